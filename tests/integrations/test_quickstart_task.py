"""The quickstart's task and closing lines, the checks' field lists, the short-window warning and
what `loraforge ranks` says about a plain LoRA adapter."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings

import pytest
import yaml

from loraforge.cli import main
from loraforge.data import alpaca_records, yelp_dir
from loraforge.data.yelp_rewrites import HELDOUT, yelp_rewrite_records


def test_yelp_rewrites_keep_the_demo_inputs_out_of_training():
    train, heldout = yelp_rewrite_records("train"), yelp_rewrite_records("heldout")
    assert len(train) == 2 * (500 - HELDOUT) and len(heldout) == 32
    assert [r["instruction"].endswith("more positive.") for r in train[:4]] == [True, False, True, False]
    trained_inputs = {r["input"] for r in train}
    # the README's demo scores the first 50 lines of sentiment.test.0 (`--limit 50`)
    demo = (yelp_dir() / "sentiment.test.0").read_text().splitlines()[:50]
    assert not trained_inputs & {s.strip() for s in demo}
    assert not trained_inputs & {r["input"] for r in heldout}
    assert alpaca_records("yelp-rewrites") == train


def test_a_file_named_like_a_shipped_set_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "yelp-rewrites").write_text(json.dumps({"instruction": "i", "output": "o"}) + "\n")
    assert alpaca_records("yelp-rewrites") == [{"instruction": "i", "output": "o"}]


def test_train_prints_held_out_loss_of_base_and_adapter(tmp_path, tiny_model_dir, capsys, alpaca_records):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_records[:8]))
    job = {"model": tiny_model_dir, "data": str(data), "eval_data": str(data), "max_length": 160,
           "adapter": {"method": "delta_lora", "r": 4, "target_modules": ["q_proj", "v_proj"], "start_step": 2},
           "training": {"output_dir": str(tmp_path / "run"), "max_steps": 12, "learning_rate": 0.02,
                        "report_to": [], "use_cpu": True, "save_strategy": "no", "disable_tqdm": True,
                        "per_device_train_batch_size": 4}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["train", str(tmp_path / "job.yaml")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("held-out loss"))
    assert f"on 8 records of {data}" in line
    base, adapter = (float(line.split(word)[1].split()[0].strip(",")) for word in ("base model", "the adapter"))
    assert adapter < base  # trained on the same 8 records: the loss on them must fall


def test_check_field_lists_match_the_classes():
    from trl import SFTConfig

    import loraforge
    import loraforge_checks as checks
    from loraforge.train import TOP_KEYS

    assert checks.TRAIN_TOP_KEYS == TOP_KEYS
    assert checks.sft_config_fields() == {f.name for f in dataclasses.fields(SFTConfig) if f.init}
    for method, cls in (("salora", loraforge.SaLoRAConfig), ("delta_lora", loraforge.DeltaLoRAConfig),
                        ("cora", loraforge.CoRAConfig)):
        assert checks.adapter_fields(method) == {f.name for f in dataclasses.fields(cls) if f.init}, method
        assert checks.METHOD_CONFIGS[method][1] == cls.__name__


def test_salora_window_of_few_steps_warns_once_at_train_begin(tiny_model):
    from peft import get_peft_model

    import loraforge

    def begin(max_steps):
        model = get_peft_model(loraforge.testing.tiny_llama(seed=0),
                               loraforge.SaLoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loraforge.driver(model).begin(max_steps)
        return [str(w.message) for w in caught if "gates train on" in str(w.message)]

    short = begin(6)  # window 0.2-0.5 of 6 steps: steps 2..3
    assert len(short) == 1 and "2 optimizer step(s) only (steps 2..3 of 6)" in short[0]
    assert len(begin(40)) == 1  # 12 steps of window: the quickstart's budget ended at C = 0.42 with it
    assert begin(60) == []  # 18 steps: the quickstart's window


def test_ranks_says_a_plain_lora_adapter_has_fixed_ranks(tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from PIL import Image

    from loraforge import testing

    get_peft_model(testing.tiny_llama(seed=0), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert main(["ranks", str(tmp_path), "--png", str(tmp_path / "r.png")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "a plain LoRA adapter" in first and "not learned" in first
    assert Image.open(tmp_path / "r.png").text["Description"] == "LoRA rank r (fixed, not learned)"


def test_heat_map_of_thirty_layers_is_a_sane_size_and_says_what_cells_are(tmp_path):
    from PIL import Image

    from loraforge.salora.plot import rank_heatmap

    ranks = {f"model.layers.{i}.self_attn.{m}": i % 9 for i in range(30) for m in ("q_proj", "v_proj")}
    rank_heatmap(ranks, str(tmp_path / "h.png"), r_max=8)
    image = Image.open(tmp_path / "h.png")
    assert image.size[0] <= 1000 and image.size[1] >= 300, image.size
    assert image.text["Description"] == "exported rank"


@pytest.mark.parametrize("command", ["export", "eval-style"])
def test_export_and_eval_style_raise_no_future_warning(tmp_path, tiny_model_dir, command):
    from peft import get_peft_model

    import loraforge

    adapter = tmp_path / "adapter"
    model = get_peft_model(loraforge.testing.tiny_llama(seed=0),
                           loraforge.DeltaLoRAConfig(r=2, target_modules=["q_proj"]))
    model.peft_config["default"].base_model_name_or_path = tiny_model_dir
    model.save_pretrained(adapter)
    yelp = yelp_dir()
    argv = (["export", str(adapter), "--out", str(tmp_path / "stock")] if command == "export" else
            ["eval-style", "--model", tiny_model_dir, "--adapter", str(adapter), "--task", "yelp-neg2pos",
             "--inputs", str(yelp / "sentiment.test.0"), "--references", str(yelp / "reference.0"),
             "--limit", "2", "--max-new-tokens", "2", "--no-progress"])
    done = subprocess.run([sys.executable, "-m", "loraforge_cli", *argv], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "FutureWarning" not in done.stderr and "Traceback" not in done.stderr, done.stderr
