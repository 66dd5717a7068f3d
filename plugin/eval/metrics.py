"""BLEU (sacrebleu) and KenLM perplexity of style-transfer outputs.

ACC lives in `classifier.py` beside the classifier it needs.
"""
from __future__ import annotations

from pathlib import Path

from .texts import normalize


def bleu(hypotheses: list[str], references: list[list[str]], tokenize: str = "13a",
         lowercase: bool = False) -> dict:
    """sacrebleu corpus BLEU; `references` is a list of reference sets, each one line per hypothesis.

    The defaults are sacrebleu's (13a tokenisation, cased, "exp" smoothing, which only matters when
    some n-gram order has no match at all); the returned signature records them so scores from
    other settings are not mixed up.
    """
    import sacrebleu

    for k, refs in enumerate(references, start=1):
        if len(refs) != len(hypotheses):
            raise ValueError(f"--references: reference set {k} has {len(refs)} lines for "
                             f"{len(hypotheses)} outputs; each set needs one line per input")
    metric = sacrebleu.BLEU(tokenize=tokenize, lowercase=lowercase)
    result = metric.corpus_score(hypotheses, references)
    return {
        "score": result.score,
        "signature": str(metric.get_signature()),
        "tokenize": tokenize,
        "lowercase": lowercase,
        "n_refs": len(references),
        "precisions": result.precisions,
        "brevity_penalty": result.bp,
    }


def perplexity(lm, sentences: list[str], normalization: str = "none") -> dict:
    """Corpus perplexity under a KenLM model: 10 ** (-sum log10 p / tokens).

    Every sentence is scored with <s> as context and </s> as its last predicted token, and
    </s> is counted in `tokens` (as `kenlm.Model.perplexity` does), so an empty output still
    costs one token. `lm` is an ARPA / KenLM binary path or a loaded `kenlm.Model`.
    """
    import kenlm

    if not isinstance(lm, kenlm.Model):
        if not Path(lm).is_file():
            raise FileNotFoundError(f"--lm: no such file {str(lm)!r}; build one with `loraforge train-kenlm`")
        from ..quiet import c_stderr_silenced

        config = kenlm.Config()
        config.show_progress = False
        try:
            with c_stderr_silenced():  # the ARPA loader's note about binary files, on std::cerr
                lm = kenlm.Model(str(lm), config)
        except OSError:
            raise ValueError(f"--lm: {lm} is not an ARPA or KenLM binary file; build one with "
                             "`loraforge train-kenlm`") from None
    log10_total, tokens, oov = 0.0, 0, 0
    for sentence in sentences:
        words = normalize(sentence, normalization).split()
        log10_total += lm.score(" ".join(words), bos=True, eos=True)
        tokens += len(words) + 1
        oov += sum(w not in lm for w in words)
    return {
        "score": 10 ** (-log10_total / tokens) if tokens else float("nan"),
        "log10_prob": log10_total,
        "tokens": tokens,
        "counts_eos": True,
        "oov": oov,
        "normalize": normalization,
    }
