"""Delta-LoRA vs plain PEFT LoRA on CPU: step time and peak memory (in place and folded), and how
much of the update a bf16 W loses without compensation.

Timing: the three models live in one process and take optimizer steps in turn (the order rotates
every round), so load on the machine hits all of them alike; the median step time is reported, as
wall time and as the process's CPU time (what a shared machine's other load disturbs least).
Memory: a variant's peak = its persistent tensors (model, adapter state, optimizer state,
Delta-LoRA's in-memory copies) + the peak tensor bytes its step allocates above them
(`benchmarks/common.py`: the profiler's allocation events), the median over --mem-rounds steps.
bf16: a Delta-LoRA in-place run on a bf16 base; after every step the same increment
`λ·s·(P_{t+1} - P_t)` is also added naively to a bf16 copy of W_0 and exactly to an fp64 copy; the
relative error of `W_T - W_0` against the fp64 value is reported for both.

    python benchmarks/bench_delta_lora.py            # full run (several minutes on 2 cores)
    python benchmarks/bench_delta_lora.py --quick    # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from peft import LoraConfig, get_peft_model

from loraforge import DeltaLoRAConfig, testing
from loraforge.delta_lora.in_place import InPlacePropagation

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AllocationTrace, MiB, median, timed  # noqa: E402

CPU = torch.device("cpu")

VARIANTS = ("lora", "delta_folded", "delta_in_place")
ATTN = ["q_proj", "v_proj"]
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_config(args) -> dict:
    return dict(hidden=args.hidden, layers=args.layers, vocab_size=args.vocab, intermediate_size=args.intermediate,
                num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
                max_position_embeddings=max(256, args.seq))


def build(variant: str, targets: list[str], args, dtype=torch.float32, **delta_kw):
    base = testing.tiny_llama(seed=0, dtype=dtype, **model_config(args))
    common = dict(r=args.r, lora_alpha=2 * args.r, target_modules=targets, lora_dropout=0.0)
    if variant == "lora":
        cfg = LoraConfig(**common)
    else:
        cfg = DeltaLoRAConfig(**common, update_ratio=delta_kw.get("update_ratio", 0.5),
                              start_step=delta_kw.get("start_step", 1), propagation=variant.removeprefix("delta_"))
    torch.manual_seed(1)
    model = get_peft_model(base, cfg)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=delta_kw.get("lr", 1e-4))
    return model, opt


def batch(args, seed: int) -> dict:
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def step(model, opt, data) -> None:
    model(**data).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def persistent_bytes(model, opt) -> int:
    seen, total = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    for m in model.modules():
        for ax in getattr(m, "forge_axes", {}).get("default", []):
            if isinstance(ax, InPlacePropagation):  # the folded axis keeps no copy of B, A
                tensors += list(ax.applied or ()) + ([ax.residual] if ax.residual is not None else [])
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def measure(targets: list[str], args) -> dict:
    runs = {v: build(v, targets, args) for v in VARIANTS}
    data = [batch(args, s) for s in range(4)]
    for v, (model, opt) in runs.items():  # warm-up; Delta-LoRA takes its snapshot at step 1
        for i in range(args.warmup):
            step(model, opt, data[i % 4])
    times = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    for i in range(args.steps):
        for v in order:
            model, opt = runs[v]
            c0 = time.process_time()  # the process's CPU time: all torch threads, not only this one
            times[v].append(timed(lambda: step(model, opt, data[i % 4]), CPU))
            cpu[v].append(time.process_time() - c0)
        order = order[1:] + order[:1]
    transient = {v: [] for v in VARIANTS}
    for i in range(args.mem_rounds):
        for v in VARIANTS:
            model, opt = runs[v]
            with AllocationTrace(CPU) as trace:
                step(model, opt, data[i % 4])
            transient[v].append(trace.peak)
    out = {}
    for v in VARIANTS:
        model, opt = runs[v]
        peak = persistent_bytes(model, opt) + median(transient[v])
        out[v] = {"median_step_s": median(times[v]), "median_cpu_s": median(cpu[v]),
                  "peak_bytes": peak}
    for v in VARIANTS:
        out[v]["time_ratio_vs_lora"] = out[v]["median_step_s"] / out["lora"]["median_step_s"]
        out[v]["cpu_ratio_vs_lora"] = out[v]["median_cpu_s"] / out["lora"]["median_cpu_s"]
        out[v]["mem_ratio_vs_lora"] = out[v]["peak_bytes"] / out["lora"]["peak_bytes"]
    return out


def profile(targets: list[str], args, top: int = 12) -> str:
    """Per-op CPU time of one folded step and one LoRA step: where the extra time goes."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    lines = []
    data = batch(args, 0)
    totals = {}
    for v in ("lora", "delta_folded"):
        model, opt = build(v, targets, args)
        for _ in range(2):
            step(model, opt, data)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step(model, opt, data)
        totals[v] = {e.key: e.self_cpu_time_total / 3 for e in prof.key_averages()}
    keys = set(totals["lora"]) | set(totals["delta_folded"])
    diff = sorted(keys, key=lambda k: totals["delta_folded"].get(k, 0) - totals["lora"].get(k, 0), reverse=True)
    lines.append(f"  {'op':40s} {'LoRA ms':>9s} {'folded ms':>9s} {'extra ms':>9s}")
    for k in diff[:top]:
        a, b = totals["lora"].get(k, 0) / 1e3, totals["delta_folded"].get(k, 0) / 1e3
        lines.append(f"  {k[:40]:40s} {a:9.2f} {b:9.2f} {b - a:9.2f}")
    lines.append(f"  {'total self CPU':40s} {sum(totals['lora'].values()) / 1e3:9.1f} "
                 f"{sum(totals['delta_folded'].values()) / 1e3:9.1f}")
    return "\n".join(lines)


