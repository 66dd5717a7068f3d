"""Streaming extraction of CoRA's common-subspace bases (`loraforge cora-extract`).

Inputs (each of `models`): a model folder in safetensors (`model.safetensors`, or shards listed in
`model.safetensors.index.json`) with its `config.json`; or a PEFT LoRA adapter folder
(`adapter_config.json` + `adapter_model.safetensors`), whose effective weight is `W_base + s·B A`
with `s` as PEFT computes it (`rank_pattern`, `alpha_pattern`, `use_rslora`); a module the adapter
does not adapt keeps `W_base`. Adapters need `base`.

Per target module (a 2-D weight whose module name, the last part of its path, is in `targets`):
`W̄ = (1/M)·Σ_m W_m` (source="weights", the paper) or `W̄ = (1/M)·Σ_m (W_m - W_base)`
(source="deltas"), then the top-`rank` left singular vectors `U` of
- group="module": `W̄` itself;
- group="layer": `[W̄_1 W̄_2 …]`, the averages of all targeted modules with the same parent module
  (e.g. q/k/v(/o) of one attention block) stacked side by side (d_out × Σ d_in), so that the group
  shares one `U`, the common column space of its modules. Needs equal d_out within each group (with
  grouped KV heads k/v are narrower than q: use group="module").
svd="exact" is `torch.linalg.svd`; svd="randomized" is `torch.svd_lowrank` with `rank + oversample`
columns, `niter` power iterations and a fixed seed, so it is reproducible.

Output file: one float32 tensor per target module, key = the module's path in the base model
(the weight key without ".weight", e.g. "model.layers.0.self_attn.q_proj" -- what PEFT and
`ForgeLinear.forge_name` call the module), value = `U` (d_out × rank), orthonormal columns ordered
by singular value; in group="layer" every module of a group holds the same `U`. The metadata key
"loraforge_cora" holds JSON: format_version, rank, group, source, svd (+ niter, oversample, seed),
targets, modules, base, and sources as [{name, path, kind, config_sha256}].

Order of work: every input's config and safetensors header is read and checked first (headers give
shapes without reading data), so a mismatch (architecture, missing key, shape, truncated file) is
refused, naming the first one, before any weight is read; then the modules are computed one at a
time, reading one tensor per input at a time through lazy `safe_open` (files are opened per read, so
the mapped pages of a file are released as soon as its tensor is consumed). Peak memory is a few
d_out × d_in matrices (the running sum, one input tensor, the SVD workspace) whatever M and the
model size. The output is written to a temporary file and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .model import METADATA_KEY

FORMAT_VERSION = 1
GROUPS = ("module", "layer")
SOURCES = ("weights", "deltas")
SVDS = ("exact", "randomized")


class CoRAExtractError(ValueError):
    """Inputs or options the extraction cannot use; raised before anything is written."""


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def _headers(file: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, dtype) from a safetensors header; refuses unreadable or truncated files."""
    if not os.path.isfile(file):
        raise CoRAExtractError(f"{file}: file not found")
    try:
        with safe_open(file, framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except SafetensorError as exc:
        raise CoRAExtractError(f"{file}: not a complete safetensors file ({exc}); is it truncated?") from exc


def _read(file: str, key: str) -> torch.Tensor:
    with safe_open(file, framework="pt") as f:
        return f.get_tensor(key)


@dataclass
class _Checkpoint:
    """A full model folder: key -> (file, shape)."""

    path: str
    model_type: Optional[str] = None
    architectures: Optional[list] = None
    config_sha256: str = ""
    tensors: dict = field(default_factory=dict)

    @classmethod
    def open(cls, path: str) -> "_Checkpoint":
        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise CoRAExtractError(f"{path}: no config.json (a model folder) or adapter_config.json (a LoRA adapter); "
                                   "cannot check its architecture")
        with open(config_file) as f:
            config = json.load(f)
        ckpt = cls(path, config.get("model_type"), config.get("architectures"), _sha256(config_file))
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as exc:
                raise CoRAExtractError(f"{index}: not a safetensors index with a weight_map ({exc!r})") from exc
            by_file: dict[str, list[str]] = {}
            for key, name in weight_map.items():
                by_file.setdefault(os.path.join(path, name), []).append(key)
            for file, keys in sorted(by_file.items()):
                header = _headers(file)
                for key in sorted(keys, key=_natural):
                    if key not in header:
                        raise CoRAExtractError(f"{file}: missing key {key!r} (listed for it in {index})")
                    ckpt.tensors[key] = (file, header[key][0])
        elif os.path.isfile(single):
            ckpt.tensors = {k: (single, shape) for k, (shape, _) in _headers(single).items()}
        else:
            raise CoRAExtractError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                   "(only safetensors checkpoints are read)")
        return ckpt

    def read(self, key: str) -> torch.Tensor:
        return _read(self.tensors[key][0], key)


