"""One all-gather for many small sharded tensors: what `core/sharding.py`'s `gather_many` and
`whole_many` run for FSDP2 and FSDP1.

Each rank concatenates the elements it holds of every tensor into one buffer (padded to the
longest rank's), one `all_gather_into_tensor` brings every rank's buffer, and one multi-tensor copy
puts each contiguous segment where it sits in the whole tensors, concatenated. Where each rank's
elements go depends only on the layout, which is static, so it is computed once per set of tensors
(a `_Plan`, Python ints: no device memory) and kept:
- FSDP2 (`rows_plan`): a DTensor split by rows (`Shard(0)` on one mesh dimension, `Replicate` on the
  others) holds, on coordinate i of that dimension's k ranks, rows [i·c, (i+1)·c) cut to the tensor
  (c = ceil(rows / k): `torch.chunk`'s split); the gather runs in that dimension's group.
- FSDP1 (`ranges_plan`): a `use_orig_params=True` parameter is any contiguous range of its row-major
  elements (possibly none), read from the rank's flat parameter; the ranges of all ranks are
  exchanged once per parameter (one all-gather for all the new ones) and the data gathered over all
  ranks (with HYBRID_SHARD several ranks hold an element: they hold the same value).
The values are carried in the widest dtype of the set and cast back, which is exact.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch


def _all_gather(out: torch.Tensor, buf: torch.Tensor, group=None) -> None:
    dist = torch.distributed  # all_gather_single: all_gather_into_tensor's newer name
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(out, buf, group=group)


class _Plan:
    """Where the elements of each rank's buffer go in the whole tensors (concatenated, row-major): a list
    of contiguous segments (a few per tensor), kept as Python ints, so a plan costs no device memory."""

    def __init__(self, shapes, dtypes, group, world: int, width: int, segments: list[tuple[int, int, int]],
                 local: Optional[list[tuple[int, int]]] = None) -> None:
        self.shapes, self.dtypes, self.group, self.world, self.width = shapes, dtypes, group, world, width
        self.numels = [int(torch.Size(s).numel()) for s in shapes]
        self.dtype = dtypes[0]
        for d in dtypes[1:]:
            self.dtype = torch.promote_types(self.dtype, d)
        self.total = sum(self.numels)
        # whole[dst:dst + n] = gathered[src:src + n] for each (src, dst, n); `local`: (first element, count) of
        # each tensor that this rank holds (rows plan: its backward hands those back)
        self.segments, self.local = segments, local

    def all_gather(self, pieces: list[torch.Tensor]) -> torch.Tensor:
        """The whole tensors concatenated (flat, in the plan's dtype) from this rank's `pieces` (its elements
        of each tensor, in order). One collective, one multi-tensor copy."""
        device = pieces[0].device
        buf = torch.zeros(self.width, dtype=self.dtype, device=device)
        n = sum(p.numel() for p in pieces)
        if n:
            torch.cat([p.reshape(-1).to(self.dtype) for p in pieces], out=buf[:n])
        out = torch.empty(self.world * self.width, dtype=self.dtype, device=device)
        _all_gather(out, buf, group=self.group)
        whole = torch.empty(self.total, dtype=self.dtype, device=device)
        if self.segments:
            torch._foreach_copy_([whole[d:d + k] for _, d, k in self.segments],
                                 [out[s:s + k] for s, _, k in self.segments])
        return whole

    def unpack(self, whole: torch.Tensor) -> list[torch.Tensor]:
        return [w.view(s) if w.dtype == d else w.view(s).to(d)
                for w, s, d in zip(whole.split(self.numels), self.shapes, self.dtypes)]

    def gather(self, pieces: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.unpack(self.all_gather(pieces))


def _plan_from_ranges(shapes: list, dtypes: list, ranges: list[list[tuple[int, int]]], group, world: int, me: int,
                      with_local: bool) -> _Plan:
    """`ranges[i][j]`: (first element, count) of whole tensor j (`shapes[j]`) that rank i (of `world` in
    `group`) holds. Ranks holding the same range (replicas) are read once."""
    numels = [int(torch.Size(s).numel()) for s in shapes]
    bases = [sum(numels[:j]) for j in range(len(shapes))]
    width = max(1, max(sum(n for _, n in per_rank) for per_rank in ranges))
    segments, seen = [], set()
    for i, per_rank in enumerate(ranges):
        off = 0
        for j, (start, n) in enumerate(per_rank):
            if n and (j, start, n) not in seen:
                seen.add((j, start, n))
                segments.append((i * width + off, bases[j] + start, n))
            off += n
    segments.sort(key=lambda seg: seg[1])
    return _Plan([tuple(s) for s in shapes], list(dtypes), group, world, width, segments,
                 list(ranges[me]) if with_local else None)


# FSDP2 -------------------------------------------------------------------------------------------
_ROWS: dict = {}  # (mesh, placements, shapes and dtypes) -> plan


def rows_plan(ts: list) -> Optional[_Plan]:
    """The plan for DTensors all on one mesh with the same placements, rows split on one mesh dimension;
    None for any other layout (the caller gathers them one by one)."""
    from torch.distributed.tensor import Shard

    mesh, placements = ts[0].device_mesh, tuple(ts[0].placements)
    shard_dims = [d for d, p in enumerate(placements) if isinstance(p, Shard)]
    if len(shard_dims) != 1 or placements[shard_dims[0]].dim != 0:
        return None
    # Equal meshes, not one object: DTensors of one `fully_shard` unit may carry equal copies.
    if any((t.device_mesh is not mesh and t.device_mesh != mesh) or tuple(t.placements) != placements for t in ts):
        return None
    key = (mesh, placements, tuple((tuple(t.shape), t.dtype) for t in ts))
    if key in _ROWS:
        return _ROWS[key]
    d = shard_dims[0]
    world, me = mesh.size(d), mesh.get_local_rank(d)
    ranges = []
    for i in range(world):
        per_rank = []
        for t in ts:
            rows, row = t.shape[0], int(torch.Size(t.shape[1:]).numel())
            c = -(-rows // world)
            r0, r1 = min(i * c, rows), min((i + 1) * c, rows)
            per_rank.append((r0 * row, (r1 - r0) * row))
        ranges.append(per_rank)
    if any(n != t.to_local().numel() for (_, n), t in zip(ranges[me], ts)):
        return None  # not torch.chunk's split: read them one by one
    plan = _plan_from_ranges([t.shape for t in ts], [t.dtype for t in ts], ranges, mesh.get_group(d), world, me,
                             with_local=True)
    _ROWS[key] = plan
    return plan


_OFFSETS: dict = {}  # id(DTensor) -> (weak ref to it, first index of this rank's elements in the whole)


def row_offset(w) -> int:
    """The first index (row-major) of the elements of DTensor `w` this rank holds; static, kept per tensor
    (DTensor computes it in ~0.1 ms)."""
    entry = _OFFSETS.get(id(w))
    if entry is None or entry[0]() is not w:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        entry = _OFFSETS[id(w)] = (weakref.ref(w), offset[0] * (w.numel() // w.shape[0]))
    return entry[1]


def rows(ts: list, differentiable: bool) -> list:
    """The whole values of DTensors `ts` (detached, or carrying their gradients back, `WholeRows`): one
    all-gather, or `full_tensor()` each for a layout `rows_plan` does not cover."""
    plan = rows_plan(ts)
    if plan is None:
        return [(t if differentiable else t.detach()).full_tensor() for t in ts]
    if differentiable:
        return list(WholeRows.apply(plan, *ts))
    return plan.gather([t.to_local().detach() for t in ts])


class WholeRows(torch.autograd.Function):
    """The whole tensors of DTensors from the ranks' local rows, one all-gather; backward hands each DTensor
    the rows of the gradient its rank holds (what `DTensor.full_tensor()`'s backward does, without a
    collective). One autograd node for all of them (a `to_local()` each would add one per tensor)."""

    @staticmethod
    def forward(ctx, plan: _Plan, *params):
        ctx.plan, ctx.params = plan, [(p.device_mesh, p.placements, p.shape, p.stride(), p.dtype) for p in params]
        locals_ = [p.to_local() for p in params]
        ctx.local_shapes = [x.shape for x in locals_]
        return tuple(plan.gather(locals_))

    @staticmethod
    def backward(ctx, *grads):
        from torch.distributed.tensor import DTensor

        out = [None]
        for g, (start, n), shape, (mesh, placements, whole, stride, dtype) in zip(
                grads, ctx.plan.local, ctx.local_shapes, ctx.params):
            if g is None:
                out.append(None)
                continue
            mine = g.reshape(-1)[start:start + n].view(shape)
            out.append(DTensor.from_local(mine if mine.dtype == dtype else mine.to(dtype), mesh, placements,
                                          run_check=False, shape=whole, stride=stride))
        return tuple(out)


# FSDP1 -------------------------------------------------------------------------------------------
_RANGES: dict = {}  # id(parameter) -> (weak ref to it, ((start, count) on each rank))
_PLANS: dict = {}  # ids of a set of parameters -> (weak refs, plan)


def _own_range(flat, i: int) -> tuple[int, int]:
    info = flat._shard_param_infos[i]
    return (info.intra_param_start_idx, info.numel_in_shard) if info.in_shard else (0, 0)


def ranges_plan(ts: list, flat_of) -> _Plan:
    """The plan for FSDP1 parameters (`flat_of(t)`: the flat parameter holding `t` and its index there).
    Collective the first time a parameter is seen (its ranges on every rank), then free."""
    dist = torch.distributed
    key = tuple(id(t) for t in ts)
    entry = _PLANS.get(key)
    if entry is not None and all(r() is t for r, t in zip(entry[0], ts)):
        return entry[1]
    world, me = dist.get_world_size(), dist.get_rank()
    new = [t for t in ts if _RANGES.get(id(t), (lambda: None,))[0]() is not t]
    if new:
        mine = torch.tensor([v for t in new for v in _own_range(*flat_of(t))], dtype=torch.long, device=ts[0].device)
        every = torch.empty(world * mine.numel(), dtype=torch.long, device=mine.device)
        _all_gather(every, mine)
        every = every.view(world, len(new), 2).tolist()
        for j, t in enumerate(new):
            _RANGES[id(t)] = (weakref.ref(t), tuple(tuple(every[i][j]) for i in range(world)))
    ranges = [[_RANGES[id(t)][1][i] for t in ts] for i in range(world)]
    shapes = [flat._shapes[i] for flat, i in map(flat_of, ts)]
    plan = _plan_from_ranges(shapes, [t.dtype for t in ts], ranges, None, world, me, with_local=True)
    _PLANS[key] = (tuple(weakref.ref(t) for t in ts), plan)
    return plan

