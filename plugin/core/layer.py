"""`ForgeLinear`: PEFT's LoRA `Linear` with loraforge's axes composed into it.

An axis is a small per-(layer, adapter) object from a method's `layer.py` that may:
- give a multiplier on the rank dimension (`rank_gate`: SaLoRA's gate),
- set how `A` and `B` start and which of them train (`init_factors`: CoRA's basis),
- add a term to the output and to the merged weight (`extra_output` / `extra_delta`: folded
  Delta-LoRA).
The composed forward is `h = W x + s·B diag(g) A x + Σ extra_output(x)`; an axis may compute that
whole adapter term itself (`lora_branch`, e.g. one fused autograd function) when it is the only
axis that changes the forward. Axis state that must survive save/load lives in `lora_`-prefixed
dicts keyed by adapter name, which the axis declares in `Axis.tensors` and the layer creates, so
PEFT's own `get_peft_model_state_dict` / `set_peft_model_state_dict` save and restore it with the
adapter. The layer knows no method: what it does with a tensor (train it, keep it fp32, shard it)
it reads from those declarations.
"""
from __future__ import annotations

import re
import weakref
from typing import Any, Optional

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.tuners_utils import BufferDict
from peft.utils.other import transpose

from . import sharding


def module_order(name: str) -> list:
    """Sort key that puts `layers.2` before `layers.10` (tables follow the model's depth)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# Every live ForgeLinear, so that an optimizer hook can find the layers whose parameters it steps.
LIVE_LAYERS: "weakref.WeakSet[ForgeLinear]" = weakref.WeakSet()

# Bumped whenever the set of adapters, their configs or the active ones may change (a new adapter or
# injection, set_adapter, delete_adapter, unload): `core.driver.drivers` caches its walk over
# `model.modules()` under this number, so a trainer does not walk the model on every micro-batch.
ADAPTER_GENERATION = [0]


def adapters_changed() -> None:
    ADAPTER_GENERATION[0] += 1


#: `Axis.tensors` kinds: a parameter that trains with the adapter (kept fp32, in its own holder) or a
#: persistent buffer of control state (saved with the adapter, never trained).
TRAINABLE, STATE = "trainable", "state"


class Axis:
    """Base of the per-layer pieces. Subclasses override only what their axis changes.

    Args:
        layer (`ForgeLinear`): the layer this axis is part of.
        adapter (`str`): the adapter name.
        config (`ForgeConfig`): the adapter's config.
    """

    #: The `lora_*` holders this axis adds to its layer, name -> `TRAINABLE` (an `nn.ParameterDict`
    #: the optimizer steps with the adapter) or `STATE` (a persistent `BufferDict`). The layer creates
    #: them before `init_factors`, keeps them in their dtype through casts, deletes their entry with the
    #: adapter, and sharding (core/sharding.py) gathers the trainable ones like A and B.
    tensors: dict[str, str] = {}

    def __init__(self, layer: "ForgeLinear", adapter: str, config) -> None:
        self.layer = layer
        self.adapter = adapter
        self.config = config

    def init_factors(self) -> None:
        """Called once after PEFT initialised `lora_A` / `lora_B`."""

    def rank_gate(self) -> Optional[torch.Tensor]:
        return None

    def extra_output(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        return None

    def lora_branch(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The whole adapter term `s·B diag(g) A x + Σ extra_output(x)` computed by this axis (a fused
        kernel), or None to let the layer compose it. Return it only when no other axis of the adapter
        gates or adds output: the layer then skips the gate and the other axes' extra outputs."""
        return None

    def extra_delta(self) -> Optional[torch.Tensor]:
        """Weight-space form of `extra_output` (d_out × d_in), for merge and export."""
        return None

    def export_factors(self, b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewrite the scaled factors `(s·B·diag(g), A)` so that `B' A'` is the whole update this axis
        makes on the ORIGINAL base weight (e.g. drop pruned ranks, append a snapshot)."""
        return b, a

    def trainable_names(self) -> dict[str, bool]:
        """`lora_*` attribute name -> whether it trains while this adapter is active."""
        return {}

    def refresh(self) -> None:
        """Re-read persisted state (after a load) into whatever the forward caches."""

    def remove(self) -> None:
        """The adapter is being deleted: undo whatever this axis wrote outside its own state (e.g. into W)."""

    def weighting_refusal(self) -> Optional[str]:
        """Why `add_weighted_adapter` cannot weight this adapter's update ("field: reason"), or None."""
        return None


def is_forge_config(config) -> bool:
    """Whether `config` composes loraforge axes (a `ForgeConfig`; tested by its protocol, so this module
    need not import the config module, which imports the layer classes)."""
    return callable(getattr(config, "axes", None)) and callable(getattr(config, "controllers", None))


class ForgeLinear(LoraLinear):
    """PEFT's LoRA `Linear` with the axes of a loraforge config composed into its forward and delta."""

    other_param_names = LoraLinear.other_param_names + ("lora_forge_step",)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        adapters_changed()
        if not is_forge_config(config):
            # A stock LoraConfig adapter on a layer loraforge already wraps (e.g. the result of
            # add_weighted_adapter, see core/weighted.py): plain LoRA, no axes, no driver, no extra state.
            return super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        if not hasattr(self, "forge_axes"):
            self.forge_axes: dict[str, list[Axis]] = {}
            self.forge_config: dict[str, Any] = {}
            self.forge_drivers: dict[str, Any] = {}  # adapter -> core.driver.Driver, shared by its layers
            self.forge_name: str = kwargs.get("target_name") or ""
            self.forge_captured: dict = {}  # sharded engines: what this forward used (core/sharding.py)
            self.lora_forge_step = BufferDict({}, persistent=True)
            self.register_load_state_dict_post_hook(lambda module, keys: module.refresh_axes())
            LIVE_LAYERS.add(self)
        super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
        self.forge_config[adapter_name] = config
        # The base weight's device: with low_cpu_mem_usage A and B start on "meta", and PEFT then moves
        # parameter-less adapter modules (this BufferDict) to the base weight's device, which fails from meta.
        weight = self.get_base_layer().weight
        self.lora_forge_step[adapter_name] = torch.zeros((), dtype=torch.long, device=weight.device)
        classes = config.axes()
        for cls in classes:
            self._add_holders(cls.tensors)
        axes = [cls(self, adapter_name, config) for cls in classes]
        self.forge_axes[adapter_name] = axes
        for axis in axes:
            axis.init_factors()
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _add_holders(self, tensors: dict[str, str]) -> None:
        """Create the `lora_*` holders an axis declares (once per layer); trainable ones join this
        layer's `adapter_layer_names`, so PEFT marks them trainable and deletes them with the adapter."""
        for name, kind in tensors.items():
            if kind not in (TRAINABLE, STATE):
                raise ValueError(f"Axis.tensors[{name!r}]: kind must be {TRAINABLE!r} or {STATE!r}, got {kind!r}")
            if not name.startswith("lora_"):
                raise ValueError(f"Axis.tensors[{name!r}]: names must start with 'lora_' (PEFT saves only those)")
            if hasattr(self, name):
                continue
            if kind == TRAINABLE:
                setattr(self, name, torch.nn.ParameterDict({}))
                self.adapter_layer_names = tuple(self.adapter_layer_names) + (name,)
            else:
                setattr(self, name, BufferDict({}, persistent=True))

    @property
    def trainable_control(self) -> tuple[str, ...]:
        """The trainable holders the axes added (beyond PEFT's A and B), e.g. gate logits."""
        return tuple(n for n in self.adapter_layer_names if n not in LoraLinear.adapter_layer_names)

    def __setstate__(self, state) -> None:
        # copy.deepcopy and pickle rebuild the layer without __init__ / update_layer: register the copy too,
        # or the optimizer hook would never see it and a copied model would train as plain LoRA.
        super().__setstate__(state)
        if "forge_axes" in self.__dict__:
            LIVE_LAYERS.add(self)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        adapters_changed()
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        # PEFT marks every adapter tensor of the active adapter trainable; axes may freeze some (CoRA's B).
        active = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for adapter in active:
            for axis in getattr(self, "forge_axes", {}).get(adapter, []):
                for name, trains in axis.trainable_names().items():
                    getattr(self, name)[adapter].requires_grad_(trains and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        """PEFT's delete, plus every piece of loraforge state of that adapter: the axes' `lora_*`
        holders that PEFT does not list (gate buffers, Delta-LoRA snapshots, ...), the axes, config and
        driver, and what an axis wrote into `W` (in-place Delta-LoRA rewinds to the original weight)."""
        adapters_changed()
        for axis in getattr(self, "forge_axes", {}).get(adapter_name, []):
            axis.remove()
        super().delete_adapter(adapter_name)
        for name, holder in self.named_children():
            if name.startswith("lora_") and isinstance(holder, (BufferDict, torch.nn.ParameterDict, torch.nn.ModuleDict)) \
                    and adapter_name in holder:
                del holder[adapter_name]
        for name in ("forge_axes", "forge_config", "forge_drivers"):
            getattr(self, name, {}).pop(adapter_name, None)

    # Control state (everything `lora_*` that is not a LoRA factor: gate logits and buffers, λ, window,
    # step, Delta-LoRA snapshot / coefficients / fingerprint) keeps its dtype through `model.to(dtype)`,
    # `.half()`, `.bfloat16()` and PEFT's move to the base layer's dtype; only A and B follow the
    # model's dtype and PEFT's `autocast_adapter_dtype`. Why: bf16 keeps 8 bits of mantissa, so gate_lr
    # steps on a logit and λ's increments η_c·(C-b)² (~1e-4) would round away, and the snapshot of
    # Delta-LoRA is documented as at least fp32. It is a few numbers per rank, so it costs nothing.
    def _control_holders(self) -> dict[str, torch.nn.Module]:
        stock = set(LoraLinear.adapter_layer_names + LoraLinear.other_param_names)
        return {name: holder for name, holder in self.named_children()
                if name.startswith("lora_") and name not in stock and isinstance(holder, (BufferDict, torch.nn.ParameterDict))}

    def _apply(self, fn, recurse: bool = True):
        holders, order = self._control_holders(), list(self._modules.items())
        for name in holders:
            del self._modules[name]
        try:
            super()._apply(fn, recurse)
        finally:
            self._modules.clear()
            self._modules.update(order)  # the same module objects, in their original order
        for holder in holders.values():
            _apply_keeping_dtype(holder, fn)
        return self

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        # PEFT moves AND casts every holder it lists to the base layer's dtype; hide the control
        # holders from it and move them to the device only.
        listed = (self.adapter_layer_names, self.other_param_names)
        control = [n for n in self._control_holders() if n in listed[0] + listed[1]]
        self.adapter_layer_names = tuple(n for n in listed[0] if n not in control)
        self.other_param_names = tuple(n for n in listed[1] if n not in control)
        try:
            super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        finally:
            self.adapter_layer_names, self.other_param_names = listed
        target = device if device is not None else self.get_base_layer().weight.device
        for name in control:
            holder = getattr(self, name)
            if adapter_name in holder and not holder[adapter_name].is_meta:
                _apply_keeping_dtype(holder, lambda t: t.to(target), only=adapter_name)

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool, adapter_names) -> torch.nn.Module:
        """PEFT's `unload` / `merge_and_unload` replace this layer by the base layer returned here."""
        adapters_changed()
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        return self.get_base_layer()

    def refresh_axes(self) -> None:
        """After a load: the axes re-read their persisted state, then the drivers and controllers."""
        for driver in self.forge_drivers.values():
            driver.forget_step()  # a load may have restored another step count
        for axes in self.forge_axes.values():
            for axis in axes:
                axis.refresh()
        for driver in self.forge_drivers.values():
            driver.refresh_controllers()

    def step_count(self, adapter: str) -> int:
        return int(self.lora_forge_step[adapter])

    def gate_values(self, adapter: str) -> Optional[torch.Tensor]:
        gate = None
        for axis in self.forge_axes.get(adapter, []):
            g = axis.rank_gate()
            if g is not None:
                gate = g if gate is None else gate * g
        return gate

    def factors(self, adapter: str, gate: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B·diag(g), A) of one adapter, gate folded into B (g: the eval-mode gate if not given); whole
        when the weights are sharded (a collective then, see core/sharding.py)."""
        b = sharding.whole(self, "lora_B", adapter)
        a = sharding.whole(self, "lora_A", adapter)
        if gate is None:
            with eval_mode(self):
                gate = self.gate_values(adapter)
        return (b if gate is None else b * gate.to(b.dtype)), a

    def get_delta_weight(self, adapter) -> torch.Tensor:
        b, a = self.factors(adapter)
        compute_dtype = torch.float32 if b.dtype in (torch.float16, torch.bfloat16) and b.device.type == "cpu" else b.dtype
        delta = (b.to(compute_dtype) @ a.to(compute_dtype)) * self.scaling[adapter]
        for axis in self.forge_axes.get(adapter, []):
            extra = axis.extra_delta()
            if extra is not None:
                delta = delta + extra.to(compute_dtype)
        return transpose(delta, self.fan_in_fan_out).to(b.dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters or self.merged or kwargs.get("adapter_names") is not None:
            if kwargs.get("adapter_names") is not None:
                raise NotImplementedError("loraforge layers do not support mixed-adapter batches (adapter_names=...)")
            return super().forward(x, *args, **kwargs)
        sharding.capture(self)
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        for adapter in self.active_adapters:
            if adapter not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
            xa = self._cast_input_dtype(x, lora_a.weight.dtype)
            axes = self.forge_axes.get(adapter, [])
            fused = next((o for o in (ax.lora_branch(xa) for ax in axes) if o is not None), None)
            if fused is not None:
                result = result + fused
                continue
            hidden = lora_a(self.lora_dropout[adapter](xa))
            gate = self.gate_values(adapter)
            if gate is not None:
                hidden = hidden * (gate if gate.dtype == hidden.dtype else gate.to(hidden.dtype))
            # A and B may differ in dtype: TRL casts only trainable adapter tensors to bf16 on k-bit bases (CoRA's frozen B stays fp32).
            result = result + lora_b(hidden if hidden.dtype == lora_b.weight.dtype else hidden.to(lora_b.weight.dtype)) * self.scaling[adapter]
            for axis in self.forge_axes.get(adapter, []):
                extra = axis.extra_output(xa)
                if extra is not None:
                    result = result + extra
        return result.to(result_dtype)

    def __repr__(self) -> str:
        return "loraforge." + super().__repr__()


def _apply_keeping_dtype(holder: torch.nn.Module, fn, only: Optional[str] = None) -> None:
    """Apply a `Module._apply` function to the tensors of `holder`, taking its device but not its dtype."""
    def convert(t: torch.Tensor) -> torch.Tensor:
        new = fn(t)
        if new.dtype == t.dtype:
            return new
        return torch.empty_like(t, device=new.device) if t.is_meta else t.to(new.device)

    for key in list(holder._buffers) if isinstance(holder, BufferDict) else []:
        if only is None or key == only:
            holder._buffers[key] = convert(holder._buffers[key])
    for key, param in list(holder._parameters.items()):
        if param is not None and (only is None or key == only):
            param.data = convert(param.data)
            if param.grad is not None:
                param.grad = convert(param.grad)


class eval_mode:
    """Temporarily put a layer in eval mode (deterministic gates) for merge and export."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.layer, self.was_training = layer, layer.training

    def __enter__(self):
        self.layer.train(False)

    def __exit__(self, *exc):
        self.layer.train(self.was_training)
