"""`loraforge train [CONFIG.yaml]`: supervised fine-tuning with a loraforge adapter from one YAML.

Keys (all optional but `adapter`; with no config at all the shipped quickstart runs; `train --help`
lists the same keys, from `loraforge_cli.TRAIN_KEYS`, and a test keeps both in step with TOP_KEYS):
  model: local folder or hub id (null: the embedded SmolLM2-135M-Instruct)
  dtype: float32 (default) | bfloat16 | float16: the dtype the base weights are loaded in
  load_in_4bit / load_in_8bit: true: load the base quantised by bitsandbytes (QLoRA: NF4 with double
    quantisation, compute in `dtype`; or LLM.int8), the key names TRL's ModelConfig and Axolotl use
  data: a .json/.jsonl file of Alpaca records {instruction, input, output} (null: the shipped set)
  eval_data: held-out records in the same format; the held-out loss before and after training is
    printed at the end (default: none)
  max_length: tokens per example (default 256)
  adapter: {method: <a registered method, e.g. salora>, ...fields of that method's config}
  training: fields of trl.SFTConfig (output_dir, max_steps, learning_rate, ...)
The run goes through `LoraForgeSFTTrainer`, so every method's training dynamics are driven.
"""
from __future__ import annotations

import dataclasses
import warnings
from importlib import resources
from pathlib import Path

import yaml

TOP_KEYS = {"model", "dtype", "load_in_4bit", "load_in_8bit", "data", "eval_data", "max_length", "adapter", "training"}
DTYPES = ("float32", "bfloat16", "float16")


class TrainConfigError(ValueError):
    """A mistake in the YAML job; the message names the key and the fix."""


