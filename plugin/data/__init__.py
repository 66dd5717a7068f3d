"""Data that ships with loraforge and the one Alpaca reader every entry point shares.

`alpaca_dataset` turns Alpaca records (`instruction`, optional `input`, `output`) into the
prompt/completion rows TRL's `SFTTrainer` trains on (loss on the completion only; TRL appends the
EOS token). The prompt is `loraforge.eval.prompts.alpaca_prompt`, the same template the style
evaluation prompts with, so a model trained here is evaluated zero-shot on its own format.

`yelp_dir()` is the small Yelp sentiment slice shipped under `yelp/` (CC BY-SA 4.0, see its README).
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

ALPACA_FIELDS = ("instruction", "input", "output")


def alpaca_records(path=None) -> list[dict]:
    """Alpaca records from a .json (a list) or .jsonl file; None: the shipped `alpaca_mini.jsonl`;
    `yelp-rewrites` / `yelp-rewrites-heldout`: the shipped Yelp rewrites (see `yelp_rewrites`).

    Every record must have `instruction` and `output` (`input` may be absent or empty); the first
    one that does not is named in the error.
    """
    from .yelp_rewrites import SETS, yelp_rewrite_records

    if path is not None and str(path) in SETS and not Path(path).exists():
        return yelp_rewrite_records(SETS[str(path)])  # a shipped set named in a YAML job
    if path is None:
        text = resources.files(__name__).joinpath("alpaca_mini.jsonl").read_text(encoding="utf-8")
        name = "alpaca_mini.jsonl"
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"data: no file {str(path)!r}; pass a .json or .jsonl file of Alpaca records")
        from ..core.files import read_utf8

        text, name = read_utf8(path, "data"), str(path)
    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ValueError(f"data: {name} is not JSON / JSON Lines ({exc.msg} at line {exc.lineno}); "
                         "expected Alpaca records {instruction, input, output}") from None
    if not isinstance(records, list) or not records:
        raise ValueError(f"data: {name} holds no records; expected a list of Alpaca records {{instruction, input, output}}")
    check_alpaca(records, name)
    return records


def check_alpaca(records, name: str = "records") -> None:
    for i, r in enumerate(records):
        missing = {"instruction", "output"} - set(r) if isinstance(r, dict) else {"instruction", "output"}
        if missing:
            raise ValueError(f"data: record {i} of {name} lacks {sorted(missing)} "
                             "(Alpaca format expected: instruction, input, output)")
        for field in ALPACA_FIELDS:
            if not isinstance(r.get(field, ""), str) and not (field == "input" and r[field] is None):
                raise ValueError(f"data: record {i} of {name} has {field}: {json.dumps(r[field])}; it must be a string")


def alpaca_dataset(source=None):
    """A `datasets.Dataset` of `prompt` / `completion` rows for `SFTTrainer` from Alpaca records.

    `source`: a path to a .json/.jsonl file, a list of record dicts, a `datasets.Dataset` with
    Alpaca columns, or None for the shipped 318-record set.
    """
    from datasets import Dataset

    from ..eval.prompts import alpaca_prompt

    if source is None or isinstance(source, (str, Path)):
        records = alpaca_records(source)
    else:
        records = list(source)
        check_alpaca(records)
    return Dataset.from_list([
        {"prompt": alpaca_prompt(r["instruction"], r.get("input") or ""), "completion": r["output"]}
        for r in records
    ])


def yelp_dir() -> Path:
    """Folder of the shipped Yelp slice (sentiment.{dev,test}.{0,1}, reference.{0,1})."""
    return Path(str(resources.files(__name__).joinpath("yelp")))
