"""`export_lora(format="uniform" | "gguf")`: every method, reloaded by plain PEFT (no loraforge) and read back
from the GGUF file by `gguf.GGUFReader`, against the trained model."""
from __future__ import annotations

import json
import subprocess
import sys

import gguf
import pytest
import torch
from peft import get_peft_model

import loraforge
from loraforge import CoRAConfig, DeltaLoRAConfig, SaLoRAConfig, testing
from loraforge.cora.extract import extract_basis
from loraforge.core.layer import ForgeLinear
from loraforge.salora import prune

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
# llama.cpp's names of the HF Llama modules (llama.cpp's gguf-py tensor_mapping.py), written out by hand.
LLAMA_CPP = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
PRUNED = "model.layers.1.self_attn.v_proj"
METHODS = ["salora_pruned", "delta_lora_folded", "delta_lora_in_place", "cora"]


def _ids(seed=0, size=(2, 12)):
    return torch.randint(3, 512, size, generator=torch.Generator().manual_seed(seed))


def _train(model, steps=4, lr=1e-2):
    """A hand loop (the optimizer hooks drive Delta-LoRA); next-token loss on random ids."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for step in range(steps):
        ids = _ids(seed=10 + step, size=(4, 12))
        logits = model(input_ids=ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def _salora():
    model = get_peft_model(testing.tiny_llama(0), SaLoRAConfig(r=8, target_modules=TARGETS, prune_budget="gate"))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero B, gate logits spread so that some ranks (some whole modules) are pruned
        for layer in loraforge.driver(model).layers:
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * 0.1)
            logits = layer.lora_gate_logits["default"]
            logits.copy_(torch.randn(logits.shape, generator=gen) * 2.0 - 2.0)
            if layer.forge_name == PRUNED:
                logits.fill_(-10.0)  # every gate closed: the whole module goes
    prune(model)
    return model.eval()


def _delta_lora(mode):
    torch.manual_seed(123)
    config = DeltaLoRAConfig(target_modules=TARGETS, r=4, lora_alpha=8, update_ratio=0.5, start_step=2,
                             propagation=mode, init_lora_weights=False)
    return _train(get_peft_model(testing.tiny_llama(0), config), steps=5, lr=3e-3)


def _cora(root):
    tuned = [testing.save_tiny_model(root / f"tuned-{i}", seed=i) for i in (1, 2)]
    extract_basis(tuned, 8, TARGETS, str(root / "basis.safetensors"), progress=False)
    config = CoRAConfig(basis_path=str(root / "basis.safetensors"), r=4, lora_alpha=16, target_modules=TARGETS)
    return _train(get_peft_model(testing.tiny_llama(0), config))


def _update_by_forward(model) -> dict[str, torch.Tensor]:
    """Each module's whole update on the ORIGINAL base weight, from the layer's forward on the identity."""
    originals = dict(testing.tiny_llama(0).named_parameters())
    out = {}
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, ForgeLinear):
                eye = torch.eye(layer.in_features)
                w0 = originals[f"{layer.forge_name}.weight"]
                out[layer.forge_name] = (layer(eye) - eye @ w0.T).T
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each method trained, exported as uniform and gguf; the uniform exports reloaded by plain PEFT."""
    root = tmp_path_factory.mktemp("export_formats")
    base = root / "base"
    testing.tiny_llama(0).save_pretrained(base)
    models = {"salora_pruned": _salora(), "delta_lora_folded": _delta_lora("folded"),
              "delta_lora_in_place": _delta_lora("in_place"), "cora": _cora(root)}
    ids = _ids()
    torch.save(ids, root / "ids.pt")
    result = {}
    for name, model in models.items():
        with torch.no_grad():
            expected = model(input_ids=ids).logits
        minimal = loraforge.export_lora(model, str(root / name / "peft"))
        uniform = loraforge.export_lora(model, str(root / name / "uniform"), format="uniform")
        loraforge.export_lora(model, str(root / name / "gguf"), format="gguf")
        result[name] = dict(expected=expected, minimal=minimal, uniform=uniform, dir=root / name,
                            update=_update_by_forward(model))
    script = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from transformers import AutoModelForCausalLM\n"
        "base, ids, out, *adapters = sys.argv[1:]\n"
        "ids, got = torch.load(ids), {}\n"
        "for a in adapters:\n"
        "    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), a).eval()\n"
        "    ranks = {n: l.lora_A['default'].weight.shape[0] for n, l in m.named_modules() if hasattr(l, 'lora_A')}\n"
        "    with torch.no_grad():\n"
        "        got[a] = (m(input_ids=ids).logits, ranks)\n"
        "assert not [k for k in sys.modules if k.startswith('loraforge')], 'loraforge was imported'\n"
        "torch.save(got, out)\n"
    )
    adapters = [str(result[name]["dir"] / "uniform") for name in models]
    subprocess.run([sys.executable, "-c", script, str(base), str(root / "ids.pt"), str(root / "got.pt"), *adapters],
                   check=True, cwd=root)
    got = torch.load(root / "got.pt")
    for name in models:
        result[name]["plain_peft"] = got[str(result[name]["dir"] / "uniform")]
    return result


