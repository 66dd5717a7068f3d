"""CoRA FB (half LoRA's trainable parameters) vs LoRA, on a task that shares a common subspace.

Setup, per seed: a tiny Llama base (hidden 64, 2 layers); in every q/k/v/o projection a common
column space U (d_out × 8) shared by all tasks. M = 4 "fine-tuned models" are the base plus a task
update `U diag(σ_m) V_mᵀ` (V_m random, σ_m random in [0.5, 1.5], ‖·‖ = 0.5·‖W‖) plus full-rank noise
(10% of the update's norm), saved as safetensors model folders. `loraforge.cora.extract.extract_basis`
extracts rank-8 bases from them, averaging the weights (the paper) and, separately, the deltas
W_m - W_base. The new task (the teacher) is the base plus `U diag(σ) Vᵀ` with a fresh V. Students:
CoRA FB r = 8 (B frozen to the basis, only A trains: 8·d_in per module), CoRA TB r = 8, LoRA r = 8
(twice CoRA FB's parameters) and LoRA r = 4 (CoRA FB's parameter count). Each is distilled onto the
teacher (experiments/fidelity.py) at four learning rates, seeds 0..S-1. Printed: the share of the
base→teacher gap closed on held-out data (mean ± sd over seeds) and how much of U each basis spans.

    python experiments/cora_vs_lora.py            # 3 seeds, a few minutes on CPU
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fidelity  # noqa: E402

import loraforge  # noqa: E402
from loraforge.cora.extract import extract_basis  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
COMMON_RANK, R, M = 8, 8, 4


def with_update(base, subspaces: dict, gen: torch.Generator, noise: float) -> torch.nn.Module:
    model = copy.deepcopy(base)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in subspaces:
                w = module.weight
                u = subspaces[name] * (0.5 + torch.rand(COMMON_RANK, generator=gen))  # per-task σ
                delta = fidelity.planted(w, COMMON_RANK, 0.5, gen, left=u)
                if noise:
                    n = torch.randn(w.shape, generator=gen)
                    delta += n * (noise * delta.norm() / n.norm())
                w += delta
    return model.eval()


def spanned(basis: dict, subspaces: dict) -> float:
    """Mean over modules of ‖Bᵀ U‖²_F / k: the share of the common subspace U (d_out × k, orthonormal)
    that lies inside span(B) (B orthonormal: 1 = U ⊂ span(B), about r/d_out for a random B)."""
    shares = []
    for name, u in subspaces.items():
        b = basis[name][:, :R].double()
        shares.append(float((b.T @ u.double()).pow(2).sum() / u.shape[1]))
    return sum(shares) / len(shares)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lrs = [float(x) for x in args.lrs.split(",")]
    results: dict[tuple[str, float], list[float]] = {}
    coverage: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        gen = torch.Generator().manual_seed(3_000 + seed)
        base = fidelity.tiny_base(seed).eval()
        subspaces = {n: fidelity.orthonormal(m.out_features, COMMON_RANK, gen)
                     for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in TARGETS}
        teacher = with_update(base, subspaces, gen, noise=0.0)
        with tempfile.TemporaryDirectory() as tmp:
            base.save_pretrained(os.path.join(tmp, "base"))
            folders = []
            for m in range(M):
                folder = os.path.join(tmp, f"task{m}")
                with_update(base, subspaces, gen, noise=0.1).save_pretrained(folder)
                folders.append(folder)
            bases = {}
            for source in ("weights", "deltas"):
                out = os.path.join(tmp, f"basis-{source}.safetensors")
                extract_basis(folders, R, TARGETS, out, base=os.path.join(tmp, "base"), source=source, progress=False)
                bases[source] = out
                coverage.setdefault(source, []).append(spanned(load_file(out), subspaces))
            test = fidelity.batches(8, seed=20_000 + seed)
            gap = fidelity.held_out(teacher, base, test)

            def lora(r):
                return lambda m: get_peft_model(m, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))

            def cora(source, freeze):
                return lambda m: get_peft_model(m, loraforge.CoRAConfig(
                    r=R, lora_alpha=2 * R, target_modules=TARGETS, basis_path=bases[source], freeze_b=freeze))

            students = {f"cora-fb r={R} (weights basis)": cora("weights", True),
                        f"cora-fb r={R} (deltas basis)": cora("deltas", True),
                        f"cora-tb r={R} (deltas basis)": cora("deltas", False),
                        f"lora r={R}": lora(R), f"lora r={R // 2}": lora(R // 2)}
            for name, make in students.items():
                for lr in lrs:
                    closed = fidelity.run(make, base, teacher, args.steps, lr, seed, test, gap)
                    results.setdefault((name, lr), []).append(closed)
                    print(f"seed {seed}  {name:30s} lr {lr:g}: closed {closed:.3f}", flush=True)
    print(f"\nShare of the common subspace U inside span(B) of the extracted basis (1 = all of it), {args.seeds} seeds:")
    for source, values in coverage.items():
        print(f"  source={source:8s} {fidelity.summary(values)}")
    print(f"\nShare of the base→teacher gap closed on held-out data ({args.steps} steps, {args.seeds} seeds: mean ± sd)")
    fidelity.report(results, f"lora r={R}", " (trainable parameters per q_proj: CoRA FB r=8 and LoRA r=4: 512; "
                    "LoRA r=8 and CoRA TB: 1024)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
