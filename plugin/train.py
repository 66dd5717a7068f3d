"""`loraforge train [CONFIG.yaml]`: supervised fine-tuning with a loraforge adapter from one YAML.

Keys (all optional but `adapter`; with no config at all the shipped quickstart runs):
  model: local folder or hub id (null: the embedded SmolLM2-135M-Instruct)
  dtype: float32 (default) | bfloat16 | float16: the dtype the base weights are loaded in
  data: a .json/.jsonl file of Alpaca records {instruction, input, output} (null: the shipped set)
  max_length: tokens per example (default 256)
  adapter: {method: salora | delta_lora | cora, ...fields of that method's config}
  training: fields of trl.SFTConfig (output_dir, max_steps, learning_rate, ...)
The run goes through `LoraForgeSFTTrainer`, so every method's training dynamics are driven.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from importlib import resources
from pathlib import Path

import yaml

TOP_KEYS = {"model", "dtype", "data", "max_length", "adapter", "training"}
DTYPES = ("float32", "bfloat16", "float16")


class TrainConfigError(ValueError):
    pass


def load_config(path: str | None) -> dict:
    if path is None:
        text = resources.files("loraforge.data").joinpath("quickstart.yaml").read_text()
    else:
        text = Path(path).read_text()
    cfg = yaml.safe_load(text) or {}
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise TrainConfigError(f"unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    if cfg.get("dtype", "float32") not in DTYPES:
        raise TrainConfigError(f"dtype: {cfg['dtype']!r} is not one of {list(DTYPES)}")
    if not isinstance(cfg.get("adapter"), dict) or "method" not in cfg["adapter"]:
        raise TrainConfigError("adapter: a block with `method: salora | delta_lora | cora` is required")
    return cfg


def adapter_config(block: dict):
    """Build the method's config from the YAML block; unknown fields are named in the error."""
    from .registry import CONFIGS

    block = dict(block)
    method = block.pop("method")
    if method not in CONFIGS:
        raise TrainConfigError(f"adapter.method: {method!r} is not one of {sorted(CONFIGS)}")
    cls = CONFIGS[method]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(block) - fields
    if unknown:
        raise TrainConfigError(f"adapter: unknown field(s) {sorted(unknown)} for {cls.__name__}")
    block.setdefault("task_type", "CAUSAL_LM")
    return cls(**block)


def alpaca_prompt(record: dict) -> str:
    from .eval.prompts import alpaca_prompt as template

    return template(record["instruction"], record.get("input", ""))


def load_records(path: str | None) -> list[dict]:
    if path is None:
        from .testing import alpaca_records

        return alpaca_records()
    text = Path(path).read_text(encoding="utf-8")
    records = json.loads(text) if text.lstrip().startswith("[") else [json.loads(x) for x in text.splitlines() if x.strip()]
    for i, r in enumerate(records):
        missing = {"instruction", "output"} - set(r)
        if missing:
            raise TrainConfigError(f"data: record {i} of {path} lacks {sorted(missing)} (Alpaca format expected)")
    return records


def build_dataset(records: list[dict], eos: str):
    from datasets import Dataset

    return Dataset.from_list(
        [{"prompt": alpaca_prompt(r), "completion": r["output"] + eos} for r in records]
    )


def run(cfg: dict) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from .core.sft import LoraForgeSFTTrainer
    from .models import default_model_path

    peft_config = adapter_config(cfg["adapter"])
    model_path = cfg.get("model") or default_model_path()
    training = dict(cfg.get("training") or {})
    training.setdefault("output_dir", "outputs/loraforge")
    training.setdefault("max_length", cfg.get("max_length", 256))
    training.setdefault("report_to", [])
    try:
        args = SFTConfig(**training)
    except TypeError as exc:
        raise TrainConfigError(f"training: {exc}") from exc
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, cfg.get("dtype") or "float32"))
    dataset = build_dataset(load_records(cfg.get("data")), tok.eos_token)
    trainer = LoraForgeSFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tok, peft_config=peft_config
    )
    if len(trainer.train_dataset) == 0:
        raise TrainConfigError(
            f"max_length: every example lost its response to truncation at {args.max_length} tokens; raise max_length"
        )
    trainer.train()
    trainer.save_model(args.output_dir)
    return args.output_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="loraforge train", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML config (default: the shipped quickstart)")
    parser.add_argument("--max-steps", type=int, help="override training.max_steps")
    parser.add_argument("--output-dir", help="override training.output_dir")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        training = cfg.setdefault("training", {}) or {}
        cfg["training"] = training
        if args.max_steps is not None:
            training["max_steps"] = args.max_steps
        if args.output_dir is not None:
            training["output_dir"] = args.output_dir
        out = run(cfg)
    except TrainConfigError as exc:
        parser.exit(2, f"loraforge train: {exc}\n")
    ranks = Path(out) / "salora_ranks.txt"
    if ranks.exists():  # SaLoRA: the per-module ranks its gates chose, and where the reports are
        print(ranks.read_text().rstrip())
        print(f"rank table: {ranks.resolve()}\nrank heat map: {ranks.with_suffix('.png').resolve()}")
    print(f"adapter saved to {Path(out).resolve()}")
    return 0
