"""`loraforge train`: the main job from a YAML, its errors, and the embedded default model."""
from __future__ import annotations

import json
import re

import pytest
import yaml

from loraforge.cli import main as cli


def _write(tmp_path, cfg) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _job(tmp_path, model_dir, **adapter):
    return {
        "model": model_dir,
        "max_length": 160,
        "adapter": {"method": "delta_lora", "target_modules": ["q_proj", "v_proj"], **adapter},
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 3, "per_device_train_batch_size": 4,
                     "report_to": [], "use_cpu": True, "save_strategy": "no", "disable_tqdm": True},
    }


def test_train_runs_and_saves_an_adapter_of_its_own_type(tmp_path, tiny_model_dir, capsys):
    assert cli(["train", _write(tmp_path, _job(tmp_path, tiny_model_dir))]) == 0
    assert "adapter saved to" in capsys.readouterr().out
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORAFORGE_DELTA_LORA"
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"adapter": {"method": "qlora"}}, "adapter.method: 'qlora' is not one of"),
        ({"adapter": {"method": "delta_lora", "rank": 8}}, r"adapter: unknown key\(s\) 'rank'"),
        ({"adapter": {"r": 8}}, "adapter: a block with `method"),
        ({"optimizer": "adam"}, r"config: unknown key\(s\) 'optimizer'"),
        ({"training": {"learning_rat": 1.0}}, "training: .*learning_rat"),
    ],
)
def test_bad_yaml_is_refused_with_the_key_named(tmp_path, tiny_model_dir, capsys, patch, message):
    job = _job(tmp_path, tiny_model_dir)
    job.update(patch)
    assert cli(["train", _write(tmp_path, job)]) == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.slow
def test_quickstart_on_the_embedded_default_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORAFORGE_CACHE", str(tmp_path / "cache"))
    assert cli(["train", "--max-steps", "4", "--output-dir", str(tmp_path / "qs")]) == 0
    assert (tmp_path / "cache" / "SmolLM2-135M-Instruct" / "model.safetensors").exists()
    assert (tmp_path / "qs" / "adapter_model.safetensors").exists()
