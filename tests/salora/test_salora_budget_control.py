"""SaLoRA's budget control: the default ("schedule") reaches b inside the window at any run length,
and the paper's rule (Eq. 12, budget_control="paper") ascends λ by the squared violation.

Runs are hand loops (driver.begin + regularization_loss + param_groups) on a four-layer MLP distilled
from a teacher with planted low-rank deltas, at the paper's defaults (but for b and the run length):
a tiny Llama costs ~60 ms a step on a shared CI core, the MLP ~5, which is what lets the test run
three lengths spanning 10× (100 / 300 / 1,000 steps) for two seeds."""
from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

import loraforge

LOG11 = math.log(11.0)


def densities_by_hand(model) -> tuple[float, float]:
    """(C, realised): Σ sigmoid(logα + log 11)·w / Σ r·w and the share of w with ĝ > 0 ⟺ logα > -log 11."""
    num = live = den = 0.0
    for layer in loraforge.driver(model).layers:
        w = layer.in_features + layer.out_features
        la = layer.lora_gate_logits["default"].detach().double()
        num += float(torch.sigmoid(la + LOG11).sum()) * w
        live += float((la > -LOG11).sum()) * w
        den += la.numel() * w
    return num / den, live / den


class Mlp(torch.nn.Module):
    """Four 24 × 24 linears with tanh between: the smallest model whose layers the gates must rank."""

    def __init__(self, width: int = 24, depth: int = 4) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def tiny(seed: int, **config):
    """An r = 8 SaLoRA adapter on every layer of an `Mlp` and the teacher it learns (the same base with a
    random delta of rank 0-8 per layer, so some ranks are worth more than others)."""
    torch.manual_seed(seed)
    base, teacher = Mlp(), Mlp()
    teacher.load_state_dict(base.state_dict())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, layer in zip((0, 3, 5, 8), teacher.layers):
            u, v = torch.randn(24, k, generator=gen), torch.randn(k, 24, generator=gen)
            layer.weight += u @ v / 24
    config.setdefault("budget_control", "schedule")  # the control these tests are about unless they name one
    return get_peft_model(base, loraforge.SaLoRAConfig(target_modules=["0", "1", "2", "3"], **config)), teacher


def train(model, teacher, steps: int, seed: int, on_step=None, lr: float = 3e-3, batch: int = 16, stop=None):
    d = loraforge.driver(model).begin(max_steps=steps)
    gates = d.param_groups(lr, 0.0)
    taken = {id(p) for g in gates for p in g["params"]}
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in taken]},
                             *gates], lr=lr, weight_decay=0.0, foreach=True)
    gen = torch.Generator().manual_seed(seed)
    for step in range(1, (stop or steps) + 1):
        x = torch.randn(batch, 24, generator=gen)
        with torch.no_grad():
            y = teacher(x)
        loss = torch.nn.functional.mse_loss(model(x), y)
        reg = d.regularization_loss()
        (loss if reg is None else loss + reg).backward()
        opt.step()
        opt.zero_grad()
        if on_step is not None:
            on_step(step, d)
    return d


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("steps", [100, 300, 1000])
def test_the_schedule_control_reaches_the_budget_by_the_window_end_at_any_run_length(steps, seed):
    b = 0.5
    model, teacher = tiny(seed, target_density=b)
    cfg = loraforge.driver(model).config
    assert cfg.budget_control == "schedule" and cfg.gate_lr == 0.01  # the default gate_lr, no per-run tuning
    start, end = round(0.2 * steps), round(0.5 * steps)
    seen = {}

    def record(step, d):
        if step in (start, end - 1):  # before the window; the last step the gates trained
            seen[step] = densities_by_hand(model)

    train(model, teacher, steps, seed, record, stop=end)  # nothing after the window is checked
    c0, r0 = seen[start]
    assert c0 == pytest.approx(1 / (1 + 1 / 11), abs=1e-6) and r0 == 1.0  # untouched before the window
    c, realised = seen[end - 1]
    assert abs(c - b) <= 0.02, f"C = {c:.3f} at the window's end"
    assert abs(realised - b) <= 0.05, f"realised density {realised:.3f} at the window's end"


def schedule_by_hand(step: int, start: int, end: int, b: float) -> float:
    """b_t: from 11/12 (C at init) at the window's start, cubically down to b at 3/4 of the window, then b."""
    u = min(1.0, (step - start) / (0.75 * (end - start)))
    return b + (11 / 12 - b) * (1 - u) ** 3


