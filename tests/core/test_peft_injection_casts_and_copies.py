"""PEFT operations beyond the matrix of test_peft_operations.py that every method shares: injection
with low_cpu_mem_usage, the refusal of target_parameters, control state through dtype casts and PEFT's
device moves, and deep copies that still train as their method."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict

import loraforge
from loraforge import testing
from loraforge.core.config import ForgeConfigError
from tiny_adapters import TARGETS, close, forge_layers, logits, train


# low_cpu_mem_usage through inject_adapter_in_model -------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: loraforge.SaLoRAConfig(r=4, target_modules=TARGETS, window_start=1, window_end=3, gate_lr=0.5),
    lambda: loraforge.DeltaLoRAConfig(r=4, target_modules=TARGETS, start_step=2, update_ratio=2.0),
], ids=["salora", "delta_lora"])
def test_inject_adapter_in_model_with_low_cpu_mem_usage(make):
    source = get_peft_model(testing.tiny_llama(0), make())
    train(source, steps=5, max_steps=8)
    state = get_peft_model_state_dict(source)
    model = inject_adapter_in_model(make(), testing.tiny_llama(0), low_cpu_mem_usage=True)
    assert any(t.is_meta for t in model.parameters())  # the adapter waits for its weights
    set_peft_model_state_dict(model, state, low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    model.eval()
    close(logits(model), logits(source), atol=1e-6)


# target_parameters ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [loraforge.SaLoRAConfig, loraforge.DeltaLoRAConfig, loraforge.CoRAConfig])
def test_target_parameters_is_refused_naming_the_field(cls):
    with pytest.raises(ForgeConfigError, match=r"^target_parameters: .* remove target_parameters and list the Linear"):
        cls(target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"],
            **({"basis_path": "no-such-file"} if cls is loraforge.CoRAConfig else {}))


# model.to(dtype) keeps λ and the other control state ---------------------------------------------
def test_dtype_casts_and_peft_device_moves_keep_control_state_exact(tmp_path):
    model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(r=4, target_modules=TARGETS,
                                                                          window_start=1, window_end=3, gate_lr=0.5))
    train(model, steps=5, max_steps=8)
    with torch.no_grad():
        for layer in forge_layers(model):
            layer.lora_salora_lambda["default"].copy_(torch.tensor([0.1234567, -0.0007654321]))
    lam = forge_layers(model)[0].lora_salora_lambda["default"].clone()
    logits_fp32 = [l.lora_gate_logits["default"].detach().clone() for l in forge_layers(model)]
    model.to(torch.bfloat16).half().float().to(torch.bfloat16)
    layers = forge_layers(model)
    assert len(layers) == len(logits_fp32) == 6  # 3 targets in each of 2 layers
    assert torch.equal(layers[0].lora_salora_lambda["default"], lam)
    assert all(torch.equal(l.lora_gate_logits["default"], g) for l, g in zip(layers, logits_fp32))
    assert layers[0].lora_A["default"].weight.dtype == torch.bfloat16
    # PEFT's own move to the base layer's device and dtype (the low_cpu_mem_usage load path)
    model.save_pretrained(str(tmp_path))
    loaded = PeftModel.from_pretrained(testing.tiny_llama(0, dtype=torch.bfloat16), str(tmp_path), low_cpu_mem_usage=True)
    layers = forge_layers(loaded)
    assert len(layers) == 6
    assert torch.equal(layers[0].lora_salora_lambda["default"], lam)
    assert all(torch.equal(l.lora_gate_logits["default"], g) for l, g in zip(layers, logits_fp32))


# deep copies -----------------------------------------------------------------------------------------
def test_a_deep_copy_trains_like_the_original():
    """copy.deepcopy rebuilds layers without update_layer; the copy must still be driven (else plain LoRA)."""
    make = lambda: get_peft_model(testing.tiny_llama(0), loraforge.DeltaLoRAConfig(  # noqa: E731
        r=4, target_modules=TARGETS, start_step=1, update_ratio=2.0, propagation="in_place"))
    original, twin = make(), make()
    copied = copy.deepcopy(twin)
    train(original, steps=3, max_steps=3)
    train(copied, steps=3, max_steps=3)
    assert loraforge.driver(copied).step == 3
    w = dict(original.named_parameters())
    moved = 0.0
    for n, p in copied.named_parameters():
        torch.testing.assert_close(p, w[n], atol=1e-6, rtol=0)
        moved = max(moved, float((p - dict(twin.named_parameters())[n]).abs().max()))
    assert moved > 1e-3
