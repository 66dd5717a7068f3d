"""Delta-LoRA under the trainers: kill-and-resume, plain TRL SFTTrainer, LoraForgeSFTTrainer, and the warning
of a run too short to reach start_step under every loop."""
from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from peft import get_peft_model
from transformers import Trainer, TrainingArguments

import loraforge
from loraforge import DeltaLoRAConfig, testing
from loraforge.core.layer import ForgeLinear




def _layers(model):
    found = [m for m in model.modules() if isinstance(m, ForgeLinear)]
    assert found, "the model holds no loraforge layer"  # a check over them must not pass on nothing
    return found


def _state(model):
    """Every weight that training changes: the (moving) base weights and the factors."""
    out = {}
    for l in _layers(model):
        out[l.forge_name + ".W"] = l.get_base_layer().weight.detach().clone()
        out[l.forge_name + ".A"] = l.lora_A["default"].weight.detach().clone()
        out[l.forge_name + ".B"] = l.lora_B["default"].weight.detach().clone()
    return out


def _fresh(mode):
    torch.manual_seed(5)
    cfg = DeltaLoRAConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=8, update_ratio=2.0, start_step=3,
                          propagation=mode, init_lora_weights=False)
    return get_peft_model(testing.tiny_llama(seed=0, dtype=torch.float64), cfg)


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=10, learning_rate=2e-3,
                logging_steps=1, save_strategy="steps", save_steps=5, report_to=[], use_cpu=True,
                disable_tqdm=True, seed=11, data_seed=11)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("mode", ["in_place", "folded"])
def test_kill_and_resume_after_k_continues_the_same_trajectory(tmp_path, lm_dataset, mode):
    w0 = {k: v for k, v in _state(_fresh(mode)).items() if k.endswith(".W")}
    full = _fresh(mode)
    trainer = loraforge.LoraForgeTrainer(model=full, args=_args(tmp_path / "a"), train_dataset=lm_dataset)
    trainer.train()
    expected = _state(full)

    resumed = _fresh(mode)  # a new process would build the model like this
    loraforge.LoraForgeTrainer(model=resumed, args=_args(tmp_path / "b"), train_dataset=lm_dataset).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-5"))
    got = _state(resumed)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-9, atol=1e-11)
    moved = max(float((expected[k] - w0[k]).abs().max()) for k in w0)
    assert moved > 1e-4 if mode == "in_place" else moved == 0.0

    # The logged shift norm is ||λ·s·(B A - B_K A_K)||_F: for in place it is how far W has moved.
    logged = [h["delta_lora/w_shift_norm"] for h in trainer.state.log_history if "delta_lora/w_shift_norm" in h]
    assert len(logged) == 10 and logged[2] == 0.0 and logged[3] > 0  # propagation starts after step K=3
    if mode == "in_place":
        true_shift = sum(float(((expected[k] - w0[k]) ** 2).sum()) for k in w0) ** 0.5
        assert logged[-1] == pytest.approx(true_shift, rel=1e-4)


def _sft_data(records):
    return Dataset.from_dict({"text": [testing.alpaca_text(r) for r in records[:32]]})


@pytest.mark.parametrize("trainer_name, mode", [("trl.SFTTrainer", "in_place"), ("trl.SFTTrainer", "folded"),
                                                ("LoraForgeSFTTrainer", "folded")])
def test_sft_trainers_drive_delta_lora_with_no_extra_code(tmp_path, tiny_tokenizer, alpaca_records, trainer_name, mode):
    from trl import SFTConfig, SFTTrainer

    cls = SFTTrainer if trainer_name == "trl.SFTTrainer" else loraforge.LoraForgeSFTTrainer
    tiny = testing.tiny_llama(seed=0)
    w0 = {n: m.weight.detach().clone() for n, m in tiny.named_modules() if n.endswith(("q_proj", "v_proj"))}
    args = SFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
                     max_length=64, report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
                     logging_steps=1)
    # The folded case leaves everything else at its default (PEFT picks q_proj, v_proj for Llama).
    config = (DeltaLoRAConfig(start_step=2, update_ratio=1.0) if mode == "folded" else
              DeltaLoRAConfig(target_modules=["q_proj", "v_proj"], start_step=2, update_ratio=1.0, propagation=mode))
    trainer = cls(model=tiny, args=args, train_dataset=_sft_data(alpaca_records), processing_class=tiny_tokenizer,
                  peft_config=config)
    trainer.train()
    layers = _layers(trainer.model)
    assert sorted(l.forge_name.rsplit(".", 1)[1] for l in layers) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    for l in layers:
        assert int(l.lora_forge_step["default"]) == 6 and int(l.lora_delta_steps["default"][1]) == 2
        bk, ak = l.lora_delta_BK["default"], l.lora_delta_AK["default"]
        assert bk.abs().max() > 0  # B starts at zero: a non-zero snapshot was taken after step 2
        w = l.get_base_layer().weight.detach()
        name = l.forge_name
        if mode == "in_place":
            D = l.scaling["default"] * 1.0 * (l.lora_B["default"].weight @ l.lora_A["default"].weight - bk @ ak).detach()
            torch.testing.assert_close(w - w0[name], D, rtol=1e-4, atol=1e-7)
            assert D.abs().max() > 1e-5
        else:
            torch.testing.assert_close(w, w0[name], rtol=0, atol=0)


@pytest.mark.parametrize("loop", ["hand", "Trainer", "LoraForgeTrainer"])
def test_a_run_that_never_reaches_start_step_warns_once_under_any_loop(tmp_path, lm_dataset, loop):
    model = get_peft_model(testing.tiny_llama(0), DeltaLoRAConfig(r=4, target_modules=["q_proj"], start_step=10))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if loop == "hand":
            loraforge.driver(model).begin(max_steps=3)
        else:
            args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, report_to=[],
                                     use_cpu=True, save_strategy="no", disable_tqdm=True)
            trainer_cls = Trainer if loop == "Trainer" else loraforge.LoraForgeTrainer
            trainer_cls(model=model, args=args, train_dataset=lm_dataset.select(range(6))).train()
            assert loraforge.driver(model).step == 3
    ours = [w for w in caught if "start_step=10 >= max_steps=3" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
