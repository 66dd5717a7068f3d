"""SaLoRA's budget control across run lengths, with planted ranks and PEFT's AdaLoRA beside it.

The task: a teacher is a small residual tower (Llama-shaped blocks: q, k, v, o, gate, up, down
projections, all d × d, so a rank weighs the same everywhere and AdaLoRA's rank budget equals
SaLoRA's parameter budget) whose linears carry planted deltas `U diag(σ) Vᵀ` of known rank k ∈
{0, 2, 4, 6, 8}. A student (the same base + an r = 8 adapter) is distilled from the teacher's hidden
state after every block (relative MSE) on Gaussian inputs; the budget b is the planted share
Σk / Σ8. For each run length T (the window is the paper's 0.2-0.5 of T) and control we report the
expected density C and the realised density (ĝ > 0) when the gates freeze, the held-out loss of
the exported (pruned) model, and the Spearman correlation of kept vs planted ranks over modules.

The tower is used rather than a tiny Llama because a 20,000-step run must finish in a minute or
two on a shared CPU core (a 4-layer tiny Llama takes ~100 ms a step there).

Run: python experiments/salora_budget.py [--steps 200 2000 20000] [--seeds 0 1 2] [--json rows.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from peft import AdaLoraConfig, get_peft_model
from scipy.stats import spearmanr
from transformers.utils import ModelOutput

import loraforge
from loraforge.salora import gate_summary

PLANTED = (0, 2, 4, 6, 8)
NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TowerOutput(ModelOutput):
    loss: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple] = None


class Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        for name in NAMES:
            setattr(self, name, torch.nn.Linear(d, d, bias=False))

    def forward(self, h):
        n = F.rms_norm(h, h.shape[-1:])
        h = h + self.o_proj(F.silu(self.q_proj(n)) * self.k_proj(n) + self.v_proj(n))
        n = F.rms_norm(h, h.shape[-1:])
        return h + self.down_proj(F.silu(self.gate_proj(n)) * self.up_proj(n))


class Tower(torch.nn.Module):
    """`forward(x, targets)` returns the hidden states and, given the teacher's, the distillation loss
    as `.loss` (so PEFT's AdaLoRA adds its own orthogonal term as it does for a causal LM)."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(d) for _ in range(layers))

    def forward(self, x, targets=None):
        hidden = []
        for block in self.layers:
            x = block(x)
            hidden.append(x)
        loss = None
        if targets is not None:
            loss = sum(F.mse_loss(h, t) / t.pow(2).mean() for h, t in zip(hidden, targets)) / len(hidden)
        return TowerOutput(loss=loss, hidden_states=tuple(hidden))


def tower(seed: int, d: int, layers: int) -> Tower:
    torch.manual_seed(seed)
    return Tower(d, layers)


def plant(model: Tower, seed: int, strength: float) -> dict[str, int]:
    gen = torch.Generator().manual_seed(1000 + seed)
    ranks = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                k = PLANTED[int(torch.randint(len(PLANTED), (1,), generator=gen))]
                ranks[name] = k
                if k:
                    d_out, d_in = module.weight.shape
                    u = torch.linalg.qr(torch.randn(d_out, k, generator=gen))[0]
                    v = torch.linalg.qr(torch.randn(d_in, k, generator=gen))[0]
                    module.weight += strength * u @ v.T
    return ranks


def inputs(seed: int, n: int, batch: int, d: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(batch, d, generator=gen)


def salora_ranks(model) -> tuple[dict[str, int], dict]:
    s = gate_summary(model)
    return {r["module"].removeprefix("base_model.model."): r["export_rank"] for r in s["modules"]}, s


def adalora_ranks(model) -> dict[str, int]:
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_E") and "default" in module.lora_E:
            out[name.removeprefix("base_model.model.")] = int((module.lora_E["default"].detach() != 0).sum())
    return out


def run(seed: int, control: str, steps: int, args) -> dict:
    teacher = tower(seed, args.d, args.layers).eval()
    planted = plant(teacher, seed, args.strength)
    density = sum(planted.values()) / (8 * len(planted))
    torch.manual_seed(seed)
    base = tower(seed, args.d, args.layers)
    start, end = round(0.2 * steps), round(0.5 * steps)
    if control == "adalora":
        # AdaLoRA's budget (average rank target_r) falls cubically over [tinit, total_step - tfinal]:
        # the same 0.2-0.5 window; it prunes singular values by sensitivity every deltaT steps.
        model = get_peft_model(base, AdaLoraConfig(init_r=8, target_r=8 * density, r=8, lora_alpha=16,
                                                   target_modules=list(NAMES), tinit=start, tfinal=steps - end,
                                                   deltaT=max(1, steps // 200), total_step=steps, lora_dropout=0.0))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0, foreach=True)
        d = None
    else:
        model = get_peft_model(base, loraforge.SaLoRAConfig(
            target_modules=list(NAMES), target_density=density, budget_control=control, prune_budget=args.prune,
            orth_reg_weight=args.orth))
        d = loraforge.driver(model).begin(max_steps=steps)
        gates = d.param_groups(args.lr, 0.0)
        taken = {id(p) for g in gates for p in g["params"]}
        opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in taken]},
                                 *gates], lr=args.lr, weight_decay=0.0, foreach=True)
    model.train()
    trace, at_end = [], None
    for step, x in enumerate(inputs(seed, steps, args.batch, args.d), start=1):
        with torch.no_grad():
            targets = teacher(x).hidden_states
        loss = model(x, targets=targets).loss
        if d is not None:
            reg = d.regularization_loss()
            loss = loss if reg is None else loss + reg
        loss.backward()
        opt.step()
        if d is None:
            model.base_model.update_and_allocate(step)
        opt.zero_grad()
        if d is not None and (step - start) % max(1, (end - start) // 10) == 0 and start <= step <= end:
            s = d.controllers[0].summary()
            trace.append((step, round(s["expected_density"], 3), round(s["realized_density"], 3), d.controllers[0].lam))
        if d is not None and step == end - 1:
            # just before the freeze: the densities the window's training reached
            s = d.controllers[0].summary()
            at_end = (s["expected_density"], s["realized_density"])
    model.eval()
    with torch.no_grad():
        held = [float(model(x, targets=teacher(x).hidden_states).loss) for x in inputs(10_000 + seed, 8, 64, args.d)]
    if d is None:
        kept = adalora_ranks(model)
        c = r = sum(kept.values()) / (8 * len(kept))
        export = c
    else:
        kept, s = salora_ranks(model)
        c, r = at_end
        export = s["export_density"]
    names = sorted(planted)
    rho = spearmanr([planted[n] for n in names], [kept[n] for n in names]).statistic
    return {"seed": seed, "control": control, "steps": steps, "target": density, "C": c, "realized": r,
            "export": export, "held_out": sum(held) / len(held), "spearman": float(rho), "trace": trace}


def mean_spread(xs) -> str:
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[200, 1000, 5000])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--controls", nargs="+", default=["schedule", "paper", "adalora"])
    parser.add_argument("--prune", default="exact", help="SaLoRA's prune_budget")
    parser.add_argument("--d", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--orth", type=float, default=0.1, help="SaLoRA's orth_reg_weight β (paper: 0.1)")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--trace", action="store_true", help="print C, realised density and λ through the window")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for steps in args.steps:
        for control in args.controls:
            for seed in args.seeds:
                t = time.time()
                row = run(seed, control, steps, args)
                rows.append(row)
                print(f"T={steps:>6} {control:>8} seed {seed}: b {row['target']:.3f}  C {row['C']:.3f}  realised "
                      f"{row['realized']:.3f}  export {row['export']:.3f}  held-out {row['held_out']:.4f}  "
                      f"spearman {row['spearman']:+.3f}  [{time.time() - t:.0f}s]", flush=True)
                if args.trace:
                    print("   ", row["trace"])
    print("\n| T | control | C − b at window end | realised − b | held-out loss | Spearman |\n|---|---|---|---|---|---|")
    for steps in args.steps:
        for control in args.controls:
            sel = [r for r in rows if r["steps"] == steps and r["control"] == control]
            print(f"| {steps} | {control} | {mean_spread([r['C'] - r['target'] for r in sel])} | "
                  f"{mean_spread([r['realized'] - r['target'] for r in sel])} | {mean_spread([r['held_out'] for r in sel])} | "
                  f"{mean_spread([r['spearman'] for r in sel])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
