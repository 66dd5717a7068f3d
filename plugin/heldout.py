"""The held-out loss `loraforge train` prints when a job names `eval_data`: the same records scored
by the model before training (the adapter's initial state, which every loraforge method starts as
the base model's output) and after, so the last lines of a run show what training changed."""
from __future__ import annotations


def heldout_loss(trainer) -> float:
    """Mean per-token loss of `trainer.eval_dataset` (the completion tokens TRL trains on).

    Args:
        trainer: a `transformers.Trainer` built with an `eval_dataset`.

    Returns:
        The evaluation loss, without any method's regulariser (those are added in training only).
    """
    return float(trainer.evaluate()["eval_loss"])


def heldout_line(before: float, after: float, records: int, name: str) -> str:
    """One closing line: base and adapter loss on the held-out records, and the change."""
    change = (after - before) / before * 100
    return (f"held-out loss on {records} records of {name} (lower is better): base model {before:.3f}, "
            f"with the adapter {after:.3f} ({change:+.0f}%)")
