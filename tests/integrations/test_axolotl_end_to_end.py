"""The Axolotl plugin end to end: Axolotl's own CLI entry trains each tiny YAML of
example_configs/axolotl/tiny on CPU, and the results are checked by value; SaLoRA, Delta-LoRA and
CoRA TB also train with `sample_packing: true` and must pass the same checks.

Needs axolotl (skipped otherwise): `.ci/axolotl.sh` builds its venv and runs this file there.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
pytest.importorskip("axolotl", reason="Axolotl is not installed in this venv: these end-to-end runs "
                    "need Axolotl 0.19-0.21 in its own venv; `bash .ci/axolotl.sh` builds it and runs them")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from loraforge import testing  # noqa: E402

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """What the tiny YAMLs' headers tell a user to prepare: model, data, CoRA basis."""
    return testing.axolotl_workdir(tmp_path_factory.mktemp("axolotl"), ATTENTION)


def _load_cfg(workdir, name, **overrides):
    from axolotl.cli.config import load_cfg

    return load_cfg(str(workdir / f"{name}.yaml"), **overrides)


#: `sample_packing: true` on a CPU: sdpa isolates the packed samples (Axolotl drops the attention mask
#: and masks by position_ids); 512-token bins hold ~3 of the tiny Alpaca samples (105-196 tokens).
PACKED = {"sample_packing": True, "attn_implementation": "sdpa", "sequence_len": 512, "pad_to_sequence_len": True}


def _train(workdir, name, monkeypatch, packed: bool = False) -> Path:
    """`axolotl train NAME.yaml`, in process: the CLI's load_cfg + do_train."""
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.train import do_train

    monkeypatch.chdir(workdir)
    overrides = {**PACKED, "output_dir": f"./outputs/axolotl-tiny-{name}-packed"} if packed else {}
    cfg = _load_cfg(workdir, name, **overrides)
    do_train(cfg, TrainerCliArgs())
    out = workdir / cfg.output_dir
    # Each optimizer step saw micro_batch_size rows: 4 samples unpacked, several per row packed.
    per_step = _log(out)[0]["epoch"] * len(testing.alpaca_records())
    assert per_step > 6 if packed else per_step == pytest.approx(4, rel=0.02), per_step
    return out


def _log(out: Path) -> list[dict]:
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


def _adapter(out: Path) -> tuple[dict, dict]:
    config = json.loads((out / "adapter_config.json").read_text())
    return config, load_file(str(out / "adapter_model.safetensors"))


def _modules(tensors: dict) -> list[str]:
    """Module paths in the base model ("model.layers.0.self_attn.q_proj") of the saved adapter."""
    return sorted({k[len(PREFIX):].rsplit(".lora_A", 1)[0] for k in tensors if ".lora_A" in k})


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_salora_trains_its_gates_towards_the_budget(workdir, monkeypatch, packed):
    out = _train(workdir, "salora", monkeypatch, packed)
    config, tensors = _adapter(out)
    assert config["peft_type"] == "LORAFORGE_SALORA" and config["target_density"] == 0.5
    log = _log(out)
    first, last = log[0], log[-1]
    # Gate logits start at 0: expected L0 share = sigmoid(0 - τ·log(-γ/ζ)) = 1 / (1 + 1/11) = 11/12.
    assert first["salora/expected_density"] == pytest.approx(11 / 12, abs=1e-4)
    assert first["salora/lambda"] == 0
    # Only LoraForgeTrainerMixin logs these; λ rises by projected ascent inside the window.
    assert max(h["salora/lambda"] for h in log) > 0
    b = config["target_density"]
    assert abs(last["salora/expected_density"] - b) < 0.5 * abs(first["salora/expected_density"] - b)
    assert last["salora/realized_density"] < 1.0  # ranks were pruned when the gates froze
    # lora_target_linear resolved to every linear of the blocks (not lm_head).
    assert {m.rsplit(".", 1)[-1] for m in _modules(tensors)} == set(ATTENTION + ["gate_proj", "up_proj", "down_proj"])


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_delta_lora_saves_the_snapshot_and_axolotl_merges_the_moved_w(workdir, monkeypatch, packed):
    from axolotl.cli.merge_lora import do_cli as merge_cli

    out = _train(workdir, "delta_lora", monkeypatch, packed)
    config, tensors = _adapter(out)
    assert config["peft_type"] == "LORAFORGE_DELTA_LORA"
    ratio, start = config["update_ratio"], config["start_step"]
    scaling = config["lora_alpha"] / config["r"]
    log = _log(out)
    assert [h["delta_lora/w_shift_norm"] for h in log if h["step"] <= start] == [0] * start  # logging_steps: 1
    assert log[-1]["delta_lora/w_shift_norm"] > 0
    modules = _modules(tensors)
    assert {m.rsplit(".", 1)[-1] for m in modules} == set(ATTENTION)
    # `axolotl merge-lora` (through the plugin's loader and the legacy merge it selects) must give
    # W_0 + s·((1+λ)·B A - λ·B_K A_K), computed here by hand from the saved tensors.
    merge_cli(config=str(workdir / "delta_lora.yaml"), lora_model_dir=str(out), output_dir=str(out))
    merged = load_file(str(out / "merged" / "model.safetensors"))
    w0 = load_file(str(workdir / "tiny-model" / "model.safetensors"))
    for module in modules:
        t = {k: tensors[f"{PREFIX}{module}.{k}"].to(torch.float64)
             for k in ("lora_A.weight", "lora_B.weight", "lora_delta_AK", "lora_delta_BK")}
        assert tensors[f"{PREFIX}{module}.lora_delta_steps"].tolist() == [start, start]
        assert t["lora_delta_BK"].abs().max() > 0  # B_K was taken after step K, B left zero by then
        expected = w0[f"{module}.weight"].to(torch.float64) + scaling * (
            (1 + ratio) * t["lora_B.weight"] @ t["lora_A.weight"] - ratio * t["lora_delta_BK"] @ t["lora_delta_AK"])
        torch.testing.assert_close(merged[f"{module}.weight"].to(torch.float64), expected, rtol=1e-5, atol=1e-6)
        assert (merged[f"{module}.weight"] - w0[f"{module}.weight"]).abs().max() > 1e-4


