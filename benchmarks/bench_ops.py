"""Per-step overhead of each loraforge method against plain PEFT LoRA: aten ops, host syncs, time.

Every method runs on a copy of one base model in one process, with the same targets, rank, batch and
optimizer (fused AdamW, the Trainer's default), driven the way `LoraForgeTrainer` drives it: each step asks
`loraforge.drivers(model)` for the drivers (the trainer does so per micro-batch), adds their
`regularization_loss()`, and the optimizer hook runs their post-step work. Steps here are not logging
steps (nothing calls `log_values`). Printed per method:

- aten ops per step: every `aten::` event torch.profiler records in a step (nested ones included),
  the per-op cost of small models; "kernel ops" leaves out the ops that only make views, read
  metadata or dispatch to another op (`_VIEWS`); "launches (est.)" counts, from the same events, the
  kernels a GPU would launch (`launch_estimate`: innermost non-view ops, a multi-tensor op once, which
  on the CPU runs as one nested op per tensor); the GPU preset also counts the kernel launches
  themselves (`cudaLaunchKernel`);
- host reads per step: calls that copy a tensor's value to Python (`item`, `float(t)`, `int(t)`,
  `bool(t)`, `tolist`, ...), counted by a `TorchFunctionMode`; on the GPU each is a stall of the
  queue (AdamW's step counters are left out: they stay on the host on a GPU too). The GPU preset also counts the synchronisations torch.cuda reports
  (`torch.cuda.set_sync_debug_mode("warn")`);
- step time: median over interleaved rounds (each round one step of every method in a rotating
  order, so drifts of a shared machine hit all alike) of the CPU time of the one torch thread
  (`time.thread_time`); on the GPU wall time between CUDA events with the device synchronised;
  printed with its ratio to LoRA (median of the per-round ratios).

Methods: lora; salora_before (before the window: g = 1), salora_in (inside the window: gates sampled,
the default budget control "schedule": the multiplier solved after each step), salora_in_paper (inside
the window with budget_control="paper": the budget term in the loss, λ ascent), salora_after (gates
frozen); delta_folded, delta_in_place (start_step=0); cora_fb, cora_tb (`common.method_config`).

    python benchmarks/bench_ops.py                      # 4-layer hidden-256 Llama, 6 targets, r 8, CPU
    python benchmarks/bench_ops.py --preset cpu-wide    # the same at hidden 1024, seq 256 (matmuls dominate)
    python benchmarks/bench_ops.py --preset gpu         # 8-layer hidden-1024, bf16, CUDA
    python benchmarks/bench_ops.py --methods salora_in --rounds 10
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
import warnings

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import FAR, load_average, median, method_config, pick_device, sync, table, write_basis  # noqa: E402

import loraforge  # noqa: E402
from loraforge import testing  # noqa: E402

METHODS = ["lora", "salora_before", "salora_in", "salora_in_paper", "salora_after", "delta_folded", "delta_in_place", "cora_fb", "cora_tb"]
PRESETS = {
    "cpu": dict(device="cpu", dtype="float32", hidden=256, layers=4, seq=64, batch=2, r=8, rounds=30, threads=1,
                targets="q_proj,k_proj,v_proj,o_proj,up_proj,down_proj"),
    # The per-op overhead is the same as in "cpu", the matmuls 16-32× larger: how much of it a wider model hides.
    "cpu-wide": dict(device="cpu", dtype="float32", hidden=1024, layers=4, seq=256, batch=2, r=8, rounds=8, threads=1,
                     targets="q_proj,k_proj,v_proj,o_proj,up_proj,down_proj"),
    "gpu": dict(device="cuda", dtype="bfloat16", hidden=1024, layers=8, seq=512, batch=4, r=16, rounds=30, threads=None,
                targets="q_proj,k_proj,v_proj,o_proj,up_proj,down_proj"),
}
# Ops that launch no kernel of their own: views, metadata, dispatch wrappers around a counted op.
_VIEWS = {"as_strided", "view", "reshape", "_reshape_alias", "_unsafe_view", "t", "transpose", "mT", "numpy_T",
          "permute", "expand", "unsqueeze", "squeeze", "diagonal", "select", "slice", "narrow", "unbind", "split",
          "split_with_sizes", "alias", "detach", "detach_", "resolve_conj", "resolve_neg", "lift_fresh",
          "result_type", "to", "_to_copy", "contiguous", "matmul", "linear", "item", "empty", "empty_strided",
          "empty_like", "new_empty", "flatten", "chunk", "_has_compatible_shallow_copy_type"}
_READS = {"item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__complex__", "__len__"}


class HostReads(TorchFunctionMode):
    """Counts calls that read a tensor's value into Python (a device sync on the GPU). `skip`: tensors
    that stay on the host on a GPU too (AdamW's step counters), whose reads are no sync."""

    def __init__(self, skip: set[int]) -> None:
        super().__init__()
        self.count, self.skip = 0, skip

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _READS and name != "__len__":
            self.count += not (args and id(args[0]) in self.skip)
        elif name in ("cpu", "to") and args and torch.is_tensor(args[0]) and args[0].device.type != "cpu":
            target = (args[1:] or [kwargs.get("device")])[0] if name == "to" else "cpu"
            self.count += str(target).startswith("cpu")
        return func(*args, **(kwargs or {}))


class Run:
    def __init__(self, name: str, base: torch.nn.Module, p: dict, basis: str, batch: dict) -> None:
        from peft import get_peft_model

        self.name, self.batch = name, batch
        self.model = get_peft_model(copy.deepcopy(base), method_config(name, p["r"], p["targets"].split(","), basis)).train()
        special = []
        for d in loraforge.drivers(self.model):
            d.begin(3 * FAR)
            special += d.param_groups(1e-4, 0.0)
        if name == "salora_after":
            loraforge.salora.prune(self.model)
        taken = {id(q) for g in special for q in g["params"]}
        rest = [q for q in self.model.parameters() if q.requires_grad and id(q) not in taken]
        # Fused AdamW: the Trainer's default optimizer ("adamw_torch_fused") with torch >= 2.8.
        self.optimizer = torch.optim.AdamW([{"params": rest}, *special], lr=1e-4, weight_decay=0.0, fused=True)
        self.times: list[float] = []

    def step(self) -> None:
        loss = self.model(**self.batch).loss
        for d in loraforge.drivers(self.model):  # as LoraForgeTrainer.compute_loss does per micro-batch
            reg = d.regularization_loss()
            if reg is not None:
                loss = loss + reg
        loss.backward()
        self.optimizer.step()  # loraforge's post-step work runs from the optimizer hook
        self.optimizer.zero_grad(set_to_none=True)


def launch_estimate(events) -> int:
    """Kernels a GPU would launch for these profiler events: the innermost aten ops that are no view,
    allocation or metadata op (`_VIEWS`), a multi-tensor op (`_foreach_*`, `_fused_*`) counted once
    (on the CPU it loops over its tensors as nested ops; on a GPU it is one multi-tensor launch per
    chunk of tensors), host reads left out (counted apart)."""
    count = 0
    for e in events:
        name = e.name[6:] if e.name.startswith("aten::") else None
        if name is None or name in _VIEWS or name == "_local_scalar_dense":
            continue
        parent, inside_multi, outer = e.cpu_parent, False, e
        while parent is not None:
            inside_multi |= parent.name.startswith(("aten::_foreach_", "aten::_fused_"))
            outer = parent if parent.name.startswith("aten::") else outer
            parent = parent.cpu_parent
        if inside_multi:
            continue
        # A Python number in an elementwise op (`x * 0.5`) becomes a 0-dim CPU tensor that the CPU kernel
        # converts with a nested copy; a GPU kernel takes it as an argument.
        if name == "copy_" and outer is not e and outer.name not in ("aten::to", "aten::_to_copy", "aten::copy_") \
                and all(not shape for shape in (e.input_shapes or [[1]])):
            continue
        multi = name.startswith(("_foreach_", "_fused_"))
        leaf = not any(c.name.startswith("aten::") and c.name[6:] not in _VIEWS for c in e.cpu_children)
        count += multi or leaf
    return count


def count_ops(run: Run, steps: int, device: torch.device) -> tuple[float, float, float, float]:
    """(aten ops, kernel ops, estimated GPU launches, CUDA kernel launches; nan on the CPU) per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            run.step()
        sync(device)
    events = prof.key_averages()
    aten = [e for e in events if e.key.startswith("aten::")]
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return (sum(e.count for e in aten) / steps, sum(e.count for e in aten if e.key[6:] not in _VIEWS) / steps,
            launch_estimate(prof.events()) / steps, launches / steps if device.type == "cuda" else float("nan"))


def count_reads(run: Run, steps: int, device: torch.device) -> tuple[float, float]:
    """(host reads per step, CUDA-reported syncs per step; nan on the CPU)."""
    mode = HostReads({id(s["step"]) for s in run.optimizer.state.values() if "step" in s})
    cuda_syncs = float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with mode:
                for _ in range(steps):
                    run.step()
            sync(device)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
    if device.type == "cuda":
        cuda_syncs = sum("synchroniz" in str(w.message) for w in caught) / steps
    return mode.count / steps, cuda_syncs


def step_time(run: Run, device: torch.device, cpu_clock: bool) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        run.step()
        end.record()
        sync(device)
        return start.elapsed_time(end) / 1e3
    clock = time.thread_time if cpu_clock else time.perf_counter
    begin = clock()
    run.step()
    return clock() - begin


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS[1:]), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--profile-steps", type=int, default=3)
    args = parser.parse_args(argv)
    p = dict(PRESETS[args.preset])
    if args.rounds is not None:
        p["rounds"] = args.rounds
    device = pick_device(p["device"])
    names = ["lora"] + [n.strip() for n in args.methods.split(",") if n.strip() and n.strip() != "lora"]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        parser.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if p["threads"]:
        torch.set_num_threads(p["threads"])
    print(f"preset {args.preset}: {p}")
    print(load_average())
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        base = testing.tiny_llama(0, hidden=p["hidden"], layers=p["layers"]).to(device, getattr(torch, p["dtype"]))
        basis = os.path.join(tmp, "basis.safetensors")
        write_basis(base, p["targets"].split(","), p["r"], basis)
        gen = torch.Generator().manual_seed(1)
        ids = torch.randint(3, base.config.vocab_size, (p["batch"], p["seq"]), generator=gen).to(device)
        batch = {"input_ids": ids, "labels": ids}
        runs = {n: Run(n, base, p, basis, batch) for n in names}
        for run in runs.values():  # warm-up: first-step work (snapshots, optimizer state) out of the way
            run.step()
            run.step()
        ops = {n: count_ops(runs[n], args.profile_steps, device) for n in names}
        reads = {n: count_reads(runs[n], args.profile_steps, device) for n in names}
        ratios: dict[str, list[float]] = {n: [] for n in names}
        cpu_clock = device.type == "cpu" and torch.get_num_threads() == 1
        for rnd in range(p["rounds"]):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            t = {}
            for n in order:
                t[n] = step_time(runs[n], device, cpu_clock)
                runs[n].times.append(t[n])
            for n in names:
                ratios[n].append(t[n] / t["lora"])
    print(load_average())
    rows = []
    cuda = device.type == "cuda"
    for n in names:
        r = sorted(ratios[n])
        q1, q3 = r[len(r) // 4], r[(3 * len(r)) // 4]
        (a, k, e, l), (a0, k0, e0, l0) = ops[n], ops["lora"]
        rows.append([n, f"{a:.0f}", f"{a / a0:.3f}", f"{k:.0f}", f"{k / k0:.3f}", f"{e:.0f}", f"{e / e0:.3f}",
                     *([f"{l:.0f}", f"{l / l0:.3f}"] if cuda else []), f"{reads[n][0]:.1f}",
                     *([f"{reads[n][1]:.1f}"] if cuda else []),
                     f"{median(runs[n].times) * 1e3:.2f}", f"{median(ratios[n]):.3f}", f"[{q1:.3f}, {q3:.3f}]"])
    print(table(rows, ["method", "aten ops/step", "×LoRA", "kernel ops/step", "×LoRA", "launches (est.)", "×LoRA",
                       *(["CUDA launches/step", "×LoRA"] if cuda else []), "host reads/step",
                       *(["cuda syncs/step"] if cuda else []), "step ms", "time ×LoRA", "IQR"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
