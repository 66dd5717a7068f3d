"""The non-finite guard: a NaN or inf loss or gradient never reaches an adapter's state or a base weight.

Before every optimizer step that trains a loraforge adapter (the global pre-step hook: any trainer or
a hand loop), the gradients of everything the optimizer holds are checked in one fused reduction.
A non-finite one makes the step a skipped step: every gradient is dropped (`grad = None`, which
torch optimizers step over, leaving parameters and their moments untouched), the step is counted
(`skipped_steps`) and still numbered, so the adapter's step counter stays equal to the trainer's.
After `max_consecutive()` skipped steps in a row (default 5, environment variable
LORAFORGE_MAX_NONFINITE_STEPS) training stops with `NonFiniteError`, one line naming the step, the
loss and the last complete checkpoint to resume from.

A step can also be finite and still blow up what follows (a learning-rate spike to 1e20 moves the
factors by 1e20): Delta-LoRA's write into W is checked by `bounded_update` before it happens, and
after every step the adapter's own values are checked (`check_parameters`), so no non-finite value
is ever saved.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

DEFAULT_MAX_CONSECUTIVE = 5


class NonFiniteError(RuntimeError):
    """Training stopped: too many optimizer steps in a row had non-finite values."""


class _State:
    consecutive = 0
    skipped = 0
    first_bad = 0  # the step that began the current run of skipped steps
    last_loss: Optional[torch.Tensor] = None
    output_dir: Optional[str] = None


STATE = _State()


def max_consecutive() -> int:
    return int(os.environ.get("LORAFORGE_MAX_NONFINITE_STEPS", DEFAULT_MAX_CONSECUTIVE))


def note_loss(loss: torch.Tensor) -> None:
    """Remember the last training loss (a detached tensor: read only when reporting, no sync per step)."""
    STATE.last_loss = loss.detach()


def note_output_dir(output_dir: Optional[str]) -> None:
    """A run begins: where its checkpoints go (for the closing error's advice); the counts start afresh."""
    STATE.output_dir = output_dir
    STATE.consecutive = STATE.skipped = STATE.first_bad = 0
    STATE.last_loss = None


def _all_finite(tensors: list[torch.Tensor], device=None) -> bool:
    """Whether every element of `tensors` is finite, agreed by every rank (each may hold only a shard)."""
    local = [t for t in (t.to_local() if hasattr(t, "to_local") else t for t in tensors) if t.numel()]  # shards may be empty
    if local:
        # The max-abs norm: NaN and inf pass through it, and a finite 1e20 does not overflow (a 2-norm would).
        norms = torch._foreach_norm([t.float() if t.dtype not in (torch.float32, torch.float64) else t for t in local],
                                    ord=float("inf"))
        bad = (~torch.isfinite(torch.stack([n.to(norms[0].device) for n in norms]))).any().float()
    else:
        bad = torch.zeros((), device=device)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips the same steps
    return not bool(bad)


def guard_step(optimizer: torch.optim.Optimizer, step: int, drivers=()) -> bool:
    """Check the gradients before optimizer step `step` (1-based); False: the step was made a skipped one.

    Args:
        optimizer: the optimizer about to step.
        step: the number the step will have.
        drivers: the loraforge drivers this optimizer trains; each gets `step_skipped` set.

    Returns:
        True if every gradient is finite (the step goes ahead).
    """
    every = [p for g in optimizer.param_groups for p in g["params"]]
    params = [p for p in every if p.grad is not None]
    ok = _all_finite([p.grad for p in params], every[0].device if every else None)
    for d in drivers:
        d.step_skipped = not ok
    if ok:
        STATE.consecutive = 0
        return True
    for p in params:
        p.grad = None
    count_bad_step(step, "they had a non-finite loss or gradient")
    return False


def count_bad_step(step: int, what: str) -> None:
    """A step whose result could not be used (e.g. Delta-LoRA's W write would overflow) counts as skipped."""
    STATE.consecutive += 1
    STATE.skipped += 1
    if STATE.consecutive == 1:
        STATE.first_bad = step
    if STATE.consecutive >= max_consecutive():
        n, STATE.consecutive = STATE.consecutive, 0
        raise NonFiniteError(stop_message(step, f"{n} optimizer steps in a row (from step {STATE.first_bad}) were "
                                                f"skipped, the last because {what}"))


def stop_message(step: int, what: str) -> str:
    loss = "unknown" if STATE.last_loss is None else f"{float(STATE.last_loss.float().mean()):g}"
    where = "none known (no trainer output_dir)"
    if STATE.output_dir:
        from .checkpoint import checkpoints, incomplete_reason

        before = [p for n, p in checkpoints(STATE.output_dir) if n < (STATE.first_bad or step) and not incomplete_reason(p)]
        where = before[-1] if before else f"none in {STATE.output_dir} from before step {STATE.first_bad or step}"
    return (f"training stopped at step {step}: {what} (loss {loss}); nothing non-finite was saved or written into "
            f"the base weights. Last complete checkpoint: {where}; resume from it with a lower learning_rate "
            "(or max_grad_norm), or check the data")


def check_parameters(driver, step: int) -> None:
    """After a step: the adapter's values must all be finite (they are what every later save writes)."""
    params = driver.parameters()
    if not _all_finite([p.detach() for p in params], params[0].device if params else None):
        raise NonFiniteError(stop_message(step, "the optimizer step made an adapter value non-finite (the learning "
                                                "rate or the gradients are too large)"))


def bounded_update(pairs: list[tuple[torch.Tensor, ...]], coef: float, dtype: torch.dtype) -> bool:
    """Whether `W += coef·(B A - B_o A_o)` stays finite for every (B, A, B_o, A_o) in `pairs`.

    |(B A)_ij| <= ||B||_F ||A||_F, so the bound needs only the factors' norms (one fused reduction
    over the small factors, no d_out × d_in product); it must leave W's dtype far from overflow."""
    if not pairs:
        return True
    norms = torch._foreach_norm([t.detach().double() for quad in pairs for t in quad])  # fp64: 1e20² fits
    n = torch.stack([x.to(norms[0].device) for x in norms]).view(-1, 4)
    bound = abs(coef) * (n[:, 0] * n[:, 1] + n[:, 2] * n[:, 3])
    return bool((torch.isfinite(bound) & (bound < torch.finfo(dtype).max / 16)).all())


def refuse_non_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Refuse in one line a state dict with a NaN or inf value (export, load), naming the first tensor."""
    from .files import DamagedFileError

    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DamagedFileError(f"{where}: {key} holds non-finite values (NaN or inf): the adapter was saved from a "
                                   "diverged run; use an earlier checkpoint")


def log_values() -> dict[str, float]:
    return {"nonfinite_skipped_steps": float(STATE.skipped)} if STATE.skipped else {}


def check_numbers(values: dict, config_cls, section: str) -> None:
    """Refuse in one line a field of the dataclass `config_cls` whose default is a number but whose value in
    `values` is not a finite one (`learning_rate: abc`, `.nan`, `.inf`): the libraries take them as given."""
    import dataclasses
    import math

    from .files import DamagedFileError

    defaults = {f.name: f.default for f in dataclasses.fields(config_cls)}
    for key, value in values.items():
        default = defaults.get(key)
        if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
            if isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
                try:
                    value = values[key] = float(value)
                except ValueError:
                    pass
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok:
                raise DamagedFileError(f"{section}.{key}: {value!r} is not a finite number (e.g. {key}: {default!r})")
