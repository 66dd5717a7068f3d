"""Delta-LoRA: the update rule, the two propagation modes, save/load, export and refusals."""
from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import Linear as StockLoraLinear

import loraforge
from loraforge import DeltaLoRAConfig, testing
from loraforge.core.config import ForgeConfigError
from loraforge.core.layer import ForgeLinear



TARGETS = ["q_proj", "v_proj", "down_proj"]


def _config(mode, **kw):
    base = dict(target_modules=TARGETS, r=4, lora_alpha=8, update_ratio=0.5, start_step=10, propagation=mode)
    base.update(kw)
    return DeltaLoRAConfig(**base)


def _model(mode, dtype=torch.float64, **kw):
    # init_lora_weights=False: B starts random too, so B A moves in every direction from step 1.
    kw.setdefault("init_lora_weights", False)
    torch.manual_seed(123)
    return get_peft_model(testing.tiny_llama(seed=0, dtype=dtype), _config(mode, **kw))


def _batches(n, seed=7, size=(4, 12)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 512, size, generator=gen) for _ in range(n)]


def _layers(model):
    found = [m for m in model.modules() if isinstance(m, ForgeLinear)]
    assert found, "the model holds no loraforge layer"  # a check over them must not pass on nothing
    return found


def _train(model, steps, lr=3e-3, on_step=None):
    """Hand loop: the optimizer hook alone drives Delta-LoRA. Returns per-step logits and gradients."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    logits, grads = [], []
    for t, ids in enumerate(_batches(steps), start=1):
        out = model(input_ids=ids)
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).double(), ids[:, 1:].flatten())
        loss.backward()
        logits.append(out.logits.detach().clone())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        opt.step()
        opt.zero_grad()
        if on_step:
            on_step(t, model)
    return logits, grads


def _probe_logits(model, seed=99):
    model.eval()
    with torch.no_grad():
        return model(input_ids=_batches(1, seed=seed)[0]).logits


def _base_weights(model):
    return {m.forge_name: m.get_base_layer().weight.detach().clone() for m in _layers(model)}


# the update rule --------------------------------------------------------------------------------
def test_in_place_and_folded_have_the_same_values_and_gradients_every_step():
    inplace, folded, plain = _model("in_place"), _model("folded"), _model("folded", update_ratio=0.0)
    li, gi = _train(inplace, 30)
    lf, gf = _train(folded, 30)
    lp, _ = _train(plain, 30)
    for t in range(30):
        torch.testing.assert_close(lf[t], li[t], rtol=1e-10, atol=1e-10)
        assert gf[t].keys() == gi[t].keys()
        for name in gi[t]:
            torch.testing.assert_close(gf[t][name], gi[t][name], rtol=1e-9, atol=1e-11)
    # W starts moving after step K=10 (logits of step t come from the weights after step t-1) ...
    torch.testing.assert_close(li[10], lp[10], rtol=1e-10, atol=1e-10)
    assert (li[11] - lp[11]).abs().max() > 1e-6
    assert (li[-1] - lp[-1]).abs().max() > 1e-3
    # ... and the merged models agree.
    mi, mf = _named_linears(inplace.merge_and_unload()), _named_linears(folded.merge_and_unload())
    assert set(mi) == set(mf)
    for n in mi:
        torch.testing.assert_close(mf[n], mi[n], rtol=1e-10, atol=1e-12)


def _named_linears(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("mode", ["in_place", "folded"])
def test_matches_a_hand_written_reference_on_one_linear_layer(mode):
    """The update rule written out by hand in plain PyTorch, Adam on A, B; W moves after step t > K."""
    d_in, d_out, r, alpha, lam, K, steps = 7, 5, 2, 6, 0.7, 3, 12
    s = alpha / r

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(d_in, d_out, bias=False, dtype=torch.float64)

        def forward(self, x):
            return self.lin(x)

    torch.manual_seed(0)
    net = Net()
    w0 = net.lin.weight.detach().clone()
    model = get_peft_model(net, DeltaLoRAConfig(target_modules=["lin"], r=r, lora_alpha=alpha, update_ratio=lam,
                                                 start_step=K, propagation=mode, init_lora_weights=False))
    layer = model.base_model.model.lin
    A = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    B = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    W = w0.clone()
    ref_opt = torch.optim.Adam([A, B], lr=0.05)
    opt = torch.optim.Adam([layer.lora_A["default"].weight, layer.lora_B["default"].weight], lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for t in range(1, steps + 1):
        x, y = torch.randn(16, d_in, generator=gen, dtype=torch.float64), torch.randn(16, d_out, generator=gen, dtype=torch.float64)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        prev = (B @ A).detach()
        ((x @ W.T + s * x @ A.T @ B.T - y) ** 2).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        if t > K:
            W += lam * s * ((B @ A).detach() - prev)
    torch.testing.assert_close(layer.lora_A["default"].weight.detach(), A.detach(), rtol=1e-10, atol=1e-12)
    if mode == "in_place":
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), W, rtol=1e-10, atol=1e-12)
    else:
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), w0, rtol=0, atol=0)  # never written
    merged = model.merge_and_unload().lin.weight.detach()
    torch.testing.assert_close(merged, W + s * (B @ A).detach(), rtol=1e-10, atol=1e-12)
    assert (W - w0).abs().max() > 1e-3  # the reference did move W


def test_in_place_telescopes_to_the_snapshot():
    model, K, lam, s = _model("in_place"), 10, 0.5, 8 / 4
    w0 = _base_weights(model)
    snap = {}

    def grab(t, m):
        if t == K:  # the factors right after optimizer step K
            snap.update({l.forge_name: (l.lora_B["default"].weight @ l.lora_A["default"].weight).detach().clone()
                         for l in _layers(m)})

    _train(model, 25, on_step=grab)
    for layer in _layers(model):
        BA = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
        expected = lam * s * (BA - snap[layer.forge_name])
        torch.testing.assert_close(layer.get_base_layer().weight - w0[layer.forge_name], expected, rtol=1e-9, atol=1e-12)
        assert expected.abs().max() > 1e-4


def test_nothing_moves_before_the_snapshot():
    model = _model("in_place", start_step=8)
    w0 = _base_weights(model)
    _train(model, 8)
    for layer in _layers(model):
        torch.testing.assert_close(layer.get_base_layer().weight, w0[layer.forge_name], rtol=0, atol=0)
        assert int(layer.lora_delta_steps["default"][1]) == 8  # snapshot taken after step 8


def test_start_step_zero_snapshots_the_initial_factors():
    model = _model("in_place", start_step=0)
    init = {l.forge_name: (l.lora_B["default"].weight @ l.lora_A["default"].weight).detach().clone() for l in _layers(model)}
    w0 = _base_weights(model)
    _train(model, 3)
    for l in _layers(model):
        BA = (l.lora_B["default"].weight @ l.lora_A["default"].weight).detach()
        torch.testing.assert_close(l.get_base_layer().weight - w0[l.forge_name], 0.5 * 2 * (BA - init[l.forge_name]),
                                   rtol=1e-9, atol=1e-12)


def test_bf16_in_place_stays_exact():
    """A bf16 W holds the rounding of the exact fp64 W_0 + λ·s·(B_T A_T - B_K A_K) (within one rounding step)."""
    K, lam, s = 2, 0.5, 2.0
    torch.manual_seed(123)
    model = get_peft_model(testing.tiny_llama(seed=0, dtype=torch.bfloat16),
                           _config("in_place", start_step=K, init_lora_weights=True))
    w0 = {k: v.double() for k, v in _base_weights(model).items()}
    snap = {}

    def grab(t, m):
        if t == K:
            snap.update({l.forge_name: (l.lora_B["default"].weight.double() @ l.lora_A["default"].weight.double()).detach()
                         for l in _layers(m)})

    with pytest.warns(UserWarning, match="fp32 buffer"):
        _train(model, 30, lr=1e-4, on_step=grab)
    for l in _layers(model):
        exact = w0[l.forge_name] + lam * s * (
            (l.lora_B["default"].weight.double() @ l.lora_A["default"].weight.double()).detach() - snap[l.forge_name])
        w = l.get_base_layer().weight.double()
        ulp = (exact.float().abs() * 2.0 ** -8)  # bf16 spacing bound
        assert ((w - exact).abs() <= ulp + 1e-30).all()
        assert ((w - w0[l.forge_name]).abs() > 0).any()


# save / load / merge / export ----------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["in_place", "folded"])
def test_save_and_load_onto_a_fresh_base_reproduces_the_model(tmp_path, mode):
    model = _model(mode, start_step=4)
    _train(model, 12)
    expected = _probe_logits(model)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORAFORGE_DELTA_LORA"
    loaded = loraforge.load_adapter(testing.tiny_llama(seed=0, dtype=torch.float64), str(tmp_path))
    assert isinstance(loaded.peft_config["default"], DeltaLoRAConfig)
    torch.testing.assert_close(_probe_logits(loaded), expected, rtol=1e-10, atol=1e-10)
    # A second load of the same state (or a resume onto the same object) does not apply it twice.
    state = get_peft_model_state_dict(loaded)
    set_peft_model_state_dict(loaded, state)
    set_peft_model_state_dict(loaded, state)
    torch.testing.assert_close(_probe_logits(loaded), expected, rtol=1e-10, atol=1e-10)
    # The saved adapter carries B_K, A_K, the step state and λ, s.
    assert any(k.endswith("lora_delta_BK") for k in state) and any(k.endswith("lora_forge_step") for k in state)
    # PEFT's low_cpu_mem_usage path (adapter built on "meta", then assigned) gives the same model.
    lean = PeftModel.from_pretrained(testing.tiny_llama(seed=0, dtype=torch.float64), str(tmp_path), low_cpu_mem_usage=True)
    torch.testing.assert_close(_probe_logits(lean), expected, rtol=1e-10, atol=1e-10)


def test_loading_an_earlier_state_onto_a_trained_in_place_model_rewinds_w(tmp_path):
    model = _model("in_place", start_step=4)
    _train(model, 8)
    early = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    early_logits = _probe_logits(model)
    model.train()
    _train(model, 6)
    assert (_probe_logits(model) - early_logits).abs().max() > 1e-4
    set_peft_model_state_dict(model, early)
    torch.testing.assert_close(_probe_logits(model), early_logits, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", ["in_place", "folded"])
def test_merge_and_unload_gives_the_rank_2r_formula(mode):
    model, lam, s = _model(mode, start_step=3), 0.5, 2.0
    w0 = _base_weights(model)
    snap = {}
    _train(model, 9, on_step=lambda t, m: t == 3 and snap.update(
        {l.forge_name: (l.lora_B["default"].weight @ l.lora_A["default"].weight).detach().clone() for l in _layers(m)}))
    factors = {l.forge_name: (l.lora_B["default"].weight @ l.lora_A["default"].weight).detach() for l in _layers(model)}
    merged = dict(model.merge_and_unload().named_modules())
    for name, BA in factors.items():
        expected = w0[name] + s * ((1 + lam) * BA - lam * snap[name])
        torch.testing.assert_close(merged[name].weight.detach(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["in_place", "folded"])
def test_export_is_a_stock_rank_2r_lora_that_plain_peft_loads(tmp_path, mode):
    model = _model(mode, start_step=4)
    _train(model, 10)
    expected = _probe_logits(model)
    ranks = loraforge.export_lora(model, str(tmp_path))
    assert set(ranks.values()) == {8}  # 2r
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    meta = json.loads((tmp_path / "loraforge_export.json").read_text())["delta_lora"]
    assert (meta["snapshot_step"], meta["steps"], meta["propagation"]) == (4, 10, mode)
    stock = PeftModel.from_pretrained(testing.tiny_llama(seed=0, dtype=torch.float64), str(tmp_path))
    layers = [m for m in stock.modules() if isinstance(m, StockLoraLinear)]
    assert layers and not any(isinstance(m, ForgeLinear) for m in layers)
    assert all(m.lora_A["default"].weight.shape[0] == 8 for m in layers)
    torch.testing.assert_close(_probe_logits(stock), expected, rtol=1e-9, atol=1e-9)


# refusals -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, field, hint", [
    (dict(lora_dropout=0.1), "lora_dropout", "lora_dropout=0.0"),
    (dict(update_ratio=-0.5), "update_ratio", ">= 0"),
    (dict(start_step=-1), "start_step", ">= 0"),
    (dict(start_step=2.5), "start_step", "integer"),
    (dict(propagation="inplace"), "propagation", "in_place"),
])
def test_config_refuses_bad_values_naming_the_field_and_the_fix(kwargs, field, hint):
    with pytest.raises(ForgeConfigError, match=rf"^{field}:.*{hint}"):
        DeltaLoRAConfig(target_modules=["q_proj"], **kwargs)


def test_dropout_refusal_says_why():
    with pytest.raises(ForgeConfigError, match="gradient of B·A differ from that of W"):
        DeltaLoRAConfig(lora_dropout=0.05)
    assert DeltaLoRAConfig().lora_dropout == 0.0


@pytest.mark.parametrize("mode", ["in_place", "folded"])
def test_training_with_the_adapter_merged_is_refused(mode):
    # lm_head trains too, so the loss has a gradient and the optimizer steps with the adapter merged.
    model = _model(mode, start_step=0, modules_to_save=["lm_head"])
    model.merge_adapter()
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        _train(model, 1)


@pytest.mark.parametrize("mode, unload", [("in_place", "unload"), ("in_place", "merge_and_unload"),
                                          ("folded", "merge_and_unload")])
def test_loading_onto_a_base_that_already_carries_the_update_is_refused(tmp_path, mode, unload):
    model = _model(mode, start_step=3)
    _train(model, 8)
    model.save_pretrained(tmp_path)
    carrying = getattr(model, unload)()  # in place + unload(): W = W_0 + λ·s·(B A - B_K A_K)
    with pytest.raises(RuntimeError, match="already carries.*ORIGINAL base"):
        loraforge.load_adapter(carrying, str(tmp_path))


def test_loading_onto_a_different_base_warns(tmp_path):
    model = _model("folded", start_step=3)
    _train(model, 5)
    model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="differs from the one"):
        loraforge.load_adapter(testing.tiny_llama(seed=1, dtype=torch.float64), str(tmp_path))


# composition and precision --------------------------------------------------------------------------
class _FixedGate(loraforge.core.layer.Axis):
    """A fixed per-rank gate, standing in for a gating axis (SaLoRA) composed with Delta-LoRA."""

    def rank_gate(self):
        return torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=torch.float64)


class _GatedDeltaConfig(DeltaLoRAConfig):
    def axes(self):
        return [_FixedGate, *super().axes()]


def test_with_a_gating_axis_both_modes_agree_and_w_moves_by_the_gated_product():
    models = {}
    for mode in ("in_place", "folded"):
        torch.manual_seed(123)
        cfg = _GatedDeltaConfig(target_modules=TARGETS, r=4, lora_alpha=8, update_ratio=0.5, start_step=3,
                                propagation=mode, init_lora_weights=False)
        models[mode] = get_peft_model(testing.tiny_llama(seed=0, dtype=torch.float64), cfg)
    assert not _layers(models["folded"])[0].forge_axes["default"][1]._fusable()  # the unfused path runs
    w0 = _base_weights(models["in_place"])
    snap = {}
    li, gi = _train(models["in_place"], 8, on_step=lambda t, m: t == 3 and snap.update(
        {l.forge_name: (l.lora_B["default"].weight * l.gate_values("default") @ l.lora_A["default"].weight).detach().clone()
         for l in _layers(m)}))
    lf, gf = _train(models["folded"], 8)
    for t in range(8):
        torch.testing.assert_close(lf[t], li[t], rtol=1e-10, atol=1e-10)
        for name in gi[t]:
            torch.testing.assert_close(gf[t][name], gi[t][name], rtol=1e-9, atol=1e-11)
    for l in _layers(models["in_place"]):
        P = (l.lora_B["default"].weight * l.gate_values("default") @ l.lora_A["default"].weight).detach()
        torch.testing.assert_close(l.get_base_layer().weight - w0[l.forge_name], 0.5 * 2.0 * (P - snap[l.forge_name]),
                                   rtol=1e-9, atol=1e-12)


def test_folded_branch_runs_under_bf16_autocast():
    model = _model("folded", dtype=torch.float32, start_step=0)
    _train(model, 1)
    ids = _batches(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)

