"""Checkpoints that are whole or absent, and the choice of the checkpoint a job resumes from.

A checkpoint is written into a hidden staging folder beside its final place (`.partial-checkpoint-N`,
which no `checkpoint-*` pattern matches), flushed to disk, and renamed to `checkpoint-N` in one step:
a kill during a save leaves the previous checkpoints and a staging folder, never a `checkpoint-N`
that looks whole and is not. The final adapter goes the same way, file by file, with
`adapter_config.json` renamed last: a folder is an adapter only once its config is there.

Folders written by other tools (or by an older loraforge) may still be partial; `incomplete_reason`
tells, and resume skips those with a notice.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from typing import Optional

from .files import CONFIG_NAME, DamagedFileError, check_adapter_folder, fsync_dir, fsync_tree

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STAGING_PREFIX = ".partial-"
TRAINER_STATE = "trainer_state.json"  # transformers writes it last into a checkpoint
EXACT_STATE = "loraforge_state.safetensors"


def incomplete_reason(folder: str) -> Optional[str]:
    """Why `folder` is not a whole trainer checkpoint (None: it is)."""
    state = os.path.join(folder, TRAINER_STATE)
    try:
        with open(state, encoding="utf-8") as f:
            json.load(f)
    except (OSError, ValueError) as exc:
        return f"{state}: {'missing' if isinstance(exc, OSError) else 'not valid JSON'}"
    if os.path.isfile(os.path.join(folder, CONFIG_NAME)) or not os.path.isfile(os.path.join(folder, "model.safetensors")):
        try:
            check_adapter_folder(folder)
        except DamagedFileError as exc:
            return str(exc)
    return None


def checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Every `checkpoint-N` folder in `output_dir`, by step."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir)
             if (m := CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return sorted(found)


def last_complete(output_dir: str) -> tuple[Optional[str], list[tuple[str, str]]]:
    """(the last whole checkpoint or None, [(skipped folder, why)] for the later partial ones)."""
    skipped = []
    for _, path in reversed(checkpoints(output_dir)):
        why = incomplete_reason(path)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


def resume_point(output_dir: str, resume, overwrite: bool = False) -> Optional[str]:
    """The checkpoint a `loraforge train` job starts from, or None for a fresh start.

    Args:
        output_dir: the job's output folder.
        resume: a checkpoint folder, True (the last whole checkpoint in `output_dir`) or False/None.
        overwrite: start over even though `output_dir` holds checkpoints (they are removed first).

    Returns:
        The checkpoint folder, or None. Raises `DamagedFileError` (one line) for a folder that holds
        another run's checkpoints when neither `resume` nor `overwrite` is given, or for nothing to resume.
    """
    found = checkpoints(output_dir)
    if resume and overwrite:
        raise DamagedFileError("--resume and --overwrite contradict each other: pass one of them")
    if isinstance(resume, str):
        if not os.path.isdir(resume):
            raise DamagedFileError(f"training.resume_from_checkpoint: no folder {resume!r}; give a checkpoint-N "
                                   "folder or `true` for the last complete one in output_dir")
        why = incomplete_reason(resume)
        if why is not None:
            raise DamagedFileError(f"training.resume_from_checkpoint: {resume} is not a complete checkpoint ({why}); "
                                   "give an earlier one or `true` for the last complete one")
        return resume
    if resume:
        path, skipped = last_complete(output_dir)
        for folder, why in skipped:
            print(f"loraforge train: skipping the incomplete checkpoint {folder} ({why})")
        if path is None:
            raise DamagedFileError(f"--resume: {output_dir} holds no complete checkpoint to resume from; run without "
                                   "--resume to start the job (set training.save_steps to get checkpoints)")
        print(f"loraforge train: resuming from {path}")
        return path
    if found and not overwrite:
        names = ", ".join(os.path.basename(p) for _, p in found[-3:])
        raise DamagedFileError(
            f"training.output_dir: {output_dir} already holds checkpoints of an earlier run ({names}); continue it "
            "with --resume (or training.resume_from_checkpoint: true), or start over with a new output_dir or --overwrite")
    if found:
        print(f"loraforge train: --overwrite: removing {len(found)} checkpoint(s) of an earlier run in {output_dir}")
        for _, path in found:
            shutil.rmtree(path)
    return None


def save_checkpoint_atomically(trainer, save, model, trial) -> None:
    """Run transformers' `_save_checkpoint` (`save`) into a staging folder, then rename it into place.

    transformers builds the folder as `<_get_output_dir()>/checkpoint-<step>`; while it writes,
    `_get_output_dir` answers the staging parent, so every file (model, optimizer, RNG of each rank,
    trainer state) lands there. Only the main process renames, after every rank has written."""
    run_dir = trainer._get_output_dir(trial=trial)
    name = f"checkpoint-{trainer.state.global_step}"
    staging_parent = os.path.join(run_dir, f"{STAGING_PREFIX}{name}")
    if trainer.args.should_save and os.path.isdir(staging_parent):
        shutil.rmtree(staging_parent)  # left by a job killed while saving this step
    trainer.accelerator.wait_for_everyone()
    trainer._get_output_dir = lambda trial=None: staging_parent
    try:
        save(model, trial)
    finally:
        del trainer._get_output_dir  # the class's method again
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        staged, final = os.path.join(staging_parent, name), os.path.join(run_dir, name)
        save_exact_state(trainer.model, staged)
        best = trainer.state.best_model_checkpoint
        if best and best.startswith(staging_parent):
            trainer.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
            trainer.state.save_to_json(os.path.join(staged, TRAINER_STATE))
        fsync_tree(staged)
        old = os.path.join(run_dir, f"{STAGING_PREFIX}old-{name}")
        if os.path.isdir(final):  # an earlier folder of this step: moved aside, removed once the new one is in
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
        os.rename(staged, final)
        fsync_dir(run_dir)
        shutil.rmtree(staging_parent, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
        _rotate(trainer, run_dir)
    trainer.accelerator.wait_for_everyone()


def _rotate(trainer, run_dir: str) -> None:
    """transformers' save_total_limit, applied to the real output folder (it ran on the staging one)."""
    try:
        from transformers.trainer_utils import rotate_checkpoints
    except ImportError:  # older transformers: a Trainer method
        return trainer._rotate_checkpoints(use_mtime=True, output_dir=run_dir)
    rotate_checkpoints(output_dir=run_dir, save_total_limit=trainer.args.save_total_limit,
                       best_model_checkpoint=trainer.state.best_model_checkpoint, use_mtime=True)