@dataclass
class _Adapter:
    """A PEFT LoRA adapter folder: module -> (A key, B key, scaling)."""

    path: str
    config_sha256: str
    file: str
    modules: dict  # module path -> (a_key, b_key, a_shape, b_shape, scaling)
    other_keys: list

    @classmethod
    def open(cls, path: str) -> "_Adapter":
        from peft.utils.other import get_pattern_key

        from ..core.files import read_adapter_config

        config_file = os.path.join(path, "adapter_config.json")
        config = read_adapter_config(path)  # one line for a missing, empty or damaged config
        peft_type = str(config.get("peft_type"))
        if peft_type.startswith("LORAFORGE_"):
            raise CoRAExtractError(f"{path}: a loraforge adapter ({peft_type}); write it as a stock LoRA adapter with "
                                   "`loraforge export` first and pass that folder")
        if peft_type != "LORA":
            raise CoRAExtractError(f"{path}: peft_type {peft_type}; only LoRA adapters have an effective weight W + s·BA")
        for option in ("use_dora", "fan_in_fan_out", "lora_bias"):
            if config.get(option):
                raise CoRAExtractError(f"{path}: {option}=True adapters are not read by cora-extract")
        file = os.path.join(path, "adapter_model.safetensors")
        header = _headers(file)
        r, alpha = config.get("r", 8), config.get("lora_alpha", 8)  # PEFT's LoraConfig defaults
        rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
        modules, other = {}, []
        prefix = "base_model.model."
        for key, (shape, _) in header.items():
            m = re.fullmatch(r"(.+)\.lora_A\.weight", key)
            if not m:
                if not re.fullmatch(r".+\.lora_B\.weight", key):
                    other.append(key)
                continue
            module = m.group(1)[len(prefix):] if m.group(1).startswith(prefix) else m.group(1)
            b_key = f"{m.group(1)}.lora_B.weight"
            if b_key not in header:
                raise CoRAExtractError(f"{file}: {key!r} has no matching {b_key!r}")
            rank = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), r)
            a_shape, b_shape = shape, header[b_key][0]
            if a_shape[0] != rank or b_shape[1] != rank:
                raise CoRAExtractError(f"{file}: {module!r} has lora_A {a_shape} and lora_B {b_shape}, but its config "
                                       f"gives rank {rank}")
            module_alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), alpha)
            scaling = module_alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            modules[module] = (key, b_key, a_shape, b_shape, scaling)
        return cls(path, _sha256(config_file), file, modules, other)

    def factors(self, module: str) -> Optional[tuple[torch.Tensor, torch.Tensor, float]]:
        if module not in self.modules:
            return None
        a_key, b_key, _, _, scaling = self.modules[module]
        return _read(self.file, a_key), _read(self.file, b_key), scaling


def _open(path: str):
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CoRAExtractError(f"{path}: not a folder (expected a model folder or a LoRA adapter folder)")
    if os.path.isfile(os.path.join(path, "adapter_config.json")):
        return _Adapter.open(path)
    return _Checkpoint.open(path)


def _check_same_model(ref: _Checkpoint, other: _Checkpoint, targets: list[str], names: set) -> None:
    if (other.model_type, other.architectures) != (ref.model_type, ref.architectures):
        raise CoRAExtractError(
            f"architectures differ: {ref.path} is model_type={ref.model_type!r} architectures={ref.architectures}, "
            f"{other.path} is model_type={other.model_type!r} architectures={other.architectures}")
    for key in targets:
        if key not in other.tensors:
            raise CoRAExtractError(f"{other.path}: missing key {key!r} (present in {ref.path})")
        if other.tensors[key][1] != ref.tensors[key][1]:
            raise CoRAExtractError(f"shapes differ for {key!r}: {tuple(ref.tensors[key][1])} in {ref.path}, "
                                   f"{tuple(other.tensors[key][1])} in {other.path}")
    extra = [k for k in _target_keys(other.tensors, names) if k not in ref.tensors]
    if extra:
        raise CoRAExtractError(f"{other.path}: has {extra[0]!r}, which {ref.path} lacks")


