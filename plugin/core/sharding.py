"""Sharded weights: the one place that knows how FSDP2, FSDP1 and DeepSpeed ZeRO-3 lay them out.

Outside the model's forward a rank holds only a shard of each parameter: FSDP2 (`fully_shard`)
makes it a DTensor (rows split, `Shard(0)`), FSDP1 with `use_orig_params=True` a 1-D view of the
rank's part of the unit's flat parameter (any contiguous range of the row-major weight, possibly
empty), ZeRO-3 an empty `data` with the rank's flat partition in `ds_tensor`. Inside the forward
each engine has the whole tensor. What the methods need, and how it is got here:

- `whole(layer, name, adapter)`: a whole small adapter tensor (A, B, gate logits). In grad mode
  (a loss term) it carries the gradient of the sharded parameter, equal to the unsharded one:
  FSDP2 `DTensor.full_tensor()` (its backward hands each rank its rows of the gradient, which is
  added to the rank's sharded grad next to the reduce-scattered task gradient); FSDP1 and ZeRO-3
  the tensor the latest forward used, captured there (`capture`) as a clone, so its gradient flows
  through the engine's own unsharded view into the flat parameter and is reduced with the task
  gradient (every rank adds the same term, the mean of equal terms is the term). The clone, not the
  view, is what the loss saves for backward: the engines free the unsharded storage after forward.
  Outside grad mode it is the current value, gathered (a collective: every rank calls it, as
  every rank runs the optimizer hook, the logging and the export). `whole_many` / `gather_many`: many
  at once, one collective per engine (core/flat_gather.py).
- `local_flat(w)`: the elements of `w` this rank holds, on which core/shard_math.py computes a low-rank
  update of `w` (written only to the rank's shard; a whole `w` is never gathered) and `w @ v`.

Each engine is one small adapter class (`Fsdp2`, `Fsdp1`, `Zero3`) answering the same four
questions (gather a whole tensor, the rank's flat range, how many ranks hold an element, what of its
layout loraforge cannot use); `engine(t)` picks the one that holds `t` as a shard now. The adapter's
trainable tensors are A, B and what the axes declare trainable (`ForgeLinear.trainable_control`).
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import flat_gather

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed
    DTensor, Replicate, Shard = (), (), ()
try:
    from torch.distributed.fsdp._flat_param import FlatParameter
except ImportError:  # torch built without distributed
    FlatParameter = ()

# id(FSDP1 original parameter) -> (weak refs to it and its flat parameter, index in it). FSDP1 keeps no
# link from the parameter back; it is learnt from the FSDP units (`register`) or from a forward
# (`capture`). Keyed by id: tensors compare elementwise, so they cannot be dictionary keys.
_FLAT: dict[int, tuple] = {}
_STEPS = [0]  # optimizer steps seen: a capture from before the latest step is stale


def stepped() -> None:
    _STEPS[0] += 1


def tensor_of(layer, name: str, adapter: str) -> torch.Tensor:
    item = getattr(layer, name)[adapter]
    return item.weight if isinstance(item, torch.nn.Module) else item


def adapter_tensors(layer) -> tuple[str, ...]:
    """The holders of `layer` whose tensors train: A, B and the axes' declared trainable ones."""
    return ("lora_A", "lora_B", *getattr(layer, "trainable_control", ()))


def _register_flat(flat) -> None:
    for i, p in enumerate(flat._params or ()):
        _FLAT[id(p)] = (weakref.ref(p), weakref.ref(flat), i)


def _flat_of(t: torch.Tensor) -> Optional[tuple]:
    entry = _FLAT.get(id(t))
    if entry is None or entry[0]() is not t or entry[1]() is None:
        return None
    return entry[1](), entry[2]


_REGISTERED: "weakref.WeakSet[torch.nn.Module]" = weakref.WeakSet()