def _basis(workdir) -> dict[str, torch.Tensor]:
    with safe_open(str(workdir / "cora-basis.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("mode, packed", [("fb", False), ("tb", False), ("tb", True)])
def test_cora_b_starts_at_the_basis(workdir, monkeypatch, mode, packed):
    out = _train(workdir, f"cora_{mode}", monkeypatch, packed)
    config, tensors = _adapter(out)
    assert config["peft_type"] == "LORAFORGE_CORA" and config["freeze_b"] is (mode == "fb")
    basis = _basis(workdir)
    modules = _modules(tensors)
    assert {m.rsplit(".", 1)[-1] for m in modules} == set(ATTENTION)
    for module in modules:
        b = tensors[f"{PREFIX}{module}.lora_B.weight"]
        u = basis[module][:, : config["r"]]
        if mode == "fb":
            assert torch.equal(b, u)  # frozen at the basis for the whole run
        else:
            assert not torch.equal(b, u) and (b - u).abs().max() < 0.1  # trained away from it, a little
        assert tensors[f"{PREFIX}{module}.lora_A.weight"].abs().max() > 0  # A trained from its zero start


def test_reinit_after_load_does_not_undo_the_methods_init(workdir):
    """Axolotl >= 0.21 re-draws lora_A after loading (`_reinit_lora_from_seed`); CoRA's A = 0 survives."""
    from axolotl.utils.dict import DictDefault

    from loraforge.integrations.axolotl import LoraForgePlugin

    try:
        from axolotl.loaders.adapter import reinit_lora_from_seed
    except ImportError:  # Axolotl 0.19: the same re-draw, as 0.21 does it
        def reinit_lora_from_seed(model, seed):
            from peft.tuners.lora.layer import LoraLayer

            for module in model.modules():
                if isinstance(module, LoraLayer):
                    for linear in module.lora_A.values():
                        torch.nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))

    cfg = DictDefault({"adapter": "cora", "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ATTENTION,
                       "cora": {"basis_path": str(workdir / "cora-basis.safetensors")}})
    plugin = LoraForgePlugin()
    model, config = plugin.load_adapter(testing.tiny_llama(seed=0), cfg)
    layers = [m for m in model.modules() if hasattr(m, "forge_axes")]
    assert len(layers) == 8 and all(m.lora_A["default"].weight.abs().max() == 0 for m in layers)
    assert config.init_lora_weights is True  # so Axolotl 0.21 does re-draw
    reinit_lora_from_seed(model, 0)
    assert all(m.lora_A["default"].weight.abs().max() > 0 for m in layers)
    plugin.post_model_load(cfg, model)
    assert all(m.lora_A["default"].weight.abs().max() == 0 for m in layers)


