#!/usr/bin/env bash
# Bring up the whole local stack on the embedded default: a Redis of its own, replicas of the tiny
# Qwen model, kvsync sidecars and the gateway. The first run makes .venv (scripts/setup.sh: torch
# 2.13.0 first, then the project); later runs find it complete and start in seconds.
# Extra arguments go to `unbroken up` (e.g. --replicas 3 --port 8000 --model PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
py=$(./scripts/setup.sh replica,load)
exec "$py" -m unbroken.cli up "$@"