def register(model: torch.nn.Module) -> None:
    """Learn the FSDP1 units of `model` (the wrapped model; once per model object, so trainers may
    call it every micro-batch: wrapping makes a new root object)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return
    if model in _REGISTERED:
        return
    _REGISTERED.add(model)
    for m in model.modules():
        handle = getattr(m, "_handle", None) if isinstance(m, FullyShardedDataParallel) else None
        if handle is not None and getattr(handle.flat_param, "_params", None):
            _register_flat(handle.flat_param)


# one adapter per engine ------------------------------------------------------------------------
class Engine:
    """What loraforge asks of a sharding engine; each subclass answers for one engine."""

    name = ""
    #: Whether the whole tensor it gathers carries the gradient back to the shard (`whole_many`; else the
    #: loss reads what the forward captured, `capture`).
    differentiable = False
    #: Why loraforge refuses a layout `refuses` picks out (formatted with `what` and `t`).
    refusal = ""

    @staticmethod
    def holds_shard(t) -> bool:
        """Whether this rank holds only a shard of `t` now, laid out by this engine."""
        raise NotImplementedError

    @staticmethod
    def refuses(t) -> bool:
        """Whether `t` is laid out by this engine in a way loraforge cannot read."""
        return False

    @classmethod
    def gather_many(cls, ts: list) -> list:
        """The whole current values of `ts` (each held by this engine as a shard), detached. An engine
        that can overrides it with one collective for all of them."""
        return [cls.gather(t) for t in ts]

    @classmethod
    def unsupported(cls, t, what: str) -> Optional[str]:
        return cls.refusal.format(what=what, t=t) if cls.refuses(t) else None


class Fsdp2(Engine):
    """`fully_shard`: a DTensor, rows split (`Shard(0)`, with `Replicate` for HSDP)."""

    name = "fsdp2"
    differentiable = True  # `full_tensor()` carries the gradient back to the shard
    refusal = ("{what} is a DTensor with placements {t.placements}: loraforge supports FSDP2's row sharding "
               "(Shard(0), with Replicate for HSDP), not tensor parallelism")

    @staticmethod
    def holds_shard(t) -> bool:
        return isinstance(t, DTensor)

    @staticmethod
    def gather(t):
        return t.detach().full_tensor()

    @classmethod
    def gather_many(cls, ts: list) -> list:
        return flat_gather.rows(ts, differentiable=False)

    @classmethod
    def whole_many(cls, ts: list) -> list:
        return flat_gather.rows(ts, differentiable=True)

    @staticmethod
    def local_flat(w):
        return w.to_local().data.view(-1), flat_gather.row_offset(w)

    @staticmethod
    def replicas(w) -> int:
        sizes = [w.device_mesh.size(d) for d, p in enumerate(w.placements) if isinstance(p, Replicate)]
        return int(torch.tensor(sizes or [1]).prod())

    @staticmethod
    def refuses(t) -> bool:
        return isinstance(t, DTensor) and not all(
            isinstance(p, (Shard, Replicate)) and (not isinstance(p, Shard) or p.dim == 0) for p in t.placements)


class Fsdp1(Engine):
    """FSDP1 with `use_orig_params=True`: a 1-D view of the rank's part of the unit's flat parameter."""

    name = "fsdp1"
    refusal = ("{what} is a view of an FSDP1 flat parameter built with use_orig_params=False; loraforge needs "
               "use_orig_params=True (accelerate's default: fsdp_use_orig_params: true)")

    @staticmethod
    def holds_shard(t) -> bool:
        entry = _flat_of(t)
        if entry is None:
            return False
        flat, i = entry
        # Decided from the unit (the same on every rank), not the local shape: a rank holding all of a
        # 1-D tensor must still join the gather that the others need. (Sizes set when FSDP1 shards,
        # before its lazy init: a driver may read the factors before the first forward.)
        return flat._sharded_size.numel() < flat._unpadded_unsharded_size.numel() or tuple(t.shape) != tuple(flat._shapes[i])

    @classmethod
    def gather(cls, t):
        return cls.gather_many([t])[0]

    @classmethod
    def gather_many(cls, ts: list) -> list:
        plan = flat_gather.ranges_plan(ts, _flat_of)
        return plan.gather([t.detach().reshape(-1)[:n] for t, (_, n) in zip(ts, plan.local)])

    @staticmethod
    def local_flat(w):
        flat, i = _flat_of(w)
        info = flat._shard_param_infos[i]
        return (w.data.view(-1), info.intra_param_start_idx) if info.in_shard else (w.data.view(-1)[:0], 0)

    @staticmethod
    def replicas(w) -> int:
        flat, _ = _flat_of(w)
        return max(1, torch.distributed.get_world_size() * flat._sharded_size.numel() // flat._unpadded_unsharded_size.numel())

    @staticmethod
    def refuses(t) -> bool:
        return isinstance(getattr(t, "_base", None), FlatParameter) and t._base._params is None


class Zero3(Engine):
    """DeepSpeed ZeRO-3: an empty `data`, the rank's flat partition in `ds_tensor`."""

    name = "zero3"

    @staticmethod
    def holds_shard(t) -> bool:
        if not hasattr(t, "ds_id"):
            return False
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        return t.ds_status != ZeroParamStatus.AVAILABLE

    @classmethod
    def gather(cls, t):
        return cls.gather_many([t])[0]

    @classmethod
    def gather_many(cls, ts: list) -> list:
        # DeepSpeed's forward fetch: one flat all-gather per dtype (GatheredParameters: one per tensor, on gloo)
        by_dtype: dict = {}
        for t in ts:
            by_dtype.setdefault(t.dtype, []).append(t)
        for handle in [group[0].all_gather_coalesced(group) for group in by_dtype.values()]:
            handle.wait()
        try:
            return [t.detach().clone() for t in ts]
        finally:
            ts[0].partition(param_list=list(ts), has_been_updated=False)

    @staticmethod
    def local_flat(w):
        part = w.ds_tensor  # rank k holds elements [k·p, (k+1)·p) of the flat weight, the last one padded
        start = w.partition_numel() * torch.distributed.get_rank(group=w.ds_process_group)
        n = max(0, min(part.numel(), w.ds_numel - start))
        return part.data.view(-1)[:n], start

    @staticmethod
    def replicas(w) -> int:
        return torch.distributed.get_world_size() // torch.distributed.get_world_size(group=w.ds_process_group)


