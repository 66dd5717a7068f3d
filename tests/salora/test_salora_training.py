"""SaLoRA under training: the window, λ's ascent, the gate learning rate, the budget, logging,
resume, and the trainers that can and cannot drive it. Runs are short (tiny Llama, CPU)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import loraforge
from loraforge import testing
from loraforge.salora import gate_summary

LOG11 = math.log(11.0)
B = 0.5




def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def expected_density_by_hand(model) -> float:
    """C = Σ sigmoid(logα + log 11)·(d_in + d_out) / Σ r·(d_in + d_out), straight from the logits."""
    num = den = 0.0
    for layer in loraforge.driver(model).layers:
        w = layer.in_features + layer.out_features
        num += sum(_sigmoid(la + LOG11) for la in layer.lora_gate_logits["default"].tolist()) * w
        den += layer.r["default"] * w
    return num / den


def gate_logits(model) -> torch.Tensor:
    return torch.cat([l.lora_gate_logits["default"].detach().clone() for l in loraforge.driver(model).layers])


def lambdas(model) -> list[float]:
    return loraforge.driver(model).layers[0].lora_salora_lambda["default"].tolist()


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=24, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


class Recorder(TrainerCallback):
    """Gate logits, λ, C (by hand) and learning rates before and after every optimizer step."""

    def __init__(self, model):
        self.model, self.pre, self.post = model, [], []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
        lrs = {g.get("name", "default"): g["lr"] for g in optimizer.param_groups}
        self.pre.append({"logits": gate_logits(self.model), "lam": lambdas(self.model),
                         "C": expected_density_by_hand(self.model), "lrs": lrs})

    def on_optimizer_step(self, args, state, control, **kw):
        self.post.append({"logits": gate_logits(self.model), "lam": lambdas(self.model)})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """24 optimizer steps (×2 accumulation), gates train on steps 7..18, weight decay and an LR schedule on."""
    tok = testing.tiny_tokenizer()
    data = testing.lm_dataset(tok, testing.alpaca_records()[:64])
    model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(
        window_start=6, window_end=18, gate_lr=0.1, target_density=B, prune_budget="exact", budget_control="paper"))
    out = tmp_path_factory.mktemp("salora_run")
    trainer = loraforge.LoraForgeTrainer(model=model, train_dataset=data, args=args(
        out, gradient_accumulation_steps=2, weight_decay=0.1, warmup_steps=3, lr_scheduler_type="linear"))
    recorder = Recorder(model)
    trainer.add_callback(recorder)
    trainer.train()
    return {"model": model, "trainer": trainer, "rec": recorder, "out": out}


def _inside(step: int) -> bool:  # optimizer step numbers 1..24; the window is 6 < t <= 18
    return 6 < step <= 18


def test_lambda_ascends_by_the_squared_violation_inside_the_window_only(run):
    rec = run["rec"]
    assert len(rec.pre) == len(rec.post) == 24
    previous = 0.0
    for t, (pre, post) in enumerate(zip(rec.pre, rec.post), start=1):
        lam_before, lam_after = pre["lam"][0], post["lam"][0]
        assert lam_after >= 0 and lam_after >= previous  # never negative, non-decreasing
        if _inside(t):
            assert lam_after == pytest.approx(max(0.0, lam_before + 0.1 * (pre["C"] - B) ** 2), rel=1e-5, abs=1e-7)
        else:
            assert lam_after == lam_before
        previous = lam_after
    assert rec.post[17]["lam"][0] > 0


def test_gates_move_only_inside_the_window_despite_weight_decay_and_momentum(run):
    rec = run["rec"]
    for t, (pre, post) in enumerate(zip(rec.pre, rec.post), start=1):
        moved = not torch.equal(pre["logits"], post["logits"])
        assert moved == _inside(t), f"step {t}: gates {'moved' if moved else 'did not move'}"


def test_gate_learning_rate_is_constant_while_the_schedule_moves_the_rest(run):
    lrs = [pre["lrs"] for pre in run["rec"].pre]
    assert all(lr["salora_gates"] == pytest.approx(0.1) for lr in lrs)
    assert len({round(lr["default"], 8) for lr in lrs}) > 10  # warmup then linear decay
    group = next(g for g in run["trainer"].optimizer.param_groups if g.get("name") == "salora_gates")
    assert group["weight_decay"] == 0.0


@pytest.mark.parametrize("schedule", [
    # One max_lr written into every group, as Axolotl's `one_cycle` builds it.
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=6, cycle_momentum=False),
    # Chained: each step scales the group's current lr.
    lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5),
], ids=["one_cycle", "exponential"])
def test_gates_step_at_gate_lr_under_schedulers_that_are_not_lambda_lr(lm_dataset, schedule):
    """Plain SGD: a gate logit must move by exactly -gate_lr·grad each step, whatever the scheduler wrote."""
    model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(
        target_modules=["q_proj", "v_proj"], window_start=0, window_end=6, gate_lr=0.1, budget_control="paper"))
    d = loraforge.driver(model).begin(max_steps=6)
    gates = d.param_groups(1e-3, 0.0)
    taken = {id(p) for g in gates for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    opt = torch.optim.SGD([{"params": rest}, *gates], lr=1e-3)
    scheduler = schedule(opt)
    batch = {k: torch.tensor(lm_dataset[:4][k]) for k in ("input_ids", "attention_mask", "labels")}
    lrs, moved = [], 0.0
    for _ in range(6):
        (model(**batch).loss + d.regularization_loss()).backward()
        before = [(p.detach().clone(), p.grad.clone()) for p in gates[0]["params"]]
        opt.step()
        for (p0, grad), p in zip(before, gates[0]["params"]):
            torch.testing.assert_close(p.detach(), p0 - 0.1 * grad, rtol=0, atol=1e-7)
        moved = max(moved, max(float(grad.abs().max()) for _, grad in before))
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        scheduler.step()
    assert moved > 0  # gates got gradients (from step 2 on: B and λ start at 0)
    assert len({round(lr, 10) for lr in lrs}) >= 5  # the rest did follow the schedule


def test_a_given_optimizer_class_gets_the_gate_group_and_a_self_grouping_one_is_refused(tmp_path, lm_dataset):
    """`optimizer_cls_and_kwargs` (how Axolotl passes its own optimizers) is used, not replaced by `optim`."""
    def trainer(cls_and_kwargs):
        model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(target_modules=["q_proj"], gate_lr=0.1))
        return loraforge.LoraForgeTrainer(model=model, train_dataset=lm_dataset, args=args(tmp_path),
                                          optimizer_cls_and_kwargs=cls_and_kwargs)

    opt = trainer((torch.optim.SGD, {"lr": 1e-3, "momentum": 0.5})).create_optimizer()
    assert type(opt) is torch.optim.SGD and opt.defaults["momentum"] == 0.5
    assert [g["lr"] for g in opt.param_groups if g.get("name") == "salora_gates"] == [0.1]

    def factory():  # the shape of Axolotl's Muon / Dion factories: called with the whole model
        return lambda model, **kw: torch.optim.SGD(model.parameters(), **kw)

    with pytest.raises(ValueError, match=r"optim: factory builds its own parameter groups .*\(salora_gates\)"):
        trainer((factory, {"lr": 1e-3})).create_optimizer()


def test_every_logging_step_reports_the_budget(run):
    logged = [h for h in run["trainer"].state.log_history if "loss" in h]
    assert len(logged) == 24
    keys = {"salora/expected_density", "salora/realized_density", "salora/export_density", "salora/lambda",
            "salora/orth_loss", "salora/live_ranks"}
    for h, post in zip(logged, run["rec"].post, strict=True):
        assert keys <= set(h)
        assert h["salora/lambda"] == pytest.approx(post["lam"][0], abs=1e-6)
    assert logged[0]["salora/expected_density"] == pytest.approx(11 / 12, abs=1e-4)


def test_gates_freeze_at_the_window_end_to_the_exact_budget_and_reports_are_written(run):
    model, out = run["model"], run["out"]
    summary = gate_summary(model)
    layers = loraforge.driver(model).layers
    w_max = max(l.in_features + l.out_features for l in layers)
    total = sum(8 * (l.in_features + l.out_features) for l in layers)
    assert B <= summary["export_density"] < B + w_max / total  # prune_budget="exact"
    assert loraforge.driver(model).controllers[0].frozen == "exact"
    saved = json.load(open(out / "salora_ranks.json"))
    assert saved["export_density"] == pytest.approx(summary["export_density"])
    assert (out / "salora_ranks.png").read_bytes()[:4] == b"\x89PNG"
    assert "density: target 0.500" in (out / "salora_ranks.txt").read_text()


def _hand_loop(model, steps, lr=1e-4, batch=8, seed=0, set_to_none=True):
    tok = testing.tiny_tokenizer()
    ds = testing.lm_dataset(tok, testing.alpaca_records()[:64])
    data = {k: torch.tensor(ds[k]) for k in ("input_ids", "attention_mask", "labels")}
    d = loraforge.driver(model).begin(max_steps=steps)
    gates = d.param_groups(lr, 0.0)
    taken = {id(p) for g in gates for p in g["params"]}
    opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in taken]}, *gates], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(ds), (batch,), generator=gen)
        yield d, opt
        loss = model(**{k: v[idx] for k, v in data.items()}).loss + d.regularization_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)


def test_a_short_run_reaches_the_target_density():
    """Hand-written loop (driver.begin + regularization_loss + param_groups), 100 steps, gates on 6..95."""
    torch.manual_seed(0)
    model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(
        window_start=5, window_end=95, gate_lr=0.1, target_density=B, prune_budget="gate"))
    for _ in _hand_loop(model, 100):
        pass
    assert expected_density_by_hand(model) == pytest.approx(B, abs=0.05)
    assert loraforge.driver(model).controllers[0].expected_density().item() == pytest.approx(expected_density_by_hand(model))


def test_linear_quadratic_lagrangian_ascends_both_multipliers():
    torch.manual_seed(0)
    model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(
        window_start=0, window_end=8, gate_lr=0.5, lagrangian="linear_quadratic", budget_control="paper"))
    history = []
    for d, _ in _hand_loop(model, 8):
        history.append((expected_density_by_hand(model), lambdas(model)))
    history.append((expected_density_by_hand(model), lambdas(model)))
    for (c, (lam2, lam1)), (_, (next2, next1)) in zip(history, history[1:]):
        assert next2 == pytest.approx(lam2 + 0.5 * (c - B) ** 2, rel=1e-5, abs=1e-7)
        assert next1 == pytest.approx(lam1 + 0.5 * (c - B), rel=1e-5, abs=1e-7)
    assert "salora/lambda_linear" in loraforge.driver(model).log_values()


def test_momentum_cannot_move_gates_after_the_window_even_with_zeroed_grads():
    torch.manual_seed(0)
    model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(window_start=0, window_end=4, gate_lr=0.1,
                                                                          prune_budget="gate"))
    seen = []
    for d, opt in _hand_loop(model, 8, set_to_none=False):
        seen.append(gate_logits(model))
    seen.append(gate_logits(model))
    # steps 2..4 move the gates (at step 1, λ = 0 and B = 0 leave them no gradient)
    assert all(not torch.equal(a, b) for a, b in zip(seen[1:4], seen[2:5]))
    assert all(torch.equal(seen[4], later) for later in seen[5:])  # AdamW's momentum stays unused after


def test_resume_continues_the_same_run(tmp_path):
    tok = testing.tiny_tokenizer()
    data = testing.lm_dataset(tok, testing.alpaca_records()[:64])

    def trainer(out):
        model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(window_start=2, window_end=6, gate_lr=0.1))
        return model, loraforge.LoraForgeTrainer(model=model, train_dataset=data, args=args(
            out, max_steps=8, save_strategy="steps", save_steps=4, logging_steps=4))

    full, t_full = trainer(tmp_path / "full")
    t_full.train()
    resumed, t_resumed = trainer(tmp_path / "resumed")
    t_resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert loraforge.driver(resumed).step == 8
    assert lambdas(resumed) == pytest.approx(lambdas(full), rel=1e-6) and lambdas(full)[0] > 0
    torch.testing.assert_close(gate_logits(resumed), gate_logits(full), atol=1e-6, rtol=1e-5)
    for a, b in zip(loraforge.driver(full).layers, loraforge.driver(resumed).layers):
        torch.testing.assert_close(b.lora_B["default"].weight, a.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(b.lora_gate_frozen["default"], a.lora_gate_frozen["default"])


def test_trl_sft_trainers(tmp_path):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    tok = testing.tiny_tokenizer()
    text = Dataset.from_dict({"text": [testing.alpaca_text(r) for r in testing.alpaca_records()[:16]]})
    sft_args = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, logging_steps=1, report_to=[],
                    use_cpu=True, save_strategy="no", disable_tqdm=True, max_length=64)
    model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(window_start=1, window_end=3))
    trainer = loraforge.LoraForgeSFTTrainer(model=model, args=SFTConfig(**sft_args), train_dataset=text, processing_class=tok)
    trainer.train()
    assert [h["salora/lambda"] > 0 for h in trainer.state.log_history if "loss" in h] == [False, True, True, True]

    for make in (lambda m: SFTTrainer(model=m, args=SFTConfig(**sft_args), train_dataset=text, processing_class=tok),
                 lambda m: Trainer(model=m, args=args(tmp_path), train_dataset=testing.lm_dataset(tok, testing.alpaca_records()[:16]))):
        model = get_peft_model(testing.tiny_llama(0), loraforge.SaLoRAConfig(window_start=1, window_end=3))
        before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        with pytest.raises(RuntimeError, match=r"SaLoRAConfig cannot be trained by this trainer: .*gate_lr.*"
                                               r"LoraForgeSFTTrainer.*No parameter has been updated"):
            make(model).train()
        for n, p in model.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(p, before[n], rtol=0, atol=0)
