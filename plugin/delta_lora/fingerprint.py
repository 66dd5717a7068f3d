"""The fingerprint of a base weight that a Delta-LoRA adapter was trained on, and what a load finds.

`W_0 v` (v a fixed ±1/√d_in vector) is saved with the adapter; on load the base's fingerprint is
compared with what W should hold: W_0 itself ("pristine"), W_0 plus what this axis wrote
("consistent"), W_0 plus the adapter's update ("carries": refused, it would be applied twice), the
same plus the adapter merged ("merged": refused), or none of them (a different base: warned).
"""
from __future__ import annotations

import warnings

import torch

from ..core import shard_math

HALF = (torch.float16, torch.bfloat16)
_PRINT_SEED = 20230901  # any fixed seed: the probe must be the same at save and at load


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of Delta-LoRA's state for factors / weights of `dtype`: at least fp32."""
    return torch.float32 if dtype in HALF else dtype


def probe(d_in: int, dtype: torch.dtype, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_PRINT_SEED)
    signs = torch.randint(0, 2, (d_in,), generator=gen).to(dtype) * 2 - 1
    return (signs / d_in ** 0.5).to(device)


def print_of(layer, w: torch.Tensor) -> torch.Tensor:
    """`W v` of `layer`'s base weight `w` (collective when sharded)."""
    return shard_math.matvec(w, probe(layer.in_features, state_dtype(w.dtype), w.device), transposed=layer.fan_in_fan_out)


@torch.no_grad()
def classify_base(self) -> str:
    """'consistent' (W holds what the axis `self` wrote), 'pristine' (W = W_0) or refuse/warn."""
    f0 = self.layer.lora_delta_w0_print[self.adapter]
    if torch.isnan(f0).any() or self.weight.device.type == "meta":
        return "consistent"
    v = probe(self.layer.in_features, f0.dtype, f0.device)
    c = print_of(self.layer, self.weight)
    target = self.target()
    candidates = {"consistent": f0.clone(), "pristine": f0, "carries": f0.clone(), "merged": None}
    written = self.written_terms()  # in place: what the axis has written into W
    if written:
        candidates["consistent"] += self._projected(written, v)
    if target is not None:
        candidates["carries"] += self._projected(self._terms(*target), v)
    b, a = (t.detach().to(v.dtype) for t in self.factors())  # a merged adapter: W_0 + D + s·B A
    candidates["merged"] = candidates["carries"] + self.scaling * (b @ (a @ v))
    dist = {k: float((c - e).norm()) for k, e in candidates.items()}
    scale = float(f0.norm()) + 1e-30
    eps = max(torch.finfo(self.weight.dtype).eps, torch.finfo(f0.dtype).eps)
    tol = 4 * eps * scale
    best = min(dist, key=lambda k: (dist[k], list(candidates).index(k)))
    separable = float((candidates[best] - candidates["consistent"]).norm()) > tol
    if best in ("carries", "merged") and separable and dist[best] <= 1e-2 * scale:
        what = ("the adapter's Delta-LoRA update λ·s·(B A - B_K A_K)" if best == "carries"
                else "this adapter, merged")
        raise RuntimeError(
            f"{self.layer.forge_name}: this base weight already carries {what} (a merged model, or an "
            "in-place-trained base after unload()); loading the adapter on it would apply the update twice. "
            "Load the adapter onto the ORIGINAL base model (e.g. a fresh from_pretrained of the base checkpoint).")
    if dist[best] > 1e-2 * scale:
        warnings.warn(
            f"{self.layer.forge_name}: the base weight differs from the one this Delta-LoRA adapter was trained on "
            f"(fingerprint off by {dist[best] / scale:.1%}); outputs will not reproduce the trained model. Load it "
            "onto the original base model.", stacklevel=2)
    return "pristine" if best == "pristine" else "consistent"
