"""Step time of SaLoRA and Delta-LoRA under DDP, FSDP2, FSDP1 and DeepSpeed ZeRO-3, as ratios to plain
PEFT LoRA trained under the same engine and config, side by side in one launch, and the collectives
each step runs.

    python -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_fsdp.py --preset cpu
    DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 benchmarks/bench_fsdp.py --engines zero3
    torchrun --nproc_per_node 8 benchmarks/bench_fsdp.py --preset gpu      # one node of GPUs, NCCL

Per engine, the methods run round-robin (`--rounds` rounds of `--steps` timed AdamW steps after
`--warmup`), each round's time is the slowest rank's wall time (barrier before and after), and the
table prints the median over rounds of each method's time divided by LoRA's of the same round.
The hand loop is the one `LoraForgeTrainer` runs (loss + `regularization_loss()`, driver param
groups); SaLoRA (the default "schedule" budget control; salora_paper: "paper") is timed inside its
window (gates sampled, density and budget work), where it does the most work. What sharding adds for
the methods is in `core/sharding.py`: SaLoRA reads its A, B (and, "paper", its logits) for the loss in
one all-gather per step (FSDP2; FSDP1 reuses the forward's), the schedule control gathers all logits
once after the step; in-place Delta-LoRA gathers all A and B once after the step and writes only the
rank's elements of W.
ZeRO-3 runs DeepSpeed's engine (`deepspeed.initialize`, its `backward` and `step`) with the
persistence threshold Axolotl's zero3.json gives ("auto": 10 x hidden size), so small adapter
tensors stay whole on every rank and the rest is partitioned. "collectives/step" counts the
process group's operations (gloo / NCCL, barriers excluded) in one step after the timed rounds; in
brackets those inside loraforge's loss term and, under ZeRO-3, its post-step work (under DDP / FSDP
the post-step work runs inside the optimizer's step and is not bracketed); "vs LoRA": what the method
adds to LoRA's (2 of them, under DDP / FSDP, the non-finite guard's, before and after the step).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import median, table  # noqa: E402

PRESETS = {
    # 12.6 M-parameter Llama as in bench_all's CPU preset, fp32, all seven linears, r=8.
    "cpu": dict(hidden=256, layers=4, heads=8, kv=4, inter=688, vocab=2048, batch=2, seq=64, dtype="float32",
                steps=3, warmup=2, rounds=3, device="cpu", backend="gloo"),
    # 1B-class Llama shape, bf16, seq 1024 (per rank batch 4).
    "gpu": dict(hidden=2048, layers=16, heads=32, kv=8, inter=5632, vocab=32000, batch=4, seq=1024, dtype="bfloat16",
                steps=10, warmup=3, rounds=5, device="cuda", backend="nccl"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
METHODS = ["lora", "salora", "salora_paper", "delta_folded", "delta_in_place"]
ENGINES = ["ddp", "fsdp2", "fsdp1", "zero3"]


def zero3_config(p: dict) -> dict:
    return {"train_micro_batch_size_per_gpu": p["batch"], "gradient_accumulation_steps": 1,
            "bf16": {"enabled": p["dtype"] == "bfloat16"},
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 10 * p["hidden"]}}


def adapter_config(method: str, steps: int):
    import loraforge
    from peft import LoraConfig

    common = dict(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0)
    if method == "lora":
        return LoraConfig(**common)
    if method.startswith("salora"):  # window over the whole run: every timed step is inside it
        budget = dict(budget_control="paper" if method == "salora_paper" else "schedule")
        return loraforge.SaLoRAConfig(**common, window_start=0, window_end=10 ** 6, **budget)
    return loraforge.DeltaLoRAConfig(**common, start_step=0, update_ratio=2.0, propagation=method.split("_", 1)[1])


def build(method: str, engine: str, p: dict, device: torch.device):
    import loraforge
    from peft import get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["inter"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                      max_position_embeddings=p["seq"], tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(getattr(torch, p["dtype"])).to(device)
    peft_model = get_peft_model(model, adapter_config(method, p["steps"]))
    if engine == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(peft_model, find_unused_parameters=method.startswith("salora"))
    elif engine == "fsdp2":
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        for layer in peft_model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(peft_model, mesh=mesh)
    elif engine == "fsdp1":
        wrapped = FullyShardedDataParallel(peft_model, use_orig_params=True, device_id=device,
                                           auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))
    else:  # zero3: DeepSpeed wraps the model and the optimizer together, below
        wrapped = peft_model
    driver = None
    if method != "lora":
        driver = loraforge.driver(wrapped)
        driver.begin(10 ** 6)
    special = driver.param_groups(1e-4, 0.0) if driver else []
    taken = {id(q) for g in special for q in g["params"]}
    rest = [q for q in wrapped.parameters() if q.requires_grad and id(q) not in taken]
    opt = torch.optim.AdamW([{"params": rest}, *special], lr=1e-4, weight_decay=0.0)
    if engine == "zero3":
        import deepspeed

        wrapped, opt, _, _ = deepspeed.initialize(model=peft_model, optimizer=opt, config=zero3_config(p))
    return wrapped, driver, opt


def step(wrapped, driver, opt, ids) -> None:
    loss = wrapped(input_ids=ids, labels=ids).loss
    with torch.profiler.record_function("loraforge"):
        reg = driver.regularization_loss() if driver else None
    loss = loss if reg is None else loss + reg
    if hasattr(wrapped, "zero_optimization_stage"):  # a DeepSpeed engine steps its own optimizer
        done = driver.step if driver else 0
        wrapped.backward(loss)
        wrapped.step()
        if driver and driver.step == done:  # its optimizer steps fp32 partitions: no hook saw the adapter
            with torch.no_grad(), torch.profiler.record_function("loraforge"):
                driver.on_step_end()
        return
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def collectives(run) -> tuple[int, int]:
    """The process group's operations (gloo / NCCL, barriers excluded) that one call of `run` makes, and how
    many of them loraforge's loss term and (under ZeRO-3) its post-step work make themselves."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    events = prof.events()
    ours = [e.time_range for e in events if e.name == "loraforge"]
    ops = [e.time_range for e in events if e.name.startswith(("gloo:", "nccl:")) and "barrier" not in e.name]
    return len(ops), sum(1 for t in ops if any(o.start <= t.start <= o.end for o in ours))


