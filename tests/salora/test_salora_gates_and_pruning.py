"""SaLoRA without training runs: the gate's distribution, density, regulariser, config checks,
prune / export / merge / save-load, the rank report. Expected values are computed here by hand."""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file

import loraforge
from loraforge import testing
from loraforge.core.config import ForgeConfigError
from loraforge.salora import gate_summary, prune
from loraforge.salora.cli import ranks_main
from loraforge.salora.layer import expected_gate, sample_gate

GAMMA, ZETA = -0.1, 1.1
LOG11 = math.log(11.0)  # -log(-γ/ζ) and log((1-γ)/(ζ-1)) at the default γ, ζ




def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def salora_model(seed: int = 0, **config):
    model = get_peft_model(testing.tiny_llama(seed), loraforge.SaLoRAConfig(**config))
    assert len(loraforge.driver(model).layers) == 14  # SaLoRA's default: the 7 linears of each of 2 layers
    return model


def randomize(model, seed: int = 1, mean: float = -2.0, std: float = 2.0) -> None:
    """Give every layer a non-zero B and spread gate logits (some ranks get ĝ = 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in loraforge.driver(model).layers:
            b = layer.lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            la = layer.lora_gate_logits["default"]
            la.copy_(torch.randn(la.shape, generator=gen) * std + mean)


def live_by_hand(model) -> dict[str, int]:
    """ĝ > 0 ⟺ sigmoid(logα)·1.2 - 0.1 > 0 ⟺ logα > log(1/11)."""
    return {layer.forge_name: int((layer.lora_gate_logits["default"] > -LOG11).sum())
            for layer in loraforge.driver(model).layers}


def widths(model) -> dict[str, int]:
    return {l.forge_name: l.in_features + l.out_features for l in loraforge.driver(model).layers}


# the gate ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_hard_concrete_samples_match_the_closed_form(temperature):
    torch.manual_seed(0)
    log_alpha = torch.tensor([-3.0, -1.0, 0.0, 1.5])
    g = sample_gate(log_alpha.expand(100_000, 4), temperature, GAMMA, ZETA)
    assert g.min() >= 0 and g.max() <= 1
    for j, la in enumerate(log_alpha.tolist()):
        p_nonzero = _sigmoid(la - temperature * math.log(-GAMMA / ZETA))
        p_one = _sigmoid(la - temperature * math.log((1 - GAMMA) / (ZETA - 1)))
        assert (g[:, j] > 0).float().mean().item() == pytest.approx(p_nonzero, abs=0.01)
        assert (g[:, j] == 1).float().mean().item() == pytest.approx(p_one, abs=0.01)
    # E[g] by quadrature vs the Monte-Carlo mean
    torch.testing.assert_close(expected_gate(log_alpha, temperature, GAMMA, ZETA), g.mean(0), atol=0.006, rtol=0)


def test_training_forward_draws_one_shared_sample_inside_the_window_only():
    model = salora_model(window_start=2, window_end=4)
    d = loraforge.driver(model).begin(max_steps=10)
    axis = d.controllers[0].axes[0]
    model.train()
    assert axis.rank_gate() is None  # before the window: g = 1, plain LoRA
    for layer in d.layers:
        layer.lora_forge_step["default"].fill_(2)
        layer.refresh_axes()
    torch.manual_seed(0)
    draws = torch.stack([axis.rank_gate() for _ in range(4000)])
    assert draws.shape == (4000, 8)  # one value per rank per forward, shared by the micro-batch
    assert (draws > 0).float().mean().item() == pytest.approx(_sigmoid(LOG11), abs=0.015)
    model.eval()
    torch.testing.assert_close(axis.rank_gate(), torch.full((8,), 0.5 * 1.2 - 0.1))  # ĝ at logα = 0


def test_gradient_reaches_log_alpha_inside_the_window_and_not_outside(tiny_tokenizer):
    model = salora_model(window_start=0, window_end=5)
    randomize(model, mean=0.0, std=1.0)
    d = loraforge.driver(model).begin(max_steps=5)
    x = torch.randint(3, 500, (2, 16))
    model.train()
    model(input_ids=x, labels=x).loss.backward()
    for layer in d.layers:
        grad = layer.lora_gate_logits["default"].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad()
    prune(model)  # frozen gates: the logits leave the graph
    model(input_ids=x, labels=x).loss.backward()
    assert all(layer.lora_gate_logits["default"].grad is None for layer in d.layers)


def test_expected_density_at_init_is_eleven_twelfths():
    c = loraforge.driver(salora_model()).controllers[0]
    assert c.expected_density().item() == pytest.approx(11 / 12, abs=1e-6)  # sigmoid(log 11) = 0.9167
    assert c.summary()["realized_density"] == 1.0  # ĝ = 0.5 > 0 everywhere


def test_expected_density_is_parameter_weighted():
    model = salora_model()
    d = loraforge.driver(model)
    w = widths(model)
    with torch.no_grad():
        for layer in d.layers:  # mlp layers fully on (logα large), attention fully off
            layer.lora_gate_logits["default"].fill_(30.0 if ".mlp." in layer.forge_name else -30.0)
    mlp = sum(v for k, v in w.items() if ".mlp." in k)
    expected = mlp / sum(w.values())
    assert d.controllers[0].expected_density().item() == pytest.approx(expected, abs=1e-6)
    assert gate_summary(model)["realized_density"] == pytest.approx(expected)


def test_orthogonal_regulariser_matches_a_hand_computation():
    model = salora_model(window_start=5, window_end=10)  # outside the window: only the orthogonal term
    d = loraforge.driver(model).begin(max_steps=10)
    with torch.no_grad():
        for layer in d.layers:
            b, a = layer.lora_B["default"].weight, layer.lora_A["default"].weight
            b.zero_(), a.zero_()
            b[0, 0], b[1, 1] = 2.0, 1.0  # BᵀB = diag(4, 1, 0 × 6): (4-1)² + 0 + 6·1 = 15
            a[0, 0], a[0, 1] = 1.0, 1.0  # AAᵀ = diag(2, 0 × 7): (2-1)² + 7·1 = 8
    c = d.controllers[0]
    assert d.regularization_loss().item() == pytest.approx(0.1 * 23.0)  # β · mean over layers
    assert c.log_values()["salora/orth_loss"] == pytest.approx(23.0)
    c.config.orth_reg_reduction = "sum"
    assert d.regularization_loss().item() == pytest.approx(0.1 * 23.0 * len(d.layers))


# config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, kwargs", [
    ("target_density", {"target_density": 0.0}),
    ("target_density", {"target_density": 1.5}),
    ("window_start", {"window_start": 0.5, "window_end": 0.5}),
    ("window_start", {"window_start": 40, "window_end": 10}),
    ("window_end", {"window_end": 1.5}),
    ("r", {"r": 0}),
    ("temperature", {"temperature": 0.0}),
    ("gamma", {"gamma": 0.0}),
    ("zeta", {"zeta": 1.0}),
    ("gate_lr", {"gate_lr": 0.0}),
    ("orth_reg_reduction", {"orth_reg_reduction": "max"}),
    ("lagrangian", {"lagrangian": "cubic"}),
    ("prune_budget", {"prune_budget": "half"}),
])
def test_bad_configs_are_refused_naming_the_field(field, kwargs):
    with pytest.raises(ForgeConfigError, match=rf"^{field}: "):
        loraforge.SaLoRAConfig(**kwargs)


def test_window_is_checked_against_the_run_length():
    with pytest.raises(ForgeConfigError, match=r"^window_start: the window is empty"):
        loraforge.driver(salora_model()).begin(max_steps=1)  # round(0.2) = round(0.5) = 0
    with pytest.raises(ForgeConfigError, match=r"^window_end: resolves to step 50"):
        loraforge.driver(salora_model(window_start=5, window_end=50)).begin(max_steps=20)
    with pytest.raises(ForgeConfigError, match=r"^window_start: .*does not know"):
        loraforge.driver(salora_model()).begin(max_steps=None)


def test_target_modules_that_match_nothing_name_the_field():
    with pytest.raises(ValueError, match=r"^target_modules: "):
        salora_model(target_modules=["no_such_proj"])


def test_defaults_are_the_papers():
    cfg = loraforge.SaLoRAConfig()
    assert (cfg.r, cfg.lora_alpha, cfg.target_density, cfg.gate_lr, cfg.orth_reg_weight) == (8, 16, 0.5, 0.01, 0.1)
    assert (cfg.temperature, cfg.gamma, cfg.zeta, cfg.window_start, cfg.window_end) == (1.0, -0.1, 1.1, 0.2, 0.5)
    targeted = {l.forge_name.rsplit(".", 1)[1] for l in loraforge.driver(salora_model()).layers}
    assert targeted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


# prune / export / merge -------------------------------------------------------------------------
def _stock_outputs(tmp_path, base_dir, adapters: dict[str, str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Logits of each stock adapter, computed by a Python that never imports loraforge."""
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
out = {{}}
for name, path in {adapters!r}.items():
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_dir!r}), path).eval()
    assert type(model.base_model.model.model.layers[0].self_attn.q_proj).__module__.startswith("peft.")
    with torch.no_grad():
        out[name] = model(input_ids=torch.load({str(tmp_path / 'x.pt')!r})).logits
