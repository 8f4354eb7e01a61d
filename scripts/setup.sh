#!/usr/bin/env bash
# Make (once) and fill the project's virtual environment, .venv, and print its python's path last.
#   scripts/setup.sh [EXTRAS]     EXTRAS: pip extras to install, e.g. "test,load" (default "load")
# Never installs into the system Python (PEP 668 keeps Debian's and Ubuntu's closed, and rightly).
# Root is used only for apt-get (sudo otherwise). A second run checks what is installed and skips.
#
# Which Python makes the environment: $PYTHON, else Debian's /usr/bin/python3 where it exists, else
# python3 on the PATH. Which torch: torch==2.13.0 (the project's range allows it), installed before the
# project so pip never picks a newer build. Where `nvidia-smi` lists a GPU, that is the CUDA build from
# the package index; where it does not, the CPU build (set UNBROKEN_TORCH_INDEX_URL to an index serving
# CPU wheels, or UNBROKEN_TORCH_SPEC to choose another torch altogether).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-load}
venv=${UNBROKEN_VENV:-.venv}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
    echo "setup: installing Debian package(s) $* with apt-get" >&2
    as_root apt-get update -qq >&2 && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

if [ -n "${PYTHON:-}" ]; then base_py=$PYTHON
elif [ -x /usr/bin/python3 ]; then base_py=/usr/bin/python3
else base_py=python3; fi

if ! command -v redis-server >/dev/null 2>&1; then apt_install redis-server; fi

if [ ! -x "$venv/bin/python" ]; then
    if ! "$base_py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
        ver=$("$base_py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        apt_install "python$ver-venv" || apt_install python3-venv
    fi
    echo "setup: creating $venv with $("$base_py" -c 'import sys; print(sys.executable, sys.version.split()[0])')" >&2
    "$base_py" -m venv "$venv"
fi
py="$venv/bin/python"
pip_install() { "$py" -m pip install -q --disable-pip-version-check "$@" >&2; }

# torch first: the project's range is then satisfied and pip pulls nothing bigger.
torch_spec=${UNBROKEN_TORCH_SPEC:-torch==2.13.0}
torch_version() { "$py" -c 'from importlib.metadata import version; print(version("torch"))' 2>/dev/null; }
if ! torch_version >/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "setup: nvidia-smi lists a GPU: installing $torch_spec (CUDA build)" >&2
        pip_install "$torch_spec"
    else
        echo "setup: no NVIDIA GPU: installing $torch_spec (CPU build)" >&2
        if [ -n "${UNBROKEN_TORCH_INDEX_URL:-}" ]; then
            pip_install --index-url "$UNBROKEN_TORCH_INDEX_URL" "$torch_spec"
        else
            pip_install "$torch_spec"
        fi
    fi
fi
case "$(torch_version)" in
    *+cpu) echo "setup: torch $(torch_version), the CPU build" >&2 ;;
    *) echo "setup: torch $(torch_version) (the package index's build: CUDA on Linux x86_64)" >&2 ;;
esac

# The project: skipped when the installed distribution already satisfies pyproject.toml's
# requirements and extras (a second run starts in seconds).
if ! "$py" scripts/check_installed.py "$extras" >/dev/null 2>&1; then
    echo "setup: installing the project with extras [$extras]" >&2
    pip_install -e ".[$extras]"
fi
echo "$py"
