"""What `loraforge train` leaves behind: the closing lines naming its outputs, no checkpointing warning,
the rank heat map's title, an export that finds its base; and the Alpaca records it trains on."""
from __future__ import annotations

import json
import warnings

import pytest
import yaml
from PIL import Image

from loraforge.cli import main
from loraforge.data import alpaca_dataset


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
