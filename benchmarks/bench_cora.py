"""CoRA FB / TB step time against plain PEFT LoRA (same rank, targets, batch, AdamW), side by side.

The three models are copies of one random Llama-shaped base in one process; the basis comes from
`loraforge.cora.extract.extract_basis` over two random "fine-tuned" copies saved as safetensors.
After warm-up the rounds alternate: each round every method (in a rotating order) takes `--steps`
timed optimizer steps (forward, backward, AdamW step, zero_grad, loraforge's post-step hook), so
drifts of a shared machine hit all alike. Printed: median step time and its ratio to LoRA,
trainable parameters and optimizer-state bytes (FB's optimizer holds no B). The process CPU time
of each step is reported beside the wall time: on a shared machine it leaves out the time spent
waiting for a core (GPU runs: read the wall time).

    python benchmarks/bench_cora.py                  # CPU, one thread, a few minutes
    python benchmarks/bench_cora.py --preset gpu     # 1B-class shape in bf16 on CUDA
    python benchmarks/bench_cora.py --profile        # + per-op time of FB minus LoRA
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_average, median, pick_device, spread, table, threads, timed, trainable_parameters  # noqa: E402

import loraforge  # noqa: E402
from loraforge.cora.extract import extract_basis  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the paper's q/k/v(/o)
PRESETS = {
    "cpu": dict(device="cpu", dtype="float32", hidden=512, intermediate=1376, layers=4, heads=8, vocab=4096,
                seq=128, batch=4, r=16, warmup=2, rounds=10, steps=3, threads=1),
    "gpu": dict(device="cuda", dtype="bfloat16", hidden=2048, intermediate=8192, layers=16, heads=32, vocab=32000,
                seq=1024, batch=4, r=16, warmup=3, rounds=10, steps=5, threads=None),
}
METHODS = ["lora", "cora_fb", "cora_tb"]


def base_model(p: dict, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["heads"],
                      max_position_embeddings=max(2048, p["seq"]), tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def write_basis(p: dict, tmp: str) -> str:
    folders = []
    for seed in (1, 2):
        folders.append(os.path.join(tmp, f"ft{seed}"))
        base_model(p, seed).save_pretrained(folders[-1])
    out = os.path.join(tmp, "basis.safetensors")
    extract_basis(folders, p["r"], TARGETS, out, svd="randomized", progress=False)
    return out


def build(name: str, base, p: dict, basis: str, device):
    from peft import LoraConfig, get_peft_model

    common = dict(r=p["r"], lora_alpha=2 * p["r"], lora_dropout=0.0, target_modules=TARGETS)
    config = LoraConfig(**common) if name == "lora" else loraforge.CoRAConfig(
        **common, basis_path=basis, freeze_b=name == "cora_fb")
    model = get_peft_model(copy.deepcopy(base), config).to(device).train()
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4, weight_decay=0.0)
    return model, optimizer


def step(model, optimizer, batch) -> None:
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def state_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))


def profile_diff(runs, batch, steps: int = 3) -> None:
    """Per-op self CPU time of cora_fb minus lora (µs per step): where FB's time goes."""
    from torch.profiler import ProfilerActivity, profile

    totals = {}
    for name in ("lora", "cora_fb"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                step(*runs[name], batch)
        totals[name] = {e.key: (e.self_cpu_time_total / steps, e.count / steps) for e in prof.key_averages()}
    a, b = totals["lora"], totals["cora_fb"]
    diff = sorted(((b.get(k, (0, 0))[0] - a.get(k, (0, 0))[0], k) for k in set(a) | set(b)), reverse=True)
    print("\nops by self CPU time, cora_fb minus lora (µs per step; calls per step lora -> cora_fb):")
    for d, k in diff[:8] + [("...", "")] + diff[-8:] if len(diff) > 16 else diff:
        print(f"{d:>12}  {k}" if d == "..." else f"{d:12.0f}  {k}  ({a.get(k, (0, 0))[1]:g} -> {b.get(k, (0, 0))[1]:g})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--rank", type=int)
    parser.add_argument("--profile", action="store_true", help="also profile cora_fb against lora")
    args = parser.parse_args(argv)
    p = dict(PRESETS[args.preset])
    for key, value in (("rounds", args.rounds), ("steps", args.steps), ("r", args.rank)):
        if value is not None:
            p[key] = value
    device = pick_device(p["device"])
    print(f"preset {args.preset}: {p}\n{load_average()}")
    with threads(p["threads"]), tempfile.TemporaryDirectory() as tmp:
        basis = write_basis(p, tmp)
        base = base_model(p).to(getattr(torch, p["dtype"]))
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), generator=gen).to(device)
        batch = {"input_ids": ids, "labels": ids}
        runs = {name: build(name, base, p, basis, device) for name in METHODS}
        times = {name: [] for name in METHODS}
        cpu_times = {name: [] for name in METHODS}  # process CPU time: robust to waiting on a busy machine
        for name in METHODS:
            for _ in range(p["warmup"]):
                step(*runs[name], batch)
        for rnd in range(p["rounds"]):
            order = METHODS[rnd % 3:] + METHODS[:rnd % 3]
            for name in order:
                for _ in range(p["steps"]):
                    cpu_start = time.process_time()
                    times[name].append(timed(lambda: step(*runs[name], batch), device))
                    cpu_times[name].append(time.process_time() - cpu_start)
        print(load_average())
        ref, cpu_ref = median(times["lora"]), median(cpu_times["lora"])
        rows = []
        for name in METHODS:
            model, optimizer = runs[name]
            t, c = median(times[name]), median(cpu_times[name])
            rows.append([name, f"{t * 1e3:.1f}", f"±{spread(times[name]):.1%}", f"{t / ref:.3f}",
                         f"{c * 1e3:.1f}", f"±{spread(cpu_times[name]):.1%}", f"{c / cpu_ref:.3f}",
                         f"{trainable_parameters(model):,}", f"{state_bytes(optimizer) / 2**20:.2f}"])
        print(table(rows, ["method", "wall ms (median)", "IQR/2", "wall ×LoRA", "CPU ms (median)", "IQR/2",
                           "CPU ×LoRA", "trainable", "optimizer state MiB"]))
        if args.profile:
            profile_diff(runs, batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