ENGINES = (Fsdp2, Zero3, Fsdp1)


def engine_of(t: torch.Tensor):
    """The engine adapter that holds `t` as a shard now, or None when this rank has all of it."""
    return next((e for e in ENGINES if e.holds_shard(t)), None)


def engine(t: torch.Tensor) -> Optional[str]:
    """"fsdp2", "fsdp1" or "zero3" when this rank holds only a shard of `t` now; None when whole."""
    found = engine_of(t)
    return None if found is None else found.name


# what the methods use --------------------------------------------------------------------------
def capture(layer) -> None:
    """In the forward (whole tensors): keep what a loss term must differentiate later (see module doc)."""
    for name in adapter_tensors(layer):
        for adapter, item in getattr(layer, name, {}).items():
            t = item.weight if isinstance(item, torch.nn.Module) else item
            base = getattr(t, "_base", None)
            if isinstance(base, FlatParameter) and base._params is not None and _flat_of(base._params[0]) is None:
                _register_flat(base)
            if torch.is_grad_enabled() and t.requires_grad and (hasattr(t, "ds_id") or isinstance(base, FlatParameter)):
                layer.forge_captured[(name, adapter)] = (_STEPS[0], t.clone())


def whole(layer, name: str, adapter: str) -> torch.Tensor:
    """The whole `name[adapter]` of `layer`: differentiable in grad mode, else the current value."""
    t = tensor_of(layer, name, adapter)
    found = engine_of(t)
    if found is None:
        return t
    if torch.is_grad_enabled() and t.requires_grad:
        if found.differentiable:
            return t.full_tensor()
        step, seen = getattr(layer, "forge_captured", {}).get((name, adapter), (None, None))
        if step != _STEPS[0]:
            raise RuntimeError(f"{layer.forge_name}.{name}.{adapter} is sharded by {found.name} and no forward of this "
                               "layer ran in grad mode since the last optimizer step: a loss term that reads the adapter "
                               "must follow the model's forward (or read it under torch.no_grad())")
        return seen
    return gather(t)