def _target_keys(tensors: dict, names: Optional[set]) -> list[str]:
    """2-D `.weight` keys whose module name is in `names` (all names when None)."""
    keys = []
    for key, (_, shape) in tensors.items():
        if key.endswith(".weight") and len(shape) == 2:
            if names is None or key[: -len(".weight")].rsplit(".", 1)[-1] in names:
                keys.append(key)
    return sorted(keys, key=_natural)


@dataclass
class _Plan:
    sources: list
    base: Optional[_Checkpoint]
    groups: list  # [[weight key, ...], ...]
    shapes: dict  # weight key -> shape


def plan(models: Sequence[str], rank: int, targets: Sequence[str], base: Optional[str] = None, group: str = "module",
         source: str = "weights") -> _Plan:
    """Read and check every header; return what to compute. Reads no weight data."""
    if group not in GROUPS:
        raise CoRAExtractError(f"group must be one of {GROUPS}, got {group!r}")
    if source not in SOURCES:
        raise CoRAExtractError(f"source must be one of {SOURCES}, got {source!r}")
    if not isinstance(rank, int) or rank < 1:
        raise CoRAExtractError(f"rank must be an integer >= 1, got {rank!r}")
    names = {t.strip() for t in targets if t.strip()}
    if not names:
        raise CoRAExtractError("targets: give the module names to extract, e.g. q_proj,k_proj,v_proj")
    if not models:
        raise CoRAExtractError("models: give at least one model or adapter folder")
    sources = [_open(m) for m in models]
    adapters = [s for s in sources if isinstance(s, _Adapter)]
    base_ckpt = None
    if base is not None:
        base_ckpt = _Checkpoint.open(os.fspath(base))
    elif adapters:
        raise CoRAExtractError(f"{adapters[0].path} is a LoRA adapter: pass --base, the model it was trained on")
    elif source == "deltas":
        raise CoRAExtractError("source='deltas' averages W_m - W_base: pass --base")
    checkpoints = [s for s in sources if isinstance(s, _Checkpoint)]
    ref = checkpoints[0] if checkpoints else base_ckpt
    keys = _target_keys(ref.tensors, names)
    missing = sorted(names - {k[: -len(".weight")].rsplit(".", 1)[-1] for k in keys})
    if missing:
        seen = sorted({k[: -len(".weight")].rsplit(".", 1)[-1] for k in _target_keys(ref.tensors, None)})
        raise CoRAExtractError(f"targets: {missing[0]!r} matches no 2-D weight in {ref.path}; module names there: "
                               f"{', '.join(seen)}")
    for other in [c for c in checkpoints if c is not ref] + ([base_ckpt] if base_ckpt is not None and base_ckpt is not ref else []):
        _check_same_model(ref, other, keys, names)
    shapes = {k: tuple(ref.tensors[k][1]) for k in keys}
    modules = {k[: -len(".weight")]: k for k in keys}
    for adapter in adapters:
        for module, (a_key, b_key, a_shape, b_shape, _) in adapter.modules.items():
            if module not in modules:
                if module.rsplit(".", 1)[-1] in names:
                    raise CoRAExtractError(f"{adapter.path}: adapts {module!r}, which {ref.path} lacks")
                continue
            d_out, d_in = shapes[modules[module]]
            if a_shape[1] != d_in or b_shape[0] != d_out:
                raise CoRAExtractError(f"shapes differ for {module!r}: the base weight is {(d_out, d_in)}, {adapter.path} "
                                       f"has lora_A {tuple(a_shape)} and lora_B {tuple(b_shape)}")
        for key in adapter.other_keys:
            if key.startswith("base_model.model.") and any(key[len("base_model.model."):].startswith(m + ".") for m in modules):
                raise CoRAExtractError(f"{adapter.file}: {key!r} changes a target module in a way cora-extract cannot read")
    if source == "deltas" and not checkpoints:
        for module in modules:
            if not any(module in a.modules for a in adapters):
                raise CoRAExtractError(f"{module!r}: no input adapts it, so its average delta is zero; "
                                       "drop its name from targets")
    if group == "module":
        groups = [[k] for k in keys]
    else:
        by_parent: dict[str, list[str]] = {}
        for k in keys:
            by_parent.setdefault(k[: -len(".weight")].rsplit(".", 1)[0], []).append(k)
        groups = list(by_parent.values())
        for g in groups:
            if len({shapes[k][0] for k in g}) > 1:
                detail = ", ".join(f"{k[:-len('.weight')]} {shapes[k]}" for k in g)
                raise CoRAExtractError(f"group='layer' stacks a layer's modules side by side and needs equal output "
                                       f"sizes, but {detail}; use group='module' or fewer targets")
    for g in groups:
        limit = min(shapes[g[0]][0], sum(shapes[k][1] for k in g))
        if rank > limit:
            raise CoRAExtractError(f"rank {rank} exceeds the largest possible rank {limit} of {g[0][:-len('.weight')]}")
    return _Plan(sources, base_ckpt, groups, shapes)


