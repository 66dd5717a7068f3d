"""SaLoRA through PEFT's operations where its gate phase matters: before the window eval, merge and
export use what training used (g = 1); the gate state stays fp32 whatever PEFT's
autocast_adapter_dtype; a model deep-copied inside the window evaluates as the original."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model

import loraforge
from loraforge import testing
from tiny_adapters import TARGETS, X, close, forge_layers, logits, train


# SaLoRA before its window: g = 1 in training, eval, merge and export -----------------------------
def test_salora_before_its_window_evaluates_merges_and_exports_what_it_trains(tmp_path):
    model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(r=4, target_modules=TARGETS,
                                                                          window_start=30, window_end=40))
    train(model, steps=10, max_steps=40)  # step 10 of 40, window 30-40
    model.train()  # no dropout anywhere in this model: training mode is deterministic
    with torch.no_grad():
        training_mode = model(input_ids=X).logits
    model.eval()
    close(logits(model), training_mode, atol=1e-6)
    with model.disable_adapter():
        assert (logits(model) - training_mode).abs().max() > 1e-2  # the adapter does something
    ranks = loraforge.export_lora(model, str(tmp_path / "stock"))
    assert set(ranks.values()) == {4}  # no rank is dropped before the window
    stock = PeftModel.from_pretrained(testing.tiny_llama(0), str(tmp_path / "stock")).eval()
    close(logits(stock), training_mode)
    model.train()
    model.merge_adapter()  # a layer left in training mode merges g = 1 too
    close(logits(model), training_mode)


# gate logits and PEFT's autocast_adapter_dtype ----------------------------------------------------
@pytest.mark.parametrize("autocast", [True, False])
def test_gate_state_stays_fp32_whatever_autocast_adapter_dtype(autocast):
    """Decision: A and B follow PEFT's rule (upcast to fp32 unless autocast_adapter_dtype=False); gate
    logits, frozen gates and λ stay fp32, because bf16 would round their small updates away."""
    model = get_peft_model(testing.tiny_llama(0, dtype=torch.bfloat16), loraforge.SaLoRAConfig(
        r=4, target_modules=TARGETS, window_start=0, window_end=20, budget_control="paper"),  # λ's own ascent
        autocast_adapter_dtype=autocast)
    layers = forge_layers(model)
    assert {l.lora_A["default"].weight.dtype for l in layers} == {torch.float32 if autocast else torch.bfloat16}
    for name in ("lora_gate_logits", "lora_gate_frozen", "lora_salora_lambda"):
        assert {getattr(l, name)["default"].dtype for l in layers} == {torch.float32}, name
    d = loraforge.driver(model).begin(max_steps=20)
    controller = d.controllers[0]
    with torch.no_grad():
        for layer in layers:
            layer.lora_salora_lambda["default"][0] = 1.0
    controller.sync()
    gap = float(controller.expected_density()) - 0.5  # at init C = 0.917 (closed form), b = 0.5
    for layer in layers:  # one step inside the window: λ ← λ + η_c·(C - b)², by hand
        layer.lora_forge_step["default"] += 1
    controller.on_step_end(1, 20)
    increment = 0.01 * gap ** 2
    assert torch.bfloat16 != torch.float32 and 1.0 + increment != torch.tensor(1.0 + increment, dtype=torch.bfloat16).item()
    assert float(layers[-1].lora_salora_lambda["default"][0]) == pytest.approx(1.0 + increment, rel=1e-7)
    with torch.no_grad():
        out = model(input_ids=X).logits
    assert torch.isfinite(out).all()


# deep copies ----------------------------------------------------------------------------------------
def test_a_model_trained_inside_the_gate_window_can_be_deep_copied():
    """The batched gate sampler caches autograd graphs between forwards; a copy must not carry them."""
    model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(r=4, target_modules=TARGETS,
                                                                          window_start=1, window_end=20, gate_lr=0.5))
    train(model, steps=4, max_steps=40)
    model.train()
    model(input_ids=X, labels=X).loss.backward()  # leaves a sampled gate (with its graph) cached
    copied = copy.deepcopy(model).eval()
    close(logits(copied), logits(model.eval()), atol=1e-6)
