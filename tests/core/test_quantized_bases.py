"""SaLoRA, Delta-LoRA and CoRA on bitsandbytes 4-bit (NF4) and 8-bit bases (core/quantized.py).

One tiny Llama saved to a folder and loaded quantised on the CPU, as a QLoRA user loads a 7B model
on a GPU. Each method trains through LoraForgeTrainer and TRL; the checks are the method's own
state, save/load onto a freshly quantised base, the stock export read by plain PEFT in a process
that never imports loraforge, PEFT LoRA's merge on the same base, and the refusals.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from datasets import Dataset  # noqa: E402
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training  # noqa: E402
from peft.utils.integrations import dequantize_module_weight  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments  # noqa: E402

import loraforge  # noqa: E402
from loraforge import CoRAConfig, DeltaLoRAConfig, SaLoRAConfig, testing  # noqa: E402
from loraforge.core.config import ForgeConfigError  # noqa: E402
from loraforge.core import sharding  # noqa: E402
from loraforge.core.layer import ForgeLinear  # noqa: E402
from loraforge.core.quantized import ForgeLinear4bit, ForgeLinear8bitLt, dense_weight  # noqa: E402
from loraforge.cora.extract import extract_basis  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
QUANT = {
    "4bit": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    "8bit": dict(load_in_8bit=True),
}
LAYER = {"4bit": ForgeLinear4bit, "8bit": ForgeLinear8bitLt}
STEPS = 8


def load_base(path, quant):
    """The base loaded quantised. bnb's CPU-only repacking of 4-bit weights (lossy across state_dict
    calls) is turned off on every layer, as loraforge's layers do on theirs, so PEFT's layers compute
    what ours do (bnb's standard path, the one GPUs take)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**QUANT[quant]),
                                                     device_map="cpu", dtype=torch.float32)
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module")
def basis(tmp_path_factory):
    root = tmp_path_factory.mktemp("qbasis")
    models = [testing.save_tiny_model(root / f"ft{i}", seed=i) for i in (1, 2, 3)]
    extract_basis(models, 8, TARGETS, root / "basis.safetensors", progress=False)
    return str(root / "basis.safetensors")


def method_config(method, basis):
    if method == "salora":
        return SaLoRAConfig(r=4, target_modules=TARGETS, window_start=1, window_end=5, gate_lr=0.1, target_density=0.5)
    if method == "delta_lora":
        return DeltaLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, start_step=2, update_ratio=1.0)
    return CoRAConfig(r=4, target_modules=TARGETS, basis_path=basis)


def layers(model):
    return [m for m in model.modules() if isinstance(m, ForgeLinear)]


def inputs():
    return torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model):
    model.eval()
    return model(input_ids=inputs()).logits


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-2,
                logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def initial_state(model):
    return {l.forge_name: (l.lora_A["default"].weight.detach().clone(), l.lora_B["default"].weight.detach().clone())
            for l in layers(model)}


def check_trained(method, model, before, losses, basis):
    """The loss fell and the method's own state moved as the method says."""
    assert sum(losses[-2:]) < sum(losses[:2]), losses
    found = layers(model)
    assert len(found) == 4
    for l in found:
        a, b = l.lora_A["default"].weight, l.lora_B["default"].weight
        a0, b0 = before[l.forge_name]
        assert not torch.equal(a, a0)
        if method == "salora":
            assert float(l.lora_salora_lambda["default"][0]) > 0  # λ rose inside the window
            assert l.lora_gate_logits["default"].abs().max() > 0  # the gate logits (start at 0) trained
            assert int(l.lora_salora_window["default"][2]) > 0  # the gates froze when the window ended
        elif method == "delta_lora":
            assert int(l.lora_delta_steps["default"][1]) == 2  # the snapshot was taken after step K=2
            bk, ak = l.lora_delta_BK["default"], l.lora_delta_AK["default"]
            assert bk.abs().max() > 0 and not torch.equal(bk, b.detach())
            # The layer computes W x + s·B A x + λ·s·(B A - B_K A_K) x, by hand (λ = 1, s = 2):
            x = torch.randn(3, l.in_features, generator=torch.Generator().manual_seed(2))
            l.eval()
            with torch.no_grad():
                got = l(x) - l.get_base_layer()(x)
                s = l.scaling["default"]
                xd, ad, bd, akd, bkd = (t.detach().double() for t in (x.to(a.dtype), a, b, ak, bk))
                want = (2 * s * (xd @ ad.T @ bd.T) - s * (xd @ akd.T @ bkd.T)).float()
            # TRL keeps QLoRA adapters in bf16 (the QLoRA paper's recipe): compare to bf16 accuracy there
            tol = 1e-5 if a.dtype == torch.float32 else 2e-2 * float(want.abs().max())
            torch.testing.assert_close(got.float(), want, rtol=1e-4 if a.dtype == torch.float32 else 2e-2, atol=tol)
        else:
            module = l.forge_name
            torch.testing.assert_close(b, load_file(basis)[module][:, :4].to(b.dtype), rtol=0, atol=0)
            assert not b.requires_grad and a0.abs().max() == 0


