"""Step time and peak memory of every loraforge method against plain PEFT LoRA, side by side.

All methods live in one process on copies of one base model (random weights, Llama shape), with
the same rank, target modules (every attention and MLP linear), batch and optimizer (AdamW). Each
takes its warm-up steps, then the rounds alternate: in every round each method (in a rotating
order) takes `--steps` timed optimizer steps, so slow drifts of a shared machine hit all methods
alike. Printed: the median step time; its ratio to plain LoRA, the median over rounds of the
ratio of the round's medians (each pair measured close in time), with half its interquartile range;
peak memory and its ratio to plain LoRA; the trainable parameters. Methods:

  lora            peft.LoraConfig (the reference)
  adalora         peft.AdaLoraConfig, init_r = r, target_r = r/2, budgeting every step
                  (`update_and_allocate` after each optimizer step): the adaptive-rank peer
  salora_out      SaLoRA before its window (gates off, orthogonal regulariser on)
  salora_in       SaLoRA inside its window (gates sampled and trained, the default budget control)
  delta_folded    Delta-LoRA, propagation="folded" (start_step=0: propagating from the first step)
  delta_in_place  Delta-LoRA, propagation="in_place"
  cora_fb         CoRA with B frozen to a basis (random orthonormal, in CoRA's key scheme)
  cora_tb         CoRA with B trainable from the basis

Peak memory = the bytes a method holds after building and warming up (its base model copy,
adapter, optimizer state and any state of its own) + the peak a training step allocates above that
(`benchmarks/common.py`: `max_memory_allocated` on the GPU, the profiler's allocation events on the
CPU). Step time covers forward, loss terms, backward, optimizer step and the post-step work; the
CPU preset runs one torch thread and counts that thread's CPU time (`time.thread_time`), which
leaves out the time a shared machine made it wait for a core; the GPU preset counts wall time with
the device synchronised. `--profile METHOD` adds, for METHOD against LoRA, the median time per
phase of a step (forward, loss terms, backward, optimizer step, loraforge's post-step work) and
torch.profiler's op tables with the ops whose time or number of calls differ most.

    python benchmarks/bench_all.py --preset cpu           # ~3 minutes on 2 CPU cores
    python benchmarks/bench_all.py --preset gpu           # 1B-class Llama shape, bf16, seq 1024, CUDA
    python benchmarks/bench_all.py --preset cpu --profile salora_in   # where a method's time goes
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (FAR, AllocationTrace, MiB, load_average, median, method_config, pick_device, round_robin,  # noqa: E402
                    spread, sync, table, threads, trainable_parameters, write_basis)

import loraforge  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

PRESETS = {
    # 12.6 M parameters, fp32, one torch thread (timed by its CPU time): ~0.3 s a step, ~3 min in all.
    "cpu": dict(device="cpu", dtype="float32", hidden=384, intermediate=1024, layers=4, heads=6, kv_heads=2,
                vocab=8192, seq=128, batch=4, r=8, tie=False, warmup=2, rounds=20, steps=2, threads=1),
    # Llama-3.2-1B shape (1.24 B parameters), random weights.
    "gpu": dict(device="cuda", dtype="bfloat16", hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8,
                vocab=128256, seq=1024, batch=4, r=16, tie=True, warmup=3, rounds=10, steps=3, threads=None),
}
METHODS = ["lora", "adalora", "salora_out", "salora_in", "delta_folded", "delta_in_place", "cora_fb", "cora_tb"]


@dataclass
class Run:
    name: str
    model: torch.nn.Module
    driver: Optional[loraforge.Driver]
    optimizer: torch.optim.Optimizer = None
    after_step: Callable[[int], None] = lambda step: None
    step_count: int = 0
    times: list = field(default_factory=list)
    round_medians: list = field(default_factory=list)
    resident: int = 0
    step_peak: int = 0

    def step(self, batch: dict, phase: Callable[[str], object] = None) -> None:
        phase = phase or _no_phase
        with phase("forward"):
            loss = self.model(**batch).loss
        with phase("loss terms"):
            if self.driver is not None:
                reg = self.driver.regularization_loss()
                if reg is not None:
                    loss = loss + reg
        with phase("backward"):
            loss.backward()
        with phase("optimizer step"):
            self.optimizer.step()  # loraforge's post-step work runs from the optimizer hook (timed apart)
        with phase("after step"):
            self.step_count += 1
            self.after_step(self.step_count)  # AdaLoRA's update_and_allocate
            self.optimizer.zero_grad(set_to_none=True)


@contextmanager
def _no_phase(name: str):
    yield


def base_model(p: dict, device: torch.device) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv_heads"],
                      max_position_embeddings=max(2048, p["seq"]), tie_word_embeddings=p["tie"])
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(cfg)
    return model.to(getattr(torch, p["dtype"]))


def build(name: str, base: torch.nn.Module, r: int, basis: str, lr: float) -> Run:
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base), method_config(name, r, TARGETS, basis))
    model.train()
    drivers = loraforge.drivers(model)
    driver = drivers[0] if drivers else None
    run = Run(name, model, driver)
    special = []
    if driver is not None:
        driver.begin(2 * FAR)
        special = driver.param_groups(lr, 0.0)
    taken = {id(p) for g in special for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    run.optimizer = torch.optim.AdamW([{"params": rest}, *special], lr=lr, weight_decay=0.0)
    if name == "adalora":
        run.after_step = model.base_model.update_and_allocate
    return run


def make_batch(p: dict, device: torch.device) -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), generator=gen).to(device)
    return {"input_ids": ids, "labels": ids}


def phase_times(runs: dict[str, Run], names: list[str], batch: dict, device: torch.device, steps: int) -> None:
    """Median time per step of each phase, steps of the methods interleaved: CPU time of the calling
    thread on the CPU (one torch thread), wall time with the device synchronised at each boundary on
    the GPU. loraforge's post-step work (the driver's `on_step_end`, run by the optimizer hook) is
    timed on its own and taken out of "optimizer step"."""
    clock = time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter
    samples: dict[str, dict[str, list[float]]] = {n: defaultdict(list) for n in names}
    for name in names:
        d = runs[name].driver
        if d is not None:
            def on_step_end(d=d, name=name, inner=d.on_step_end):
                start = clock()
                inner()
                sync(device)
                samples[name]["_post"].append(clock() - start)
            d.on_step_end = on_step_end  # the optimizer hook calls the instance's method
    for _ in range(steps):
        for name in names:
            current: dict[str, float] = {}

            @contextmanager
            def phase(label, current=current):
                sync(device)
                start = clock()
                yield
                sync(device)
                current[label] = clock() - start

            n_post = len(samples[name]["_post"])
            runs[name].step(batch, phase)
            post = sum(samples[name]["_post"][n_post:])
            current["optimizer step"] -= post
            current["post-step work (loraforge)"] = post
            for label, value in current.items():
                samples[name][label].append(value)
    labels = [k for k in samples[names[0]] if not k.startswith("_")] + ["post-step work (loraforge)"]
    labels = list(dict.fromkeys(labels))
    rows = []
    for label in labels:
        values = [median(samples[n][label]) * 1e3 if samples[n].get(label) else 0.0 for n in names]
        rows.append([label, *(f"{v:.2f}" for v in values), *(f"{v - values[0]:+.2f}" for v in values[1:])])
    totals = [sum(median(samples[n][l]) for l in labels if samples[n].get(l)) * 1e3 for n in names]
    rows.append(["total", *(f"{v:.2f}" for v in totals), *(f"{v - totals[0]:+.2f}" for v in totals[1:])])
    print(f"\n=== ms per step by phase (median of {steps} interleaved steps)")
    print(table(rows, ["phase", *names, *(f"{n} - {names[0]}" for n in names[1:])]))


def profile(runs: dict[str, Run], names: list[str], batch: dict, device: torch.device, steps: int = 3) -> None:
    """torch.profiler tables of `names` (self time per op, top 20) and the ops whose time or number of
    calls differs most. On the GPU both the kernels' device time and the host's time (launches,
    Python-side work) are shown: a step is as slow as the slower of the two."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    keys = ["self_cpu_time_total"] + (["self_device_time_total"] if device.type == "cuda" else [])
    totals: dict[str, dict[str, dict]] = {k: {} for k in keys}
    for name in names:
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                runs[name].step(batch, record_function)
            sync(device)
        events = prof.key_averages()
        for key in keys:
            print(f"\n=== {name}: {steps} steps, top ops by {key}")
            print(events.table(sort_by=key, row_limit=25))
            totals[key][name] = {e.key: (getattr(e, key) / steps, e.count / steps) for e in events}
    if len(names) == 2:
        for key in keys:
            a, b = (totals[key][n] for n in names)
            diff = sorted(((b.get(k, (0, 0))[0] - a.get(k, (0, 0))[0], k) for k in set(a) | set(b)), reverse=True)
            print(f"\n=== ops where {names[1]} spends more {key} than {names[0]} (µs per step; calls per step)")
            for d, k in diff[:20]:
                print(f"{d:12.0f}  {k}  ({a.get(k, (0, 0))[1]:g} -> {b.get(k, (0, 0))[1]:g} calls)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="override the preset's device")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per method per round")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--profile", metavar="METHOD", help="after the table, profile METHOD against lora")
    args = parser.parse_args(argv)
    p = dict(PRESETS[args.preset])
    for k in ("device", "rounds", "steps"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    if args.rank is not None:
        p["r"] = args.rank
    if p["device"] == "cpu":
        p["dtype"] = "float32"
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if "lora" not in names:
        names.insert(0, "lora")
    device = pick_device(p["device"])
    print(f"preset {args.preset}: {p}")
    print("step time: " + ("CPU time of the one torch thread (time.thread_time)" if p["device"] == "cpu"
                           and p.get("threads") == 1 else "wall time, device synchronised"))
    print(load_average())
    with threads(p.get("threads")), tempfile.TemporaryDirectory() as tmp:
        base = base_model(p, device)
        basis = os.path.join(tmp, "basis.safetensors")
        write_basis(base, TARGETS, p["r"], basis)
        batch = make_batch(p, device)
        runs = {}
        for name in names:
            with AllocationTrace(device) as trace:
                run = build(name, base, p["r"], basis, lr=1e-4)
                for _ in range(p["warmup"]):
                    run.step(batch)
            run.resident = trace.net
            runs[name] = run
        round_robin(runs, names, batch, p["rounds"], p["steps"], device, thread_time=p.get("threads") == 1)
        print(load_average())
        ref = runs["lora"]
        ref_mem = ref.resident + ref.step_peak
        ref_params = trainable_parameters(ref.model)
        rows = []
        for name in names:
            run = runs[name]
            t, mem, n = median(run.times), run.resident + run.step_peak, trainable_parameters(run.model)
            ratios = [a / b for a, b in zip(run.round_medians, ref.round_medians)]
            rows.append([name, f"{t * 1e3:.1f}", f"{median(ratios):.3f}", f"±{spread(ratios) * median(ratios):.3f}",
                         f"{mem / MiB:.1f}", f"{run.step_peak / MiB:.1f}", f"{mem / ref_mem:.4f}",
                         f"{n:,}", f"{n / ref_params:.2f}"])
        print()
        print(table(rows, ["method", "step ms (median)", "time ×LoRA", "IQR/2", "peak MiB", "of which step",
                           "memory ×LoRA", "trainable", "params ×LoRA"]))
        if args.profile:
            phase_times(runs, ["lora", args.profile], batch, device, steps=max(10, p["rounds"]))
            profile(runs, ["lora", args.profile], batch, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
