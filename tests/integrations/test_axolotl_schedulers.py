"""SaLoRA's gate learning rate stays constant under every LR scheduler an Axolotl YAML can pick.

Axolotl 0.21 builds LambdaLR schedules (transformers' types, its cosine variants) but also
OneCycleLR (`one_cycle`) and RexLR (`rex`), which write one value into every param group,
JaggedLRRestartScheduler (`jagged_restart_steps`), which wraps another, and ReduceLROnPlateau,
which chains. Each case builds the trainer the way `axolotl train` does (load_cfg -> the plugin's
adapter -> Axolotl's trainer builder -> `create_optimizer_and_scheduler`) with plain SGD, then takes
optimizer and scheduler steps by hand with known gradients: every step must run the gate group at
gate_lr, and a gate logit must move by exactly -gate_lr·grad (an SGD step, computed here; not under
`one_cycle`, which also cycles the momentum of every group, the gates' included), while the other
groups' lr moves.

Needs axolotl (skipped otherwise): `.ci/axolotl.sh` runs this file in its venv.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
pytest.importorskip("axolotl")

import torch  # noqa: E402

import loraforge  # noqa: E402
from loraforge import testing  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "example_configs" / "axolotl" / "tiny"
STEPS, GATE_LR = 10, 0.5

#: YAML keys -> the scheduler class Axolotl 0.21 builds from them (core/trainers/mixins/scheduler.py).
CASES = {
    "one_cycle": ({"lr_scheduler": "one_cycle"}, "OneCycleLR"),
    "rex": ({"lr_scheduler": "rex"}, "RexLR"),
    "jagged_restart": ({"lr_scheduler": "linear", "jagged_restart_steps": 4, "jagged_restart_warmup_steps": 2},
                       "JaggedLRRestartScheduler"),
    "reduce_lr_on_plateau": ({"lr_scheduler": "reduce_lr_on_plateau",
                              "lr_scheduler_kwargs": {"patience": 0, "factor": 0.5},
                              "eval_strategy": "steps", "eval_steps": 5, "val_set_size": 0.25}, "ReduceLROnPlateau"),
    "cosine_quadratic_warmup": ({"lr_scheduler": "cosine", "lr_quadratic_warmup": True}, "LambdaLR"),
    "cosine_min_lr": ({"lr_scheduler": "cosine", "cosine_min_lr_ratio": 0.1}, "LambdaLR"),
    "cosine_min_lr_constant": ({"lr_scheduler": "cosine", "cosine_min_lr_ratio": 0.1,
                                "cosine_constant_lr_ratio": 0.5}, "LambdaLR"),
    "linear": ({"lr_scheduler": "linear"}, "LambdaLR"),
    "warmup_stable_decay": ({"lr_scheduler": "warmup_stable_decay",
                             "lr_scheduler_kwargs": {"num_decay_steps": 4}}, "LambdaLR"),
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("axolotl_schedulers")
    testing.save_tiny_model(root / "tiny-model")
    shutil.copy(TINY / "salora.yaml", root)
    return root


def _trainer(workdir, monkeypatch, keys: dict):
    from axolotl.cli.config import load_cfg
    from axolotl.utils.trainer import setup_trainer

    from loraforge.integrations.axolotl import LoraForgePlugin

    monkeypatch.chdir(workdir)
    cfg = load_cfg(str(workdir / "salora.yaml"), optimizer="sgd", learning_rate=0.01, warmup_steps=2,
                   max_steps=STEPS, lora_target_linear=False, lora_target_modules=["q_proj", "v_proj"],
                   salora__gate_lr=GATE_LR, salora__window_start=0, salora__window_end=STEPS,
                   salora__budget_control="paper",  # the schedule control also moves the gates after the step
                   **keys)
    model, _ = LoraForgePlugin().load_adapter(testing.tiny_llama(0), cfg)
    tok = testing.tiny_tokenizer()
    data = testing.lm_dataset(tok, testing.alpaca_records()[:8])
    trainer = setup_trainer(cfg, data, data if cfg.val_set_size else None, model, tok, None, total_num_steps=STEPS)
    trainer.create_optimizer_and_scheduler(num_training_steps=STEPS)
    return trainer, model


@pytest.mark.parametrize("case", list(CASES))
def test_gate_lr_is_constant_under_every_axolotl_scheduler(workdir, monkeypatch, case):
    keys, scheduler_cls = CASES[case]
    trainer, model = _trainer(workdir, monkeypatch, keys)
    assert type(trainer).__name__.startswith("LoraForge")
    optimizer, scheduler = trainer.optimizer, trainer.lr_scheduler
    assert type(scheduler).__name__ == scheduler_cls
    assert type(optimizer) is torch.optim.SGD
    (gates,) = [g for g in optimizer.param_groups if g.get("name") == "salora_gates"]
    others = [g for g in optimizer.param_groups if g is not gates]
    loraforge.driver(model).begin(STEPS)  # what the trainer's on_train_begin does
    used = []  # an instance pre-hook runs after loraforge's global one: the lr this step uses
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: used.append(gates["lr"]))
    torch.manual_seed(0)
    seen = set()
    for step in range(STEPS):
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p)
        before = [(p.detach().clone(), p.grad.clone()) for p in gates["params"]]
        plain_sgd = gates.get("momentum", 0) == 0  # one_cycle also cycles momentum (0.85-0.95), in every group
        optimizer.step()
        if plain_sgd:
            for (p0, grad), p in zip(before, gates["params"]):
                torch.testing.assert_close(p.detach(), p0 - GATE_LR * grad, rtol=0, atol=1e-6)
        seen.add(round(float(others[0]["lr"]), 12))
        optimizer.zero_grad()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(float(step))  # a rising loss: every step is a plateau, lr halves
        else:
            scheduler.step()
    assert used == [GATE_LR] * STEPS
    assert len(seen) >= 3, f"{case}: the schedule did not move the other groups' lr: {sorted(seen)}"
