"""Reading sentence files and reference files, and the tokenisation used before KenLM.

Errors name the command-line flag the file came from, so a user can tell which path to fix.
"""
from __future__ import annotations

import re
from pathlib import Path


def read_lines(path, flag: str = "file") -> list[str]:
    """One sentence per line, trailing newline and surrounding whitespace dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no such file {str(path)!r}; pass the path of an existing text file")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def read_references(path, inputs: list[str] | None = None, flag: str = "--references") -> list[str]:
    """One reference per input, from a plain file or an `input<TAB>rewrite` file (Yelp's format).

    A file is read as the tab format when every non-empty line holds exactly one tab. Its input
    column is then checked against `inputs`: a reference file for the other direction is the
    easy mistake (reference.1 scored against sentiment.test.0) and it would otherwise pass
    silently with a low BLEU.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no such file {str(path)!r}; pass the path of an existing reference file")
    raw = [line.rstrip("\r\n") for line in path.read_text(encoding="utf-8").splitlines()]
    filled = [line for line in raw if line.strip()]
    if filled and all(line.count("\t") == 1 for line in filled):
        pairs = [line.split("\t") if line.strip() else ["", ""] for line in raw]
        refs = [rewrite.strip() for _, rewrite in pairs]
        if inputs is not None and len(pairs) == len(inputs):
            for i, ((src, _), inp) in enumerate(zip(pairs, inputs), start=1):
                if src.split() != inp.split():
                    raise ValueError(
                        f"{flag}: {path} line {i} has input {src.strip()!r} but --inputs line {i} is "
                        f"{inp!r}; pass the reference file written for these inputs (same order)"
                    )
    else:
        refs = [line.strip() for line in raw]
    if inputs is not None and len(refs) != len(inputs):
        raise ValueError(
            f"{flag}: {path} has {len(refs)} references but --inputs has {len(inputs)} sentences; "
            "each reference file needs exactly one line per input"
        )
    return refs


_CLITIC_NT = re.compile(r"(\w)n't\b")
_CLITIC = re.compile(r"(\w)'(s|re|ve|ll|d|m)\b")
_ELLIPSIS = re.compile(r"\.( \.){2,}")


def normalize(text: str, how: str) -> str:
    """Tokenise `text` like the LM's corpus before KenLM scores it.

    "yelp" reproduces the Li et al. (2018) Yelp files: lowercased, punctuation split off
    (sacrebleu's 13a tokeniser, then "..." and the corpus's "_num_" rejoined) and English clitics
    split Penn-Treebank style ("don't" -> "do n't", "it's" -> "it 's"). Without it, cased
    untokenised outputs would be scored as out-of-vocabulary words and the PPL would say more
    about tokenisation than about fluency.
    """
    if how == "none":
        return text
    if how == "lower":
        return text.lower()
    if how == "yelp":
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

        text = Tokenizer13a()(text.lower()).replace("_ num _", "_num_")
        text = _ELLIPSIS.sub("...", text)
        text = _CLITIC_NT.sub(r"\1 n't", text)
        return _CLITIC.sub(r"\1 '\2", text)
    raise ValueError(f"unknown normalisation {how!r}; choose none, lower or yelp")


NORMALIZATIONS = ("none", "lower", "yelp")
