"""`loraforge ranks ADAPTER_DIR`: the per-module rank table of a saved SaLoRA adapter.

Reads the adapter's config and safetensors directly (no base model, no PEFT model built). For a
stock LoRA adapter written by `loraforge export` it prints the exported ranks (and the densities
recorded in `loraforge_export.json`).
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch

from ..core.layer import module_order
from .layer import FROZEN_CODES, deterministic_gate, phase_at
from .report import ModuleGates, format_table, summarize, write_summary

PREFIX = "base_model.model."
LEGEND = ("columns: r = ranks trained; E[L0] = expected number of open gates (the L0 norm the budget counts); "
          "live = gates open now (ĝ > 0); export = ranks `loraforge export` keeps. lambda = the multiplier holding "
          "the density on its target (linear = the linear term's, with lagrangian='linear_quadratic')")


def _split(key: str) -> tuple[str, str] | None:
    if not key.startswith(PREFIX) or ".lora_" not in key:
        return None
    module, rest = key[len(PREFIX):].split(".lora_", 1)
    return module, "lora_" + rest


def read_adapter(path: str) -> tuple[dict, dict[str, dict]]:
    """(adapter config dict, module -> {tensor name: tensor}) of a saved adapter folder."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME
    from safetensors.torch import load_file

    from ..core.files import check_adapter_folder

    config = check_adapter_folder(path)  # one line for a missing, truncated or damaged file
    modules: dict[str, dict] = {}
    for key, value in load_file(os.path.join(path, SAFETENSORS_WEIGHTS_NAME)).items():
        parts = _split(key)
        if parts:
            modules.setdefault(parts[0], {})[parts[1]] = value
    return config, modules


def adapter_summary(path: str) -> dict:
    """The densities and per-module ranks of a saved SaLoRA adapter (see report.summarize), plus its
    λ, window, step and freeze state."""
    config, modules = read_adapter(path)
    if config.get("peft_type") != "LORAFORGE_SALORA":
        raise ValueError(f"{path} is not a SaLoRA adapter (peft_type {config.get('peft_type')!r})")
    cfg = SimpleNamespace(**{k: config[k] for k in ("temperature", "gamma", "zeta", "target_density")})
    gates, state = [], None
    for name in sorted(modules, key=module_order):
        t = modules[name]
        if "lora_gate_logits" not in t:
            continue
        start, end, code = (int(v) for v in t["lora_salora_window"].tolist())
        frozen = FROZEN_CODES[code]
        step = int(t["lora_forge_step"]) if "lora_forge_step" in t else 0
        phase = phase_at(step, start, end, frozen)  # the layer's eval gate: 1 before the window
        eval_gate = (t["lora_gate_frozen"] if frozen else torch.ones_like(t["lora_gate_logits"].float()) if phase == "ones"
                     else deterministic_gate(t["lora_gate_logits"].float(), cfg.gamma, cfg.zeta))
        gates.append(ModuleGates(name, t["lora_gate_logits"], eval_gate, t["lora_A.weight"].shape[1], t["lora_B.weight"].shape[0]))
        if state is None:
            lam = t["lora_salora_lambda"].tolist()
            state = {"window": [start, end], "frozen": frozen, "lambda": lam[0], "lambda_linear": lam[1],
                     "step": int(t["lora_forge_step"]) if "lora_forge_step" in t else None}
    if not gates:
        raise ValueError(f"{path}: no gate tensors found in the adapter weights")
    return {**summarize(gates, cfg), **state}


def stock_summary(path: str) -> dict:
    config, modules = read_adapter(path)
    rows = [{"module": name, "export_rank": t["lora_A.weight"].shape[0]} for name, t in sorted(modules.items(), key=lambda item: module_order(item[0]))
            if "lora_A.weight" in t]
    meta_path = os.path.join(path, "loraforge_export.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    return {"modules": rows, "export_ranks": sum(r["export_rank"] for r in rows), "metadata": meta}


def ranks_main(argv: list[str]) -> int:
    from loraforge_cli import parse

    return ranks(parse("ranks", argv))


def ranks(args) -> int:
    """`loraforge ranks` with parsed arguments (see loraforge_cli)."""
    from loraforge_cli import UsageError, check_adapter_dir

    check_adapter_dir(args.adapter)
    config, _ = read_adapter(args.adapter)
    if config.get("peft_type") == "LORAFORGE_SALORA":
        summary = adapter_summary(args.adapter)
        print(format_table(summary))
        start, end = summary["window"]
        window = f"steps {start + 1}..{end}" if start >= 0 else "not resolved (never trained)"
        print(f"lambda {summary['lambda']:.6g} (linear {summary['lambda_linear']:.6g}) | window {window} | "
              f"step {summary['step']} | gates "
              f"{'frozen with prune_budget=' + repr(summary['frozen']) if summary['frozen'] else 'not frozen'}")
        print(LEGEND)
        module_ranks = {r["module"]: r["export_rank"] for r in summary["modules"]}
        r_max = max(r["r"] for r in summary["modules"])
        densities = summary
    elif config.get("peft_type") == "LORA":
        summary = stock_summary(args.adapter)
        salora = summary["metadata"].get("salora")
        print(f"{args.adapter}: exported ranks of a SaLoRA adapter (stock LoRA written by `loraforge export`)"
              if salora else f"{args.adapter}: a plain LoRA adapter (no SaLoRA gates): the ranks below are the "
              "fixed r of each module, not learned ones")
        for row in summary["modules"]:
            print(f"{row['module']}  {row['export_rank']}")
        if salora:
            print("densities at export: " + ", ".join(f"{k} {salora[k]:.3f}" for k in
                  ("target_density", "expected_density", "realized_density", "export_density")))
        module_ranks = {r["module"]: r["export_rank"] for r in summary["modules"]}
        r_max = max(module_ranks.values())
        densities = salora
    else:
        raise UsageError(f"{args.adapter}: not a SaLoRA or LoRA adapter (peft_type {config.get('peft_type')!r}); "
                         "pass a folder written by a SaLoRA run or by `loraforge export`")
    if args.png:
        from .plot import heatmap_title, rank_heatmap

        label = "exported rank" if densities else "LoRA rank r (fixed, not learned)"
        if rank_heatmap(module_ranks, args.png, r_max=r_max, title=heatmap_title(densities), label=label) is None:
            print("no module has a layer index: no heat map written")
    if args.json:
        write_summary(summary, args.json)
    return 0
