"""Delta-LoRA vs LoRA at the same rank, on a target whose true update has rank > r.

Teacher: the tiny Llama (hidden 64, 2 layers) with a planted update of rank R = 16 in every
q/v/up/down projection (flat spectrum, ‖ΔW‖ = 0.5·‖W‖). Students adapt those modules at rank r = 4:
plain LoRA, Delta-LoRA with the paper's two update ratios (λ = 0.5, GLUE; λ = 2, E2E) and start
step K = 10% of the steps (the paper's warm-up), and LoRA at rank 2r = 8 (the rank Delta-LoRA's
update `(1+λ)·s·B A - λ·s·B_K A_K` can reach) as a reference. Each is distilled onto the teacher
(experiments/fidelity.py) at four learning rates, over seeds 0..S-1 (base, teacher, adapter init and
data all follow the seed). Printed: the share of the base→teacher gap closed on held-out data,
mean ± sample standard deviation over seeds, per method and learning rate.

    python experiments/delta_lora_vs_lora.py               # 3 seeds, a few minutes on CPU
    python experiments/delta_lora_vs_lora.py --seeds 5 --steps 600
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity  # noqa: E402

import loraforge  # noqa: E402

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
TRUE_RANK, R = 16, 4


def teacher_of(base: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(1_000 + seed)
    teacher = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in teacher.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                module.weight += fidelity.planted(module.weight, TRUE_RANK, 0.5, gen)
    return teacher.eval()


def methods(steps: int) -> dict:
    k = steps // 10

    def lora(r):
        return lambda m: get_peft_model(m, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))

    def delta(ratio):
        return lambda m: get_peft_model(m, loraforge.DeltaLoRAConfig(
            r=R, lora_alpha=2 * R, target_modules=TARGETS, update_ratio=ratio, start_step=k, propagation="folded"))

    return {f"lora r={R}": lora(R), f"delta-lora r={R} λ=0.5": delta(0.5), f"delta-lora r={R} λ=2": delta(2.0),
            f"lora r={2 * R} (reference)": lora(2 * R)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lrs = [float(x) for x in args.lrs.split(",")]
    results: dict[tuple[str, float], list[float]] = {}
    for seed in range(args.seeds):
        base = fidelity.tiny_base(seed).eval()
        teacher = teacher_of(base, seed)
        test = fidelity.batches(8, seed=20_000 + seed)
        gap = fidelity.held_out(teacher, base, test)
        for name, make in methods(args.steps).items():
            for lr in lrs:
                closed = fidelity.run(make, base, teacher, args.steps, lr, seed, test, gap)
                results.setdefault((name, lr), []).append(closed)
                print(f"seed {seed}  {name:28s} lr {lr:g}: closed {closed:.3f} of the gap (KL base→teacher {gap:.4f})",
                      flush=True)
    print(f"\nShare of the base→teacher gap closed on held-out data (true update rank {TRUE_RANK}, r = {R}, "
          f"{args.steps} steps, {args.seeds} seeds: mean ± sd)")
    fidelity.report(results, f"lora r={R}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
