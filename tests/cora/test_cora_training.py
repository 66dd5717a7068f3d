"""CoRA training side: B from the basis, FB/TB modes, save/load/resume, merge/export, refusals."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import loraforge
from loraforge import CoRAConfig, testing
from loraforge.core.config import ForgeConfigError
from loraforge.cora.extract import extract_basis

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def basis(tmp_path_factory):
    root = tmp_path_factory.mktemp("cora_basis")
    models = [testing.save_tiny_model(root / f"ft{i}", seed=i) for i in (1, 2, 3)]
    out = root / "basis.safetensors"
    extract_basis(models, 8, TARGETS, out, progress=False)
    return str(out)


def _inputs():
    return torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))


def _cora(basis, **kw):
    kw.setdefault("r", 4)
    kw.setdefault("target_modules", ["q_proj", "o_proj"])
    return get_peft_model(testing.tiny_llama(seed=0), CoRAConfig(basis_path=basis, **kw))


def _lora_params(model, which):
    found = {n: p for n, p in model.named_parameters() if f"lora_{which}." in n}
    assert found, f"the model holds no lora_{which}"  # a check over them must not pass on nothing
    return found


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


def test_b_starts_as_the_basis_and_step0_output_is_the_base_models(basis):
    x = _inputs()
    expected = testing.tiny_llama(seed=0).eval()(x).logits
    bases = load_file(basis)
    for freeze_b in (True, False):
        model = _cora(basis, freeze_b=freeze_b, target_modules=TARGETS).eval()
        torch.testing.assert_close(model(x).logits, expected, rtol=0, atol=0)
        for name, b in _lora_params(model, "B").items():
            module = name.removeprefix("base_model.model.").removesuffix(".lora_B.default.weight")
            torch.testing.assert_close(b, bases[module][:, :4], rtol=0, atol=0)
        assert all(not a.any() for a in _lora_params(model, "A").values())
    moved = _cora(basis, a_init="gaussian").eval()
    assert not torch.allclose(moved(x).logits, expected)
    a = torch.cat([p.flatten() for p in _lora_params(moved, "A").values()])
    assert abs(a.std().item() - 1 / 4) < 0.02  # PEFT's gaussian init: std 1/r


@pytest.mark.parametrize("trainer_cls", [loraforge.LoraForgeTrainer, Trainer])
def test_fb_trains_exactly_a_and_the_optimizer_never_holds_b(tmp_path, basis, lm_dataset, trainer_cls):
    model = _cora(basis)
    a_params, b_params = _lora_params(model, "A"), _lora_params(model, "B")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(a_params) and len(a_params) == 4
    # Half LoRA's trainable parameters (q and o are square here), and exactly r·d_in per module.
    lora = get_peft_model(testing.tiny_llama(seed=0), LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    n_fb = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 2 * n_fb == sum(p.numel() for p in lora.parameters() if p.requires_grad) and n_fb == 4 * 4 * 64
    b_before = {n: p.detach().clone() for n, p in b_params.items()}
    a_before = {n: p.detach().clone() for n, p in a_params.items()}
    trainer = trainer_cls(model=model, args=_args(tmp_path), train_dataset=lm_dataset)
    trainer.train()
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in a_params.values()}
    assert not {id(p) for p in b_params.values()} & set(trainer.optimizer.state.keys())
    for n, p in b_params.items():
        torch.testing.assert_close(p, b_before[n], rtol=0, atol=0)
    assert all(not torch.equal(p, a_before[n]) for n, p in a_params.items())
    assert loraforge.driver(model).step == 3


def test_tb_trains_b_from_the_basis(tmp_path, basis, lm_dataset):
    model = _cora(basis, freeze_b=False)
    b_params = _lora_params(model, "B")
    assert all(p.requires_grad for p in b_params.values())
    b_before = {n: p.detach().clone() for n, p in b_params.items()}
    loraforge.LoraForgeTrainer(model=model, args=_args(tmp_path), train_dataset=lm_dataset).train()
    assert all(not torch.equal(p, b_before[n]) for n, p in b_params.items())


def _train_by_hand(model, lm_dataset, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    batch = {k: torch.tensor(lm_dataset[:4][k]) for k in ("input_ids", "attention_mask", "labels")}
    for _ in range(steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def _frozen_state(model):
    return {n: p.requires_grad for n, p in model.named_parameters() if "lora_" in n}


def _only(state: dict, part: str) -> dict:
    found = {n: v for n, v in state.items() if part in n}
    assert found, f"nothing named {part!r}"  # a check over them must not pass on nothing
    return found


def test_save_load_needs_no_basis_and_keeps_b_frozen(tmp_path, basis, lm_dataset):
    local_basis = tmp_path / "basis.safetensors"
    shutil.copy(basis, local_basis)
    model = _train_by_hand(_cora(str(local_basis)), lm_dataset).eval()
    x = _inputs()
    trained = model(x).logits
    model.save_pretrained(tmp_path / "adapter")
    saved = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert saved["peft_type"] == "LORAFORGE_CORA" and saved["init_from_basis"] is False and saved["freeze_b"] is True
    os.remove(local_basis)  # loading must not need it

    loaded = loraforge.load_adapter(testing.tiny_llama(seed=0), str(tmp_path / "adapter"), is_trainable=True)
    assert isinstance(loaded.peft_config["default"], CoRAConfig)
    torch.testing.assert_close(loaded.eval()(x).logits, trained, rtol=0, atol=0)
    expected = {n: ".lora_A." in n for n in _frozen_state(loaded)}
    assert _frozen_state(loaded) == expected
    loaded.set_adapter("default")
    assert _frozen_state(loaded) == expected
    # A second adapter loaded trainable, then switched to and back: every B stays frozen.
    loaded.load_adapter(str(tmp_path / "adapter"), adapter_name="other", is_trainable=True)
    assert not any(_only(_frozen_state(loaded), ".lora_B.").values())  # PEFT's set_requires_grad path
    for name in ("other", "default"):
        loaded.set_adapter(name)
        state = _frozen_state(loaded)
        assert not any(_only(state, ".lora_B.").values())
        assert all(v == (f".{name}." in n) for n, v in _only(state, ".lora_A.").items())

    plain = PeftModel.from_pretrained(testing.tiny_llama(seed=0), str(tmp_path / "adapter"))
    assert not any(_only(_frozen_state(plain), ".lora_").values())  # inference: nothing trains
    torch.testing.assert_close(plain(x).logits, trained, rtol=0, atol=0)


def test_resume_keeps_b_frozen_and_continues_the_run(tmp_path, basis, lm_dataset):
    def trainer_for(model, out):
        args = _args(out, max_steps=4, save_strategy="steps", save_steps=2)
        return loraforge.LoraForgeTrainer(model=model, args=args, train_dataset=lm_dataset)

    straight = _cora(basis)
    trainer_for(straight, tmp_path / "a").train()  # also writes checkpoint-2
    resumed = _cora(basis)
    trainer = trainer_for(resumed, tmp_path / "b")
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert all(not p.requires_grad for p in _lora_params(resumed, "B").values())
    held = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in _lora_params(resumed, "A").values()}
    bases = load_file(basis)
    for n, p in _lora_params(resumed, "B").items():
        module = n.removeprefix("base_model.model.").removesuffix(".lora_B.default.weight")
        torch.testing.assert_close(p, bases[module][:, :4], rtol=0, atol=0)
    for (n, p), q in zip(_lora_params(resumed, "A").items(), _lora_params(straight, "A").values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert loraforge.driver(resumed).step == 4


def test_merge_and_stock_export_reproduce_the_outputs(tmp_path, basis, lm_dataset):
    model = _train_by_hand(_cora(basis, target_modules=TARGETS, lora_alpha=8), lm_dataset).eval()
    x = _inputs()
    expected = model(x).logits
    loraforge.export_lora(model, str(tmp_path / "stock"))
    meta = json.load(open(tmp_path / "stock" / "loraforge_export.json"))
    assert meta["exported_from"] == "CoRAConfig" and meta["cora"]["mode"] == "FB"
    assert json.load(open(tmp_path / "stock" / "adapter_config.json"))["peft_type"] == "LORA"
    stock = PeftModel.from_pretrained(testing.tiny_llama(seed=0), str(tmp_path / "stock")).eval()
    torch.testing.assert_close(stock(x).logits, expected, rtol=1e-5, atol=1e-5)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5)


# refusals ------------------------------------------------------------------------------------------


def test_config_refusals(tmp_path, basis):
    with pytest.raises(ForgeConfigError, match=r"^basis_path: a new CoRA adapter needs the basis file"):
        CoRAConfig(target_modules=["q_proj"])
    with pytest.raises(ForgeConfigError, match=r"^basis_path: no file at .*nowhere"):
        CoRAConfig(basis_path=str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(ForgeConfigError, match=r"^r: the basis in .* has 8 columns, fewer than r=16; use r <= 8"):
        CoRAConfig(basis_path=basis, r=16)
    with pytest.raises(ForgeConfigError, match=r"^a_init: must be one of zeros, gaussian, kaiming"):
        CoRAConfig(basis_path=basis, a_init="ones")
    with pytest.raises(ForgeConfigError, match=r"^init_lora_weights: CoRA sets A from a_init"):
        CoRAConfig(basis_path=basis, init_lora_weights="pissa")
    with pytest.raises(ForgeConfigError, match=r"^freeze_b: must be True"):
        CoRAConfig(basis_path=basis, freeze_b="yes")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(open(basis, "rb").read()[:-64])
    with pytest.raises(ForgeConfigError, match=r"^basis_path: .*cut.safetensors' is not a readable basis file"):
        CoRAConfig(basis_path=str(truncated))


def test_layer_refusals(tmp_path, basis):
    # rank_pattern asks one module for more columns than the basis has.
    with pytest.raises(ForgeConfigError, match=r"^r: the basis of 'model.layers.0.self_attn.q_proj' .* has 8 columns, "
                                               r"fewer than the module's r=12"):
        _cora(basis, rank_pattern={"layers.0.self_attn.q_proj": 12})
    # A basis extracted for q_proj only, used with v_proj too.
    models = [testing.save_tiny_model(tmp_path / f"m{i}", seed=i) for i in range(2)]
    q_only = tmp_path / "q.safetensors"
    extract_basis(models, 4, ["q_proj"], q_only, progress=False)
    with pytest.raises(ForgeConfigError, match=r"has no basis for target module 'model.layers.0.self_attn.v_proj'"):
        _cora(str(q_only), target_modules=["q_proj", "v_proj"])
    # A basis of a narrower model: wrong shape for the target.
    small = [testing.save_tiny_model(tmp_path / f"s{i}", seed=i, hidden=32) for i in range(2)]
    narrow = tmp_path / "narrow.safetensors"
    extract_basis(small, 4, ["q_proj"], narrow, progress=False)
    with pytest.raises(ForgeConfigError, match=r"the basis of 'model.layers.0.self_attn.q_proj' .* has shape \(32, 4\), "
                                               r"but the module has 64 output features"):
        _cora(str(narrow), target_modules=["q_proj"])


def test_a_config_read_from_a_saved_adapter_cannot_run_without_its_weights(tmp_path, basis):
    _cora(basis).save_pretrained(tmp_path / "adapter")
    config = CoRAConfig.from_pretrained(str(tmp_path / "adapter"))
    assert config.init_from_basis is False
    model = get_peft_model(testing.tiny_llama(seed=0), config)
    with pytest.raises(RuntimeError, match="B was never set"):
        model(_inputs())
    fresh = CoRAConfig.from_pretrained(str(tmp_path / "adapter"))
    fresh.init_from_basis = True  # explicitly start a new adapter from the (still present) basis
    torch.testing.assert_close(get_peft_model(testing.tiny_llama(seed=0), fresh)(_inputs()).logits,
                               testing.tiny_llama(seed=0)(_inputs()).logits, rtol=0, atol=0)
