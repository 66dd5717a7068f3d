"""Train SaLoRA and Delta-LoRA sharded by FSDP2 / FSDP1 on 2 gloo ranks, or as one process.

tests/scale/test_fsdp_sharded_training.py runs
    python -m torch.distributed.run --nproc_per_node 2 tests/scale/fsdp_worker.py OUT sharded
(every case under every engine, then the resume runs; mode "hybrid" with --nproc_per_node 4: HSDP and
HYBRID_SHARD, 2 replicas of a 2-way sharding) and, at the same time, one plain process
    python tests/scale/fsdp_worker.py OUT single
that trains the same cases unsharded on the whole global batch. HF Trainer cannot shard on a CPU
(accelerate enables FSDP only for accelerator devices), so the loop is written out here the way
`LoraForgeTrainer` drives it: `driver.begin(max_steps)`, the loss plus `regularization_loss()`,
AdamW over the default group and the driver's `param_groups`. Rank r of k takes rows
[r·8/k, (r + 1)·8/k) of each global batch of 8 (equal token counts, so the mean of the ranks' mean
losses is the global mean loss that the engines' averaged gradients follow).

Each run writes OUT/<engine>-<case>.<tag>.pt: the whole adapter state (every `lora_*` parameter
gathered and buffer: factors, gate logits, frozen gates, λ, window, snapshots, step counters; for
in-place Delta-LoRA the base weights gathered), and the driver's logged values after every step.
Resume (FSDP2): fsdp2-<case>-resume trains 4 steps, writes a sharded DCP checkpoint (model and
optimizer; -resume-full: full state dicts) and drops the model; a fresh model loads it and trains
steps 5..8.
"""
from __future__ import annotations

import gc
import os
import sys
import traceback

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

import loraforge  # noqa: E402
from loraforge import testing  # noqa: E402
from loraforge.core import sharding  # noqa: E402
from loraforge.core.layer import ForgeLinear  # noqa: E402

GLOBAL_BATCH, MAX_STEPS, LENGTH = 8, 8, 16
TARGETS = ["q_proj", "v_proj", "up_proj"]
START_STEP = {"delta_in_place": 2, "delta_folded": 2}
#: Steps of a case's run when not MAX_STEPS: the default SaLoRA window (0.2-0.5 of the run) spans steps 13..32.
STEPS = {"salora_schedule": 64}


def steps_of(case: str) -> int:
    return STEPS.get(case, MAX_STEPS)


def config(case: str):
    if case == "salora":  # window inside the run: gates sample on steps 3..6, λ ascends, then the gates freeze
        return loraforge.SaLoRAConfig(r=4, target_modules=TARGETS, window_start=2, window_end=6, gate_lr=0.05,
                                      budget_control="paper")
    if case == "salora_schedule":  # the defaults (window 0.2-0.5 of the run) with the schedule control, which lands C on b
        return loraforge.SaLoRAConfig(target_modules=TARGETS, budget_control="schedule")
    return loraforge.DeltaLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, start_step=START_STEP[case],
                                     update_ratio=2.0, propagation=case.split("_", 1)[1])


def batches(steps: int = MAX_STEPS):
    gen = torch.Generator().manual_seed(0)
    return torch.randint(3, 512, (steps, GLOBAL_BATCH, LENGTH), generator=gen)


def shard(model, engine: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy, fully_shard
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    world = torch.distributed.get_world_size()
    if engine in ("fsdp2", "fsdp2_hsdp"):  # HSDP: 2 replicas of a 2-way sharding (a 2-D mesh)
        mesh = (init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) if engine == "fsdp2_hsdp"
                else init_device_mesh("cpu", (world,)))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)
    strategy = {"fsdp1": ShardingStrategy.FULL_SHARD, "fsdp1_grad_op": ShardingStrategy.SHARD_GRAD_OP,
                "fsdp1_hybrid": ShardingStrategy.HYBRID_SHARD}[engine]
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard")) if engine == "fsdp1_hybrid" else None
    return FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"), device_mesh=mesh,
                                    sharding_strategy=strategy, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}))


def build(case: str, engine: str | None):
    from peft import get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(testing.tiny_llama(seed=0), config(case))
    wrapped = shard(peft_model, engine) if engine else peft_model
    driver = loraforge.driver(wrapped)
    driver.begin(steps_of(case))
    special = driver.param_groups(1e-2, 0.0)
    taken = {id(p) for g in special for p in g["params"]}
    rest = [p for p in wrapped.parameters() if p.requires_grad and id(p) not in taken]
    opt = torch.optim.AdamW([{"params": rest}, *special], lr=1e-2, weight_decay=0.0)
    return peft_model, wrapped, driver, opt


