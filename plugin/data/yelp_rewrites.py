"""The quickstart's task: Yelp sentiment transfer, from the human rewrites shipped in `yelp/`.

`reference.0` / `reference.1` hold 500 negative / positive sentences, each with a human rewrite in
the opposite sentiment. Each pair becomes an Alpaca record with the evaluation's own instruction
(`loraforge.eval.prompts.TASKS`), so a model trained here is scored by `eval-style` on its training
format. The first `HELDOUT` lines of each file are kept out of training, so the README's demo
(`eval-style --limit 50` reads the first 50 inputs) scores sentences the adapter never saw; the
first `LOSS_LINES` of them give the quickstart's held-out loss (few, because each costs a forward
pass of the model on a CPU, twice). Directions alternate (neg→pos, pos→neg, ...) so any prefix holds both.
"""
from __future__ import annotations

from pathlib import Path

HELDOUT = 100
LOSS_LINES = 16
SETS = {"yelp-rewrites": "train", "yelp-rewrites-heldout": "heldout"}


def yelp_rewrite_records(split: str = "train") -> list[dict]:
    """Alpaca records {instruction, input, output} of the shipped Yelp rewrites.

    Args:
        split: "train" (lines HELDOUT.. of each reference file, 800 records) or "heldout" (the
            first LOSS_LINES lines, 32 records).

    Returns:
        The records, neg→pos and pos→neg alternating.
    """
    from ..eval.prompts import TASKS

    if split not in ("train", "heldout"):
        raise ValueError(f"split: {split!r} is not 'train' or 'heldout'")
    per_file = []
    for name, task in (("reference.0", "yelp-neg2pos"), ("reference.1", "yelp-pos2neg")):
        lines = Path(__file__).with_name("yelp").joinpath(name).read_text(encoding="utf-8").splitlines()
        lines = lines[HELDOUT:] if split == "train" else lines[:LOSS_LINES]
        pairs = [line.split("\t", 1) for line in lines]
        per_file.append([{"instruction": TASKS[task].instruction, "input": src.strip(), "output": out.strip()}
                         for src, out in pairs])
    return [record for pair in zip(*per_file) for record in pair]
