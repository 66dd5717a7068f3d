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
