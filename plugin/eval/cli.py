"""Command-line entry points of the style-transfer evaluation (parsers in `loraforge_cli`).

Each takes the parsed arguments and returns an exit code; bad input ends in one line on stderr
naming the flag and exit code 2, not a traceback. `*_main(argv)` parse first (for callers that
hold an argument list).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _fail(prog: str, error: Exception) -> int:
    print(f"loraforge {prog}: error: {error}", file=sys.stderr)
    return 2


def _parse(name: str, argv: list[str]):
    from loraforge_cli import parse

    return parse(name, argv)


def eval_style(a) -> int:
    from loraforge_cli import UsageError

    if a.adapter and not a.model:
        raise UsageError("--adapter needs --model (the base the adapter was trained on)")
    from loraforge_cli import EVAL_DIR

    from .pipeline import evaluate_style

    if a.out is None:
        system = a.system_name or (Path(a.adapter).name if a.adapter else Path(a.hypotheses).stem if a.hypotheses
                                   else "base")
        a.out = str(Path(EVAL_DIR, "results", f"{system}.{a.task}.json"))

    try:
        result = evaluate_style(
            a.task, a.inputs, a.references, model=a.model, adapter=a.adapter, hypotheses=a.hypotheses,
            classifier=a.classifier, lm=a.lm, out=a.out, system_name=a.system_name, protocol=a.protocol,
            template=a.prompt, batch_size=a.batch_size, num_beams=a.num_beams, max_new_tokens=a.max_new_tokens,
            dtype=a.dtype, device=a.device, limit=a.limit, bleu_tokenize=a.bleu_tokenize,
            bleu_lowercase=a.bleu_lowercase, lm_normalize=a.lm_normalize, progress=not a.no_progress,
        )
    except (FileNotFoundError, ValueError) as e:
        return _fail("eval-style", e)
    print(json.dumps({"system": result["system"], "task": result["task"], "protocol": result["protocol"],
                      **result["metrics"]}))
    print(f"results: {a.out}; rewrites: {result['outputs_file']}")
    return 0


def report(a) -> int:
    from .report import load_results, make_report

    try:
        text = make_report(load_results(a.results))
    except (FileNotFoundError, ValueError) as e:
        return _fail("eval-style-report", e)
    print(text, end="")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text, encoding="utf-8")
    return 0


def train_classifier(a) -> int:
    from loraforge_cli import UsageError

    names = tuple(a.names.split(","))
    if len(names) != 2:
        raise UsageError(f"--names needs two comma-separated names, got {a.names!r}")
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


def train_kenlm(a) -> int:
    from loraforge_cli import EVAL_DIR

    from .arpa import write_arpa

    if a.out is None:
        a.out = str(Path(EVAL_DIR, "lm", Path(a.corpus).name + ".arpa"))
    from .texts import normalize, read_lines

    try:
        lines = [normalize(s, a.normalize) for s in read_lines(a.corpus, "--corpus")]
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        info = write_arpa([s for s in lines if s], a.out, order=a.order)
    except (FileNotFoundError, ValueError) as e:
        return _fail("train-kenlm", e)
    counts = ", ".join(f"{n}-grams {c}" for n, c in enumerate(info["ngrams"], start=1))
    print(f"wrote {a.out} ({counts}) in {info['seconds']:.1f} s")
    return 0


def eval_style_main(argv: list[str]) -> int:
    return eval_style(_parse("eval-style", argv))


def report_main(argv: list[str]) -> int:
    return report(_parse("eval-style-report", argv))


def train_classifier_main(argv: list[str]) -> int:
    return train_classifier(_parse("train-style-classifier", argv))


def train_kenlm_main(argv: list[str]) -> int:
    return train_kenlm(_parse("train-kenlm", argv))
