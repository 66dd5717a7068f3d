"""The shipped example configs (example_configs/axolotl, example_configs/train) are valid and agree.

Runs without Axolotl: the plugin's YAML checks (`loraforge.integrations.axolotl.args`) need only
pydantic. One tiny `loraforge train` sibling also trains end to end here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

pytest.importorskip("pydantic")

from loraforge import testing  # noqa: E402
from loraforge.integrations.axolotl.args import check_config, method_config  # noqa: E402
from loraforge.train import adapter_config, load_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[2] / "example_configs"
AXOLOTL = sorted((CONFIGS / "axolotl").glob("**/*.yaml"))
TRAIN = sorted((CONFIGS / "train").glob("**/*.yaml"))
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _with_basis(tmp_path, monkeypatch, cfg: dict) -> None:
    """Run from a folder holding the basis file a CoRA config names (header-checked at validation)."""
    monkeypatch.chdir(tmp_path)
    block = cfg.get("cora") or cfg.get("adapter") or {}
    if "basis_path" in block:
        r = cfg.get("lora_r") or block.get("r")
        save_file({"model.layers.0.self_attn.q_proj": torch.zeros(8, r)}, str(tmp_path / block["basis_path"]))


def _pairs():
    """(axolotl config, its `loraforge train` sibling): same file name, same tiny/ or paper level."""
    return [(path, CONFIGS / "train" / path.relative_to(CONFIGS / "axolotl")) for path in AXOLOTL]


def test_every_axolotl_config_has_a_train_sibling():
    assert len(AXOLOTL) >= 8 and all(sibling.exists() for _, sibling in _pairs())
    assert {p.relative_to(CONFIGS / "train") for p in TRAIN} == {p.relative_to(CONFIGS / "axolotl") for p in AXOLOTL}


@pytest.mark.parametrize("axolotl_path, train_path", _pairs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_axolotl_and_train_configs_build_the_same_adapter(tmp_path, monkeypatch, axolotl_path, train_path):
    ax = yaml.safe_load(axolotl_path.read_text())
    assert ax["plugins"] == ["loraforge.integrations.axolotl.LoraForgePlugin"]
    _with_basis(tmp_path, monkeypatch, ax)
    check_config(ax)
    from_axolotl = method_config(ax)
    train = load_config(str(train_path))
    from_train = adapter_config(train["adapter"])
    assert type(from_axolotl) is type(from_train)
    assert from_axolotl.to_dict() == from_train.to_dict()
    # The Axolotl header says how long the run takes and on what (paper-scale configs only).
    if "tiny" not in axolotl_path.parts:
        header = axolotl_path.read_text().split("\nbase_model:")[0]
        assert "Hardware:" in header and "Time:" in header


@pytest.mark.parametrize("path", TRAIN, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_train_configs_use_sft_config_fields(path):
    import dataclasses

    from trl import SFTConfig

    training = load_config(str(path))["training"]
    assert set(training) <= {f.name for f in dataclasses.fields(SFTConfig)}


def test_a_tiny_train_config_runs(tmp_path, monkeypatch):
    """One sibling end to end (CoRA FB: it also resolves a relative basis path); the rest share its keys."""
    from loraforge.cora.extract import extract_basis
    from loraforge.train import main

    monkeypatch.chdir(tmp_path)
    testing.save_tiny_model(tmp_path / "tiny-model")
    (tmp_path / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in testing.alpaca_records()[:48]))
    tuned = [testing.save_tiny_model(tmp_path / f"tuned-{i}", seed=i) for i in (1, 2, 3)]
    extract_basis(tuned, 4, ATTENTION, "cora-basis.safetensors", progress=False)
    assert main([str(CONFIGS / "train" / "tiny" / "cora_fb.yaml"), "--max-steps", "4"]) == 0
    saved = json.loads((tmp_path / "outputs" / "train-tiny-cora_fb" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORAFORGE_CORA" and saved["freeze_b"] is True


#: What the paper-scale headers ask for (one 80 GB A100 / H100: bf16, tf32); tiny configs run on the CPU.
A100 = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_80"}


@pytest.mark.parametrize("path", AXOLOTL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_axolotl_validates_every_shipped_config_without_deprecation_warnings(tmp_path, monkeypatch, path):
    """Axolotl's own schema (with the plugin's keys merged in) accepts the YAML as shipped."""
    pytest.importorskip("axolotl")
    import logging

    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    raw = yaml.safe_load(path.read_text())
    _with_basis(tmp_path, monkeypatch, raw)  # CoRA's basis file is header-checked: a stand-in
    cfg = DictDefault(raw)
    prepare_plugins(cfg)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("axolotl")
    logger.addHandler(handler)
    try:
        gpu = (None, None) if "tiny" in path.parts else (A100, {"torch_version": torch.__version__.split("+")[0]})
        validated = validate_config(cfg, *gpu)
    finally:
        logger.removeHandler(handler)
    assert validated["adapter"] == raw["adapter"]
    deprecated = [r.getMessage() for r in records if "deprecat" in r.getMessage().lower()]
    assert not deprecated, deprecated