def save_adapter_atomically(trainer, output_dir: str) -> None:
    """`trainer.save_model(output_dir)` through a staging folder: each file is flushed and renamed into
    `output_dir`, adapter_config.json last (removed first), so a kill leaves no folder that reads as a
    whole adapter with mixed or partial files."""
    staging = os.path.join(output_dir, f"{STAGING_PREFIX}adapter")
    if trainer.args.should_save:
        os.makedirs(output_dir, exist_ok=True)
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    trainer.save_model(staging)
    if not trainer.args.should_save:
        return
    fsync_tree(staging)
    names = sorted(os.listdir(staging), key=lambda n: n == CONFIG_NAME)  # the config last
    if CONFIG_NAME in names and os.path.isfile(os.path.join(output_dir, CONFIG_NAME)):
        os.remove(os.path.join(output_dir, CONFIG_NAME))  # the old adapter stops being one before its files change
        fsync_dir(output_dir)
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    fsync_dir(output_dir)
    shutil.rmtree(staging, ignore_errors=True)


def _axes_with_state(model):
    from .layer import ForgeLinear

    for layer in model.modules():
        if isinstance(layer, ForgeLinear):
            for adapter, axes in layer.forge_axes.items():
                for axis in axes:
                    if hasattr(axis, "checkpoint_tensors"):
                        yield f"{layer.forge_name}.{adapter}", axis


def save_exact_state(model, folder: str) -> None:
    """Write what an axis needs beyond the adapter's weights to resume exactly (Delta-LoRA in place: W)."""
    tensors = {f"{key}.{name}": t.detach().contiguous().cpu()
               for key, axis in _axes_with_state(model) for name, t in axis.checkpoint_tensors().items()}
    if tensors:
        from safetensors.torch import save_file

        save_file(tensors, os.path.join(folder, EXACT_STATE))


def restore_exact_state(model, folder: str) -> None:
    """The counterpart of `save_exact_state`, after the adapter's weights were loaded from `folder`."""
    path = os.path.join(folder, EXACT_STATE)
    if not os.path.isfile(path):
        return
    from safetensors.torch import load_file

    saved = load_file(path)
    for key, axis in _axes_with_state(model):
        mine = {name[len(key) + 1:]: t for name, t in saved.items() if name.startswith(key + ".")}
        axis.restore_checkpoint_tensors({k: t.to(axis.layer.get_base_layer().weight.device) for k, t in mine.items()})