def bf16_loss(args, lr: float, steps: int, K: int = 5, lam: float = 0.5) -> dict:
    """Relative error of W_T - W_0 (bf16) against the fp64 value: naive bf16 adds vs loraforge's in place."""
    model, opt = build("delta_in_place", ALL_LINEAR, args, dtype=torch.bfloat16, start_step=K, update_ratio=lam, lr=lr)
    axes = [ax for m in model.modules() for ax in getattr(m, "forge_axes", {}).get("default", [])]
    w0 = [ax.weight.detach().double().clone() for ax in axes]
    naive = [ax.weight.detach().clone() for ax in axes]
    exact = [w.clone() for w in w0]
    prev = None
    data = [batch(args, s) for s in range(4)]
    for t in range(1, steps + 1):
        step(model, opt, data[t % 4])
        now = [ax.scaling * (ax.layer.lora_B["default"].weight.detach().double()
                             @ ax.layer.lora_A["default"].weight.detach().double()) for ax in axes]
        if t > K:
            for i, p in enumerate(now):
                inc = lam * (p - prev[i])
                exact[i] += inc
                naive[i].add_(inc.to(naive[i].dtype))  # what `W.add_(delta)` on a bf16 W does
        prev = [p.detach() for p in now]

    def rel(ws):
        num = sum(float((w.double() - e).pow(2).sum()) for w, e in zip(ws, exact))
        den = sum(float((e - w_0).pow(2).sum()) for w_0, e in zip(w0, exact))
        return (num / den) ** 0.5

    def kept(ws):  # share of the exact update that the weight carries (projection onto it)
        dot = sum(float(((w.double() - w_0) * (e - w_0)).sum()) for w, w_0, e in zip(ws, w0, exact))
        den = sum(float((e - w_0).pow(2).sum()) for w_0, e in zip(w0, exact))
        return dot / den

    held = [ax.weight.detach() for ax in axes]
    with_residual = [ax.weight.detach().double() + ax.residual.double() for ax in axes]
    rounded = [e.to(torch.bfloat16) for e in exact]  # the best any bf16 W can hold
    return {"lr": lr, "steps": steps, "start_step": K, "update_ratio": lam,
            "update_norm_over_w0_norm": (sum(float((e - w_0).pow(2).sum()) for w_0, e in zip(w0, exact))
                                         / sum(float(w_0.pow(2).sum()) for w_0 in w0)) ** 0.5,
            "naive_rel_error": rel(naive), "naive_kept": kept(naive),
            "best_bf16_rel_error": rel(rounded),
            "loraforge_w_rel_error": rel(held), "loraforge_w_plus_residual_rel_error": rel(with_residual),
            "loraforge_w_equals_rounded_exact": float(sum(int((w == r).sum()) for w, r in zip(held, rounded))
                                                      / sum(w.numel() for w in held))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mem-rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--bf16-steps", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="small model, few steps (smoke run)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.intermediate, args.vocab, args.seq = 128, 2, 256, 512, 32
        args.steps, args.mem_rounds, args.bf16_steps = 4, 1, 12
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"model: Llama {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab "
          f"{args.vocab}; batch {args.batch} x seq {args.seq}; r={args.r}; torch threads {torch.get_num_threads()}; "
          f"{args.steps} timed steps per variant, interleaved")
    results = {"settings": vars(args)}
    for label, targets in (("q,v (PEFT default)", ATTN), ("all linear", ALL_LINEAR)):
        res = measure(targets, args)
        results[label] = res
        print(f"\n[{label}]\n  {'variant':16s} {'wall/step':>10s} {'x LoRA':>7s} {'CPU/step':>10s} {'x LoRA':>7s} "
              f"{'peak MiB':>9s} {'x LoRA':>7s}")
        for v, r in res.items():
            print(f"  {v:16s} {r['median_step_s'] * 1e3:8.1f}ms {r['time_ratio_vs_lora']:7.3f} "
                  f"{r['median_cpu_s'] * 1e3:8.1f}ms {r['cpu_ratio_vs_lora']:7.3f} "
                  f"{r['peak_bytes'] / MiB:9.1f} {r['mem_ratio_vs_lora']:7.4f}")
    worst = max(results[k]["delta_folded"]["cpu_ratio_vs_lora"] for k in ("q,v (PEFT default)", "all linear"))
    print(f"\nprofile (all linear): self CPU time per step, ops that grow most from LoRA to folded"
          f"{' (folded is over the 1.03x target)' if worst > 1.03 else ''}:")
    print(profile(ALL_LINEAR, args))
    print("\nbf16 base weight, in place (all linear): error of W_T against the fp64 W_0 + Σ updates, relative to |W_T - W_0|")
    results["bf16"] = []
    bf_args = argparse.Namespace(**{**vars(args), "layers": min(args.layers, 2), "seq": min(args.seq, 64),
                                    "batch": min(args.batch, 4)})
    for lr in (1e-4, 1e-3):
        b = bf16_loss(bf_args, lr=lr, steps=args.bf16_steps)
        results["bf16"].append(b)
        print(f"  lr {lr:g}, {b['steps']} steps, K={b['start_step']}, λ={b['update_ratio']}: "
              f"|W_T-W_0|/|W_0| = {b['update_norm_over_w0_norm']:.2e}\n"
              f"    naive bf16 adds:   rel. error {b['naive_rel_error']:.3f}, keeps {b['naive_kept']:.1%} of the update\n"
              f"    best bf16 W:       rel. error {b['best_bf16_rel_error']:.3f} (one rounding of the exact W_T)\n"
              f"    loraforge W:       rel. error {b['loraforge_w_rel_error']:.3f} "
              f"({b['loraforge_w_equals_rounded_exact']:.2%} of entries equal the rounded exact W_T); "
              f"W + fp32 residual: {b['loraforge_w_plus_residual_rel_error']:.1e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