assert not any(m.startswith("loraforge") for m in sys.modules)
torch.save(out, {str(tmp_path / 'out.pt')!r})
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, cwd=str(tmp_path))
    return torch.load(tmp_path / "out.pt")


def _scores(model):
    """(ĝ, P(g>0), width) of every rank, by hand."""
    rows = []
    for layer in loraforge.driver(model).layers:
        for la in layer.lora_gate_logits["default"].tolist():
            rows.append((max(0.0, min(1.0, _sigmoid(la) * 1.2 - 0.1)), _sigmoid(la + LOG11),
                         layer.in_features + layer.out_features, layer.forge_name))
    return rows


def test_export_is_a_stock_peft_adapter_with_the_gated_eval_outputs(tmp_path, tiny_model_dir):
    gate_model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(prune_budget="gate"))
    randomize(gate_model)
    exact_model = copy.deepcopy(gate_model)
    x = torch.randint(3, 500, (2, 12))

    expected_gate_ranks = {k: v for k, v in live_by_hand(gate_model).items() if v}
    assert prune(gate_model) == live_by_hand(gate_model)
    assert loraforge.export_lora(gate_model, str(tmp_path / "gate")) == expected_gate_ranks

    exact_ranks = prune(exact_model, budget="exact")
    loraforge.export_lora(exact_model, str(tmp_path / "exact"))
    w = widths(exact_model)
    kept = sum(exact_ranks[m] * w[m] for m in w)
    total = 8 * sum(w.values())
    assert 0.5 * total <= kept < 0.5 * total + max(w.values())  # within one rank triplet of b·total
    # exact keeps the best ranks: every kept rank scores at least as high as every dropped one
    frozen = torch.cat([l.lora_gate_frozen["default"] for l in loraforge.driver(exact_model).layers])
    scores = [(g, p) for g, p, _, _ in _scores(exact_model)]
    kept_scores = [s for s, f in zip(scores, frozen.tolist()) if f > 0]
    dropped_scores = [s for s, f in zip(scores, frozen.tolist()) if f == 0]
    assert min(kept_scores) >= max(dropped_scores)
    assert live_by_hand(exact_model) != exact_ranks  # the two budgets really differ on this model

    for name, model, ranks in (("gate", gate_model, expected_gate_ranks), ("exact", exact_model, exact_ranks)):
        tensors = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        stock_ranks = {k[len("base_model.model."):-len(".lora_A.weight")]: v.shape[0]
                       for k, v in tensors.items() if k.endswith("lora_A.weight")}
        assert stock_ranks == {k: v for k, v in ranks.items() if v}
        meta = json.load(open(tmp_path / name / "loraforge_export.json"))["salora"]
        assert {"target_density", "expected_density", "realized_density", "export_density"} <= set(meta)
        assert meta["export_density"] == pytest.approx(sum(ranks[m] * w[m] for m in w) / total)

    stock = _stock_outputs(tmp_path, tiny_model_dir, {"gate": str(tmp_path / "gate"), "exact": str(tmp_path / "exact")}, x)
    for name, model in (("gate", gate_model), ("exact", exact_model)):
        model.eval()
        with torch.no_grad():
            gated = model(input_ids=x).logits
        torch.testing.assert_close(stock[name], gated, atol=1e-5, rtol=1e-5)


