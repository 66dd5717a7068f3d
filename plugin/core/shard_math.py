"""Arithmetic on the elements of a sharded weight this rank holds (`sharding.local_flat`): a low-rank update
written only to the rank's shard, and a matrix-vector product from the shards, so a whole `w` is never
gathered. Unsharded, the same on the whole tensor."""
from __future__ import annotations

import torch

from .sharding import engine_of, local_flat


def local_product(w: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(view of this rank's elements of `w`, the same elements of `left @ right`): its rows of
    `left` times the whole `right`, cut to the flat range the rank holds."""
    view, start = local_flat(w)
    n, cols = view.numel(), right.shape[1]
    if n == 0:
        return view, view.new_zeros(0, dtype=left.dtype)
    r0, r1 = start // cols, (start + n - 1) // cols + 1
    block = (left[r0:r1] @ right).reshape(-1)
    return view, block[start - r0 * cols:start - r0 * cols + n]


@torch.no_grad()
def matvec(w: torch.Tensor, v: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """`w @ v` (`wᵀ @ v` if `transposed`) for a 2-D `w`, from the shards (collective when sharded)."""
    found = engine_of(w)
    if found is None:
        m = w.detach().to(v.dtype)
        return (m.T if transposed else m) @ v
    view, start = found.local_flat(w)
    rows, cols = getattr(w, "ds_shape", w.shape)  # ZeRO-3: `shape` is the empty data's
    out = torch.zeros(cols if transposed else rows, dtype=v.dtype, device=v.device)
    idx = torch.arange(start, start + view.numel(), device=v.device)
    r, c = idx // cols, idx % cols
    vals = view.to(v.dtype)
    if transposed:
        out.index_add_(0, c, vals * v[r])
    else:
        out.index_add_(0, r, vals * v[c])
    torch.distributed.all_reduce(out)
    return out / found.replicas(w)
