"""`loraforge cora-extract`: write CoRA's common-subspace bases of several fine-tuned models."""
from __future__ import annotations

import argparse
import sys

from .extract import GROUPS, SOURCES, SVDS, CoRAExtractError, extract_basis


def extract_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="loraforge cora-extract",
        description="Average M fine-tuned models (or LoRA adapters + --base) per module and keep the top-r left "
                    "singular vectors as CoRA's basis for B. Streams: one tensor per input in memory at a time.")
    parser.add_argument("--models", nargs="+", required=True,
                        help="model folders (safetensors, single file or sharded) or PEFT LoRA adapter folders")
    parser.add_argument("--base", help="base model folder: needed for LoRA adapter inputs and for --source deltas")
    parser.add_argument("--rank", type=int, required=True, help="basis columns per module (>= the r you will train)")
    parser.add_argument("--targets", required=True, help="comma-separated module names, e.g. q_proj,k_proj,v_proj")
    parser.add_argument("--out", required=True, help="output .safetensors file (written atomically)")
    parser.add_argument("--group", choices=GROUPS, default="module",
                        help="module: one basis per module (default); layer: one shared basis per parent module "
                             "(e.g. q/k/v of an attention block), from the SVD of their averages stacked side by side")
    parser.add_argument("--source", choices=SOURCES, default="weights",
                        help="weights: average W_m (paper, default); deltas: average W_m - W_base (needs --base)")
    parser.add_argument("--svd", choices=SVDS, default="exact", help="exact: torch.linalg.svd; randomized: torch.svd_lowrank")
    parser.add_argument("--niter", type=int, default=4, help="power iterations of the randomized SVD")
    parser.add_argument("--oversample", type=int, default=10, help="extra columns of the randomized SVD")
    parser.add_argument("--seed", type=int, default=0, help="seed of the randomized SVD")
    parser.add_argument("--device", default="cpu", help="where to sum and decompose, e.g. cpu or cuda")
    args = parser.parse_args(argv)
    try:
        meta = extract_basis(args.models, args.rank, args.targets.split(","), args.out, base=args.base,
                             group=args.group, source=args.source, svd=args.svd, niter=args.niter,
                             oversample=args.oversample, seed=args.seed, device=args.device)
    except CoRAExtractError as exc:
        print(f"loraforge cora-extract: error: {exc}\nNothing was written.", file=sys.stderr)
        return 2
    print(f"wrote {meta['modules']} bases of rank {meta['rank']} from {len(meta['sources'])} inputs to {args.out}")
    return 0
