"""PEFT's adapter operations over every loraforge method and phase, in the spirit of PEFT's generic tests.

Cases: SaLoRA before, inside and after its gate window, Delta-LoRA folded and in place (past its
snapshot), CoRA FB and TB, each trained a few optimizer steps with large learning rates so that
factors, gates, λ and snapshots all hold non-trivial values. Every operation asserts that it works
exactly, against an expectation computed another way (the base model's own outputs, the trained
model's outputs before the operation, the moved weight `W_0 + λ·s·(B A - B_K A_K)` by hand, each
layer's own forward for the sources of a combination), or that it refuses with the field named.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file

import loraforge
from loraforge import testing
from loraforge.core.config import ForgeConfigError
from loraforge.core.layer import ForgeLinear
from tiny_adapters import TARGETS, X, close, forge_layers, logits, train


def _basis(path) -> str:
    """Per adapted module, orthonormal columns (QR of a seeded Gaussian), in cora-extract's key scheme."""
    gen = torch.Generator().manual_seed(1)
    bases = {}
    for name, module in testing.tiny_llama(seed=0).named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            bases[name] = torch.linalg.qr(torch.randn(module.out_features, 6, generator=gen))[0].contiguous()
    save_file(bases, str(path))
    return str(path)


# case -> (config factory, optimizer steps taken, max_steps told to the driver)
CASES = {
    "salora_before": (lambda b: loraforge.SaLoRAConfig(r=4, target_modules=TARGETS, window_start=20, window_end=30), 3, 40),
    "salora_inside": (lambda b: loraforge.SaLoRAConfig(r=4, target_modules=TARGETS, window_start=1, window_end=20,
                                                       gate_lr=0.5), 4, 40),
    "salora_after": (lambda b: loraforge.SaLoRAConfig(r=4, target_modules=TARGETS, window_start=1, window_end=3,
                                                      gate_lr=0.5), 5, 8),
    "delta_folded": (lambda b: loraforge.DeltaLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, start_step=2,
                                                         update_ratio=2.0), 5, 8),
    "delta_in_place": (lambda b: loraforge.DeltaLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, start_step=2,
                                                           update_ratio=2.0, propagation="in_place"), 5, 8),
    "cora_fb": (lambda b: loraforge.CoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, basis_path=b), 3, 8),
    "cora_tb": (lambda b: loraforge.CoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, basis_path=b, freeze_b=False), 3, 8),
}


@pytest.fixture(scope="module")
def basis(tmp_path_factory):
    return _basis(tmp_path_factory.mktemp("basis") / "basis.safetensors")


_TRAINED: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _forget_trained_models():
    yield
    _TRAINED.clear()  # their layers stay in LIVE_LAYERS while alive; later test modules need not see them


def trained(case: str, basis: str, second: bool = False):
    """A copy of the case's model trained once per test module: adapter "default" (seed 0) and, with
    `second`, an adapter "second" of the same config trained after it (seed 1)."""
    key = (case, basis, second)
    if key not in _TRAINED:
        make, steps, max_steps = CASES[case]
        model = get_peft_model(testing.tiny_llama(0), make(basis))
        train(model, steps, max_steps, seed=0)
        if second:
            model.add_adapter("second", make(basis))
            model.set_adapter("second")
            train(model, steps, max_steps, seed=1)
        _TRAINED[key] = model
    return copy.deepcopy(_TRAINED[key])


def base_logits() -> torch.Tensor:
    return logits(testing.tiny_llama(0).eval())


@torch.no_grad()
def moved_base_logits(model, adapter: str = "default") -> torch.Tensor:
    """The base model with every adapted W replaced by W_0 + λ·s·(B A - B_K A_K), computed here by hand
    (what in-place Delta-LoRA's W holds); W_0 is read from a fresh base model."""
    base = testing.tiny_llama(0).eval()
    for name, layer in model.base_model.model.named_modules():
        if isinstance(layer, ForgeLinear) and adapter in layer.lora_A:
            lam, s = (float(v) for v in layer.lora_delta_coef[adapter])
            b, a = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
            bk, ak = layer.lora_delta_BK[adapter], layer.lora_delta_AK[adapter]
            base.get_submodule(name).weight += lam * s * (b @ a - bk @ ak)
    return logits(base)


def moved(case: str) -> bool:
    return case == "delta_in_place"


# save / load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("safe_serialization,low_cpu_mem_usage", [(True, False), (True, True), (False, False)],
                         ids=["safetensors", "safetensors-low_cpu_mem_usage", "torch_bin"])
