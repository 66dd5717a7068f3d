"""The evaluation commands write under one folder (./loraforge-eval/ unless --out says otherwise) and
the report says how to read its columns, including that a Reference row scores BLEU against itself."""
from __future__ import annotations

import json

from loraforge.cli import main
from loraforge.data import yelp_dir


def test_evaluation_writes_under_loraforge_eval_by_default(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    yelp = yelp_dir()
    corpus = tmp_path / "pos.txt"
    corpus.write_text("the food is good .\nthe staff is nice .\n")
    assert main(["train-kenlm", "--corpus", str(corpus), "--order", "2"]) == 0
    human = tmp_path / "human.txt"
    human.write_text("".join(line.split("\t")[1].strip() + "\n"
                             for line in (yelp / "reference.0").read_text().splitlines()[:5]))
    common = ["--task", "yelp-neg2pos", "--inputs", str(yelp / "sentiment.test.0"), "--references",
              str(yelp / "reference.0"), "--lm", "loraforge-eval/lm/pos.txt.arpa", "--limit", "5"]
    assert main(["eval-style", "--hypotheses", str(human), "--system-name", "Reference", *common]) == 0
    assert main(["eval-style", "--hypotheses", str(yelp / "sentiment.test.0"), "--system-name", "copy input",
                 *common]) == 0
    results = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "loraforge-eval").rglob("*") if p.is_file())
    assert results == ["loraforge-eval/lm/pos.txt.arpa",
                       "loraforge-eval/results/Reference.yelp-neg2pos.json",
                       "loraforge-eval/results/Reference.yelp-neg2pos.outputs.txt",
                       "loraforge-eval/results/copy input.yelp-neg2pos.json",
                       "loraforge-eval/results/copy input.yelp-neg2pos.outputs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["human.txt", "loraforge-eval", "pos.txt"]

    capsys.readouterr()
    files = sorted(str(p) for p in (tmp_path / "loraforge-eval" / "results").glob("*.json"))
    assert main(["eval-style-report", *files]) == 0
    report = (tmp_path / "loraforge-eval" / "report.md").read_text()
    assert report == capsys.readouterr().out
    reference = json.loads((tmp_path / "loraforge-eval/results/Reference.yelp-neg2pos.json").read_text())
    assert reference["metrics"]["bleu"] > 99.99  # its outputs are its references
    assert "How to read it: ACC ↑" in report and "BLEU ↑" in report and "PPL ↓" in report
    assert "Reference: BLEU against its own text" in report and "copy input:" not in report