def timed_steps(run, n: int, device) -> float:
    torch.distributed.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
    return float(elapsed) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=ENGINES)
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args()
    p = dict(PRESETS[args.preset])
    if args.rounds:
        p["rounds"] = args.rounds
    torch.distributed.init_process_group(p["backend"])
    rank = torch.distributed.get_rank()
    device = torch.device(p["device"], int(os.environ.get("LOCAL_RANK", 0))) if p["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, p["vocab"], (p["batch"], p["seq"]), generator=gen).to(device)
    rows, base = [], {}
    for engine in args.engines:
        built = {m: build(m, engine, p, device) for m in METHODS}
        runs = {m: (lambda b=b: step(*b, ids)) for m, b in built.items()}
        for m in METHODS:
            timed_steps(runs[m], p["warmup"], device)
        times = {m: [] for m in METHODS}
        for _ in range(p["rounds"]):
            for m in METHODS:
                times[m].append(timed_steps(runs[m], p["steps"], device))
        base[engine] = median(times["lora"])
        counts = {m: collectives(runs[m]) for m in METHODS}
        for m in METHODS:
            ratios = [t / ref for t, ref in zip(times[m], times["lora"])]
            rows.append([engine, m, f"{median(ratios):.3f}", f"{median(times[m]) * 1e3:.1f}", "%d (%d)" % counts[m],
                         f"{counts[m][0] - counts['lora'][0]:+d}"])
        del built, runs
    if rank == 0:
        world = torch.distributed.get_world_size()
        print(f"preset {args.preset}: {world} ranks ({p['backend']}), batch {p['batch']}x{p['seq']} per rank, "
              f"{p['dtype']}, r=8 on {len(TARGETS)} linears x {p['layers']} layers; median of {p['rounds']} rounds")
        print(table(rows, ["engine", "method", "step time x LoRA (same engine)", "ms/step",
                           "collectives/step (loraforge's own)", "vs LoRA"]))
        for engine in args.engines[1:]:
            print(f"LoRA under {engine} vs ddp: {base[engine] / base[args.engines[0]]:.3f}x")
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
