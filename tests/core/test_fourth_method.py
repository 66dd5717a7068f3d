"""A fourth method defined here, outside the package, with no edit to loraforge: an axis with a
trainable tensor of its own (a per-rank scale) and a state buffer, and a controller with a loss term,
a param group and post-step work. It registers with one call, then trains under `LoraForgeTrainer`,
saves, loads and exports like the shipped methods, and `loraforge train` / the Axolotl schema know it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import TrainingArguments

import loraforge
from loraforge import testing
from loraforge.core.layer import STATE, TRAINABLE, Axis

TARGETS = ["q_proj", "v_proj"]


class RankScale(Axis):
    """h = W x + s·B diag(c) A x with a trainable per-rank scale c (starts at 1)."""

    tensors = {"lora_rank_scale": TRAINABLE, "lora_scale_steps": STATE}

    def init_factors(self):
        r = self.layer.r[self.adapter]
        self.layer.lora_rank_scale[self.adapter] = torch.nn.Parameter(torch.ones(r))
        self.layer.lora_scale_steps[self.adapter] = torch.zeros((), dtype=torch.long)

    def rank_gate(self):
        return self.layer.lora_rank_scale[self.adapter]


class RankScaleController(loraforge.Controller):
    def scales(self):
        return [layer.lora_rank_scale[self.adapter] for layer in self.layers]

    def regularization_loss(self):
        return self.driver.config.scale_weight * sum(((c - 1) ** 2).sum() for c in self.scales())

    def param_groups(self, lr, weight_decay):
        return [{"params": self.scales(), "lr": self.driver.config.scale_lr, "weight_decay": 0.0, "name": "rank_scale"}]

    def on_step_end(self, step, max_steps):
        for layer in self.layers:
            layer.lora_scale_steps[self.adapter] += 1

    def export_metadata(self):
        return {"rank_scale": {"steps": self.driver.step}}


@dataclass
class RankScaleConfig(loraforge.ForgeConfig):
    method = "rank_scale"

    scale_lr: float = field(default=0.05, metadata={"help": "learning rate of the per-rank scales"})
    scale_weight: float = field(default=1e-3, metadata={"help": "weight of (c - 1)² in the loss"})

    def axes(self):
        return [RankScale]

    def controllers(self):
        return [RankScaleController]


METHOD = loraforge.register_method(RankScaleConfig, title="RankScale", example="{scale_lr: 0.05}")


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_registered_once_and_read_everywhere():
    from loraforge.integrations.axolotl.args import method_config, method_names
    from loraforge.train import adapter_config

    assert loraforge.methods()["rank_scale"] is METHOD and loraforge.register_method(RankScaleConfig) is METHOD
    built = adapter_config({"method": "rank_scale", "r": 4, "target_modules": TARGETS, "scale_lr": 0.2})
    assert type(built) is RankScaleConfig and built.scale_lr == 0.2
    assert "rank_scale" in method_names()
    axolotl = method_config({"adapter": "rank_scale", "lora_r": 4, "lora_target_modules": TARGETS,
                             "rank_scale": {"scale_weight": 0.5}})
    assert type(axolotl) is RankScaleConfig and axolotl.scale_weight == 0.5 and axolotl.r == 4


def test_trains_saves_loads_and_exports(tmp_path, lm_dataset):
    model = get_peft_model(testing.tiny_llama(0), RankScaleConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    layers = loraforge.driver(model).layers
    assert len(layers) == 4 and all(l.lora_rank_scale["default"].requires_grad for l in layers)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = loraforge.LoraForgeTrainer(model=model, args=args, train_dataset=lm_dataset)
    trainer.train()

    groups = {g.get("name"): g for g in trainer.optimizer.param_groups}
    assert groups["rank_scale"]["initial_lr"] == 0.05 and len(groups["rank_scale"]["params"]) == 4
    assert loraforge.driver(model).step == 4
    assert all(int(l.lora_scale_steps["default"]) == 4 for l in layers)
    moved = max(float((l.lora_rank_scale["default"].detach() - 1).abs().max()) for l in layers)
    assert moved > 1e-3  # the declared tensor trained, in its own group

    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = _logits(model, ids)
    model.save_pretrained(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORAFORGE_RANK_SCALE" and saved["scale_lr"] == 0.05
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum(k.endswith(".lora_rank_scale") for k in keys) == 4 and sum(k.endswith(".lora_scale_steps") for k in keys) == 4

    loaded = loraforge.load_adapter(testing.tiny_llama(0), str(tmp_path / "adapter"))
    assert type(loaded.peft_config["default"]) is RankScaleConfig
    torch.testing.assert_close(_logits(loaded, ids), expected, rtol=0, atol=0)
    assert loraforge.driver(loaded).step == 4

    ranks = loraforge.export_lora(loaded, str(tmp_path / "stock"))
    assert set(ranks.values()) == {4}
    meta = json.loads((tmp_path / "stock" / "loraforge_export.json").read_text())
    assert meta["exported_from"] == "RankScaleConfig" and meta["rank_scale"] == {"steps": 4}
    stock = PeftModel.from_pretrained(testing.tiny_llama(0), str(tmp_path / "stock"))
    assert type(stock.peft_config["default"]).__name__ == "LoraConfig"
    torch.testing.assert_close(_logits(stock, ids), expected, rtol=1e-5, atol=1e-5)


def test_a_name_is_registered_once():
    @dataclass
    class Other(loraforge.ForgeConfig):
        method = "rank_scale"

    with pytest.raises(ValueError, match="taken by RankScaleConfig"):
        loraforge.register_method(Other)