@pytest.mark.parametrize("method", METHODS)
def test_uniform_export_is_one_rank_and_plain_peft_reproduces_the_model(exported, method):
    run = exported[method]
    logits, loaded_ranks = run["plain_peft"]
    torch.testing.assert_close(logits, run["expected"], rtol=0, atol=1e-5)
    config = json.loads((run["dir"] / "uniform" / "adapter_config.json").read_text())
    rank = max(run["minimal"].values())
    assert config["r"] == config["lora_alpha"] == rank
    assert not config["rank_pattern"] and not config["alpha_pattern"]
    assert set(loaded_ranks.values()) == {rank} and len(loaded_ranks) == len(run["minimal"])
    assert run["uniform"] == dict.fromkeys(run["minimal"], rank)


def test_salora_export_really_has_pruned_ranks_to_pad(exported):
    ranks = exported["salora_pruned"]["minimal"]
    assert len(set(ranks.values())) > 2 and PRUNED not in ranks and len(ranks) == 2 * len(TARGETS) - 1
    assert set(exported["delta_lora_folded"]["minimal"].values()) == {8}  # the rank-2r stack


def _gguf_rows(n_rows: int, n_head: int) -> list[int]:
    """GGUF row i of a llama q/k projection holds HF row _gguf_rows(..)[i]: llama.cpp stores each head's
    rotary pairs (x_j, x_{j + d/2}) next to each other."""
    d = n_rows // n_head
    return [h * d + (i % 2) * (d // 2) + i // 2 for h in range(n_head) for i in range(d)]


@pytest.mark.parametrize("method", METHODS)
def test_gguf_tensors_read_back_give_each_modules_update(exported, method):
    run = exported[method]
    reader = gguf.GGUFReader(run["dir"] / "gguf" / "adapter_model.gguf")
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert (field("general.type"), field("adapter.type"), field("general.architecture")) == ("adapter", "lora", "llama")
    alpha = field("adapter.lora.alpha")
    tensors = {t.name: t for t in reader.tensors}
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    config = testing.tiny_llama_config()
    seen = set()
    for module, update in run["update"].items():
        layer, kind = int(module.split(".")[2]), module.rsplit(".", 1)[1]
        name = f"blk.{layer}.{LLAMA_CPP[kind]}.weight"
        if module not in run["minimal"]:  # pruned away whole: no update, no tensors
            assert update.abs().max() == 0 and f"{name}.lora_a" not in tensors
            continue
        a = torch.from_numpy(tensors[f"{name}.lora_a"].data.copy())  # (rank, in), llama.cpp's ne = (in, rank)
        b = torch.from_numpy(tensors[f"{name}.lora_b"].data.copy())  # (out, rank)
        assert a.shape[0] == b.shape[1] == run["minimal"][module]
        delta = b @ a * (alpha / b.shape[1])  # llama.cpp: scale = alpha / rank, rank from B's shape
        if kind in ("q_proj", "k_proj"):
            heads = config.num_attention_heads if kind == "q_proj" else config.num_key_value_heads
            update = update[_gguf_rows(update.shape[0], heads)]
        torch.testing.assert_close(delta, update, rtol=1e-4, atol=1e-6)
        seen.add(module)
    assert seen == set(run["minimal"])


def test_ollama_modelfile_beside_the_gguf(exported, tmp_path):
    text = (exported["cora"]["dir"] / "gguf" / "Modelfile").read_text().splitlines()
    assert text[1] == "ADAPTER ./adapter_model.gguf" and text[0].startswith("FROM ")
    model = _cora(tmp_path)
    loraforge.export_lora(model, str(tmp_path / "g"), format="gguf", base_gguf="/models/base.gguf")
    assert (tmp_path / "g" / "Modelfile").read_text() == "FROM /models/base.gguf\nADAPTER ./adapter_model.gguf\n"


def test_qwen2_gguf_keeps_the_row_order_and_names_the_architecture(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    base = Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    w0 = base.model.layers[1].self_attn.k_proj.weight.detach().clone()
    model = get_peft_model(base, DeltaLoRAConfig(target_modules=["k_proj"], r=4, init_lora_weights=False)).eval()
    layer = model.base_model.model.model.layers[1].self_attn.k_proj
    with torch.no_grad():
        update = (layer(torch.eye(64)) - torch.eye(64) @ w0.T).T
    loraforge.export_lora(model, str(tmp_path), format="gguf")
    reader = gguf.GGUFReader(tmp_path / "adapter_model.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen2"
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in reader.tensors}
    a, b = tensors["blk.1.attn_k.weight.lora_a"], tensors["blk.1.attn_k.weight.lora_b"]
    delta = b @ a * (reader.fields["adapter.lora.alpha"].contents() / b.shape[1])
    torch.testing.assert_close(delta, update, rtol=1e-4, atol=1e-6)


def test_gguf_refuses_what_llama_cpp_cannot_express(tmp_path):
    kept = get_peft_model(testing.tiny_llama(0), DeltaLoRAConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match=r"^format gguf: modules_to_save \(lm_head\)"):
        loraforge.export_lora(kept, str(tmp_path / "a"), format="gguf")
    tied = get_peft_model(testing.tiny_llama(0, tie_word_embeddings=True),
                          DeltaLoRAConfig(target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"^format gguf: module lm_head has no tensor of its own"):
        loraforge.export_lora(tied, str(tmp_path / "b"), format="gguf")
    from transformers import GemmaConfig, GemmaForCausalLM

    gemma = GemmaForCausalLM(GemmaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16))
    with pytest.raises(ValueError, match=r"^format gguf: architecture GemmaForCausalLM is not one loraforge maps"):
        loraforge.export_lora(get_peft_model(gemma, DeltaLoRAConfig(target_modules=["q_proj"])), str(tmp_path / "c"),
                              format="gguf")
    with pytest.raises(ValueError, match=r"^format: must be one of"):
        loraforge.export_lora(kept, str(tmp_path / "d"), format="onnx")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()  # refused before writing anything


def test_cli_export_gguf_prints_the_modelfile_and_refuses_in_one_line(tmp_path, capsys):
    from loraforge_cli import main

    testing.tiny_llama(0).save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    config = DeltaLoRAConfig(target_modules=["q_proj", "k_proj"], r=4, init_lora_weights=False)
    get_peft_model(testing.tiny_llama(0), config).save_pretrained(tmp_path / "adapter")
    args = ["export", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--format", "gguf"]
    assert main(args + ["--out", str(tmp_path / "out"), "--base-gguf", "/models/base.gguf"]) == 0
    printed = capsys.readouterr().out
    assert "FROM /models/base.gguf\nADAPTER ./adapter_model.gguf\n" in printed and "ollama create" in printed
    assert (tmp_path / "out" / "adapter_model.gguf").is_file()
    config = DeltaLoRAConfig(target_modules=["q_proj"], modules_to_save=["lm_head"])
    get_peft_model(testing.tiny_llama(0), config).save_pretrained(tmp_path / "kept")
    args[1] = str(tmp_path / "kept")
    assert main(args + ["--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip().splitlines()  # (after the weight-loading progress bar)
    assert err[-1].startswith("loraforge export: error: format gguf: modules_to_save (lm_head)")
    assert not any("Traceback" in line for line in err)
