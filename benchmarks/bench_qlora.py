"""Step time and peak memory of each loraforge method on a 4-bit NF4 base against PEFT QLoRA, side by side.

The same protocol as bench_all.py (its configs, step, batch and interleaved rounds), on a base that
every method loads quantised from one saved checkpoint (bitsandbytes NF4, double quantisation,
`prepare_model_for_kbit_training` without checkpointing, as QLoRA does): same model, rank, target
modules (every attention and MLP linear), batch and optimizer (AdamW). The reference `lora` is
PEFT's LoRA on that base, i.e. QLoRA. Delta-LoRA runs folded (`in_place` is refused on a quantised
W). Peak memory = what a method holds after loading its base and warming up + the peak a step
allocates above that (benchmarks/common.py).

    python benchmarks/bench_qlora.py --preset cpu     # ~3 minutes on 2 CPU cores (bnb's CPU kernels)
    python benchmarks/bench_qlora.py --preset gpu     # 1B-class Llama shape, NF4 + bf16 compute, CUDA
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_all  # noqa: E402
from common import AllocationTrace, MiB, load_average, median, pick_device, spread, table, threads  # noqa: E402
from common import FAR, method_config, round_robin, trainable_parameters, write_basis  # noqa: E402

import loraforge  # noqa: E402

PRESETS = {
    "cpu": dict(bench_all.PRESETS["cpu"], rounds=8, steps=2),
    "gpu": dict(bench_all.PRESETS["gpu"]),
}
METHODS = ["lora", "salora_out", "salora_in", "delta_folded", "cora_fb", "cora_tb"]


def load_quantized(path: str, p: dict, device: torch.device):
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.float32 if device.type == "cpu" else getattr(torch, p["dtype"])
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=compute,
                                                 device_map={"": str(device) if device.type == "cpu" else 0})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def build(name: str, path: str, p: dict, device: torch.device, basis: str, lr: float) -> bench_all.Run:
    from peft import get_peft_model

    model = get_peft_model(load_quantized(path, p, device), method_config(name, p["r"], bench_all.TARGETS, basis))
    model.train()
    drivers = loraforge.drivers(model)
    driver = drivers[0] if drivers else None
    run = bench_all.Run(name, model, driver)
    special = []
    if driver is not None:
        driver.begin(2 * FAR)
        special = driver.param_groups(lr, 0.0)
    taken = {id(q) for g in special for q in g["params"]}
    rest = [q for q in model.parameters() if q.requires_grad and id(q) not in taken]
    run.optimizer = torch.optim.AdamW([{"params": rest}, *special], lr=lr, weight_decay=0.0)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per method per round")
    args = parser.parse_args(argv)
    p = dict(PRESETS[args.preset])
    for k in ("rounds", "steps"):
        if getattr(args, k) is not None:
            p[k] = getattr(args, k)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    if "lora" not in names:
        names.insert(0, "lora")
    device = pick_device(p["device"])
    thread_time = p["device"] == "cpu" and p.get("threads") == 1
    print(f"preset {args.preset} (4-bit NF4 base): {p}")
    print(load_average())
    with threads(p.get("threads")), tempfile.TemporaryDirectory() as tmp:
        base = bench_all.base_model(dict(p, dtype="float32" if device.type == "cpu" else p["dtype"]), torch.device("cpu"))
        base.save_pretrained(os.path.join(tmp, "base"))
        basis = os.path.join(tmp, "basis.safetensors")
        write_basis(base, bench_all.TARGETS, p["r"], basis)
        del base
        batch = bench_all.make_batch(p, device)
        runs = {}
        for name in names:
            with AllocationTrace(device) as trace:
                run = build(name, os.path.join(tmp, "base"), p, device, basis, lr=1e-4)
                for _ in range(p["warmup"]):
                    run.step(batch)
            run.resident = trace.net
            runs[name] = run
        round_robin(runs, names, batch, p["rounds"], p["steps"], device, thread_time=thread_time)
        print(load_average())
        ref = runs["lora"]
        ref_mem = ref.resident + ref.step_peak
        rows = []
        for name in names:
            run = runs[name]
            t, mem = median(run.times), run.resident + run.step_peak
            ratios = [a / b for a, b in zip(run.round_medians, ref.round_medians)]
            rows.append([name, f"{t * 1e3:.1f}", f"{median(ratios):.3f}", f"±{spread(ratios) * median(ratios):.3f}",
                         f"{mem / MiB:.1f}", f"{run.step_peak / MiB:.1f}", f"{mem / ref_mem:.4f}",
                         f"{trainable_parameters(run.model):,}"])
        print()
        print(table(rows, ["method", "step ms (median)", "time ×QLoRA", "IQR/2", "peak MiB", "of which step",
                           "memory ×QLoRA", "trainable"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