def test_merge_uses_the_deterministic_gate():
    model = salora_model()
    randomize(model)
    model.eval()
    x = torch.randint(3, 500, (2, 12))
    with torch.no_grad():
        gated = model(input_ids=x).logits
        with model.disable_adapter():
            base = model(input_ids=x).logits
        merged = copy.deepcopy(model).merge_and_unload()(input_ids=x).logits
    assert (gated - base).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(merged, gated, atol=1e-5, rtol=1e-5)


def test_save_and_load_keep_gates_lambda_window_and_step(tmp_path):
    model = salora_model(window_start=2, window_end=6)
    randomize(model)
    d = loraforge.driver(model).begin(max_steps=8)
    with torch.no_grad():
        for layer in d.layers:
            layer.lora_salora_lambda["default"].copy_(torch.tensor([0.25, -0.125]))
            layer.lora_forge_step["default"].fill_(3)
    prune(model, budget="exact")
    model.save_pretrained(str(tmp_path))
    loaded = loraforge.load_adapter(testing.tiny_llama(0), str(tmp_path), is_trainable=True)
    d2 = loraforge.driver(loaded)
    c2 = d2.controllers[0]
    assert (c2.start, c2.end, c2.frozen, c2.lam, c2.lam_linear, d2.step) == (2, 6, "exact", 0.25, -0.125, 3)
    for a, b in zip(d.layers, d2.layers):
        torch.testing.assert_close(a.lora_gate_logits["default"], b.lora_gate_logits["default"], rtol=0, atol=0)
        torch.testing.assert_close(a.lora_gate_frozen["default"], b.lora_gate_frozen["default"], rtol=0, atol=0)
    x = torch.randint(3, 500, (2, 12))
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)


