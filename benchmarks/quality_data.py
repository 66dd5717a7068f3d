"""Data of the quality benchmark: its fixed splits, prompts and batches.

Splits (`quality_splits.json`, shipped beside this file) are line indices into the shipped data:
`plugin/data/yelp/reference.0` (negative source TAB positive human rewrite, "neg2pos") and
`reference.1` (positive source TAB negative rewrite, "pos2neg"), and `plugin/data/alpaca_mini.jsonl`.
They are the output of `make_splits()` (a seeded permutation) written once, so a change of code cannot
move a test example into training unnoticed: the plumbing test compares the file with the function.

Every example is one chat turn of SmolLM2's template without a system prompt; the loss is the
response's tokens (the `<|im_end|>` that closes it included). Batches are left-padded so every
response ends at the last position: the LM head then runs only over the last `k` positions
(`logits_to_keep`), which is most of the saving on a 49k-token vocabulary.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "plugin" / "data"
SPLITS = Path(__file__).with_name("quality_splits.json")
DIRECTIONS = {"neg2pos": ("reference.0", "positive"), "pos2neg": ("reference.1", "negative")}
TEST_PER_DIRECTION, TRAIN_PER_DIRECTION, ALPACA_TEST = 40, 200, 50


def make_splits() -> dict:
    """Disjoint train / test line indices per source, from one seeded permutation of each."""
    out = {}
    for direction, (name, _) in DIRECTIONS.items():
        n = len((DATA / "yelp" / name).read_text().splitlines())
        order = list(range(n))
        random.Random(f"quality-{direction}").shuffle(order)
        out[direction] = {"test": sorted(order[:TEST_PER_DIRECTION]),
                          "train": sorted(order[TEST_PER_DIRECTION:TEST_PER_DIRECTION + TRAIN_PER_DIRECTION])}
    n = len((DATA / "alpaca_mini.jsonl").read_text().splitlines())
    order = list(range(n))
    random.Random("quality-alpaca").shuffle(order)
    out["alpaca"] = {"test": sorted(order[:ALPACA_TEST]), "train": sorted(order[ALPACA_TEST:])}
    return out


def load_splits() -> dict:
    return json.loads(SPLITS.read_text())


def yelp_pairs(direction: str, part: str, splits: dict | None = None) -> list[tuple[str, str]]:
    """(prompt, response) pairs of one direction and part ("train" / "test")."""
    name, target = DIRECTIONS[direction]
    lines = (DATA / "yelp" / name).read_text().splitlines()
    idx = (splits or load_splits())[direction][part]
    pairs = []
    for i in idx:
        source, rewrite = lines[i].split("\t")
        pairs.append((f"Make it {target}: {source.strip()}", rewrite.strip()))
    return pairs


def alpaca_pairs(part: str, splits: dict | None = None) -> list[tuple[str, str]]:
    lines = (DATA / "alpaca_mini.jsonl").read_text().splitlines()
    pairs = []
    for i in (splits or load_splits())["alpaca"][part]:
        rec = json.loads(lines[i])
        prompt = rec["instruction"] + (f"\n{rec['input']}" if rec.get("input") else "")
        pairs.append((prompt, rec["output"]))
    return pairs


def encode(tokenizer, pairs: list[tuple[str, str]], max_len: int = 96) -> list[tuple[list[int], int]]:
    """Token ids of each chat turn and how many of its last tokens are the response (prompt cut first)."""
    out = []
    for prompt, response in pairs:
        p = tokenizer(f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
        r = tokenizer(f"{response}<|im_end|>", add_special_tokens=False).input_ids[: max_len // 2]
        p = p[-(max_len - len(r)):]
        out.append((p + r, len(r)))
    return out


def collate(examples: list[tuple[list[int], int]], pad_id: int) -> dict:
    """Left-padded batch; `labels` covers the last `keep` positions (the response and the token before it)."""
    width = max(len(ids) for ids, _ in examples)
    keep = max(n for _, n in examples) + 1
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full((len(examples), keep), -100, dtype=torch.long)
    for row, (x, n) in enumerate(examples):
        ids[row, width - len(x):] = torch.tensor(x)
        mask[row, width - len(x):] = 1
        labels[row, keep - n:] = torch.tensor(x[-n:])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "logits_to_keep": keep}


def train_order(n: int, seed: int) -> list[int]:
    """The data order of seed `seed`: the same for every system."""
    order = list(range(n))
    random.Random(f"order-{seed}").shuffle(order)
    return order


def batches(examples: list, seed: int, steps: int, batch: int, pad_id: int):
    """`steps` batches drawn in the seed's order, cycling through the examples (a new order each pass)."""
    taken, rnd = [], 0
    while len(taken) < steps * batch:
        taken += [examples[i] for i in train_order(len(examples), seed * 1000 + rnd)]
        rnd += 1
    for s in range(steps):
        yield collate(taken[s * batch:(s + 1) * batch], pad_id)


if __name__ == "__main__":
    SPLITS.write_text(json.dumps(make_splits()) + "\n")
    print(f"wrote {SPLITS}")
