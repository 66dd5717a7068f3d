"""SaLoRA's batched quantities (all layers' gates in one draw, the orthogonal term over stacked factors,
one expected L0) against per-layer formulas written out here, and the driver cache's invalidation."""
from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

import loraforge
from loraforge import testing

GAMMA, ZETA, TAU = -0.1, 1.1, 2.0 / 3.0  # τ off its default 1, so a misplaced τ shows


def model_with_mixed_ranks(**config):
    """Ranks 8 (attention) and 4 (MLP): the batched code must handle unequal ranks and several shapes."""
    cfg = loraforge.SaLoRAConfig(r=8, rank_pattern={"gate_proj": 4, "up_proj": 4, "down_proj": 4}, temperature=TAU,
                                 **config)
    model = get_peft_model(testing.tiny_llama(0), cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in loraforge.driver(model).layers:
            for w in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
            la = layer.lora_gate_logits["default"]
            la.copy_(torch.randn(la.shape, generator=gen) * 2.0)
    assert len(loraforge.driver(model).layers) == 14  # SaLoRA's default: the 7 linears of each of 2 layers
    return model


@pytest.mark.parametrize("ranks", ["mixed", "equal"])
def test_orthogonal_term_and_its_gradient_equal_the_per_layer_formula(ranks):
    model = model_with_mixed_ranks() if ranks == "mixed" else get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(r=4))
    d = loraforge.driver(model)
    if ranks == "equal":
        with torch.no_grad():
            for layer in d.layers:
                layer.lora_B["default"].weight.normal_(0, 0.3)
    assert len({layer.r["default"] for layer in d.layers}) == (2 if ranks == "mixed" else 1)
    factors = [(l.lora_A["default"].weight, l.lora_B["default"].weight) for l in d.layers]
    ref_leaves = [(a.detach().double().requires_grad_(), b.detach().double().requires_grad_()) for a, b in factors]
    ref = 0.0
    for a, b in ref_leaves:  # ||BᵀB - I||_F² + ||AAᵀ - I||_F², layer by layer, in float64
        eye = torch.eye(a.shape[0], dtype=torch.float64)
        ref = ref + ((b.T @ b - eye) ** 2).sum() + ((a @ a.T - eye) ** 2).sum()
    ref.backward()
    got = d.controllers[0].orth_loss()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.detach(), rtol=1e-6, atol=0)
    got.backward()
    for (a, b), (ra, rb) in zip(factors, ref_leaves):
        # float32 round-off is relative to the gradient's scale, not to each entry: a few ulps of the largest
        for g, ref in ((a.grad, ra.grad), (b.grad, rb.grad)):
            torch.testing.assert_close(g.double(), ref, rtol=1e-5, atol=2e-6 * float(ref.abs().max()))


def test_orthogonal_term_of_bf16_factors_is_computed_in_float32():
    model = model_with_mixed_ranks()
    d = loraforge.driver(model)
    ref = 0.0
    for layer in d.layers:
        for name in ("lora_A", "lora_B"):
            w = getattr(layer, name)["default"].weight
            w.data = w.data.to(torch.bfloat16)
        a, b = (getattr(layer, n)["default"].weight.detach().double() for n in ("lora_A", "lora_B"))
        eye = torch.eye(a.shape[0], dtype=torch.float64)
        ref += float(((b.T @ b - eye) ** 2).sum() + ((a @ a.T - eye) ** 2).sum())
    got = d.controllers[0].orth_loss()
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(ref, rel=1e-5)  # bf16 inputs, exact fp32 arithmetic on them
    got.backward()
    assert all(l.lora_A["default"].weight.grad.dtype == torch.bfloat16 for l in d.layers)


def test_expected_density_equals_the_per_layer_formula():
    model = model_with_mixed_ranks()
    d = loraforge.driver(model)
    num = den = 0.0
    for layer in d.layers:  # C = Σ P(g > 0)·(d_in + d_out) / Σ r·(d_in + d_out), P(g > 0) = σ(logα - τ log(-γ/ζ))
        w = layer.in_features + layer.out_features
        num += sum(1 / (1 + math.exp(-(la - TAU * math.log(-GAMMA / ZETA))))
                   for la in layer.lora_gate_logits["default"].tolist()) * w
        den += layer.r["default"] * w
    assert d.controllers[0].expected_density().item() == pytest.approx(num / den, rel=1e-6)