def _bad(workdir, name, edit) -> Path:
    cfg = yaml.safe_load((workdir / f"{name}.yaml").read_text())
    edit(cfg)
    path = workdir / f"bad-{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("name, edit, key", [
    ("salora", lambda c: c["salora"].update(target_densty=0.5), "salora.target_densty"),
    ("salora", lambda c: c["salora"].update(target_density=2), "salora.target_density"),
    ("salora", lambda c: c["salora"].update(r=8), "salora.r: set it with Axolotl's top-level `lora_r`"),
    ("salora", lambda c: c.update(lora_qkv_kernel=True), "lora_qkv_kernel"),
    ("salora", lambda c: c.update(loraplus_lr_ratio=16), "loraplus_lr_ratio: SaLoRAConfig builds"),
    ("salora", lambda c: c.update(adapter="lora"), "salora: this block configures"),
    ("delta_lora", lambda c: c.update(lora_dropout=0.1), "lora_dropout: Delta-LoRA needs lora_dropout=0.0"),
    ("delta_lora", lambda c: c.update(merge_method="memory_efficient"), "merge_method: Axolotl's memory-efficient"),
    ("cora_fb", lambda c: c["cora"].pop("basis_path"), "cora.basis_path"),
    ("cora_fb", lambda c: c["cora"].update(basis_path="./missing.safetensors"), "cora.basis_path"),
])
def test_bad_yaml_fails_at_validation_naming_the_key(workdir, monkeypatch, name, edit, key):
    monkeypatch.chdir(workdir)
    path = _bad(workdir, name, edit)
    with pytest.raises(ValueError) as info:
        _load_cfg(path.parent, path.stem)
    assert key in str(info.value)
    assert not (workdir / "outputs" / f"bad-{name}").exists()


def test_other_adapters_are_left_to_axolotl(workdir):
    """Axolotl >= 0.21 loads entry-point plugins into every run: a plain LoRA run must not notice."""
    from axolotl.utils.dict import DictDefault

    from loraforge.integrations.axolotl import LoraForgePlugin
    from loraforge.integrations.axolotl.args import check_config

    cfg = DictDefault({"adapter": "lora", "lora_r": 4, "lora_alpha": 8, "lora_target_modules": ATTENTION})
    plugin = LoraForgePlugin()
    check_config(cfg)
    assert plugin.load_adapter(testing.tiny_llama(), cfg) is None
    assert plugin.get_trainer_cls(cfg) is None
    assert {c.name for c in plugin.get_adapter_capabilities()} == {"salora", "delta_lora", "cora"}


def test_entry_point_names_the_plugin_as_the_yaml_does():
    from importlib.metadata import entry_points

    from loraforge.integrations.axolotl import LoraForgePlugin

    (point,) = [p for p in entry_points(group="axolotl.plugins") if p.name == "loraforge"]
    assert point.load() is LoraForgePlugin
    # Axolotl >= 0.21 registers it as "module.Class", the name a YAML `plugins:` entry uses, so it loads once.
    assert point.value.replace(":", ".") == "loraforge.integrations.axolotl.LoraForgePlugin"


def test_lora_model_dir_restores_a_saved_adapter_of_the_same_method(workdir):
    """Axolotl's `lora_model_dir` (resume training, merge) goes through the plugin's loader."""
    from axolotl.utils.dict import DictDefault

    from loraforge.integrations.axolotl import LoraForgePlugin

    saved = workdir / "outputs" / "axolotl-tiny-cora_fb"
    if not saved.exists():
        pytest.skip("needs the CoRA FB run of this module")
    plugin = LoraForgePlugin()
    cfg = DictDefault({"adapter": "cora", "lora_model_dir": str(saved)})
    model, config = plugin.load_adapter(testing.tiny_llama(seed=0), cfg)
    assert type(config).__name__ == "CoRAConfig" and config.init_from_basis is False
    tensors = load_file(str(saved / "adapter_model.safetensors"))
    q = "model.layers.1.self_attn.q_proj"
    layer = model.get_submodule(PREFIX + q)
    assert torch.equal(layer.lora_A["default"].weight, tensors[f"{PREFIX}{q}.lora_A.weight"])
    with pytest.raises(ValueError, match="lora_model_dir: .* holds a cora adapter, not salora"):
        plugin.load_adapter(testing.tiny_llama(seed=0), DictDefault({"adapter": "salora", "lora_model_dir": str(saved)}))


def test_hooks_match_the_installed_axolotl():
    """Every hook the plugin overrides exists on Axolotl's BasePlugin with the same parameters
    (checked by hand against Axolotl 0.21's source too: see integrations/axolotl/plugin.py)."""
    import inspect

    from axolotl.integrations.base import BasePlugin

    from loraforge.integrations.axolotl import LoraForgePlugin

    hooks = [n for n, f in vars(LoraForgePlugin).items() if callable(f) and not n.startswith("_")]
    assert {"load_adapter", "get_adapter_capabilities", "get_trainer_cls", "post_model_load"} <= set(hooks)
    for name in hooks:
        ours = list(inspect.signature(getattr(LoraForgePlugin, name)).parameters)
        assert ours == list(inspect.signature(getattr(BasePlugin, name)).parameters), name