# budget report ----------------------------------------------------------------------------------
def test_a_missed_budget_is_reported_with_both_densities(tmp_path, capsys):
    model = salora_model(prune_budget="gate")
    with torch.no_grad():
        for layer in loraforge.driver(model).layers:  # P(g>0) = sigmoid(-0.052) ≈ 0.487, ĝ = 0
            layer.lora_gate_logits["default"].fill_(-2.45)
    c_expected = _sigmoid(-2.45 + LOG11)
    prune(model)
    d = loraforge.driver(model)
    with pytest.warns(UserWarning, match=r"keeps 0\.000 .* target_density is 0\.500 \(expected density C = "
                                         rf"{c_expected:.3f}\).*prune_budget='exact'"):
        d.on_train_end(str(tmp_path))
    logs = d.log_values()
    assert logs["salora/expected_density"] == pytest.approx(c_expected, abs=1e-6)
    assert logs["salora/realized_density"] == 0.0 and logs["salora/live_ranks"] == 0.0
    assert json.load(open(tmp_path / "salora_ranks.json"))["realized_density"] == 0.0


def test_ranks_cli_reads_a_saved_adapter_without_the_base_model(tmp_path, capsys):
    model = salora_model(prune_budget="gate")
    randomize(model, seed=3)
    model.save_pretrained(str(tmp_path / "adapter"))
    assert ranks_main([str(tmp_path / "adapter"), "--png", str(tmp_path / "r.png"), "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    by_hand = live_by_hand(model)
    for name, live in by_hand.items():
        row = next(line for line in printed.splitlines() if line.startswith(name + " "))
        # never trained, so before the window: the eval gate is 1 and export keeps all 8 ranks
        # (docs/methods.md, "SaLoRA: the gates")
        assert int(row.split()[3]) == live and int(row.split()[4]) == 8
    w = widths(model)
    realized = sum(by_hand[m] * w[m] for m in w) / (8 * sum(w.values()))
    expected = sum(_sigmoid(la + LOG11) * w[l.forge_name] for l in loraforge.driver(model).layers
                   for la in l.lora_gate_logits["default"].tolist()) / (8 * sum(w.values()))
    assert f"expected (closed-form L0) {expected:.3f} | realized (ĝ>0) {realized:.3f}" in printed
    assert open(tmp_path / "r.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(tmp_path / "r.json"))["live_ranks"] == sum(by_hand.values())

    prune(model)
    loraforge.export_lora(model, str(tmp_path / "stock"))
    assert ranks_main([str(tmp_path / "stock")]) == 0
    printed = capsys.readouterr().out
    assert f"realized_density {realized:.3f}" in printed
    assert f"model.layers.0.self_attn.q_proj  {by_hand['model.layers.0.self_attn.q_proj']}" in printed
