"""`loraforge` console script: one sub-command per job, each implemented beside its method.

Sub-commands are imported lazily so that `loraforge --help` stays fast and a command's heavy
dependencies (kenlm, sacrebleu) are only needed by the command that uses them.
"""
from __future__ import annotations

import importlib
import sys

# name -> (module, function, one-line help); each function takes the remaining argv list.
COMMANDS = {
    "train": ("loraforge.train", "main", "SFT with a loraforge adapter from a YAML config"),
    "ranks": ("loraforge.salora.cli", "ranks_main", "per-module rank table of a SaLoRA adapter"),
    "export": ("loraforge.core.export", "main", "write a loraforge adapter as a stock PEFT LoRA adapter"),
    "cora-extract": ("loraforge.cora.cli", "extract_main", "common-subspace basis from fine-tuned models"),
    "eval-style": ("loraforge.eval.cli", "eval_style_main", "zero-shot style transfer: ACC / BLEU / PPL"),
    "eval-style-report": ("loraforge.eval.cli", "report_main", "Table-2 style comparison of results files"),
    "train-style-classifier": ("loraforge.eval.cli", "train_classifier_main", "fine-tune the ACC classifier"),
    "train-kenlm": ("loraforge.eval.cli", "train_kenlm_main", "write an n-gram ARPA model for PPL"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: loraforge COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"loraforge: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func, _ = COMMANDS[name]
    return int(getattr(importlib.import_module(module), func)(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
