"""Shared parts of the miniature fidelity runs: a teacher with planted weight updates, distillation
of a student adapter onto it, and the held-out gap.

A run: the student is the base model with an adapter; it is trained for a fixed number of AdamW
steps to match the teacher's next-token distributions (KL(teacher ‖ student)) on fresh random token
sequences, and scored on held-out sequences by the share of the base model's gap it closed:
`closed = 1 - KL(teacher ‖ student) / KL(teacher ‖ base)` (1 = the teacher recovered, 0 = no better
than the base). Everything is seeded, so a (method, lr, seed) triple always gives the same number.
"""
from __future__ import annotations

import copy
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

import loraforge
from loraforge import testing

VOCAB, SEQ, BATCH = 512, 32, 16


def orthonormal(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    return q.float()


def planted(weight: torch.Tensor, rank: int, share: float, gen: torch.Generator, left: torch.Tensor | None = None) -> torch.Tensor:
    """A rank-`rank` update with a flat spectrum and Frobenius norm `share·‖W‖`; its column space is
    `left` when given (d_out × rank), else random."""
    d_out, d_in = weight.shape
    u = orthonormal(d_out, rank, gen) if left is None else left
    v = orthonormal(d_in, rank, gen)
    delta = u @ v.T
    return delta * (share * weight.norm() / delta.norm())


def batches(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (BATCH, SEQ), generator=gen) for _ in range(n)]


def kl(teacher: torch.nn.Module, student: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        target = F.log_softmax(teacher(input_ids=ids).logits.float(), -1)
    pred = F.log_softmax(student(input_ids=ids).logits.float(), -1)
    return F.kl_div(pred, target, log_target=True, reduction="batchmean") / SEQ


@torch.no_grad()
def held_out(teacher, student, data: list[torch.Tensor]) -> float:
    was = student.training
    student.eval()
    value = sum(float(kl(teacher, student, ids)) for ids in data) / len(data)
    student.train(was)
    return value


def distill(student, teacher, steps: int, lr: float, seed: int) -> None:
    """AdamW on the student's trainable parameters (plus a loraforge method's own param groups and
    loss terms), one fresh random batch per step."""
    drivers = loraforge.drivers(student)
    driver = drivers[0] if drivers else None
    special = []
    if driver is not None:
        driver.begin(steps)
        special = driver.param_groups(lr, 0.0)
    taken = {id(p) for g in special for p in g["params"]}
    rest = [p for p in student.parameters() if p.requires_grad and id(p) not in taken]
    opt = torch.optim.AdamW([{"params": rest}, *special], lr=lr, weight_decay=0.0)
    student.train()
    for ids in batches(steps, seed=10_000 + seed):
        loss = kl(teacher, student, ids)
        reg = driver.regularization_loss() if driver is not None else None
        (loss if reg is None else loss + reg).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def tiny_base(seed: int) -> torch.nn.Module:
    return testing.tiny_llama(seed=seed, vocab_size=VOCAB, hidden=64, layers=2)


def run(make_student: Callable[[torch.nn.Module], torch.nn.Module], base, teacher, steps: int, lr: float, seed: int,
        test: list[torch.Tensor], gap: float) -> float:
    """Share of the base→teacher gap the student closes on `test`."""
    torch.manual_seed(seed)
    student = make_student(copy.deepcopy(base))
    distill(student, teacher, steps, lr, seed)
    return 1.0 - held_out(teacher, student, test) / gap


def summary(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{mean:.3f} ± {sd:.3f} (min {min(values):.3f}, max {max(values):.3f})"


def report(results: dict[tuple[str, float], list[float]], reference: str, best_note: str = "") -> None:
    """Print every (method, lr) result, each method at its best lr, and the paired difference to `reference`."""
    width = max(len(name) for name, _ in results) + 2
    for (name, lr), values in results.items():
        print(f"  {name:{width}s} lr {lr:<6g} {summary(values)}")
    best: dict[str, tuple[float, float, list[float]]] = {}
    for (name, lr), values in results.items():
        mean = sum(values) / len(values)
        if name not in best or mean > best[name][1]:
            best[name] = (lr, mean, values)
    print(f"\nBest learning rate per method{best_note}:")
    for name, (lr, _, values) in best.items():
        print(f"  {name:{width}s} lr {lr:<6g} {summary(values)}")
    ref_values = best[reference][2]
    print(f"\nDifference to {reference} at each one's best learning rate, paired by seed (mean ± sd):")
    for name, (_, _, values) in best.items():
        if name != reference:
            print(f"  {name:{width}s} {summary([v - r for v, r in zip(values, ref_values)])}")