def train(wrapped, driver, opt, steps: range, rows: slice, logs: list) -> None:
    """`logs`: per step the driver's logged values and, sharded, the collectives this rank called in
    `regularization_loss()` (`collectives/loss`) and in the optimizer step with its post-step work
    (`collectives/step`), the engine's own there included."""
    data = batches(steps.stop)
    sharded = torch.distributed.is_initialized()
    for step in steps:
        ids = data[step, rows]
        loss = wrapped(input_ids=ids, labels=ids).loss
        with testing.CollectiveCounter() as in_loss:
            reg = driver.regularization_loss()
        (loss if reg is None else loss + reg).backward()
        with testing.CollectiveCounter() as in_step:
            opt.step()
        opt.zero_grad()
        logs.append(driver.log_values())  # a collective when sharded: every rank logs
        if sharded:
            logs[-1].update({"collectives/loss": in_loss.count, "collectives/step": in_step.count})


def _clean(name: str) -> str:
    return name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")


def adapter_state(peft_model, case: str) -> dict:
    state = {}
    for name, m in peft_model.named_modules():
        if not isinstance(m, ForgeLinear):
            continue
        for n, t in m.named_parameters():
            if "lora_" in n:
                state[f"{_clean(name)}.{n}"] = sharding.gather(t).clone()
        for n, t in m.named_buffers():
            if "lora_" in n:
                state[f"{_clean(name)}.{n}"] = t.detach().clone()
        if case == "delta_in_place":  # test only: the whole W, to compare with the single process
            w = m.get_base_layer().weight
            state[f"{_clean(name)}.base_layer.weight"] = (w.full_tensor() if sharding.engine(w) == "fsdp2"
                                                          else sharding.gather(w)).clone()
    return state