def load_config(path: str | None) -> dict:
    if path is None:
        text = resources.files("loraforge.data").joinpath("quickstart.yaml").read_text()
    else:
        from loraforge_cli import check_config_file

        check_config_file(path)
        text = Path(path).read_text()
    try:
        cfg = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        from loraforge_checks import yaml_error

        raise TrainConfigError(yaml_error(path or "quickstart.yaml", exc)) from None
    if not isinstance(cfg, dict):
        raise TrainConfigError(f"{path}: the YAML must be a mapping of keys {sorted(TOP_KEYS)}, got {type(cfg).__name__}")
    unknown = set(cfg) - TOP_KEYS
    if unknown:
        raise TrainConfigError(f"unknown top-level key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    if cfg.get("dtype", "float32") not in DTYPES:
        raise TrainConfigError(f"dtype: {cfg['dtype']!r} is not one of {list(DTYPES)}")
    if cfg.get("load_in_4bit") and cfg.get("load_in_8bit"):
        raise TrainConfigError("load_in_8bit: set one of load_in_4bit / load_in_8bit, not both")
    if not isinstance(cfg.get("adapter"), dict) or "method" not in cfg["adapter"]:
        from .registry import methods

        raise TrainConfigError(f"adapter: a block with `method: {' | '.join(methods())}` is required")
    return cfg


def adapter_config(block: dict):
    """Build the method's config from the YAML block; unknown fields are named in the error."""
    from .registry import methods

    block = dict(block)
    method = block.pop("method")
    known = methods()
    if method not in known:
        raise TrainConfigError(f"adapter.method: {method!r} is not one of {sorted(known)}")
    cls = known[method].config
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(block) - fields
    if unknown:
        from loraforge_checks import unknown_keys

        raise TrainConfigError(unknown_keys("adapter", unknown, fields, f"they must be fields of {cls.__name__}"))
    block.setdefault("task_type", "CAUSAL_LM")
    return cls(**block)


def quantization(cfg: dict, dtype):
    """The bitsandbytes config of `load_in_4bit` / `load_in_8bit` (None: full precision). 4-bit is the
    QLoRA recipe (NF4, double quantisation), computing in the run's `dtype`."""
    if cfg.get("load_in_4bit"):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if cfg.get("load_in_8bit"):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def alpaca_prompt(record: dict) -> str:
    from .eval.prompts import alpaca_prompt as template

    return template(record["instruction"], record.get("input", ""))


def check_model(model_path: str):
    """Refuse a `model:` that is neither a model folder nor a cached hub model, before any loading
    (transformers would otherwise end in an unrelated "Repo id must use alphanumeric chars").
    Returns the model's config."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        raise TrainConfigError(
            f"model: {model_path!r} is not a model folder (config.json and weights) nor a model in the Hugging Face "
            "cache; set `model:` to a local folder, or to null for the embedded SmolLM2-135M-Instruct "
            "(nothing is downloaded)") from None


def check_targets(model_config, peft_config, model_path: str) -> None:
    """Refuse `target_modules` that match no module, listing the Linear layer names the model has;
    the module tree comes from the config on the meta device, so no weight is loaded for this."""
    import torch
    import torch.nn as nn
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoModelForCausalLM

    targets = peft_config.target_modules
    if targets is None or targets == "all-linear":
        return
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    if any(check_target_module_exists(peft_config, name) for name, _ in model.named_modules()):
        return
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
    shown = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
    raise TrainConfigError(f"adapter.target_modules: {shown} match no module of {model_path}; its Linear layers "
                           f"are named {linear}")


# PEFT 0.21 and TRL 1.16 read `model.is_gradient_checkpointing`, which transformers 5.24 deprecated:
# a FutureWarning on every run that the user cannot act on (the code reading it is the libraries').
_LIBRARY_DEPRECATIONS = r"`is_gradient_checkpointing` is deprecated"


def run(cfg: dict) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from .core.checkpoint import save_adapter_atomically
    from .core.sft import LoraForgeSFTTrainer
    from .data import alpaca_dataset
    from .heldout import heldout_line, heldout_loss
    from .models import default_model_path

    peft_config = adapter_config(cfg["adapter"])
    try:
        dataset = alpaca_dataset(cfg.get("data"))  # read and checked before any model is loaded
        heldout = alpaca_dataset(cfg["eval_data"]) if cfg.get("eval_data") else None
    except ValueError as exc:
        raise TrainConfigError(str(exc)) from None
    model_path = str(cfg.get("model") or default_model_path())
    check_targets(check_model(model_path), peft_config, model_path)
    training = dict(cfg.get("training") or {})
    training.setdefault("output_dir", "outputs/loraforge")
    training.setdefault("max_length", cfg.get("max_length", 256))
    training.setdefault("report_to", [])
    if training.get("use_cpu"):
        # TRL's configs default bf16 to True; on a CPU that autocasts every matmul to bf16, which CPUs
        # without bf16 units run several times slower than fp32 (measured ~5x on the quickstart).
        training.setdefault("bf16", False)
    # TRL's configs default the deprecated `gradient_checkpointing` to True, which warns on every
    # run; the same setting under its new name keeps TRL's default without the warning (TRL < 1.16,
    # as Axolotl 0.21 pins, has only the old name).
    if "activation_checkpointing" in SFTConfig.__dataclass_fields__:
        training.setdefault("activation_checkpointing", training.pop("gradient_checkpointing", True))
    fields = {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    if set(training) - fields:
        from loraforge_checks import unknown_keys

        raise TrainConfigError(unknown_keys("training", set(training) - fields, fields,
                                            "they must be fields of trl.SFTConfig"))
    from .core.finite import check_numbers

    check_numbers(training, SFTConfig, "training")
    try:
        args = SFTConfig(**training)
    except TypeError as exc:
        raise TrainConfigError(f"training: {exc}") from exc
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = getattr(torch, cfg.get("dtype") or "float32")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, quantization_config=quantization(cfg, dtype))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_LIBRARY_DEPRECATIONS, category=FutureWarning)
        trainer = LoraForgeSFTTrainer(
            model=model, args=args, train_dataset=dataset, eval_dataset=heldout, processing_class=tok,
            peft_config=peft_config,
        )
        before = heldout_loss(trainer) if heldout is not None else None
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    save_adapter_atomically(trainer, args.output_dir)
    if before is not None:
        print(heldout_line(before, heldout_loss(trainer), len(heldout), cfg["eval_data"]))
    return args.output_dir


def report_outputs(out: str) -> None:
    """The closing lines of a run: where the adapter went and what each method's run wrote beside it
    (`Method.report`, e.g. SaLoRA's rank table and heat map)."""
    from .registry import methods

    out_dir = Path(out).resolve()
    print(f"adapter saved to {out_dir}")
    for method in methods().values():
        for line in method.report(out_dir) if method.report else ():
            print(line)


def run_args(args) -> int:
    """`loraforge train` with parsed arguments (see loraforge_cli)."""
    cfg = load_config(args.config)
    training = cfg.get("training") or {}
    cfg["training"] = training
    if args.max_steps is not None:
        training["max_steps"] = args.max_steps
    if args.output_dir is not None:
        training["output_dir"] = args.output_dir
    from .core.checkpoint import resume_point
    from .core.run_lock import hold

    out = training.setdefault("output_dir", "outputs/loraforge")
    with hold(out):  # one job per output folder; then resume, refuse or start over
        training["resume_from_checkpoint"] = resume_point(
            out, getattr(args, "resume", False) or training.get("resume_from_checkpoint"), getattr(args, "overwrite", False))
        report_outputs(run(cfg))
    return 0


def main(argv: list[str]) -> int:
    from loraforge_cli import parse

    return run_args(parse("train", argv))
