"""`evaluate_style`: generate rewrites (or take given ones) and score ACC / BLEU / PPL in one call."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .prompts import PROTOCOLS, get_task
from .texts import NORMALIZATIONS, read_lines, read_references


def outputs_path(out) -> Path:
    """Where the rewrites go: beside the results file, `results.json` -> `results.outputs.txt`."""
    out = Path(out)
    return out.with_name(out.stem + ".outputs.txt")


def evaluate_style(task: str, inputs, references, *, model=None, adapter=None, hypotheses=None,
                   classifier=None, lm=None, out=None, system_name: str | None = None,
                   protocol: str = "loraforge", template: str | None = None, batch_size: int = 8,
                   num_beams: int | None = None, max_new_tokens: int | None = None,
                   dtype: str = "auto", device: str | None = None,
                   limit: int | None = None, bleu_tokenize: str = "13a", bleu_lowercase: bool = False,
                   lm_normalize: str = "auto", progress: bool = True) -> dict:
    """Score one system on one transfer direction; write `out` (JSON) and its outputs file if given.

    Either `model` (a local folder, optionally with `adapter`) generates the rewrites, or
    `hypotheses` (a file, one rewrite per input) supplies them, e.g. the human references for
    the paper's "Reference" row. `references` is a list of files, each one reference per input.
    ACC needs `classifier` (a folder from `train_style_classifier`), PPL needs `lm` (ARPA or
    KenLM binary); a metric whose resource is not given is reported as null.

    `protocol` sets the generation defaults (`prompts.PROTOCOLS`): "loraforge" (greedy, 64 new
    tokens, the Alpaca template, text as given) or "paper" (the SaLoRA authors' script: 4 beams,
    128 new tokens, their Alpaca prompt, lowercased inputs and references). `template`,
    `num_beams` and `max_new_tokens` override it; the results record the protocol, every setting
    and which ones were overridden.
    """
    started = time.time()
    spec = get_task(task)
    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol: unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    proto = PROTOCOLS[protocol]
    given = {"template": template, "num_beams": num_beams, "max_new_tokens": max_new_tokens}
    overridden = sorted(k for k, v in given.items() if v is not None and v != getattr(proto, k))
    template = template or proto.template
    num_beams = num_beams or proto.num_beams
    max_new_tokens = max_new_tokens or proto.max_new_tokens
    if (model is None) == (hypotheses is None):
        raise ValueError("pass exactly one of --model (generate rewrites) or --hypotheses (score a file of rewrites)")
    if not references:
        raise ValueError("--references: give at least one reference file")
    if lm_normalize == "auto":
        lm_normalize = spec.lm_normalize
    if lm_normalize not in NORMALIZATIONS:
        raise ValueError(f"--lm-normalize: unknown value {lm_normalize!r}; choose auto, {', '.join(NORMALIZATIONS)}")

    sentences = read_lines(inputs, "--inputs")
    ref_sets = [read_references(path, sentences) for path in references]
    if limit is not None:
        sentences, ref_sets = sentences[:limit], [refs[:limit] for refs in ref_sets]
    if proto.lowercase:
        sentences = [s.lower() for s in sentences]
        ref_sets = [[r.lower() for r in refs] for refs in ref_sets]

    if hypotheses is not None:
        outputs = read_lines(hypotheses, "--hypotheses")
        if limit is not None:
            outputs = outputs[:limit]
        if len(outputs) != len(sentences):
            raise ValueError(f"--hypotheses: {hypotheses} has {len(outputs)} lines but --inputs has "
                             f"{len(sentences)}; pass one rewrite per input")
        default_name = Path(hypotheses).stem
    else:
        from .generate import generate_rewrites, load_model

        causal_lm, tokenizer = load_model(model, adapter, dtype=dtype, device=device)
        outputs = generate_rewrites(causal_lm, tokenizer, sentences, spec, template=template,
                                    batch_size=batch_size, num_beams=num_beams,
                                    max_new_tokens=max_new_tokens, progress=progress)
        default_name = Path(adapter).name if adapter is not None else "base"

    from .metrics import bleu, perplexity

    result = {
        "system": system_name or default_name,
        "task": spec.name,
        "source_style": spec.source_style,
        "target_style": spec.target_style,
        "n": len(sentences),
        "model": None if model is None else str(model),
        "adapter": None if adapter is None else str(adapter),
        "hypotheses": None if hypotheses is None else str(hypotheses),
        "inputs": str(inputs),
        "references": [str(p) for p in references],
        "protocol": proto.name,
        "protocol_source": proto.source,
        "lowercased_inputs_and_references": proto.lowercase,
        "generation": None if model is None else {
            "prompt": template, "decoding": "greedy" if num_beams == 1 else "beam",
            "num_beams": num_beams, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
            "overridden": overridden,
        },
        "metrics": {"acc": None, "bleu": None, "ppl": None},
        "bleu": bleu(outputs, ref_sets, tokenize=bleu_tokenize, lowercase=bleu_lowercase),
        "acc": None,
        "ppl": None,
    }
    result["metrics"]["bleu"] = result["bleu"]["score"]
    if classifier is not None:
        from .classifier import StyleClassifier, style_accuracy

        clf = classifier if isinstance(classifier, StyleClassifier) else StyleClassifier(classifier)
        target = clf.label_of(spec.target_style, spec.target_label)
        acc = style_accuracy(clf, outputs, target)
        result["acc"] = {"classifier": clf.path, "target_label": target, "score": 100 * acc}
        result["metrics"]["acc"] = 100 * acc
    if lm is not None:
        result["ppl"] = {"lm": str(lm), **perplexity(lm, outputs, lm_normalize)}
        result["metrics"]["ppl"] = result["ppl"]["score"]
    result["seconds"] = round(time.time() - started, 2)

    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        outputs_file = outputs_path(out)
        outputs_file.write_text("".join(o + "\n" for o in outputs), encoding="utf-8")
        result["outputs_file"] = str(outputs_file)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    result["outputs"] = outputs
    return result
