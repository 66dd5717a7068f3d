"""Command-line entry points of the style-transfer evaluation (dispatched by `loraforge.cli`).

Each takes the argument list after the sub-command and returns an exit code; bad input ends in
one line on stderr naming the flag and exit code 2, not a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .prompts import TASKS, TEMPLATES
from .texts import NORMALIZATIONS


def _fail(prog: str, error: Exception) -> int:
    print(f"loraforge {prog}: error: {error}", file=sys.stderr)
    return 2


def eval_style_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="loraforge eval-style",
                                description="Zero-shot style transfer: generate rewrites, score ACC / BLEU / PPL.")
    p.add_argument("--model", help="base model folder (generates the rewrites)")
    p.add_argument("--adapter", help="adapter folder to load on the base model")
    p.add_argument("--hypotheses", help="score this file of rewrites (one per input) instead of generating")
    p.add_argument("--task", required=True, choices=list(TASKS))
    p.add_argument("--inputs", required=True, help="source sentences, one per line")
    p.add_argument("--references", required=True, nargs="+",
                   help="reference files, one line per input: plain or `input<TAB>rewrite`")
    p.add_argument("--classifier", help="style classifier folder (train-style-classifier); enables ACC")
    p.add_argument("--lm", help="KenLM model of the target style (.arpa or binary); enables PPL")
    p.add_argument("--out", required=True, help="results JSON; rewrites go to <stem>.outputs.txt beside it")
    p.add_argument("--system-name", help="row label in reports (default: adapter folder name, or 'base')")
    p.add_argument("--prompt", default="alpaca", choices=list(TEMPLATES),
                   help="alpaca: Stanford Alpaca template (default); paper: Table A3 as printed")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-beams", type=int, default=1, help="1 = greedy decoding (default)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--limit", type=int, help="evaluate only the first N inputs")
    p.add_argument("--bleu-tokenize", default="13a", help="sacrebleu tokeniser: 13a (default), intl, none, ...")
    p.add_argument("--bleu-lowercase", action="store_true", help="case-insensitive BLEU")
    p.add_argument("--lm-normalize", default="auto", choices=["auto", *NORMALIZATIONS],
                   help="tokenisation of outputs before KenLM; auto = yelp for Yelp tasks, none for GYAFC")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.adapter and not a.model:
        p.error("--adapter needs --model (the base the adapter was trained on)")
    from .pipeline import evaluate_style

    try:
        result = evaluate_style(
            a.task, a.inputs, a.references, model=a.model, adapter=a.adapter, hypotheses=a.hypotheses,
            classifier=a.classifier, lm=a.lm, out=a.out, system_name=a.system_name, template=a.prompt,
            batch_size=a.batch_size, num_beams=a.num_beams, max_new_tokens=a.max_new_tokens,
            dtype=a.dtype, device=a.device, limit=a.limit, bleu_tokenize=a.bleu_tokenize,
            bleu_lowercase=a.bleu_lowercase, lm_normalize=a.lm_normalize, progress=not a.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        return _fail("eval-style", e)
    print(json.dumps({"system": result["system"], "task": result["task"], **result["metrics"]}))
    return 0


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="loraforge eval-style-report",
                                description="Table-2 style Markdown table from eval-style results files.")
    p.add_argument("results", nargs="+", help="results JSON files written by eval-style --out")
    p.add_argument("--out", help="also write the table to this Markdown file")
    a = p.parse_args(argv)
    from .report import load_results, make_report

    try:
        text = make_report(load_results(a.results))
    except (FileNotFoundError, ValueError) as e:
        return _fail("eval-style-report", e)
    print(text, end="")
    if a.out:
        Path(a.out).write_text(text, encoding="utf-8")
    return 0


def train_classifier_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="loraforge train-style-classifier",
                                description="Fine-tune a BERT-like model to tell two styles apart (for ACC).")
    p.add_argument("--train-0", required=True, help="sentences of style 0 (negative / informal), one per line")
    p.add_argument("--train-1", required=True, help="sentences of style 1 (positive / formal), one per line")
    p.add_argument("--base", required=True, help="local BERT-like model folder to fine-tune")
    p.add_argument("--out", required=True, help="folder to save the classifier to")
    p.add_argument("--names", default="0,1",
                   help="style names of labels 0,1 (e.g. negative,positive), stored in the config")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after N steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--max-per-style", type=int, help="subsample each file to N sentences")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    names = tuple(a.names.split(","))
    if len(names) != 2:
        p.error(f"--names needs two comma-separated names, got {a.names!r}")
    from .classifier import train_style_classifier

    try:
        out = train_style_classifier(a.train_0, a.train_1, a.base, a.out, epochs=a.epochs,
                                     max_steps=a.max_steps, batch_size=a.batch_size, learning_rate=a.lr,
                                     max_length=a.max_length, max_per_style=a.max_per_style,
                                     label_names=names, seed=a.seed)
    except (FileNotFoundError, ValueError) as e:
        return _fail("train-style-classifier", e)
    print(f"saved the style classifier to {out}")
    return 0


def train_kenlm_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="loraforge train-kenlm",
                                description="Interpolated modified Kneser-Ney n-gram model, written as ARPA.")
    p.add_argument("--corpus", required=True, help="training text, one sentence per line, space-tokenised")
    p.add_argument("--order", type=int, default=5)
    p.add_argument("--out", required=True, help="ARPA file to write (kenlm loads it directly)")
    p.add_argument("--normalize", default="none", choices=list(NORMALIZATIONS),
                   help="tokenise the corpus first (use the same value as eval-style --lm-normalize)")
    a = p.parse_args(argv)
    from .arpa import write_arpa
    from .texts import normalize, read_lines

    try:
        lines = [normalize(s, a.normalize) for s in read_lines(a.corpus, "--corpus")]
        info = write_arpa([s for s in lines if s], a.out, order=a.order)
    except (FileNotFoundError, ValueError) as e:
        return _fail("train-kenlm", e)
    counts = ", ".join(f"{n}-grams {c}" for n, c in enumerate(info["ngrams"], start=1))
    print(f"wrote {a.out} ({counts}) in {info['seconds']:.1f} s")
    return 0