def _average(p: _Plan, key: str, source: str, device: torch.device) -> torch.Tensor:
    module = key[: -len(".weight")]
    acc = torch.zeros(p.shapes[key], dtype=torch.float32, device=device)
    n_models = n_adapters = 0
    for src in p.sources:
        if isinstance(src, _Checkpoint):
            acc.add_(src.read(key).to(device))
            n_models += 1
        else:
            n_adapters += 1
            factors = src.factors(module)
            if factors is not None:
                a, b, scaling = factors
                acc.addmm_(b.to(device, torch.float32), a.to(device, torch.float32), alpha=scaling)
    # Full models give W_m, adapters give s·B A: add or remove the base weight once, not M times.
    base_weight = n_adapters if source == "weights" else -n_models
    if base_weight:
        acc.add_(p.base.read(key).to(device), alpha=base_weight)
    return acc.div_(len(p.sources))


def _top_left_singular(matrix: torch.Tensor, rank: int, svd: str, niter: int, oversample: int, seed: int) -> torch.Tensor:
    if svd == "exact":
        return torch.linalg.svd(matrix, full_matrices=False).U[:, :rank]
    with torch.random.fork_rng(devices=[matrix.device] if matrix.device.type == "cuda" else []):
        torch.manual_seed(seed)
        u, _, _ = torch.svd_lowrank(matrix, q=min(rank + oversample, *matrix.shape), niter=niter)
    return u[:, :rank]


def extract_basis(models: Sequence[str], rank: int, targets: Sequence[str], out: str, *, base: Optional[str] = None,
                  group: str = "module", source: str = "weights", svd: str = "exact", niter: int = 4,
                  oversample: int = 10, seed: int = 0, device: str = "cpu", progress: bool = True) -> dict:
    """Write CoRA's bases of `models` to `out` (see the module docstring); return the metadata written."""
    from tqdm.auto import tqdm

    if svd not in SVDS:
        raise CoRAExtractError(f"svd must be one of {SVDS}, got {svd!r}")
    out = os.fspath(out)
    out_dir = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(out_dir):
        raise CoRAExtractError(f"out: folder {out_dir} does not exist")
    p = plan(models, rank, list(targets), base=base, group=group, source=source)
    dev = torch.device(device)
    bases: dict[str, torch.Tensor] = {}
    for g in tqdm(p.groups, desc="cora-extract", unit="group" if group == "layer" else "module", disable=not progress):
        averages = [_average(p, key, source, dev) for key in g]
        stacked = averages[0] if len(averages) == 1 else torch.cat(averages, dim=1)
        del averages
        if not torch.any(stacked):
            raise CoRAExtractError(f"{g[0][:-len('.weight')]}: the averaged {source} are all zero; nothing to extract "
                                   "(drop it from targets)")
        u = _top_left_singular(stacked, rank, svd, niter, oversample, seed).to("cpu", torch.float32)
        del stacked
        for key in g:
            bases[key[: -len(".weight")]] = u.clone().contiguous()
    meta = {
        "format_version": FORMAT_VERSION, "rank": rank, "group": group, "source": source, "svd": svd,
        "targets": sorted({t.strip() for t in targets if t.strip()}), "modules": len(bases),
        "base": None if p.base is None else {"name": os.path.basename(os.path.normpath(p.base.path)),
                                             "path": os.path.abspath(p.base.path), "config_sha256": p.base.config_sha256},
        "sources": [{"name": os.path.basename(os.path.normpath(s.path)), "path": os.path.abspath(s.path),
                     "kind": "model" if isinstance(s, _Checkpoint) else "lora", "config_sha256": s.config_sha256}
                    for s in p.sources],
    }
    if svd == "randomized":
        meta.update(niter=niter, oversample=oversample, seed=seed)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        save_file(bases, tmp, metadata={"format": "pt", METADATA_KEY: json.dumps(meta, sort_keys=True)})
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return meta
