#!/usr/bin/env bash
# Install the project (torch==2.13.0 first, so no CUDA build is pulled), then bring up the whole
# local stack: a Redis of its own, replicas of the tiny Qwen model, kvsync sidecars and the gateway.
# Extra arguments go to `unbroken up` (e.g. --replicas 3 --port 8000 --model PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server (Debian package)"
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null; fi
fi
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e ".[load]"
exec "$PY" -m unbroken.cli up "$@"
