"""Throughput and peak memory of `loraforge cora-extract` on Llama-7B-shaped attention matrices.

Writes `--models` synthetic "fine-tuned models" (random fp16, q/k/v/o of 4096 × 4096 in each of
`--layers` layers, one shard per layer + `model.safetensors.index.json`, as a sharded Llama-7B
checkpoint is laid out), then runs the extraction for each `--svd` mode. Reported per mode: wall
time and process CPU time, input read (GB/s of safetensors data), modules per second, how the time splits between
reading + averaging (timed separately over the same inputs) and the SVDs, and the peak resident
memory above the level before the run (the kernel's high-water mark VmHWM, reset through
/proc/self/clear_refs; tracemalloc does not see torch's allocations), next to the size of one
input model and of all inputs. The page cache is warm (the files were just written); a cold read
from disk adds the disk's read time. Files are removed at the end unless --keep.

    python benchmarks/bench_cora_extract.py                          # 4 models × 4 layers = 2 GiB
    python benchmarks/bench_cora_extract.py --svd randomized --layers 8
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import load_average, table, threads  # noqa: E402

from loraforge.cora import extract as ex  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
GiB = 2 ** 30


def write_models(root: str, n_models: int, n_layers: int, dim: int) -> list[str]:
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": dim,
              "num_hidden_layers": n_layers}
    gen = torch.Generator().manual_seed(0)
    paths = []
    for m in range(n_models):
        path = os.path.join(root, f"ft{m}")
        os.makedirs(path)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
        weight_map = {}
        for i in range(n_layers):
            shard = f"model-{i + 1:05d}-of-{n_layers:05d}.safetensors"
            tensors = {f"model.layers.{i}.self_attn.{t}.weight": (0.02 * torch.randn(dim, dim, generator=gen)).half()
                       for t in TARGETS}
            save_file(tensors, os.path.join(path, shard), metadata={"format": "pt"})
            weight_map.update({k: shard for k in tensors})
            del tensors
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
        paths.append(path)
    return paths


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


class Peak:
    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.start = _status("VmRSS")
        return self

    def __exit__(self, *exc):
        self.peak = _status("VmHWM") - self.start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--svd", default="randomized,exact")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dir", default=None, help="where to write the synthetic models (default: a temp dir in /tmp)")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    per_model = args.layers * len(TARGETS) * args.dim * args.dim * 2
    if args.models * per_model > 10 * 10 ** 9:
        raise SystemExit(f"{args.models * per_model / GiB:.1f} GiB of inputs: keep it under 10 GB")
    root = tempfile.mkdtemp(prefix="cora_bench_", dir=args.dir)
    try:
        t0 = time.perf_counter()
        paths = write_models(root, args.models, args.layers, args.dim)
        print(f"wrote {args.models} models × {args.layers} layers × q/k/v/o {args.dim}² fp16 = "
              f"{args.models * per_model / GiB:.2f} GiB in {time.perf_counter() - t0:.0f} s; {load_average()}")
        n_modules = args.layers * len(TARGETS)
        rows = []
        with threads(args.threads):
            print(f"torch threads: {torch.get_num_threads()}")
            # Reading + averaging alone, over the same inputs (no SVD).
            p = ex.plan(paths, args.rank, TARGETS)
            start = time.perf_counter()
            for g in p.groups:
                ex._average(p, g[0], "weights", torch.device("cpu"))
            read_s = time.perf_counter() - start
            print(f"reading + averaging alone: {read_s:.1f} s ({args.models * per_model / read_s / 1e9:.2f} GB/s)")
            for svd in [s.strip() for s in args.svd.split(",") if s.strip()]:
                out = os.path.join(root, f"basis-{svd}.safetensors")
                with Peak() as mem:
                    start, cpu_start = time.perf_counter(), time.process_time()
                    ex.extract_basis(paths, args.rank, TARGETS, out, svd=svd, progress=False)
                    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                rows.append([svd, f"{wall:.1f}", f"{cpu:.1f}", f"{args.models * per_model / wall / 1e9:.3f}",
                             f"{n_modules / wall:.2f}", f"{read_s:.1f} / {max(wall - read_s, 0):.1f}",
                             f"{mem.peak / 2**20:.0f}", f"{per_model / 2**20:.0f}", f"{args.models * per_model / 2**20:.0f}"])
                print(f"{svd}: done ({load_average()})", flush=True)
        print(table(rows, ["svd", "wall s", "CPU s", "input GB/s", "modules/s", "read+avg s / svd s", "peak MiB",
                           "one model MiB", "all inputs MiB"]))
        print(f"rank {args.rank}; one fp32 {args.dim}² matrix = {args.dim * args.dim * 4 / 2**20:.0f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
