"""The Axolotl plugin on bitsandbytes bases: the tiny `load_in_4bit` / `load_in_8bit` YAMLs of
example_configs/axolotl/tiny train end to end through Axolotl's own CLI entry on CPU, checked by value.

Needs axolotl and bitsandbytes (skipped otherwise); run it in the Axolotl venv as .ci/axolotl.sh does.
"""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
pytest.importorskip("axolotl")
pytest.importorskip("bitsandbytes")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from loraforge import testing  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What the tiny YAMLs' headers tell a user to prepare: model, data, CoRA basis."""
    return testing.axolotl_workdir(tmp_path_factory.mktemp("axolotl_qlora"), ATTENTION)


def _train(workdir, name, monkeypatch):
    """`axolotl train NAME.yaml` in process; returns the output folder and the trained model's layers."""
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.cli.train import do_train

    from loraforge.core.layer import ForgeLinear

    monkeypatch.chdir(workdir)
    cfg = load_cfg(str(workdir / f"{name}.yaml"))
    seen = {}
    import loraforge.integrations.axolotl.plugin as plugin

    original = plugin.LoraForgePlugin.post_model_load

    def spy(self, cfg, model):
        seen["layers"] = [m for m in model.modules() if isinstance(m, ForgeLinear)]
        seen["base"] = model
        return original(self, cfg, model)

    monkeypatch.setattr(plugin.LoraForgePlugin, "post_model_load", spy)
    do_train(cfg, TrainerCliArgs())
    out = workdir / cfg.output_dir
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    log = [h for h in state["log_history"] if "loss" in h]
    return out, log, seen["layers"]


def _check_quantised(layers, bits):
    from loraforge.core.quantized import ForgeLinear4bit, ForgeLinear8bitLt

    cls = ForgeLinear4bit if bits == 4 else ForgeLinear8bitLt
    assert layers and all(type(l) is cls for l in layers)
    w = layers[0].get_base_layer().weight
    assert type(w).__name__ == ("Params4bit" if bits == 4 else "Int8Params")
    if bits == 4:  # Axolotl's QLoRA recipe: NF4, double quantisation, bf16 storage
        assert w.quant_type == "nf4" and w.compress_statistics and w.dtype == torch.bfloat16


def test_salora_on_4bit(workdir, monkeypatch):
    out, log, layers = _train(workdir, "salora_qlora", monkeypatch)
    _check_quantised(layers, 4)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORAFORGE_SALORA"
    assert log[0]["salora/expected_density"] == pytest.approx(11 / 12, abs=1e-4) and log[0]["salora/lambda"] == 0
    assert max(h["salora/lambda"] for h in log) > 0
    assert log[-1]["salora/realized_density"] < 1.0
    assert log[-1]["loss"] < log[0]["loss"]


@pytest.mark.parametrize("name, bits", [("delta_lora_qlora", 4), ("delta_lora_8bit", 8)])
def test_delta_lora_on_quantised_bases(workdir, monkeypatch, name, bits):
    out, log, layers = _train(workdir, name, monkeypatch)
    _check_quantised(layers, bits)
    config = json.loads((out / "adapter_config.json").read_text())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    start = config["start_step"]
    assert config["peft_type"] == "LORAFORGE_DELTA_LORA" and config["propagation"] == "folded"
    assert [h["delta_lora/w_shift_norm"] for h in log if h["step"] <= start] == [0] * start  # logging_steps: 1
    assert log[-1]["delta_lora/w_shift_norm"] > 0 and log[-1]["loss"] < log[0]["loss"]
    # The logged shift is ||λ·s·(B A - B_K A_K)||_F, recomputed here from the saved tensors.
    ratio, s = config["update_ratio"], config["lora_alpha"] / config["r"]
    total = 0.0
    for key in [k for k in tensors if k.endswith("lora_delta_BK")]:
        module = key[: -len(".lora_delta_BK")]
        assert tensors[f"{module}.lora_delta_steps"].tolist() == [start, start]
        b, a = tensors[f"{module}.lora_B.weight"].double(), tensors[f"{module}.lora_A.weight"].double()
        bk, ak = tensors[key].double(), tensors[f"{module}.lora_delta_AK"].double()
        total += float(((ratio * s * (b @ a - bk @ ak)) ** 2).sum())
    assert log[-1]["delta_lora/w_shift_norm"] == pytest.approx(total ** 0.5, rel=1e-3)


def test_cora_fb_on_4bit_keeps_b_at_the_basis(workdir, monkeypatch):
    out, log, layers = _train(workdir, "cora_fb_qlora", monkeypatch)
    _check_quantised(layers, 4)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    basis = load_file(str(workdir / "cora-basis.safetensors"))
    keys = [k for k in tensors if k.endswith("lora_B.weight")]
    assert len(keys) == len(layers)  # one saved B per adapted layer
    for key in keys:
        module = key[len(PREFIX): -len(".lora_B.weight")]
        torch.testing.assert_close(tensors[key].float(), basis[module][:, :4].float(), rtol=0, atol=0)
        assert tensors[key.replace("lora_B", "lora_A")].abs().max() > 0  # A trained from zero
    assert log[-1]["loss"] < log[0]["loss"]
