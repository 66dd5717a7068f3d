"""CoRA's per-layer piece: `B` starts as the module's common-subspace basis; FB mode freezes it."""
from __future__ import annotations

import math
import os

import torch
from safetensors import safe_open

from ..core.errors import ForgeConfigError
from ..core.layer import Axis


def basis_columns(path: str) -> dict[str, int]:
    """Module path -> number of basis columns, from the file header only (no tensor is read)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    return {key: shape[1] for key, shape in shapes.items() if len(shape) == 2}


def read_basis(path: str, module: str, r: int, out_features: int) -> torch.Tensor:
    """The first `r` columns of `module`'s basis (d_out × r), refusing a missing or ill-shaped one."""
    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
        if module not in keys:
            example = f" such as {keys[0]!r}" if keys else ""
            raise ForgeConfigError(
                f"basis_path: {path!r} has no basis for target module {module!r} (it holds {len(keys)} bases{example}); "
                f"extract one whose --targets include {module.rsplit('.', 1)[-1]!r}, or drop that module from "
                "target_modules")
        shape = f.get_slice(module).get_shape()
        if len(shape) != 2 or shape[0] != out_features:
            raise ForgeConfigError(
                f"basis_path: the basis of {module!r} in {path!r} has shape {tuple(shape)}, but the module has "
                f"{out_features} output features (expected ({out_features}, >= {r})); it was extracted from models of "
                "another architecture or size")
        if shape[1] < r:
            raise ForgeConfigError(
                f"r: the basis of {module!r} in {path!r} has {shape[1]} columns, fewer than the module's r={r}; "
                f"use r <= {shape[1]} (or a smaller rank_pattern entry) or extract with --rank {r}")
        basis = f.get_slice(module)[:, :r]
    if not bool(torch.isfinite(basis).all()) or bool((basis.abs().amax(dim=0) == 0).any()):
        what = "non-finite entries (NaN or inf)" if not bool(torch.isfinite(basis).all()) else "an all-zero column"
        raise ForgeConfigError(
            f"basis_path: the basis of {module!r} in {path!r} has {what}: B would train to NaN or never move along "
            "it; extract the basis again (loraforge cora-extract) from finite models")
    return basis


class BasisAxis(Axis):
    """Sets `B` to the basis columns and `A` per `a_init`; with `freeze_b` keeps `B` out of training.

    Freezing uses both the project's `trainable_names` (re-applied by `ForgeLinear.set_adapter`) and
    PEFT's own `frozen_peft_weight_names`, which PEFT re-applies in `set_requires_grad` (called by
    `load_adapter(..., is_trainable=True)`) and when it marks adapters trainable.
    """

    def __init__(self, layer, adapter, config) -> None:
        super().__init__(layer, adapter, config)
        # True while B holds no basis and no loaded weights: a forward then would silently run a
        # dead (B = 0) adapter, so it is refused until a state dict is loaded.
        self.awaiting_load = False

    def init_factors(self) -> None:
        layer, adapter, config = self.layer, self.adapter, self.config
        if config.freeze_b:
            frozen = dict(layer.frozen_peft_weight_names)  # the class default is a dict shared by all layers
            frozen[adapter] = tuple(sorted(set(frozen.get(adapter, ())) | {"lora_B"}))
            layer.frozen_peft_weight_names = frozen
        b, a = layer.lora_B[adapter].weight, layer.lora_A[adapter].weight
        if not config.init_from_basis or b.is_meta:
            self.awaiting_load = True  # a saved adapter being restored: its weights bring B
            return
        r = layer.r[adapter]
        basis = read_basis(config.basis_path, layer.forge_name, r, b.shape[0])
        with torch.no_grad():
            b.copy_(basis.to(device=b.device, dtype=b.dtype))
            if config.a_init == "zeros":
                a.zero_()
            elif config.a_init == "gaussian":
                torch.nn.init.normal_(a, std=1 / r)  # PEFT's init_lora_weights="gaussian"
            else:
                torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # PEFT's default LoRA A

    def trainable_names(self) -> dict[str, bool]:
        return {"lora_B": not self.config.freeze_b}

    def refresh(self) -> None:
        self.awaiting_load = False

    def _refuse_uninitialised(self) -> None:
        if self.awaiting_load:
            raise RuntimeError(
                f"{self.layer.forge_name}: this CoRA adapter's B was never set: its config has init_from_basis=False "
                "(it was read from a saved adapter) but no adapter weights were loaded. Load the adapter with "
                "loraforge.load_adapter / PeftModel.from_pretrained, or start a new adapter with "
                "CoRAConfig(basis_path=..., init_from_basis=True)")

    def extra_output(self, x):
        self._refuse_uninitialised()
        return None

    def extra_delta(self):
        self._refuse_uninitialised()
        return None
