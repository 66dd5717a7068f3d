"""The non-finite guard: a learning-rate spike or a NaN loss never puts a non-finite value into W, the
adapter, SaLoRA's λ or a saved file; bad steps are skipped, and 5 in a row stop the run in one line
that names the step, the loss and the last checkpoint from before the trouble."""
from __future__ import annotations

import pytest
import torch
import transformers.trainer
from robust_jobs import job_dir, tiny_job, write_job  # noqa: F401 (job_dir: fixture)
from safetensors.torch import load_file
from transformers import TrainerCallback

import loraforge
from loraforge import CoRAConfig, DeltaLoRAConfig, testing
from loraforge.cli import main as cli
from loraforge.core import finite
from loraforge.core.layer import ForgeLinear


class _Spike(TrainerCallback):
    """Sets every group's learning rate to 1e20 for optimizer step 3 (the scheduler resets it after)."""

    model = None

    def on_step_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        _Spike.model = model
        if state.global_step == 2:
            for group in optimizer.param_groups:
                group["lr"] = 1e20


def _all_finite(model) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in [*model.state_dict().values()] if t.is_floating_point())


@pytest.mark.parametrize("method", ["salora", "delta_lora_folded", "delta_lora_in_place", "cora"])
def test_learning_rate_spike_stops_in_one_line_and_nothing_saved_is_non_finite(job_dir, tmp_path, method, capsys,
                                                                               monkeypatch):
    monkeypatch.setattr(transformers.trainer, "DEFAULT_CALLBACKS", [*transformers.trainer.DEFAULT_CALLBACKS, _Spike])
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", tiny_job(job_dir, method, out, max_steps=12, save_steps=2))
    assert cli(["train", job]) == 2
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("loraforge train: error:")]
    assert len(err) == 1 and "training stopped at step" in err[0] and "Traceback" not in stderr, stderr[-3000:]
    assert f"Last complete checkpoint: {out / 'checkpoint-2'};" in err[0]  # the one from before the spike
    saved = list(out.rglob("*.safetensors"))
    assert any(p.parent.name == "checkpoint-2" for p in saved)
    for path in saved:
        for key, t in load_file(str(path)).items():
            assert not t.is_floating_point() or bool(torch.isfinite(t).all()), (path, key)
    model = _Spike.model
    w = [m.get_base_layer().weight for m in model.modules() if isinstance(m, ForgeLinear)]
    assert w and all(bool(torch.isfinite(x).all()) for x in w)  # W (written in place by Delta-LoRA) stays finite
    lam = [t for n, t in model.named_buffers() if "salora_lambda" in n]
    assert all(bool(torch.isfinite(t).all()) for t in lam) and (lam or method != "salora")


@pytest.mark.parametrize("method", ["delta_lora_in_place", "cora"])
def test_hand_loop_skips_a_nan_step_and_stops_after_five(job_dir, method):
    config = DeltaLoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], start_step=1,
                             propagation="in_place") if method != "cora" else CoRAConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], freeze_b=False,
        basis_path=str(job_dir / "cora-basis.safetensors"))
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(testing.tiny_llama(seed=0), config)
    finite.note_output_dir(None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 500, (4, 16))

    def step(poison: bool):
        loss = model(input_ids=ids, labels=ids).loss
        (loss * float("nan") if poison else loss).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        step(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    drv = loraforge.driver(model)
    n = drv.step
    step(True)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [k for k in before if "lora_forge_step" in k] and changed  # only the step counters moved
    assert drv.step == n + 1 and finite.STATE.skipped == 1
    step(False)
    key = next(k for k in before if "lora_A" in k)
    assert not torch.equal(before[key], model.state_dict()[key])  # a finite step trains again
    for i in range(4):
        step(True)
    with pytest.raises(finite.NonFiniteError, match=rf"training stopped at step {n + 7}: 5 optimizer steps in a row \(from step {n + 3}\)"):
        step(True)
    assert _all_finite(model)


def _poisoned(cls, start: int):
    """`cls` whose training loss is NaN from optimizer step `start + 1` on."""

    class Poisoned(cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            if self.state.global_step < start:
                return out
            return (out[0] * float("nan"), out[1]) if return_outputs else out * float("nan")

    return Poisoned


class _Keep(TrainerCallback):
    """The model's floating state right after optimizer step 3."""

    state = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 3:
            _Keep.state = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("trainer, method", [("transformers.Trainer", "delta_lora_in_place"),
                                             ("transformers.Trainer", "cora"), ("LoraForgeTrainer", "salora")])
def test_trainers_skip_nan_steps_and_stop(job_dir, tmp_path, lm_dataset, trainer, method):
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from loraforge import SaLoRAConfig

    config = {
        "delta_lora_in_place": DeltaLoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], start_step=1,
                                               propagation="in_place"),
        "cora": CoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], freeze_b=False,
                           basis_path=str(job_dir / "cora-basis.safetensors")),
        "salora": SaLoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], window_start=0.1,
                               window_end=0.75),
    }[method]
    model = get_peft_model(testing.tiny_llama(seed=0), config)
    cls = _poisoned(Trainer if trainer == "transformers.Trainer" else loraforge.LoraForgeTrainer, start=3)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=12, learning_rate=2e-3,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1)
    t = cls(model=model, args=args, train_dataset=lm_dataset, callbacks=[_Keep()])
    with pytest.raises(finite.NonFiniteError, match=r"training stopped at step 8: 5 optimizer steps in a row "
                                                    r"\(from step 4\).* \(loss [^)]+\)"):
        t.train()
    now = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    assert _all_finite(model)
    moved = [k for k in now if not torch.equal(now[k], _Keep.state[k])]
    assert moved == []  # five NaN steps changed no weight, factor, gate, λ or W
    assert loraforge.driver(model).step == 7  # the skipped steps are numbered like the trainer's
