"""Loading the model under test and generating rewrites in batches."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .prompts import build_prompt


def load_model(base, adapter=None, dtype: str = "auto", device: str | None = None):
    """(model, tokenizer) for `base` with an optional adapter, in eval mode on `device`.

    The adapter goes through `loraforge.load_adapter`, which knows loraforge's own adapter
    types; without it (a bare PEFT install) `PeftModel.from_pretrained` loads stock adapters.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not Path(base).is_dir():
        raise FileNotFoundError(f"--model: no model folder {str(base)!r}; pass a local checkpoint folder "
                                "(nothing is downloaded)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    if adapter is not None:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--adapter: {str(adapter)!r} holds no adapter_config.json; "
                                    "pass a folder written by save_pretrained")
        try:
            from loraforge import load_adapter
        except ImportError:
            from peft import PeftModel

            load_adapter = PeftModel.from_pretrained
        try:
            model = load_adapter(model, str(adapter))
        except RuntimeError as exc:
            if "size mismatch" not in str(exc):
                raise
            raise ValueError(f"--adapter: {adapter} was trained on another base than {base} (its tensor shapes "
                             "differ); pass the model it was trained on with --model") from None
    return model.to(device).eval(), tokenizer


def clean_response(text: str) -> str:
    """The rewrite proper: the first non-empty line of the response.

    Outputs are stored one per line, and an instruction-tuned model that keeps going after its
    answer starts a new line ("### Instruction: ..."), so the first line is the answer.
    """
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


@torch.inference_mode()
def generate_rewrites(model, tokenizer, sentences: list[str], task, *, template: str = "alpaca",
                      batch_size: int = 8, num_beams: int = 1, max_new_tokens: int = 64,
                      progress: bool = True) -> list[str]:
    """Rewrite each sentence in the task's target style (greedy unless `num_beams` > 1).

    Prompts are padded on the left so every row's last token is its "Response:" and generation
    continues from there; they are batched longest first so a batch wastes little padding, and
    the outputs come back in input order.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "left"
    prompts = [build_prompt(task, s, template) for s in sentences]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    outputs = [""] * len(prompts)
    device = next(model.parameters()).device
    # Keep the model's own stop tokens (Llama 3 has several); fall back to the tokenizer's.
    eos = None if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc=f"generating ({len(prompts)} sentences)", disable=not progress):
        idx = order[start:start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
        generated = model.generate(
            **enc, do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, **({"eos_token_id": eos} if eos is not None else {}),
        )
        texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(idx, texts):
            outputs[i] = clean_response(text)
    return outputs
