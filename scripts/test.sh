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
if ! command -v promtool >/dev/null 2>&1 && [ ! -x .tools/bin/promtool ]; then
    # promtool (from Debian's prometheus package) checks the /metrics expositions. Only its binary
    # is unpacked into .tools/: installing the package would also start a Prometheus server.
    echo "unpacking promtool from Debian's prometheus package into .tools/bin"
    tmp=$(mktemp -d)
    (cd "$tmp" && { apt-get download prometheus >/dev/null 2>&1 \
                     || { [ "$(id -u)" = 0 ] && apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }; } \
        && dpkg-deb -x prometheus_*.deb x) \
        && mkdir -p .tools/bin && cp "$tmp/x/usr/bin/promtool" .tools/bin/
    rm -rf "$tmp"
fi
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
"$PY" -m pip install -q --disable-pip-version-check -e ".[test,load]"
set +e
"$PY" -m pytest -p no:cacheprovider -q "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "no tests ran: failing" >&2; exit 1; fi
exit "$rc"
