#!/usr/bin/env bash
# Install what the tests need into .venv (scripts/setup.sh: torch 2.13.0 first, then the project
# with its test extras; skipped when already satisfied) and run them. This is what CI runs.
# Extra arguments go to pytest (e.g. tests/unit, -k failover, -m slow; a slow run adds the engines extra).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=replica,test,load,tokens
# The slow tests also run a real llama.cpp server: its extra builds llama.cpp from source (minutes),
# so only a run that selects slow tests installs it.
case " $* " in *slow*) extras="$extras,engines" ;; esac
py=$(./scripts/setup.sh "$extras")
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
set +e
"$py" -m pytest -p no:cacheprovider -q --durations=15 "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "no tests ran: failing" >&2; exit 1; fi
exit "$rc"
