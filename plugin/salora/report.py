"""What SaLoRA's gates say about the adapter: densities, per-module ranks, the rank table.

Works on plain tensors, so the trainer (live layers) and `loraforge ranks` (a saved adapter's
safetensors, no base model) report the same numbers. Three densities, all parameter-weighted over
the adapted modules (a rank of a d_out × d_in module weighs d_in + d_out):
- expected: `C = Σ P(g > 0)·(d_in + d_out) / Σ r·(d_in + d_out)`, what the budget term drives to b;
- realized: the share of ranks whose deterministic gate ĝ is > 0 (what the paper's pruning keeps);
- export: the share of ranks whose eval-mode gate is > 0, i.e. what merge and export keep (equals
  realized until the gates freeze with `prune_budget="exact"`).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

import torch

from .layer import deterministic_gate, prob_nonzero

#: All linears of attention and MLP in Llama-style models, in the order tables and heat maps list them
#: (SaLoRA's default `target_modules`; the ones a model lacks are skipped).
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModuleGates:
    name: str
    log_alpha: torch.Tensor
    eval_gate: torch.Tensor
    d_in: int
    d_out: int

    @property
    def r(self) -> int:
        return self.log_alpha.numel()

    @property
    def weight(self) -> int:
        return self.d_in + self.d_out


def summarize(modules: list[ModuleGates], cfg) -> dict:
    """Densities, λ-free numbers and per-module ranks; `cfg` has temperature, gamma, zeta, target_density."""
    total = sum(m.r * m.weight for m in modules)
    rows, expected, realized, exported = [], 0.0, 0.0, 0.0
    for m in modules:
        la = m.log_alpha.detach().float().cpu()
        l0 = float(prob_nonzero(la, cfg.temperature, cfg.gamma, cfg.zeta).sum())
        live = int((deterministic_gate(la, cfg.gamma, cfg.zeta) > 0).sum())
        kept = int((m.eval_gate.detach().float().cpu() > 0).sum())
        expected += l0 * m.weight
        realized += live * m.weight
        exported += kept * m.weight
        rows.append({"module": m.name, "r": m.r, "expected_l0": round(l0, 4), "live": live, "export_rank": kept})
    return {
        "target_density": float(cfg.target_density),
        "expected_density": expected / total if total else 0.0,
        "realized_density": realized / total if total else 0.0,
        "export_density": exported / total if total else 0.0,
        "live_ranks": sum(r["live"] for r in rows),
        "export_ranks": sum(r["export_rank"] for r in rows),
        "total_ranks": sum(m.r for m in modules),
        "total_params": total,
        "modules": rows,
    }


def format_table(summary: dict) -> str:
    """The per-module rank table, with the densities the budget is judged by."""
    rows = summary["modules"]
    width = max([len("module")] + [len(r["module"]) for r in rows])
    lines = [f"{'module'.ljust(width)}  {'r':>3}  {'E[L0]':>6}  {'live':>4}  {'export':>6}"]
    lines += [f"{r['module'].ljust(width)}  {r['r']:>3}  {r['expected_l0']:>6.2f}  {r['live']:>4}  {r['export_rank']:>6}"
              for r in rows]
    lines.append(
        f"density: target {summary['target_density']:.3f} | expected (closed-form L0) {summary['expected_density']:.3f}"
        f" | realized (ĝ>0) {summary['realized_density']:.3f} | export {summary['export_density']:.3f}"
        f"  ({summary['export_ranks']}/{summary['total_ranks']} ranks exported, {summary['live_ranks']} with ĝ>0)"
    )
    return "\n".join(lines)


def write_summary(summary: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)


_INDEX = re.compile(r"\.(\d+)\.")


def layer_and_type(name: str) -> tuple[int | None, str]:
    """("model.layers.3.mlp.up_proj") -> (3, "up_proj"): the first numeric path part and the last part."""
    match = _INDEX.search(f".{name}.")
    return (int(match.group(1)) if match else None), name.rsplit(".", 1)[-1]