@pytest.mark.parametrize("ranks", [None, {"1": 4, "3": 2}], ids=["equal", "mixed"])
def test_the_schedule_holds_c_on_its_target_at_every_window_step_and_lambda_settles(ranks):
    b, steps = 0.3, 200
    model, teacher = tiny(0, target_density=b, **({"rank_pattern": ranks} if ranks else {}))
    assert len({layer.r["default"] for layer in loraforge.driver(model).layers}) == (3 if ranks else 1)
    seen = []
    train(model, teacher, steps, 0, lambda step, d: seen.append((step, densities_by_hand(model)[0], d.controllers[0].lam)),
          stop=100)
    before = [(c, lam) for t, c, lam in seen if t <= 40]
    inside = [(t, c, lam) for t, c, lam in seen if 40 < t <= 100]
    assert (len(before), len(inside)) == (40, 60)  # every step of the first 100
    assert all(c == pytest.approx(11 / 12, abs=1e-6) and lam == 0 for c, lam in before)
    for t, c, _ in inside:
        assert c == pytest.approx(schedule_by_hand(t, 40, 100, b), abs=2e-4), f"step {t}"
    lams = [lam for _, _, lam in inside]
    assert lams[len(lams) // 2] > 0.5 * max(lams) > 0  # Λ rises while b_t falls ...
    assert abs(lams[-1] - lams[-5]) < 0.1 * max(lams)  # ... and settles once it holds at b


def test_the_papers_rule_ascends_lambda_by_the_squared_violation():
    """budget_control="paper" (Eq. 12): λ ← max(0, λ + η_c·(C - b)²) after each step inside the window,
    with the term λ·(C - b)² in the loss; C is read before the step, by hand."""
    b, eta = 0.5, 0.01
    model, teacher = tiny(0, target_density=b, budget_control="paper", window_start=3, window_end=9)
    history = []

    def record(step, d):
        history.append((densities_by_hand(model)[0], d.controllers[0].lam))

    d = loraforge.driver(model)
    history.append((densities_by_hand(model)[0], 0.0))
    reg_terms = []
    c = d.controllers[0]
    original = c.regularization_loss

    def spy():
        loss = original()
        reg_terms.append(None if not c.in_window() else float(c.lam_state[0]) * (c.expected_density().item() - b) ** 2)
        return loss

    c.regularization_loss = spy
    train(model, teacher, 12, 0, record)
    for t, ((c_before, lam_before), (_, lam_after)) in enumerate(zip(history, history[1:]), start=1):
        expected = max(0.0, lam_before + eta * (c_before - b) ** 2) if 3 < t <= 9 else lam_before
        assert lam_after == pytest.approx(expected, rel=1e-6, abs=1e-9), f"step {t}"
    assert history[-1][1] > 0
    assert reg_terms[3] == 0.0 and reg_terms[4] > 0  # the term is in the loss from the window on, λ·(C-b)²


@pytest.mark.parametrize("control", ["schedule", "paper"])
def test_both_controls_move_fsdp2_sharded_gates_as_unsharded_ones(gloo_world_of_one, control):
    """On FSDP2 DTensors (one rank: the sharded code path with its gathers, local snapshot and local writes)
    each control trains the gates, λ and factors as on plain tensors; tests/scale compares 2 and 4 ranks."""
    from torch.distributed.fsdp import fully_shard

    runs = []
    for sharded in (False, True):
        model, teacher = tiny(0, window_start=2, window_end=8, budget_control=control)
        if sharded:
            fully_shard(model)
        d = train(model, teacher, 10, 0)
        state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                 for k, v in [*model.named_parameters(), *model.named_buffers()] if ".lora_" in k}
        runs.append((state, d.log_values()))
    (ref, ref_logs), (got, got_logs) = runs
    assert ref.keys() == got.keys() and sum(".lora_gate_logits." in k for k in ref) == 4
    for key, value in ref.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=lambda m: f"{key}: {m}")
    assert got_logs == pytest.approx(ref_logs, abs=1e-6)
    # the comparison means something only if the gates and λ moved (C at init: 1 / (1 + 1/11))
    assert ref_logs["salora/lambda"] != 0.0 and abs(ref_logs["salora/expected_density"] - 11 / 12) > 1e-3