def lm_data():
    return testing.lm_dataset(testing.tiny_tokenizer(), testing.alpaca_records()[:16], max_length=64)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, basis, tiny_model_dir):
    """Each method × quantisation trained 8 steps by LoraForgeTrainer, then saved."""
    out, data = {}, lm_data()
    for quant in QUANT:
        for method in ("salora", "delta_lora", "cora"):
            model = get_peft_model(prepare_model_for_kbit_training(load_base(tiny_model_dir, quant),
                                                                   use_gradient_checkpointing=False),
                                   method_config(method, basis))
            before = initial_state(model)
            folder = tmp_path_factory.mktemp(f"{method}_{quant}")
            trainer = loraforge.LoraForgeTrainer(model=model, args=args(folder), train_dataset=data)
            trainer.train()
            losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
            model.save_pretrained(folder / "adapter")
            out[(method, quant)] = dict(model=model, before=before, losses=losses, dir=folder)
    return out


@pytest.mark.parametrize("quant", list(QUANT))
def test_dispatch_builds_forge_bnb_layers_with_the_hand_computed_forward(quant, tiny_model_dir):
    base = load_base(tiny_model_dir, quant)
    model = get_peft_model(base, SaLoRAConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    found = layers(model)
    assert len(found) == 4 and all(type(l) is LAYER[quant] for l in found)
    assert all(l.forge_name.endswith(("q_proj", "v_proj")) for l in found)
    # The packed 4-bit storage is not taken for an FSDP shard.
    assert sharding.unsupported(found, "default") is None
    assert all(sharding.engine(l.get_base_layer().weight) is None for l in found)
    l = found[0].eval()
    x = torch.randn(3, l.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = l.lora_A["default"].weight, l.lora_B["default"].weight
        g = l.gate_values("default")  # eval-mode gate: None (= 1) before SaLoRA's window
        g = 1.0 if g is None else g
        want = l.scaling["default"] * ((x @ a.T) * g) @ b.T  # s·B diag(ĝ) A x on top of bnb's own W x
        torch.testing.assert_close(l(x) - l.get_base_layer()(x), want, rtol=1e-4, atol=1e-5)
        assert want.abs().max() > 1e-2


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("method", ["salora", "delta_lora", "cora"])
def test_trains_with_loraforge_trainer(trained, basis, method, quant):
    run = trained[(method, quant)]
    check_trained(method, run["model"], run["before"], run["losses"], basis)


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("method", ["salora", "delta_lora", "cora"])
def test_trains_through_trl_with_kbit_preparation_and_gradient_checkpointing(tmp_path, basis, tiny_model_dir,
                                                                             method, quant):
    """TRL prepares the k-bit model itself (prepare_model_for_kbit_training + gradient checkpointing)
    and wraps it with the config; SaLoRA needs LoraForgeSFTTrainer, the others run under plain SFTTrainer."""
    from trl import SFTConfig, SFTTrainer

    cls = loraforge.LoraForgeSFTTrainer if method == "salora" else SFTTrainer
    text = Dataset.from_dict({"text": [testing.alpaca_text(r) for r in testing.alpaca_records()[:16]]})
    sft = SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-2,
                    max_length=64, report_to=[], use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
                    logging_steps=1, gradient_checkpointing=True, seed=0)
    base = load_base(tiny_model_dir, quant)
    trainer = cls(model=base, args=sft, train_dataset=text, processing_class=testing.tiny_tokenizer(),
                  peft_config=method_config(method, basis))
    model = trainer.model
    assert len(layers(model)) == 4  # q_proj and v_proj in each of the 2 layers
    if method == "salora":  # TRL's QLoRA cast left A and B in bf16; the gate logits stay fp32
        assert all(l.lora_A["default"].weight.dtype == torch.bfloat16 for l in layers(model))
        assert all(l.lora_gate_logits["default"].dtype == torch.float32 for l in layers(model))
    before = initial_state(model)
    if method == "cora":  # A starts at zero and trains; the fixture's state is what the config built
        assert all(a.abs().max() == 0 for a, _ in before.values())
    trainer.train()
    # TRL ran prepare_model_for_kbit_training (frozen base, fp32 norms) and training used checkpointing.
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    assert model.get_input_embeddings().weight.dtype == torch.float32 and not model.get_input_embeddings().weight.requires_grad
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    check_trained(method, model, before, losses, basis)


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("method", ["salora", "delta_lora", "cora"])
def test_save_then_load_onto_a_freshly_quantised_base_gives_the_same_outputs(trained, tiny_model_dir, method, quant):
    run = trained[(method, quant)]
    expected = logits(run["model"])
    loaded = loraforge.load_adapter(load_base(tiny_model_dir, quant), str(run["dir"] / "adapter"))
    assert [type(l) for l in layers(loaded)] == [LAYER[quant]] * 4  # q_proj and v_proj in each of the 2 layers
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=1e-5)
    # and the outputs are not the base model's: the adapter is live after the load
    assert (logits(load_base(tiny_model_dir, quant)) - expected).abs().max() > 1e-3


