#!/usr/bin/env bash
# CI, Axolotl part: build the Axolotl venv (.venv-axolotl: Python 3.12, axolotl 0.21.0 with its own
# torch / transformers / trl / peft pins) and run every tests/integrations/test_axolotl*.py file in it.
# Axolotl 0.21 needs Python >= 3.12; pip takes torch 2.14.1 from PyPI (a CUDA build: it runs on the
# CPU), ~7.6 GB in all: 3.5 min on a quiet machine, 17 min on a busy 2-core one (empty pip cache).
# The Axolotl tests took ~3 min before the packing / scheduler / validation tests were added (a few
# more minutes of CPU); the whole job is not yet timed end to end on the CI machine.
# A venv that already has axolotl 0.21.0 is reused (rm -rf .venv-axolotl to rebuild it).
# Only 0.21 is tested: 0.19 (Python 3.11) would add a second ~7 GB venv and ~10 min.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1 AXOLOTL_DO_NOT_TRACK=1 \
    WANDB_DISABLED=true OMP_NUM_THREADS=1
AXOLOTL=0.21.0
VENV=.venv-axolotl
PY="$VENV/bin/python"

python312() {
    # python3.12 on PATH (one that runs: a pyenv shim of a version not selected does not), else the
    # newest 3.12 that pyenv has (these machines: pyenv 3.12.1).
    if python3.12 -c "" >/dev/null 2>&1; then
        command -v python3.12
    elif command -v pyenv >/dev/null 2>&1 && version=$(pyenv versions --bare | grep -E '^3\.12(\.[0-9]+)?$' | sort -V | tail -1) \
            && [ -n "$version" ]; then
        PYENV_VERSION="$version" pyenv which python
    else
        echo ".ci/axolotl.sh: axolotl $AXOLOTL needs Python 3.12: put python3.12 on PATH or install it with pyenv" >&2
        return 1
    fi
}

if ! "$PY" -c "import axolotl, sys; sys.exit(axolotl.__version__ != '$AXOLOTL' or sys.version_info[:2] != (3, 12))" 2>/dev/null; then
    rm -rf "$VENV"
    "$(python312)" -m venv "$VENV"
    "$PY" -m pip install -q "axolotl==$AXOLOTL" pytest
fi
# loraforge itself: its missing dependencies (matplotlib, gguf, ...) but no version of what Axolotl pinned.
"$PY" -m pip freeze --exclude-editable > "$VENV/frozen.txt"
"$PY" -m pip install -q -c "$VENV/frozen.txt" -e .
"$PY" -m pytest tests/integrations/test_axolotl*.py -W ignore
