"""`loraforge cora-extract`: write CoRA's common-subspace bases of several fine-tuned models."""
from __future__ import annotations

import sys

from .extract import CoRAExtractError, extract_basis


def extract_main(argv: list[str]) -> int:
    from loraforge_cli import parse

    return extract(parse("cora-extract", argv))


def extract(args) -> int:
    """`loraforge cora-extract` with parsed arguments (see loraforge_cli)."""
    try:
        meta = extract_basis(args.models, args.rank, args.targets.split(","), args.out, base=args.base,
                             group=args.group, source=args.source, svd=args.svd, niter=args.niter,
                             oversample=args.oversample, seed=args.seed, device=args.device)
    except CoRAExtractError as exc:
        print(f"loraforge cora-extract: error: {exc} Nothing was written.", file=sys.stderr)
        return 2
    print(f"wrote {meta['modules']} bases of rank {meta['rank']} from {len(meta['sources'])} inputs to {args.out}")
    return 0
