#!/usr/bin/env bash
# Sets up everything aiosd needs, idempotently: a virtual environment in the repo, llama-cpp-python built
# portable into the project's own wheel cache, the project itself (editable), and the embedded default model
# assembled once into the state directory.  A second run takes seconds.
#
# Environment:
#   PYTHON              interpreter to build the venv from (default: python3; must be 3.11+)
#   AIOSD_WHEEL_CACHE   where built wheels are kept (default: ${XDG_CACHE_HOME:-~/.cache}/aiosd/wheels)
#   AIOSD_STATE_DIR     where the default model is assembled (default: ${XDG_STATE_HOME:-~/.local/state}/aiosd)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
LLAMA_VERSION=0.3.36
# The native build detects AMX and segfaults on the first llama_decode on AMX CPUs; build portable instead.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
CACHE_ROOT=${AIOSD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/aiosd/wheels}
FLAGS_KEY=$(printf '%s' "$LLAMA_VERSION $LLAMA_CMAKE_ARGS $(uname -m)" | sha256sum | cut -c1-16)
WHEEL_DIR="$CACHE_ROOT/llama-cpp-python-$LLAMA_VERSION-$FLAGS_KEY"

log() { printf '[install] %s\n' "$*"; }

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install: $PYTHON is missing or older than 3.11; set PYTHON=/path/to/python3.11" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"

if ! ls "$WHEEL_DIR"/llama_cpp_python-"$LLAMA_VERSION"-*.whl >/dev/null 2>&1; then
    log "building llama-cpp-python $LLAMA_VERSION (portable, takes ~4 min on 2 cores) into $WHEEL_DIR"
    mkdir -p "$WHEEL_DIR.tmp"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
        "$PY" -m pip wheel --no-cache-dir --no-deps -w "$WHEEL_DIR.tmp" "llama-cpp-python==$LLAMA_VERSION"
    rm -rf "$WHEEL_DIR"
    mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"
fi

if ! "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION')" 2>/dev/null; then
    log "installing llama-cpp-python from $WHEEL_DIR"
    "$PY" -m pip install -q --no-index --find-links "$WHEEL_DIR" --no-deps "llama-cpp-python==$LLAMA_VERSION"
fi

stamp="$VENV/.aiosd-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    log "installing aiosd and its dependencies"
    "$PY" -m pip install -q -e '.[test]'
    touch "$stamp"
fi

STATE_DIR=${AIOSD_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/aiosd}
"$PY" -m kernel.models --state-dir "$STATE_DIR" --ensure-default
log "ready: $VENV (state dir $STATE_DIR)"
