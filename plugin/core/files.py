"""One-line answers for damaged files: adapter folders, safetensors files and Alpaca data.

Only the standard library is imported here, so the console script can check a folder before it pays
for `import torch`. Every check raises `DamagedFileError`, whose message names the file and what is
wrong with it (the console script prints it as one line and exits with code 2).
"""
from __future__ import annotations

import json
import os
import struct

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class DamagedFileError(ValueError):
    """A file is missing, truncated or holds values that cannot be used; the message names the file."""


def safetensors_problem(path: str) -> str | None:
    """What is wrong with a safetensors file (None: its header is whole and its data all there).

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte
    range, then the data; a file cut short (a kill during a copy or a save) ends before the last range.
    """
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path}: truncated safetensors file ({size} bytes, no header)"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path}: truncated safetensors file ({size} bytes, the header alone claims {n})"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"{path}: not a readable safetensors file ({type(exc).__name__})"
    if not isinstance(header, dict):
        return f"{path}: not a safetensors file (its header is not a mapping)"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"{path}: truncated safetensors file ({size} bytes of {need}); save or copy it again"
    return None


def read_adapter_config(folder: str) -> dict:
    """The parsed adapter_config.json of `folder`, refused in one line when missing, empty, not JSON,
    or without a `peft_type`."""
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise DamagedFileError(f"{folder} holds no {CONFIG_NAME}; pass a folder written by save_pretrained / "
                               "save_model (an interrupted save leaves a folder without it)")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        config = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        what = "is empty" if not text.strip() else f"is not valid JSON ({exc})" if isinstance(exc, json.JSONDecodeError) \
            else "is not UTF-8 text"
        raise DamagedFileError(f"{path} {what}; the save that wrote it was interrupted or the file was edited: "
                               "save the adapter again") from None
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise DamagedFileError(f"{path} has no `peft_type` (e.g. \"LORAFORGE_SALORA\" or \"LORA\"); it is not an "
                               "adapter config written by PEFT or loraforge")
    return config


def safetensors_shapes(path: str) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def check_adapter_fits(folder: str, base_model) -> None:
    """Refuse in one line an adapter whose factors do not fit the base's Linear layers (a base of another
    width), naming the module and both shapes, before PEFT's many-line size-mismatch error."""
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        return
    modules = dict(base_model.named_modules())
    for key, shape in safetensors_shapes(path).items():
        for kind, axis, attr in (("lora_A.weight", 1, "in_features"), ("lora_B.weight", 0, "out_features")):
            if not key.endswith("." + kind) or len(shape) != 2:
                continue
            name = key[: -len(kind) - 1].removeprefix("base_model.model.")
            module = modules.get(name)
            size = getattr(module, attr, None)
            if isinstance(size, int) and shape[axis] != size:
                raise DamagedFileError(
                    f"{path}: {key} has shape {tuple(shape)} but the base's {name} is {module.out_features}×"
                    f"{module.in_features} ({attr} {size}); the adapter was trained on another base model: load it "
                    "onto that one")


def check_adapter_folder(folder: str) -> dict:
    """Refuse in one line an adapter folder that is missing, incomplete or damaged; returns its config."""
    if not os.path.isdir(folder):
        raise DamagedFileError(f"no adapter folder {folder!r}; pass the output_dir of a training run (it holds "
                               f"{CONFIG_NAME})")
    parts = os.path.normpath(os.path.abspath(folder)).split(os.sep)
    if any(part.startswith(".partial-") for part in parts):
        raise DamagedFileError(f"{folder} is the staging folder of a save that was interrupted, not a saved adapter; "
                               "use a checkpoint-N folder or the output_dir of a finished run")
    config = read_adapter_config(folder)
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
            return config
        raise DamagedFileError(f"{folder} holds no {WEIGHTS_NAME}; pass a folder written by save_pretrained / "
                               "save_model (an interrupted save leaves a folder without it)")
    problem = safetensors_problem(weights)
    if problem:
        raise DamagedFileError(problem)
    return config


def read_utf8(path, what: str) -> str:
    """The text of `path`; a file that is not UTF-8 is refused naming the file and the first bad line."""
    raw = open(path, "rb").read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DamagedFileError(f"{what}: {path} is not UTF-8 text (line {line}, byte {exc.start}: "
                               f"{raw[exc.start:exc.start + 1]!r}); save it as UTF-8") from None


def fsync_tree(folder: str) -> None:
    """Flush every file under `folder`, and the folders themselves, to disk (before a rename commits them)."""
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
