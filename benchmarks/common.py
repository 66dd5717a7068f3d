"""Timing and memory helpers shared by the benchmarks (run them as scripts, not tests).

Memory on the GPU is `torch.cuda.max_memory_allocated`. On the CPU torch has no allocator
statistics and `tracemalloc` does not see tensor storage (torch allocates it outside Python's
allocator), and RSS includes whatever the C allocator caches, so the CPU figure comes from the
profiler's allocation events (`profile_memory=True`): every tensor allocation and free with its
time, whose running sum gives the live tensor bytes and their peak, the CPU analogue of
`max_memory_allocated`.
"""
from __future__ import annotations

import os
import statistics
import time
from contextlib import contextmanager
from typing import Callable

import torch

MiB = 2 ** 20


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible; use --device cpu")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, thread_time: bool = False) -> float:
    """Seconds `fn` takes, the device's queued work included. `thread_time=True` (CPU, one torch
    thread) counts the CPU time of the calling thread instead of wall time: on a shared machine it
    leaves out the time the thread waited for a core, which wall time includes."""
    clock = time.thread_time if thread_time and device.type == "cpu" else time.perf_counter
    sync(device)
    start = clock()
    fn()
    sync(device)
    return clock() - start


class AllocationTrace:
    """Net and peak tensor bytes allocated while the `with` block runs, relative to its start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.net = self.peak = 0

    def __enter__(self) -> "AllocationTrace":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.net = torch.cuda.memory_allocated(self.device) - self._start
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        self._prof.__exit__(*exc)
        events = [e for e in self._prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
        self.net, self.peak = live, peak


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Half the interquartile range, as a share of the median (a robust relative spread)."""
    if len(values) < 4:
        return float("nan")
    q = statistics.quantiles(values, n=4)
    return (q[2] - q[0]) / 2 / statistics.median(values)


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


@contextmanager
def threads(n: int | None):
    """Pin torch's intra-op threads for the block (comparable CPU timings on a shared machine)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


FAR = 10 ** 6  # a step count no benchmark reaches


def method_config(name: str, r: int, targets: list[str], basis: str):
    """The adapter config of one benchmarked method, the same in every benchmark: PEFT's `lora` and
    `adalora` (budgeting every step), SaLoRA before (`salora_before` / `salora_out`), inside
    (`salora_in`, the default budget control; `salora_in_paper`) and after (`salora_after`, pruned by the
    caller) its window, Delta-LoRA `delta_folded` / `delta_in_place` (start_step 0), CoRA `cora_fb` /
    `cora_tb` on the basis file `basis`."""
    import loraforge
    from peft import AdaLoraConfig, LoraConfig

    common = dict(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)
    if name == "lora":
        return LoraConfig(**common)
    if name == "adalora":
        return AdaLoraConfig(init_r=r, target_r=max(1, r // 2), lora_alpha=2 * r, lora_dropout=0.0,
                             target_modules=targets, tinit=0, tfinal=0, deltaT=1, total_step=FAR)
    if name in ("salora_before", "salora_out"):
        return loraforge.SaLoRAConfig(**common, window_start=FAR, window_end=2 * FAR)
    if name in ("salora_in", "salora_after", "salora_in_paper"):
        control = "paper" if name == "salora_in_paper" else "schedule"
        return loraforge.SaLoRAConfig(**common, window_start=0, window_end=2 * FAR, budget_control=control)
    if name in ("delta_folded", "delta_in_place"):
        return loraforge.DeltaLoRAConfig(**common, start_step=0, update_ratio=0.5, propagation=name[len("delta_"):])
    if name in ("cora_fb", "cora_tb"):
        return loraforge.CoRAConfig(**common, basis_path=basis, freeze_b=name == "cora_fb")
    raise ValueError(f"unknown method {name!r}")


def write_basis(model: torch.nn.Module, targets: list[str], r: int, path: str) -> None:
    """A CoRA basis in its key scheme (module path -> d_out × r orthonormal), random: speed and memory
    do not depend on which subspace B spans."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    bases = {name: torch.linalg.qr(torch.randn(m.out_features, r, generator=gen))[0].contiguous()
             for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets}
    save_file(bases, path)


def round_robin(runs: dict, names: list[str], batch, rounds: int, steps: int, device: torch.device,
                thread_time: bool) -> None:
    """Time `steps` steps of every run per round, in an order that rotates each round (a drift of a shared
    machine hits all runs alike), into `run.times` / `run.round_medians`; then one step each under an
    `AllocationTrace` for `run.step_peak`."""
    for rnd in range(rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            times = [timed(lambda: runs[name].step(batch), device, thread_time=thread_time) for _ in range(steps)]
            runs[name].times += times
            runs[name].round_medians.append(median(times))
    for name in names:
        with AllocationTrace(device) as trace:
            runs[name].step(batch)
        runs[name].step_peak = trace.peak
