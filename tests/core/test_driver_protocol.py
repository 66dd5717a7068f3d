"""The driving protocol, checked with a probe adapter that uses every hook."""
from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import loraforge
from probe import ProbeConfig, RefusingProbeConfig


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def test_every_hook_runs_once_per_optimizer_step_with_accumulation(tmp_path, tiny_model, lm_dataset):
    model = get_peft_model(tiny_model, ProbeConfig(target_modules=["q_proj", "v_proj"]))
    trainer = loraforge.LoraForgeTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=4),
                                         train_dataset=lm_dataset)
    trainer.train()
    d = loraforge.driver(model)
    probe = d.controllers[0]
    assert probe.steps_seen == [1, 2, 3, 4, 5, 6]  # post-step ran once per optimizer step, not per micro-batch
    assert probe.max_steps_seen == 6
    assert d.step == 6
    groups = [g for g in trainer.optimizer.param_groups if g.get("name") == "probe"]
    assert len(groups) == 1 and groups[0]["initial_lr"] == pytest.approx(0.123)
    gate_ids = {id(p) for p in probe.gates()}
    others = [p for g in trainer.optimizer.param_groups if g.get("name") != "probe" for p in g["params"]]
    assert not gate_ids & {id(p) for p in others}  # the probe's params left the default groups
    logged = [h for h in trainer.state.log_history if "probe/steps" in h]
    assert [h["probe/steps"] for h in logged] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_loss_term_reaches_the_gradient_once_per_step(tmp_path, tiny_model, lm_dataset):
    """With lr 0 for everything but the probe and a huge regulariser, the probe's gradient is
    d/dg (w·Σg²) = 2·w·g exactly once per optimizer step, whatever the accumulation."""
    torch.manual_seed(0)
    model = get_peft_model(tiny_model, ProbeConfig(target_modules=["q_proj"]))
    grads = []
    trainer = loraforge.LoraForgeTrainer(
        model=model, args=_args(tmp_path, gradient_accumulation_steps=4, max_steps=1, max_grad_norm=0.0),
        train_dataset=lm_dataset)
    from transformers import TrainerCallback

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            grads.extend(l.lora_gate_logits["default"].grad.clone() for l in loraforge.driver(model).layers)

    trainer.add_callback(Grab())
    # B = 0 at init, so the task loss has no gradient w.r.t. the probe: only the term reaches it.
    trainer.train()
    assert len(grads) == 2  # one optimizer step, one q_proj in each of the tiny Llama's 2 layers
    for g in grads:
        torch.testing.assert_close(g, torch.full_like(g, 2 * 0.5 * 1.0))


def test_plain_trainer_refuses_a_method_that_needs_the_mixin(tmp_path, tiny_model, lm_dataset):
    model = get_peft_model(tiny_model, RefusingProbeConfig(target_modules=["q_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert len(before) == 2 * 3  # A, B and the gate logits of q_proj in 2 layers
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=lm_dataset)
    with pytest.raises(RuntimeError, match="LoraForgeSFTTrainer.*No parameter has been updated"):
        trainer.train()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, before[n], rtol=0, atol=0)


def test_plain_trainer_drives_post_step_work(tmp_path, tiny_model, lm_dataset):
    model = get_peft_model(tiny_model, ProbeConfig(target_modules=["q_proj"]))
    Trainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=2), train_dataset=lm_dataset).train()
    assert loraforge.driver(model).controllers[0].steps_seen == [1, 2, 3, 4, 5, 6]


def test_hand_written_loop(tiny_model, lm_dataset):
    model = get_peft_model(tiny_model, RefusingProbeConfig(target_modules=["q_proj"]))
    d = loraforge.driver(model).begin(max_steps=3)
    opt = torch.optim.SGD(d.param_groups(0.1, 0.0), lr=0.1)
    batch = {k: torch.tensor(lm_dataset[:4][k]) for k in ("input_ids", "attention_mask", "labels")}
    for _ in range(3):
        loss = model(**batch).loss + d.regularization_loss()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert d.controllers[0].steps_seen == [1, 2, 3]


def test_resume_continues_the_step_count_and_refuses_a_mismatched_adapter(tmp_path, lm_dataset):
    from loraforge.testing import tiny_llama

    def make():
        return get_peft_model(tiny_llama(), ProbeConfig(target_modules=["q_proj"]))

    args = _args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, gradient_accumulation_steps=2)
    full = make()
    loraforge.LoraForgeTrainer(model=full, args=args, train_dataset=lm_dataset).train()

    resumed = make()
    trainer = loraforge.LoraForgeTrainer(model=resumed, args=args, train_dataset=lm_dataset)
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    d = loraforge.driver(resumed)
    assert d.step == 4 and d.controllers[0].steps_seen == [3, 4]
    full_params, resumed_params = list(loraforge.driver(full).parameters()), list(d.parameters())
    assert len(full_params) == len(resumed_params) == 2 * 3  # A, B and the gate logits of q_proj in 2 layers
    for a, b in zip(full_params, resumed_params):
        torch.testing.assert_close(a, b)

    # An adapter whose step state says 4 cannot silently continue a run that the trainer says is at 2.
    stale = make()
    for layer in loraforge.driver(stale).layers:
        layer.lora_forge_step["default"].fill_(4)
    trainer = loraforge.LoraForgeTrainer(model=stale, args=_args(tmp_path / "x", max_steps=2), train_dataset=lm_dataset)
    with pytest.raises(RuntimeError, match="has taken 4 optimizer steps but the trainer resumes at step 0"):
        trainer.train()
