"""`loraforge export ADAPTER --out DIR [--format peft|uniform|gguf]`: a saved loraforge adapter written as a
stock PEFT LoRA adapter, or in a serving format (see `loraforge.export_formats`)."""
from __future__ import annotations

import json
import logging
import os
import sys

from .export import export_lora
from .io import load_adapter


def base_of(adapter_dir: str) -> str | None:
    """The base model an adapter was trained on, from its adapter_config.json (None if not recorded)."""
    from loraforge_cli import UsageError

    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(path):
        raise UsageError(f"no adapter_config.json in {adapter_dir!r}; pass the folder of a saved adapter")
    try:
        with open(path) as f:
            return json.load(f).get("base_model_name_or_path") or None
    except ValueError:  # empty or not JSON: the one-line answer names the file and the damage
        from .files import read_adapter_config

        read_adapter_config(adapter_dir)
        raise


def export_args(args) -> int:
    """`loraforge export` with parsed arguments (see loraforge_cli)."""
    from loraforge_cli import UsageError
    from transformers import AutoModelForCausalLM

    recorded = base_of(args.adapter)
    base = args.base or recorded
    if base is None:
        raise UsageError(f"{args.adapter}/adapter_config.json records no base_model_name_or_path; "
                         "pass the base model folder with --base")
    if not os.path.isdir(base):
        source = "--base" if args.base else f"base_model_name_or_path in {args.adapter}/adapter_config.json"
        raise UsageError(f"no base model folder {base!r} ({source}); pass the folder the adapter was trained on "
                         "with --base")
    from safetensors.torch import load_file

    from .files import WEIGHTS_NAME, check_adapter_folder
    from .finite import refuse_non_finite

    check_adapter_folder(args.adapter)  # one line for a missing, truncated or damaged file
    weights = os.path.join(args.adapter, WEIGHTS_NAME)
    if os.path.isfile(weights):
        refuse_non_finite(load_file(weights), weights)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(base), args.adapter)
    logger = logging.getLogger("loraforge.export")  # the format's summary: padding cost, Modelfile
    logger.addHandler(logging.StreamHandler(sys.stdout))
    logger.setLevel(logging.INFO)
    options = {"base_gguf": args.base_gguf} if args.format == "gguf" and args.base_gguf else {}
    try:
        ranks = export_lora(model, args.out, format=args.format, **options)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"wrote a {args.format} LoRA adapter ({len(ranks)} modules, ranks {min(ranks.values())}-"
          f"{max(ranks.values())}) from base {base} to {args.out}")
    return 0


def main(argv: list[str]) -> int:
    from loraforge_cli import parse

    return export_args(parse("export", argv))
