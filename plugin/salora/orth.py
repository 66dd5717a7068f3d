"""SaLoRA's orthogonal regulariser `Σ_i ||B_iᵀB_i - I||_F² + ||A_i A_iᵀ - I||_F²`, batched over layers.

Per layer it is a handful of tiny ops, forward and backward; a model with K adapted layers would
launch them K times a step. Here the factors of one shape (and dtype, device) are stacked and
`M Mᵀ - I` of all of them is one batched product (`baddbmm` onto -I), and the squared norms of all
groups are one dot product, so the op count grows with the number of distinct shapes (a Llama has
five: A of width d_model or d_ff; B of height d_model, d_kv or d_ff), not with depth.
One autograd function for all of them, with the analytic gradient `d/dM ||M Mᵀ - I||² = 4 (M Mᵀ - I) M`
in backward: autograd through the same ops would add, per group, the backward of every op and, per
factor, a copy of its gradient slice; here each factor's gradient is one row of one batched product.
Computed in float32 whatever the autocast or the factors' dtype (the gradient is cast back to it).
The stacks are rebuilt in backward rather than saved, so the regulariser holds no copy of the adapter.
"""
from __future__ import annotations

import torch

_NEG_EYE: dict = {}


def _neg_eye(r: int, device: torch.device) -> torch.Tensor:
    """-I (r × r, float32), made once per size and device (it broadcasts over a stack)."""
    key = (r, device)
    if key not in _NEG_EYE:
        _NEG_EYE[key] = -torch.eye(r, dtype=torch.float32, device=device)
    return _NEG_EYE[key]


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
    if wide:
        return torch.baddbmm(_neg_eye(x.shape[1], x.device), x, x.mT)
    return torch.baddbmm(_neg_eye(x.shape[2], x.device), x.mT, x)


def _squared_norm(grams: list[torch.Tensor]) -> torch.Tensor:
    """Σ ||G||_F² over all `grams`, one dot product per device, summed on the first one's device."""
    by_device: dict = {}
    for g in grams:
        by_device.setdefault(g.device, []).append(g.view(-1))
    flats = [v[0] if len(v) == 1 else torch.cat(v) for v in by_device.values()]
    parts = [torch.dot(f, f) for f in flats]
    return parts[0] if len(parts) == 1 else sum(p.to(grams[0].device) for p in parts)


class _OrthPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, n_a: int, scale: float, *mats: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=mats[0].device.type, enabled=False):
            groups = _groups(list(mats), n_a)
            grams = [_grams(_stack(mats, idx), wide=idx[0] < n_a) for idx in groups]
            total = _squared_norm(grams)
        ctx.n_a, ctx.scale, ctx.groups = n_a, scale, groups
        ctx.save_for_backward(*mats, *grams)
        return total if scale == 1.0 else total * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved = ctx.saved_tensors
        mats, grams = saved[:len(saved) - len(ctx.groups)], saved[len(saved) - len(ctx.groups):]
        out: list = [None] * len(mats)
        # d/dA ||A Aᵀ - I||² = 4 (A Aᵀ - I) A;  d/dB ||BᵀB - I||² = 4 B (BᵀB - I)
        coef = grad * (4.0 * ctx.scale)
        with torch.autocast(device_type=mats[0].device.type, enabled=False):
            for idx, g in zip(ctx.groups, grams):
                if not any(ctx.needs_input_grad[2 + i] for i in idx):
                    continue
                x = _stack(mats, idx)
                gx = (torch.bmm(g, x) if idx[0] < ctx.n_a else torch.bmm(x, g)).mul_(
                    coef if coef.device == x.device else coef.to(x.device))
                dtype = mats[idx[0]].dtype
                for i, gi in zip(idx, (gx if gx.dtype == dtype else gx.to(dtype)).unbind(0)):
                    out[i] = gi
        return (None, None, *out)


def orth_penalty(a_factors: list[torch.Tensor], b_factors: list[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """`scale · Σ_i ||A_i A_iᵀ - I||_F² + ||B_iᵀB_i - I||_F²` (float32 scalar, on the first factor's device);
    A_i is r × d_in, B_i is d_out × r. `scale` (β, or β/K) is applied inside, forward and backward alike."""
    return _OrthPenalty.apply(len(a_factors), float(scale), *a_factors, *b_factors)
