"""Tiny offline models, tokenizer and data for tests, benchmarks and the offline demo.

Nothing here downloads anything: the model is a randomly initialised Llama-shaped network and the
tokenizer is a byte-level BPE trained in-process on the shipped instruction set.
"""
from __future__ import annotations

import functools

import torch

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def alpaca_records() -> list[dict]:
    """The project's own Alpaca-style instruction set (instruction / input / output)."""
    from .data import alpaca_records as shipped

    return shipped()


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(r.values()) for r in alpaca_records()]
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 512):
    """A `PreTrainedTokenizerFast` with pad/bos/eos set and a minimal chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    return tok


def tiny_llama_config(vocab_size: int = 512, hidden: int = 64, layers: int = 2, **overrides):
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    """A randomly initialised Llama-shaped causal LM (about 0.1 M parameters by default)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**config_overrides))
    return model.to(dtype)


def save_tiny_model(path, seed: int = 0, **config_overrides) -> str:
    """Write a tiny Llama and its tokenizer as a model folder that `from_pretrained` loads."""
    model = tiny_llama(seed=seed, **config_overrides)
    model.save_pretrained(path)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return str(path)


def alpaca_text(record: dict) -> str:
    """The Alpaca prompt (the same one evaluation uses) followed by the response."""
    from .eval.prompts import alpaca_prompt

    return alpaca_prompt(record["instruction"], record.get("input", "")) + record["output"]


def lm_dataset(tokenizer, records: list[dict], max_length: int = 128):
    """A `datasets.Dataset` of input_ids / attention_mask / labels, padded to `max_length`."""
    from datasets import Dataset

    enc = tokenizer([alpaca_text(r) + tokenizer.eos_token for r in records], truncation=True,
                    max_length=max_length, padding="max_length")
    labels = [[t if m else -100 for t, m in zip(ids, mask)] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    return Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})


def axolotl_workdir(root, attention=("q_proj", "k_proj", "v_proj", "o_proj")):
    """What the headers of `example_configs/axolotl/tiny/*.yaml` tell a user to prepare in `root`: the tiny
    model, the Alpaca data, a CoRA basis of the attention projections, and the YAMLs themselves."""
    import json
    import shutil
    from pathlib import Path

    from .cora.extract import extract_basis

    root = Path(root)
    save_tiny_model(root / "tiny-model")
    with open(root / "alpaca.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in alpaca_records())
    tuned = [save_tiny_model(root / f"tuned-{i}", seed=i) for i in (1, 2, 3)]
    extract_basis(tuned, 4, list(attention), str(root / "cora-basis.safetensors"), progress=False)
    for path in (Path(__file__).resolve().parents[1] / "example_configs" / "axolotl" / "tiny").glob("*.yaml"):
        shutil.copy(path, root)
    return root


class CollectiveCounter:
    """Counts the collectives this process calls while active (`with CollectiveCounter() as n: ...;
    n.count`): every public collective of `torch.distributed` and of its functional collectives
    (DTensor's), the outermost call only (one that calls another counts once). For tests and benchmarks."""

    _KINDS = ("all_", "reduce", "broadcast", "scatter", "gather")

    def __init__(self) -> None:
        self.count, self.names, self._depth, self._saved = 0, {}, 0, []

    def __enter__(self) -> "CollectiveCounter":
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        for module in (dist, funcol):
            for name in dir(module):
                fn = getattr(module, name)
                if (name.startswith(self._KINDS) and callable(fn) and not isinstance(fn, type)
                        and not name.endswith(("_backward", "_setup_context"))):
                    self._saved.append((module, name, fn))
                    setattr(module, name, self._wrap(name, fn))
        return self

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self._depth == 0:
                self.count += 1
                self.names[name] = self.names.get(name, 0) + 1
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
        return counted

    def __exit__(self, *exc) -> None:
        for module, name, fn in reversed(self._saved):
            setattr(module, name, fn)
        self._saved = []