def save_adapter(peft_model, wrapped, path: str) -> None:
    """What `trainer.save_model()` does under FSDP with FULL_STATE_DICT (accelerate's
    `get_state_dict`: the full state dict gathered to CPU; `save_pretrained` on the main process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload=False: the tensors are on the CPU already (FSDP1 with cpu_offload=True crashes on CPU in torch 2.13)
    sd = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
    if torch.distributed.get_rank() == 0:
        peft_model.save_pretrained(path, state_dict=sd)
    torch.distributed.barrier()


def run(case: str, engine: str | None, out: str, tag: str) -> None:
    world = torch.distributed.get_world_size() if engine else 1
    rank = torch.distributed.get_rank() if engine else 0
    per = GLOBAL_BATCH // world
    peft_model, wrapped, driver, opt = build(case, engine)
    logs: list = []
    train(wrapped, driver, opt, range(steps_of(case)), slice(rank * per, rank * per + per), logs)
    if engine:
        save_adapter(peft_model, wrapped, os.path.join(out, f"adapter-{engine}-{case}"))
    torch.save({"state": adapter_state(peft_model, case), "logs": logs, "steps": driver.step},
               os.path.join(out, f"{engine or 'single'}-{case}.{tag}.pt"))


def run_resume(case: str, engine: str, out: str, tag: str, full: bool = False) -> None:
    """Train 4 steps and checkpoint (a sharded DCP checkpoint, or with `full` a full state dict that
    every rank reads); a fresh model loads it and trains to the end."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    rank, per = torch.distributed.get_rank(), GLOBAL_BATCH // torch.distributed.get_world_size()
    rows = slice(rank * per, rank * per + per)
    ckpt = os.path.join(out, f"ckpt-{engine}-{case}-{'full' if full else 'sharded'}")
    logs: list = []
    first, wrapped, driver, opt = build(case, engine)
    train(wrapped, driver, opt, range(4), rows, logs)
    model_sd, optim_sd = get_state_dict(wrapped, opt, options=StateDictOptions(full_state_dict=full))
    rng = torch.get_rng_state()
    if full:
        if rank == 0:
            torch.save({"model": model_sd, "optim": optim_sd}, ckpt + ".pt")
    else:
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
    torch.distributed.barrier()
    del first, wrapped, driver, opt, model_sd, optim_sd
    gc.collect()

    peft_model, wrapped, driver, opt = build(case, engine)  # a fresh model: nothing carried over in memory
    if full:
        sd = torch.load(ckpt + ".pt", weights_only=False)
        options = StateDictOptions(full_state_dict=True)
    else:
        sd = dict(zip(("model", "optim"), get_state_dict(wrapped, opt)))
        dcp.load(sd, checkpoint_id=ckpt)
        options = StateDictOptions()
    set_state_dict(wrapped, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"], options=options)
    torch.set_rng_state(rng)
    driver.begin(MAX_STEPS)  # as the trainer does on resume
    assert driver.step == 4, driver.step
    train(wrapped, driver, opt, range(4, MAX_STEPS), rows, logs)
    torch.save({"state": adapter_state(peft_model, case), "logs": logs, "steps": driver.step},
               os.path.join(out, f"{engine}-{case}-resume{'-full' if full else ''}.{tag}.pt"))


def run_resume_full(case: str, engine: str, out: str, tag: str) -> None:
    run_resume(case, engine, out, tag, full=True)


GATHER_SHAPES = [(5, 3), (1,), (7,), (2, 4)]  # rows not divisible by 2; ranks holding nothing of a tensor


def run_gathers(case: str, engine: str, out: str, tag: str) -> None:
    """`gather_many` of tensors of odd shapes sharded by `engine` (FSDP2: rows 3 + 2, 1 + 0, ...; FSDP1: the
    31 elements cut at 16, so rank 0 holds nothing of the last two tensors and rank 1 nothing of the first
    two), and under FSDP2 the gradient `whole_many`'s backward hands each shard, with the collectives each
    call made. The values are known: tensor k holds 100·k + its row-major index."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    holder = torch.nn.Module()
    holder.ps = torch.nn.ParameterList(torch.nn.Parameter(torch.arange(float(torch.Size(s).numel())).view(s) + 100 * k)
                                       for k, s in enumerate(GATHER_SHAPES))
    if engine == "fsdp2":
        fully_shard(holder)
    else:
        sharding.register(FullyShardedDataParallel(holder, use_orig_params=True, device_id=torch.device("cpu")))
    params = list(holder.ps)
    result: dict = {"held": [sharding.engine(p) for p in params]}
    for name in ("first", "again"):
        with testing.CollectiveCounter() as n:
            result[name] = [t.clone() for t in sharding.gather_many(params)]
        result[f"collectives/{name}"] = n.count
    if engine == "fsdp2":
        with testing.CollectiveCounter() as n:
            wholes = sharding.Fsdp2.whole_many(params)
        result["collectives/whole"] = n.count
        sum((k + 1) * (w * w).sum() for k, w in enumerate(wholes)).backward()  # d/dw = 2 (k + 1) w
        result["grads"] = [p.grad.full_tensor() for p in params]
    torch.save(result, os.path.join(out, f"{engine}-gathers.{tag}.pt"))


CASES = ["salora", "delta_in_place", "delta_folded", "salora_schedule"]
ENGINES = ["fsdp2", "fsdp1"]
#: On 4 ranks (mode "hybrid"): 2 replicas of a 2-way sharding.
HYBRID = [(engine, case) for engine in ("fsdp2_hsdp", "fsdp1_hybrid") for case in ("salora_schedule", "delta_in_place")]
# Every case from a sharded FSDP2 checkpoint; the other engine x state-dict kinds once each.
RESUMES = [(case, "fsdp2", "run_resume") for case in ("salora", "delta_in_place", "delta_folded")] + [
    ("salora", "fsdp2", "run_resume_full"), ("salora", "fsdp1", "run_resume"),
    ("delta_in_place", "fsdp1", "run_resume_full")]


def main(argv: list[str]) -> int:
    out, mode, only = argv[0], argv[1], set(argv[2:])
    resumes = [(case, engine, globals()[fn]) for case, engine, fn in RESUMES]
    if mode == "single":
        jobs = [(case, None, run) for case in CASES]
        tag = "single"
    elif mode == "hybrid":
        torch.distributed.init_process_group("gloo")
        tag = f"rank{torch.distributed.get_rank()}"
        jobs = [(case, engine, run) for engine, case in HYBRID]
    else:
        torch.distributed.init_process_group("gloo")
        tag = f"rank{torch.distributed.get_rank()}"
        jobs = [(case, engine, run) for engine in ENGINES for case in CASES]
        jobs += [(case, "fsdp1_grad_op", run) for case in ("salora", "delta_in_place", "salora_schedule")]
        jobs += resumes + [(None, engine, run_gathers) for engine in ENGINES]
    for case, engine, fn in jobs:
        name = (f"{engine}-gathers" if fn is run_gathers else
                f"{engine or 'single'}-{case}" + {run_resume: "-resume", run_resume_full: "-resume-full"}.get(fn, ""))
        if only and name not in only:
            continue
        try:
            fn(case, engine, out, tag)
        except Exception:  # reported per case by the test
            with open(os.path.join(out, f"{name}.{tag}.error"), "w") as f:
                f.write(traceback.format_exc())
    if mode != "single":
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    from two_ranks import exit_without_finalising

    exit_without_finalising(main(sys.argv[1:]))
