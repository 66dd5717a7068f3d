"""PEFT operations that the matrix of test_peft_operations.py does not cover: SaLoRA before its gate
window (eval, merge and export use g = 1), low_cpu_mem_usage injection, target_parameters, the dtype of
control state under casts and autocast_adapter_dtype, DDP's unused parameters, and deep copies."""
from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from transformers import TrainingArguments

import loraforge
from loraforge import testing
from loraforge.core.config import ForgeConfigError
from test_peft_operations import TARGETS, X, close, forge_layers, logits, train


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


# DDP with find_unused_parameters=False ------------------------------------------------------------
def _salora_before_window():
    return get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(r=4, target_modules=TARGETS,
                                                                         window_start=4, window_end=8))


def test_ddp_without_unused_parameter_detection_fails_on_its_own_at_step_two(gloo_world_of_one):
    """Why the refusal below exists: DDP's reducer fails on the second step, after one update."""
    model = _salora_before_window()
    loraforge.driver(model).begin(max_steps=8)
    ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ddp(input_ids=X, labels=X).loss.backward()
    opt.step()
    with pytest.raises(RuntimeError, match="unused parameters|finished reduction"):
        ddp(input_ids=X, labels=X).loss.backward()


@pytest.mark.parametrize("find_unused", [False, True])
def test_ddp_find_unused_parameters_false_is_refused_at_train_begin(tmp_path, gloo_world_of_one, lm_dataset, find_unused):
    model = _salora_before_window()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(before) == 6 * 3  # A, B and the gate logits of 3 targets in 2 layers

    class DDPTrainer(loraforge.LoraForgeTrainer):
        def _wrap_model(self, model, training=True, dataloader=None):  # what accelerate does on several ranks
            return torch.nn.parallel.DistributedDataParallel(self.model, find_unused_parameters=find_unused)

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, learning_rate=1e-2,
                             ddp_find_unused_parameters=find_unused)
    trainer = DDPTrainer(model=model, args=args, train_dataset=lm_dataset.select(range(16)))
    if find_unused:
        trainer.train()  # window 4-8 inside the run: gates sample, then freeze
        assert loraforge.driver(model).step == 8
        return
    with pytest.raises(ForgeConfigError, match=r"^ddp_find_unused_parameters: SaLoRAConfig under DDP needs "
                                               r"find_unused_parameters=True .*ddp_find_unused_parameters=True"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


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


def test_a_model_trained_inside_the_gate_window_can_be_deep_copied():
    """The batched gate sampler caches autograd graphs between forwards; a copy must not carry them."""
    model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(r=4, target_modules=TARGETS,
                                                                          window_start=1, window_end=20, gate_lr=0.5))
    train(model, steps=4, max_steps=40)
    model.train()
    model(input_ids=X, labels=X).loss.backward()  # leaves a sampled gate (with its graph) cached
    copied = copy.deepcopy(model).eval()
    close(logits(copied), logits(model.eval()), atol=1e-6)
