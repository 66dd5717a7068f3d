#!/usr/bin/env bash
# CI, Axolotl part: build the Axolotl venv (.venv-axolotl, Python 3.11: axolotl 0.19.0 and its own
# transformers / trl / peft pins) and run the Axolotl tests in it. Measured on 2 CPU cores: install
# ~3 min (torch from the local wheel, axolotl 2.3 min, loraforge's own extra deps 0.5 min), tests
# ~2.5 min; 12 min in all when the machine was busy with other jobs. A venv that already has
# axolotl 0.19.0 and torch 2.13.0 is reused (rm -rf .venv-axolotl to rebuild it).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_DISABLED=true
VENV=.venv-axolotl
PY="$VENV/bin/python"
if ! "$PY" -c "import axolotl, torch, sys; sys.exit(axolotl.__version__ != '0.19.0' or not torch.__version__.startswith('2.13.0'))" 2>/dev/null; then
    rm -rf "$VENV"
    python3.11 -m venv "$VENV"
    # torch first and pinned for good: pip takes the local CPU wheel; axolotl must not replace it with a CUDA build.
    "$PY" -m pip install -q "torch==2.13.0"
    echo "torch==2.13.0" > "$VENV/constraints.txt"
    "$PY" -m pip install -q -c "$VENV/constraints.txt" "axolotl==0.19.0" pytest
fi
# loraforge itself: its missing dependencies (matplotlib, gguf, ...) but no version of what Axolotl pinned.
"$PY" -m pip freeze --exclude-editable > "$VENV/frozen.txt"
"$PY" -m pip install -q -c "$VENV/frozen.txt" -e .
"$PY" -m pytest tests/test_axolotl_integration.py tests/test_axolotl_configs.py -W ignore
