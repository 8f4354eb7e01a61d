#!/usr/bin/env bash
# Install what the tests need, then run them. torch==2.13.0 goes first: the project's torch range
# is then already satisfied and pip pulls no multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v redis-server >/dev/null 2>&1; then
    echo "installing redis-server (Debian package)"
    if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
    else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server >/dev/null; fi
fi
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e ".[test,load]"
set +e
"$PY" -m pytest -p no:cacheprovider -q "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "no tests ran: failing" >&2; exit 1; fi
exit "$rc"