def whole_many(layers_names: list) -> list:
    """`whole` of each `(layer, name, adapter)`, in order: one collective per engine (in grad mode FSDP1 and
    ZeRO-3 read what the forward captured: none)."""
    ts = [tensor_of(*item) for item in layers_names]
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in ts)):
        return gather_many(ts)
    return _per_engine(ts, lambda e, t: e.differentiable and t.requires_grad, lambda e, group: e.whole_many(group),
                       lambda i: whole(*layers_names[i]))


def _per_engine(ts: list, joins, read, alone) -> list:
    """`ts` read in order: by `read(engine, group)`, one call per engine, those `joins(engine, t)`; else `alone(i)`."""
    out, held = [None] * len(ts), {}
    for i, t in enumerate(ts):
        found = engine_of(t)
        if found is not None and joins(found, t):
            held.setdefault(found, []).append(i)
        else:
            out[i] = alone(i)
    for found, idx in held.items():
        for i, value in zip(idx, read(found, [ts[i] for i in idx])):
            out[i] = value
    return out


@torch.no_grad()
def gather(t: torch.Tensor) -> torch.Tensor:
    """The whole current value of a (small) sharded tensor, detached. Collective."""
    found = engine_of(t)
    return t.detach() if found is None else found.gather(t)


@torch.no_grad()
def gather_many(ts: list) -> list:
    """`gather` of each of `ts`, in order: the tensors each engine holds as shards are gathered together
    (`Engine.gather_many`), the whole ones returned detached. Collective."""
    return _per_engine(ts, lambda e, t: True, lambda e, group: e.gather_many(group), lambda i: ts[i].detach())


@torch.no_grad()
def written(ts: list) -> None:
    """After an in-place write into trainable `ts` (whole values, or `local_flat` views): DeepSpeed's fp32
    master copies take it, or the next step writes the old values back (ZeRO-3: also the rank's partition of
    a tensor kept whole on every rank). FSDP steps the shards themselves. Not a collective."""
    for t in ts:
        if hasattr(t, "ds_id") or hasattr(t, "_hp_mapping"):
            from deepspeed.utils import safe_set_full_fp32_param, safe_set_local_fp32_param
        if hasattr(t, "ds_id"):
            if not Zero3.holds_shard(t):  # whole here: the rank's partition follows `data`
                part, start = Zero3.local_flat(t)
                part.copy_(t.data.view(-1)[start:start + part.numel()])
            safe_set_local_fp32_param(t, t.ds_tensor)
        elif hasattr(t, "_hp_mapping"):  # ZeRO-1/2: whole tensors
            safe_set_full_fp32_param(t, t.data)


def local_flat(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(a 1-D view of the elements of `w` this rank holds, their first index in the row-major whole)."""
    found = engine_of(w)
    return (w.data.view(-1), 0) if found is None else found.local_flat(w)


def unsupported(layers, adapter: str) -> Optional[str]:
    """What of the sharding loraforge cannot handle (None: all of it)."""
    for layer in layers:
        for name in ("lora_A", "lora_B"):
            t = tensor_of(layer, name, adapter)
            what = f"{layer.forge_name}.{name}.{adapter}.weight"
            for e in ENGINES:
                reason = e.unsupported(t, what)
                if reason is not None:
                    return reason
    return None