@pytest.mark.parametrize("case", CASES)
def test_save_and_load_reproduce_the_trained_model(tmp_path, basis, case, safe_serialization, low_cpu_mem_usage):
    model = trained(case, basis)
    expected = logits(model)
    model.save_pretrained(str(tmp_path), safe_serialization=safe_serialization)
    assert os.path.exists(tmp_path / ("adapter_model.safetensors" if safe_serialization else "adapter_model.bin"))
    loaded = PeftModel.from_pretrained(testing.tiny_llama(0), str(tmp_path), low_cpu_mem_usage=low_cpu_mem_usage).eval()
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    close(logits(loaded), expected, atol=1e-6)
    saved = {n: t for n, t in model.state_dict().items() if ".lora_" in n}
    for n, t in loaded.state_dict().items():
        if n in saved:
            assert t.dtype == saved[n].dtype and torch.equal(t, saved[n]), n


# merge / unmerge / safe merge ---------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_and_safe_merge_keep_the_outputs(basis, case):
    model = trained(case, basis)
    expected = logits(model)
    weights = {n: m.get_base_layer().weight.clone() for n, m in model.named_modules() if isinstance(m, ForgeLinear)}
    model.train()  # merging from training mode must still merge the eval-mode function
    model.merge_adapter()
    model.eval()
    close(logits(model), expected)
    model.unmerge_adapter()
    close(logits(model), expected)
    for n, m in model.named_modules():
        if isinstance(m, ForgeLinear):
            close(m.get_base_layer().weight, weights[n], atol=1e-6)
    merged = copy.deepcopy(model).merge_and_unload(safe_merge=True)
    assert not forge_layers(merged)
    close(logits(merged), expected)


# disable ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_disable_adapter_gives_the_base_model(basis, case):
    model = trained(case, basis)
    with model.disable_adapter():
        disabled = logits(model)
    # in place, W itself was trained (the paper's algorithm): the base is the moved W
    close(disabled, moved_base_logits(model) if moved(case) else base_logits())


# delete -----------------------------------------------------------------------------------------
def _left_behind(model, adapter: str) -> list[str]:
    keys = [k for k in model.state_dict() if f".{adapter}." in k + "." or k.endswith(f".{adapter}")]
    for layer in forge_layers(model):
        for name in ("forge_axes", "forge_config", "forge_drivers", "frozen_peft_weight_names", "r", "scaling"):
            if adapter in getattr(layer, name, {}):
                keys.append(f"{layer.forge_name}.{name}")
    return keys + [f"peft_config.{adapter}"] * (adapter in model.peft_config)


@pytest.mark.parametrize("case", CASES)
def test_delete_adapter_leaves_nothing_of_it(basis, case):
    model = trained(case, basis)
    expected = logits(model)
    model.add_adapter("extra", CASES[case][0](basis))
    assert _left_behind(model, "extra")
    model.delete_adapter("extra")
    assert _left_behind(model, "extra") == []
    close(logits(model), expected, atol=1e-6)

    model.add_adapter("extra", CASES[case][0](basis))  # untrained: B = 0 (A = 0 for CoRA)
    model.delete_adapter("default")
    assert _left_behind(model, "default") == []
    assert model.active_adapters == ["extra"]
    # the untrained adapter alone is the base model; in place, deleting took D back out of W
    close(logits(model), base_logits(), atol=1e-6)


# add_weighted_adapter ---------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_a_weighted_copy_reproduces_the_trained_adapter(tmp_path, basis, case):
    model = trained(case, basis)
    expected = logits(model)
    if moved(case):
        with pytest.raises(ForgeConfigError, match=r"^propagation: an in_place Delta-LoRA"):
            model.add_weighted_adapter(["default"], [1.0], "copy")
        assert "copy" not in model.peft_config
        return
    model.add_weighted_adapter(["default"], [1.0], "copy")
    assert type(model.peft_config["copy"]) is LoraConfig  # decision: the result is plain LoRA
    model.set_adapter("copy")
    close(logits(model), expected)
    # plain LoRA on disk: it loads as stock PEFT layers (no loraforge layer) with the same outputs
    model.save_pretrained(str(tmp_path), selected_adapters=["copy"])
    assert json.load(open(tmp_path / "copy" / "adapter_config.json"))["peft_type"] == "LORA"
    stock = PeftModel.from_pretrained(testing.tiny_llama(0), str(tmp_path / "copy")).eval()
    assert not forge_layers(stock)
    close(logits(stock), expected)


def _layer_delta(layer, adapter: str, x: torch.Tensor) -> torch.Tensor:
    """The adapter's own contribution to one layer's output, from that layer's forward (eval mode)."""
    layer.set_adapter(adapter)
    return layer(x) - layer.get_base_layer()(x)


@pytest.mark.parametrize("combination_type", ["cat", "svd", "linear"])
@pytest.mark.parametrize("case", [c for c in CASES if not moved(c)])
def test_weighted_combinations_of_trained_adapters_are_exact(basis, case, combination_type):
    model = trained(case, basis, second=True)
    assert {l.step_count(a) for l in forge_layers(model) for a in ("default", "second")} == {CASES[case][1]}
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    if combination_type == "linear":  # combines factors rank by rank: exact for one source
        adapters, weights = ["second"], [-0.6]
    else:
        adapters, weights = ["default", "second"], [0.7, -0.4]
    model.add_weighted_adapter(adapters, weights, "mix", combination_type=combination_type, svd_rank=16)
    layers = [layer for layer in forge_layers(model) if layer.in_features == 64]  # the width of x
    assert len(layers) == 6  # every target reads the hidden size: 3 in each of 2 layers
    with torch.no_grad():
        for layer in layers:
            expected = sum(w * _layer_delta(layer, a, x) for a, w in zip(adapters, weights))
            close(_layer_delta(layer, "mix", x), expected, atol=2e-5)


