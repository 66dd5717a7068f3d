"""SaLoRA's orthogonal regulariser `Σ_i ||B_iᵀB_i - I||_F² + ||A_i A_iᵀ - I||_F²`, batched over layers.

Per layer it is a handful of tiny ops, forward and backward; a model with K adapted layers would
launch them K times a step. Here the factors of one shape (and dtype, device) are stacked and their
Gram matrices taken by one batched matmul, so the op count grows with the number of distinct shapes
(a Llama has five: A of width d_model or d_ff; B of height d_model, d_kv or d_ff), not with depth.
One autograd function for all of them, with the analytic gradient `d/dM ||M Mᵀ - I||² = 4 (M Mᵀ - I) M`
in backward: autograd through the same ops would add, per group, the backward of every op and, per
factor, a copy of its gradient slice; here each factor's gradient is one row of one batched product.
Computed in float32 whatever the autocast or the factors' dtype (the gradient is cast back to it).
The stacks are rebuilt in backward rather than saved, so the regulariser holds no copy of the adapter.
"""
from __future__ import annotations

import torch


def _groups(mats: list[torch.Tensor], n_a: int) -> list[list[int]]:
    """Indices of the factors that stack together: same kind (A or B), shape, dtype and device."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(mats):
        groups.setdefault((i < n_a, tuple(m.shape), m.dtype, m.device), []).append(i)
    return list(groups.values())


def _stack(mats, idx: list[int]) -> torch.Tensor:
    x = torch.stack([mats[i] for i in idx])
    return x if x.dtype == torch.float32 else x.float()


def _grams(x: torch.Tensor, wide: bool) -> torch.Tensor:
    """M Mᵀ - I per matrix of the stack; M = x (r × d) if `wide` (an A), else xᵀ (x is d × r, a B)."""
    g = torch.bmm(x, x.mT) if wide else torch.bmm(x.mT, x)
    g.diagonal(0, -2, -1).sub_(1.0)
    return g


class _OrthPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n_a: int, *mats: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=mats[0].device.type, enabled=False):
            groups = _groups(list(mats), n_a)
            grams, parts = [], []
            for idx in groups:
                g = _grams(_stack(mats, idx), wide=idx[0] < n_a)
                grams.append(g)
                v = g.view(-1)
                parts.append(torch.dot(v, v))
            device = mats[0].device
            if len(parts) == 1:
                total = parts[0]
            elif all(p.device == device for p in parts):
                total = torch.stack(parts).sum()
            else:
                total = sum(p.to(device) for p in parts)
        ctx.n_a, ctx.groups = n_a, groups
        ctx.save_for_backward(*mats, *grams)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        mats, grams = saved[:len(saved) - len(ctx.groups)], saved[len(saved) - len(ctx.groups):]
        out: list = [None] * len(mats)
        scale = grad * 4  # d/dA ||A Aᵀ - I||² = 4 (A Aᵀ - I) A;  d/dB ||BᵀB - I||² = 4 B (BᵀB - I)
        with torch.autocast(device_type=mats[0].device.type, enabled=False):
            for idx, g in zip(ctx.groups, grams):
                if not any(ctx.needs_input_grad[1 + i] for i in idx):
                    continue
                x = _stack(mats, idx)
                gx = (torch.bmm(g, x) if idx[0] < ctx.n_a else torch.bmm(x, g)).mul_(
                    scale if scale.device == x.device else scale.to(x.device))
                dtype = mats[idx[0]].dtype
                for i, gi in zip(idx, (gx if gx.dtype == dtype else gx.to(dtype)).unbind(0)):
                    out[i] = gi
        return (None, *out)


def orth_penalty(a_factors: list[torch.Tensor], b_factors: list[torch.Tensor]) -> torch.Tensor:
    """`Σ_i ||A_i A_iᵀ - I||_F² + ||B_iᵀB_i - I||_F²` (float32 scalar, on the first factor's device);
    A_i is r × d_in, B_i is d_out × r."""
    return _OrthPenalty.apply(len(a_factors), *a_factors, *b_factors)
