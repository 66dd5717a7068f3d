"""SaLoRA under DDP: its gate logits take no gradient outside the window, so DDP needs
find_unused_parameters=True; without it DDP fails at the second step, and loraforge refuses the setting
at train begin, before any update. One gloo process stands for the ranks."""
from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from transformers import TrainingArguments

import loraforge
from loraforge import testing
from loraforge.core.config import ForgeConfigError
from tiny_adapters import TARGETS, X


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
