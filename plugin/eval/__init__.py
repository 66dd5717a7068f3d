"""Zero-shot style-transfer evaluation as in the SaLoRA paper (Table 2): ACC, BLEU and KenLM PPL.

Names are imported on first use so that `loraforge train-kenlm` and friends do not pay for
torch and transformers when they do not need them.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TASKS": "prompts", "Task": "prompts", "build_prompt": "prompts", "alpaca_prompt": "prompts",
    "get_task": "prompts",
    "read_lines": "texts", "read_references": "texts", "normalize": "texts",
    "load_model": "generate", "generate_rewrites": "generate",
    "bleu": "metrics", "perplexity": "metrics",
    "train_style_classifier": "classifier", "StyleClassifier": "classifier", "style_accuracy": "classifier",
    "write_arpa": "arpa", "kneser_ney": "arpa",
    "evaluate_style": "pipeline",
    "load_results": "report", "make_report": "report",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