@pytest.mark.parametrize("ranks", ["mixed", "equal"])
def test_one_draw_gives_every_layer_the_per_layer_hard_concrete_sample(ranks):
    """All gates of one forward come from one torch.rand over all ranks (layers in module order); each
    layer's gate and its gradient are the per-layer formula of Eq. 7 applied to its slice of that draw."""
    kw = dict(window_start=0, window_end=5)
    model = (model_with_mixed_ranks(**kw) if ranks == "mixed"
             else get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(r=4, temperature=TAU, **kw)))
    d = loraforge.driver(model).begin(max_steps=5)
    model.train()
    axes = d.controllers[0].axes
    sizes = [a.layer.r["default"] for a in axes]
    torch.manual_seed(7)
    gates = [a.rank_gate() for a in axes]  # one forward's worth of requests
    torch.manual_seed(7)
    u = torch.rand(len(sizes), sizes[0]).flatten() if ranks == "equal" else torch.rand(sum(sizes))
    u = u.clamp(torch.finfo(torch.float32).tiny, 1 - 1e-7)
    offset = 0
    for axis, gate, r in zip(axes, gates, sizes):
        la = axis.log_alpha.detach().clone().requires_grad_()
        ui = u[offset:offset + r]
        offset += r
        ref = (torch.sigmoid((torch.log(ui) - torch.log(1 - ui) + la) / TAU) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)
        torch.testing.assert_close(gate, ref, rtol=1e-6, atol=1e-6)
        ref.sum().backward()
        (grad,) = torch.autograd.grad(gate.sum(), axis.log_alpha, retain_graph=True)
        torch.testing.assert_close(grad, la.grad, rtol=1e-5, atol=1e-6)
    again = axes[0].rank_gate()  # the same layer asks again: its next forward call, a new sample
    assert not torch.equal(again.detach(), gates[0].detach())
    assert axes[1].rank_gate() is not gates[1]  # and every layer shares the new draw


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint_recomputation_sees_the_same_gates_and_dropout(reentrant, dropout):
    """Gate gradients with and without activation checkpointing agree: the recomputed blocks see the same
    gate sample; with lora_dropout on, they also draw the same dropout masks (the drawing layer repeats
    its draw)."""
    grads = []
    for checkpointing in (False, True):
        model = model_with_mixed_ranks(window_start=0, window_end=5, lora_dropout=dropout)
        loraforge.driver(model).begin(max_steps=5)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
            if reentrant:
                model.enable_input_require_grads()
        model.train()
        x = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
        torch.manual_seed(11)
        model(input_ids=x, labels=x).loss.backward()
        layers = loraforge.driver(model).layers
        grads.append(torch.cat([l.lora_gate_logits["default"].grad for l in layers]
                               + [l.lora_A["default"].weight.grad.flatten() for l in layers]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_drivers_cache_follows_adapter_changes():
    model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(r=4))
    first = loraforge.drivers(model)
    assert loraforge.drivers(model) == first and first[0].adapter == "default"  # cached: the same drivers
    model.add_adapter("other", loraforge.DeltaLoRAConfig(r=4, target_modules=["q_proj"]))
    model.set_adapter("other")
    (other,) = loraforge.drivers(model)
    assert other.adapter == "other" and len(other.layers) == 2
    model.set_adapter("default")
    assert loraforge.drivers(model) == first
    model.delete_adapter("other")
    assert loraforge.drivers(model) == first
    model.merge_and_unload()
    assert loraforge.drivers(model) == []


def test_driver_step_is_reread_after_a_load():
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model = get_peft_model(testing.tiny_llama(0), loraforge.DeltaLoRAConfig(r=4, target_modules=["q_proj"]))
    d = loraforge.driver(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randint(3, 500, (1, 8))
    state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    for _ in range(3):
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
    assert d.step == 3 and [int(l.lora_forge_step["default"]) for l in d.layers] == [3, 3]  # q_proj in 2 layers
    set_peft_model_state_dict(model, state)  # back to step 0
    assert d.step == 0


def test_plain_lora_layers_are_not_driven():
    model = get_peft_model(testing.tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj"]))
    assert loraforge.drivers(model) == []
