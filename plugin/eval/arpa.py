"""An n-gram ARPA writer: interpolated modified Kneser-Ney (Chen & Goodman 1998), as KenLM's lmplz.

Written by hand because `lmplz` is not available from PyPI; the `kenlm` module only queries.
The estimate follows lmplz:

* Counts: the highest order keeps raw counts; a lower-order n-gram gets its continuation count
  (the number of distinct words seen before it), except n-grams starting with <s>, which nothing
  can precede, so they keep raw counts.
* Discounts per order from the counts-of-counts n1..n4 of those adjusted counts:
  Y = n1 / (n1 + 2 n2), D1 = 1 - 2Y n2/n1, D2 = 2 - 3Y n3/n2, D3+ = 3 - 4Y n4/n3. When a tiny
  corpus leaves a count-of-counts empty, the fallback discounts 0.5 / 1.0 / 1.5 are used (the
  values of lmplz --discount_fallback).
* p(w|h) = (a(hw) - D(a(hw))) / a(h.) + gamma(h) p(w|h'), with
  gamma(h) = (D1 N1(h.) + D2 N2(h.) + D3+ N3+(h.)) / a(h.) and h' = h without its first word;
  unigrams interpolate with the uniform distribution over the vocabulary (words, </s>, <unk>).
  In ARPA form the stored probability is the interpolated p(w|h) and the back-off weight of h is
  gamma(h), so an unseen hw scores gamma(h) p(w|h') and every context sums to one.
"""
from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from pathlib import Path

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)


def _discounts(counts: Counter) -> tuple[float, float, float]:
    coc = Counter(min(c, 4) for c in counts.values())
    n1, n2, n3, n4 = (coc[k] for k in (1, 2, 3, 4))
    if not (n1 and n2 and n3 and n4):
        return FALLBACK_DISCOUNTS
    y = n1 / (n1 + 2 * n2)
    d = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    ok = all(0 < dk <= k for k, dk in enumerate(d, start=1))
    return d if ok else FALLBACK_DISCOUNTS


def count_ngrams(sentences, order: int) -> list[Counter]:
    """Raw counts of every n-gram (as a tuple) for n = 1..order, sentences padded with <s> ... </s>."""
    raw = [Counter() for _ in range(order)]
    for sentence in sentences:
        toks = (BOS, *sentence.split(), EOS)
        for n in range(1, order + 1):
            raw[n - 1].update(zip(*(toks[i:] for i in range(n))))
    return raw


def kneser_ney(sentences, order: int = 5):
    """Log10 probabilities and back-off weights per order: a list of {ngram: (logp, logbow|None)}."""
    if order < 2:
        raise ValueError(f"--order must be at least 2 (KenLM cannot load a unigram model), got {order}")
    raw = count_ngrams(sentences, order)
    raw[0].pop((BOS,), None)  # <s> is never predicted; it is written with probability 0 below
    if not raw[0]:
        raise ValueError("--corpus has no words; pass a non-empty text file, one sentence per line")

    # Adjusted counts: continuation counts below the top order, except after-<s> n-grams.
    adjusted = [None] * order
    adjusted[-1] = raw[-1]
    for n in range(order - 1, 0, -1):
        left_ext = Counter(g[1:] for g in raw[n])  # keys of raw[n] are distinct (n+1)-grams
        adjusted[n - 1] = Counter({g: c if g[0] == BOS else left_ext[g] for g, c in raw[n - 1].items()})

    vocab = sorted({g[0] for g in raw[0]} | {UNK})
    probs: list[dict] = []
    gammas: list[dict] = []
    for n in range(1, order + 1):
        counts = adjusted[n - 1]
        d = (0.0, *_discounts(counts))
        total = defaultdict(int)
        freq = defaultdict(lambda: [0, 0, 0])  # N1, N2, N3+ per context
        for g, c in counts.items():
            total[g[:-1]] += c
            freq[g[:-1]][min(c, 3) - 1] += 1
        gamma = {h: (d[1] * f[0] + d[2] * f[1] + d[3] * f[2]) / total[h] for h, f in freq.items()}
        lower = probs[-1] if probs else None
        p = {}
        for g, c in counts.items():
            h = g[:-1]
            backoff = 1.0 / len(vocab) if lower is None else lower[g[1:]]
            p[g] = (c - d[min(c, 3)]) / total[h] + gamma[h] * backoff
        if lower is None:
            p[(UNK,)] = gamma[()] / len(vocab)
        probs.append(p)
        gammas.append(gamma)

    tables = []
    for n in range(1, order + 1):
        # A context's back-off weight is stored on the n-gram that spells the context.
        nxt = gammas[n] if n < order else {}
        table = {g: (math.log10(pr), _log10_or_none(nxt.get(g))) for g, pr in probs[n - 1].items()}
        if n == 1:
            table[(BOS,)] = (-99.0, _log10_or_none(nxt.get((BOS,))))
        tables.append(table)
    return tables


def _log10_or_none(x):
    return None if x is None else (math.log10(x) if x > 0 else -99.0)


def write_arpa(sentences, path, order: int = 5) -> dict:
    """Estimate an order-`order` interpolated modified Kneser-Ney model and write it as ARPA text.

    `sentences` are whitespace-tokenised strings. Returns a summary (n-gram counts, seconds).
    """
    start = time.perf_counter()
    tables = kneser_ney(list(sentences), order)
    lines = ["\\data\\"]
    lines += [f"ngram {n}={len(t)}" for n, t in enumerate(tables, start=1)]
    for n, table in enumerate(tables, start=1):
        lines += ["", f"\\{n}-grams:"]
        for g in sorted(table):
            logp, logbow = table[g]
            words = " ".join(g)
            lines.append(f"{logp:.7g}\t{words}" if logbow is None else f"{logp:.7g}\t{words}\t{logbow:.7g}")
    lines += ["", "\\end\\", ""]
    Path(path).write_text("\n".join(lines), encoding="utf-8")
    return {"order": order, "ngrams": [len(t) for t in tables], "seconds": time.perf_counter() - start}
