"""Registration with PEFT/TRL, save -> load with the adapter's own type, stock export."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

import loraforge
from loraforge.core.layer import ForgeLinear
from loraforge.testing import tiny_llama
from probe import ProbeConfig, RefusingProbeConfig


def _perturbed(model, seed=1):
    """Give every adapter tensor non-trivial values so that a lost tensor changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _ids():
    return torch.arange(1, 17).reshape(2, 8)


def test_save_load_keeps_type_fields_and_weights(tmp_path):
    cfg = ProbeConfig(target_modules=["q_proj", "v_proj"], r=4, lora_alpha=12, rank_pattern={"v_proj": 2})
    model = _perturbed(get_peft_model(tiny_llama(), cfg)).eval()
    expected = model(_ids()).logits
    model.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "adapter_config.json").read_text())
    assert on_disk["peft_type"] == "LORAFORGE_PROBE"

    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    cfg2 = loaded.peft_config["default"]
    assert type(cfg2) is ProbeConfig
    assert (cfg2.r, cfg2.lora_alpha, cfg2.rank_pattern) == (4, 12, {"v_proj": 2})
    layers = [m for m in loaded.modules() if isinstance(m, ForgeLinear)]
    assert len(layers) == 4
    torch.testing.assert_close(loaded(_ids()).logits, expected, rtol=0, atol=0)
    same = loraforge.load_adapter(tiny_llama(), str(tmp_path)).eval()
    torch.testing.assert_close(same(_ids()).logits, expected, rtol=0, atol=0)


def test_unregistered_type_fails_loudly_instead_of_loading_plain_lora(tmp_path):
    get_peft_model(tiny_llama(), ProbeConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    entry = PEFT_TYPE_TO_CONFIG_MAPPING.pop("LORAFORGE_PROBE")
    try:
        with pytest.raises(KeyError, match="LORAFORGE_PROBE"):
            PeftModel.from_pretrained(tiny_llama(), tmp_path)
    finally:
        PEFT_TYPE_TO_CONFIG_MAPPING["LORAFORGE_PROBE"] = entry


def test_sft_trainer_accepts_the_config_and_builds_forge_layers(tmp_path, tiny_tokenizer, alpaca_records):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_list([{"prompt": r["instruction"], "completion": r["output"]} for r in alpaca_records[:16]])
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                     use_cpu=True, save_strategy="no", max_length=48, disable_tqdm=True)
    trainer = SFTTrainer(model=tiny_llama(), args=args, train_dataset=ds, processing_class=tiny_tokenizer,
                         peft_config=RefusingProbeConfig(target_modules=["q_proj"]))
    assert any(isinstance(m, ForgeLinear) for m in trainer.model.modules())
    with pytest.raises(RuntimeError, match="RefusingProbeConfig cannot be trained by this trainer"):
        trainer.train()

    forge = loraforge.LoraForgeSFTTrainer(model=tiny_llama(), args=args, train_dataset=ds,
                                          processing_class=tiny_tokenizer,
                                          peft_config=RefusingProbeConfig(target_modules=["q_proj"]))
    forge.train()
    assert loraforge.driver(forge.model).controllers[0].steps_seen == [1, 2]


def test_export_is_a_stock_lora_that_plain_peft_loads_without_loraforge(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = _perturbed(get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                      ProbeConfig(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})))
    model.eval()
    ranks = loraforge.export_lora(model, str(tmp_path / "stock"))
    assert sorted(set(ranks.values())) == [2, 8]
    torch.save(model(_ids()).logits, tmp_path / "expected.pt")
    # A fresh interpreter that never imports loraforge: stock PEFT alone must load and reproduce it.
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({tiny_model_dir!r}), {str(tmp_path / 'stock')!r}).eval()
assert "loraforge" not in sys.modules
got = m(torch.arange(1, 17).reshape(2, 8)).logits
exp = torch.load({str(tmp_path / 'expected.pt')!r})
print(float((got - exp).abs().max()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_layers_loraforge_cannot_adapt_are_refused_not_trained_as_plain_lora():
    from loraforge.core.config import ForgeConfigError

    with pytest.raises(ForgeConfigError, match="target_modules: model.embed_tokens is a Embedding"):
        get_peft_model(tiny_llama(), ProbeConfig(target_modules=["q_proj", "embed_tokens"]))
    with pytest.raises(ForgeConfigError, match="use_dora"):
        ProbeConfig(target_modules=["q_proj"], use_dora=True)