_PLAIN_PEFT = textwrap.dedent("""
    import json, sys, torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    base_dir, jobs = sys.argv[1], json.loads(sys.argv[2])
    for job in jobs:
        q = dict(job["quant"])
        if "bnb_4bit_compute_dtype" in q:
            q["bnb_4bit_compute_dtype"] = torch.float32
        base = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**q),
                                                    device_map="cpu", dtype=torch.float32)
        for m in base.modules():  # bnb's standard 4-bit path, as in load_base
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        model = PeftModel.from_pretrained(base, job["adapter"]).eval()
        with torch.no_grad():
            torch.save(model(input_ids=torch.load(job["inputs"])).logits, job["out"])
    assert not [m for m in sys.modules if m.startswith("loraforge")], "loraforge was imported"
    print("OK")
""")


def test_stock_export_loaded_by_plain_peft_in_a_clean_process_reproduces_the_logits(trained, tiny_model_dir, tmp_path):
    torch.save(inputs(), tmp_path / "inputs.pt")
    jobs, expected = [], {}
    for (method, quant), run in trained.items():
        stock = tmp_path / f"{method}_{quant}"
        loraforge.export_lora(run["model"], str(stock))
        q = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in QUANT[quant].items()}
        jobs.append(dict(quant=q, adapter=str(stock), inputs=str(tmp_path / "inputs.pt"), out=str(stock / "logits.pt")))
        expected[str(stock / "logits.pt")] = logits(run["model"])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _PLAIN_PEFT, tiny_model_dir, json.dumps(jobs)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
    for path, want in expected.items():
        got = torch.load(path)
        assert (got - want).abs().max() <= 1e-4, (path, float((got - want).abs().max()))


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("method", ["salora", "delta_lora"])
def test_merge_on_a_quantised_base_is_peft_loras_merge(trained, tiny_model_dir, tmp_path, method, quant):
    """Merging requantises W + ΔW as PEFT LoRA does on the same base (its rounding warning included):
    the merged weights equal those of PEFT LoRA merging the same update, so the merge error is PEFT's."""
    run = trained[(method, quant)]
    before = logits(run["model"])  # = the loaded adapter's and the stock export's (tests above)
    stock = tmp_path / "stock"
    loraforge.export_lora(run["model"], str(stock))
    # Fresh copies of the base; both merge from bnb's standard layout (load_base).
    ours = loraforge.load_adapter(load_base(tiny_model_dir, quant), str(run["dir"] / "adapter"))
    peft_lora = PeftModel.from_pretrained(load_base(tiny_model_dir, quant), str(stock))
    exact = {l.forge_name: dense_weight(l.get_base_layer()).float() + l.get_delta_weight("default").detach().float()
             for l in layers(ours)}
    with pytest.warns(UserWarning, match="rounding errors"):
        merged = ours.merge_and_unload()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = peft_lora.merge_and_unload()
    bnb_cls = bnb.nn.Linear4bit if quant == "4bit" else bnb.nn.Linear8bitLt
    for name, want in exact.items():
        ours_w, peft_w = merged.get_submodule(name), peft_merged.get_submodule(name)
        assert type(ours_w) is bnb_cls  # requantised in place, as PEFT does
        a, b = dequantize_module_weight(ours_w).float(), dequantize_module_weight(peft_w).float()
        # PEFT's quantised weight, up to ΔW's float rounding flipping values near a bin edge: far
        # closer to PEFT's merged weight than the merged weights are to the exact W + ΔW.
        assert float((a - b).norm()) <= 0.25 * float((b - want).norm()) + 1e-6, name
    ours_err = float((logits(merged) - before).abs().max())
    peft_err = float((logits(peft_merged) - before).abs().max())
    assert ours_err > 0 and ours_err == pytest.approx(peft_err, rel=0.25)


