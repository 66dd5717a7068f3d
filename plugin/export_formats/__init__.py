"""Adapter files for serving engines, written from the stock PEFT export's factors.

`peft` (the default of `export_lora`) keeps each module's own rank through `rank_pattern` /
`alpha_pattern`. The formats here are for engines that cannot read those: `uniform` (one rank and one
alpha for every module: SGLang, LoRAX, TGI, older vLLM) and `gguf` (a llama.cpp / Ollama LoRA adapter).
"""
from __future__ import annotations

FORMATS = ("peft", "uniform", "gguf")


def write(fmt: str, model, config, factors: dict, extra: dict, out_dir: str, dtype=None, **options) -> str:
    """Write the adapter in `fmt` to `out_dir`.

    Args:
        fmt (`str`): `"uniform"` or `"gguf"`.
        model: the PEFT model the factors come from (its base config names the architecture).
        config (`LoraConfig`): the stock export's config (target modules, modules_to_save, task type, base).
        factors (`dict[str, tuple[Tensor, Tensor]]`): module name -> `(B, A)` with `B @ A` the module's
            whole update (scaling folded in).
        extra (`dict[str, Tensor]`): tensors of modules trained in full (`modules_to_save`), PEFT-keyed.
        out_dir (`str`): folder to write to (created).
        dtype (`torch.dtype`, *optional*): the factors' dtype is kept by `uniform`; `gguf` writes F16 tensors
            for `torch.float16` and F32 for anything else.
        options: `gguf`: `base_gguf` (the base model's GGUF, for the Ollama Modelfile).

    Returns:
        `str`: one line saying what was written (and, for `uniform`, what the padding costs).
    """
    if fmt == "uniform":
        from .uniform import write_uniform

        return write_uniform(config, factors, extra, out_dir)
    if fmt == "gguf":
        from .gguf_lora import write_gguf

        return write_gguf(model, config, factors, extra, out_dir, dtype=dtype, **options)
    raise ValueError(f"format: must be one of {FORMATS}, got {fmt!r}")