def test_linear_combination_of_differently_pruned_adapters_is_refused(basis):
    model = trained("salora_after", basis, second=True)
    ranks = [{int((l.lora_gate_frozen[a] > 0).sum()) for l in forge_layers(model)} for a in ("default", "second")]
    with pytest.raises(ForgeConfigError, match=r"^combination_type: 'linear' combines A and B rank by rank"):
        model.add_weighted_adapter(["default", "second"], [0.5, 0.5], "mix", combination_type="linear")
    assert ranks != [{4}, {4}]  # the gates really pruned


# set_adapter, requires_grad -------------------------------------------------------------------
def _trainable(model) -> set[str]:
    return {n.split("base_model.model.", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}


def _expected_trainable(model, case: str, adapter: str) -> set[str]:
    names = {"lora_A", "lora_B"} - ({"lora_B"} if case == "cora_fb" else set())
    names |= {"lora_gate_logits"} if case.startswith("salora") else set()
    out = set()
    for layer in forge_layers(model):
        for name in names:
            out.add(f"{layer.forge_name}.{name}.{adapter}" + ("" if name == "lora_gate_logits" else ".weight"))
    return out


@pytest.mark.parametrize("case", CASES)
def test_set_adapter_switches_outputs_and_trainable_parameters(basis, case):
    model = trained(case, basis)
    expected = logits(model)
    model.add_adapter("extra", CASES[case][0](basis))
    model.set_adapter("extra")
    close(logits(model), moved_base_logits(model) if moved(case) else base_logits(), atol=1e-6)
    assert _trainable(model) == _expected_trainable(model, case, "extra")
    model.set_adapter("default")
    close(logits(model), expected, atol=1e-6)
    assert _trainable(model) == _expected_trainable(model, case, "default")


@pytest.mark.parametrize("is_trainable", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_requires_grad_after_load(tmp_path, basis, case, is_trainable):
    trained(case, basis).save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(testing.tiny_llama(0), str(tmp_path), is_trainable=is_trainable)
    assert _trainable(loaded) == (_expected_trainable(loaded, case, "default") if is_trainable else set())


# half precision ---------------------------------------------------------------------------------
CONTROL = ("lora_gate_logits", "lora_gate_frozen", "lora_salora_lambda", "lora_delta_BK", "lora_delta_AK",
           "lora_delta_coef", "lora_delta_w0_print")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_half_precision_forward_and_control_state(basis, case, dtype):
    model = trained(case, basis)
    expected = logits(model)
    control = {n: (t.dtype, t.clone()) for n, t in [*model.named_parameters(), *model.named_buffers()]
               if any(f".{c}." in n for c in CONTROL)}
    assert bool(control) == (not case.startswith("cora"))  # CoRA alone keeps no control state
    model.to(dtype)
    assert model.base_model.model.lm_head.weight.dtype == dtype
    assert [l.lora_A["default"].weight.dtype for l in forge_layers(model)] == [dtype] * 6  # 3 targets, 2 layers
    now = dict([*model.named_parameters(), *model.named_buffers()])
    for n, (dt, value) in control.items():  # control state keeps dtype and value through the cast
        assert now[n].dtype == dt and torch.equal(now[n], value), n
    out = logits(model)
    assert out.dtype == dtype
    # half precision rounds the weights: the outputs agree to its resolution, and the adapter still acts
    close(out.float(), expected, atol=3e-2)
    if not moved(case):
        assert (out.float() - base_logits()).abs().max() > 4 * (out.float() - expected).abs().max()


@pytest.mark.parametrize("case", CASES)
def test_bf16_autocast_forward_matches_fp32(basis, case):
    """Every adapted layer computes in bf16 under autocast (its output says so), and the logits agree with
    fp32 to bf16's resolution without being fp32's own (a forward that ignored autocast would give those)."""
    model = trained(case, basis)
    expected = logits(model)
    layers = forge_layers(model)
    seen = []
    hooks = [layer.register_forward_hook(lambda module, args, output: seen.append(output.dtype)) for layer in layers]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
            out = model(input_ids=X).logits
    finally:
        for hook in hooks:
            hook.remove()
    assert len(layers) == 6 and seen == [torch.bfloat16] * len(layers)  # 3 targets in each of 2 layers
    assert out.dtype == torch.bfloat16 and not torch.equal(out.float(), expected)
    close(out.float(), expected, atol=3e-2)