@pytest.mark.parametrize("quant", list(QUANT))
def test_delta_lora_in_place_on_a_quantised_base_is_refused_in_one_line(quant, tiny_model_dir):
    base = load_base(tiny_model_dir, quant)
    with pytest.raises(ForgeConfigError, match=r"^propagation: 'in_place' writes W .* bitsandbytes .*folded") as err:
        get_peft_model(base, DeltaLoRAConfig(target_modules=TARGETS, propagation="in_place"))
    assert "\n" not in str(err.value)


def test_other_quantisation_backends_are_refused_naming_the_backend():
    """GPTQ / AWQ / HQQ / EETQ layers are nn.Modules, torchao keeps nn.Linear with a tensor-subclass
    weight: PEFT would give each a plain LoRA layer; loraforge refuses and names the backend."""

    def fake(module_path, name):
        cls = type(name, (torch.nn.Module,), {"forward": lambda self, x: x})
        cls.__module__ = module_path
        layer = cls()
        layer.in_features, layer.out_features = 8, 8
        layer.register_buffer("qweight", torch.zeros(8, 1, dtype=torch.int32))
        return layer

    class AffineQuantizedTensor(torch.Tensor):
        pass

    AffineQuantizedTensor.__module__ = "torchao.dtypes.affine_quantized_tensor"
    torchao_linear = torch.nn.Linear(8, 8)
    torchao_linear.weight = torch.nn.Parameter(torch.zeros(8, 8).as_subclass(AffineQuantizedTensor), requires_grad=False)
    cases = {"GPTQ": fake("gptqmodel.nn_modules.qlinear.torch", "TorchQuantLinear"),
             "AWQ": fake("awq.modules.linear.gemm", "WQLinear_GEMM"),
             "HQQ": fake("hqq.core.quantize", "HQQLinear"),
             "EETQ": fake("eetq.modules.qlinear", "EetqLinear"),
             "torchao": torchao_linear}
    for backend, layer in cases.items():
        model = torch.nn.Sequential()
        model.add_module("proj", layer)
        model.add_module("head", torch.nn.Linear(8, 8))  # PEFT reads the device from a parameter
        with pytest.raises(ForgeConfigError, match=rf"^target_modules: proj is a {backend}-quantised .*bitsandbytes"):
            get_peft_model(model, DeltaLoRAConfig(target_modules=["proj"]))


def test_loraforge_train_loads_the_base_in_4bit_from_the_yaml_key(tmp_path, tiny_model_dir, monkeypatch):
    """`load_in_4bit: true` in a `loraforge train` YAML trains on a bnb NF4 base (the layers say so)."""
    import yaml

    from loraforge.core.sft import LoraForgeSFTTrainer
    from loraforge.train import main

    seen = {}
    original = LoraForgeSFTTrainer.train

    def spy(self, *a, **k):
        seen["layers"] = [type(l) for l in layers(self.model)]
        seen["quant"] = self.model.get_base_model().config.quantization_config
        return original(self, *a, **k)

    monkeypatch.setattr(LoraForgeSFTTrainer, "train", spy)
    job = {"model": tiny_model_dir, "max_length": 160, "load_in_4bit": True,
           "adapter": {"method": "delta_lora", "target_modules": TARGETS, "start_step": 1},
           "training": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 4,
                        "report_to": [], "use_cpu": True, "save_strategy": "no", "disable_tqdm": True}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main([str(tmp_path / "job.yaml")]) == 0
    assert seen["layers"] == [ForgeLinear4bit] * 4
    q = seen["quant"]
    q = q if isinstance(q, dict) else q.to_dict()
    assert q["load_in_4bit"] and q["bnb_4bit_quant_type"] == "nf4" and q["bnb_4bit_use_double_quant"]
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["peft_type"] == "LORAFORGE_DELTA_LORA"
    job["load_in_8bit"] = True
    (tmp_path / "both.yaml").write_text(yaml.safe_dump(job))
    from loraforge.train import TrainConfigError, load_config

    with pytest.raises(TrainConfigError, match="^load_in_8bit: set one of"):
        load_config(str(tmp_path / "both.yaml"))
