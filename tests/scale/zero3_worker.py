"""Train SaLoRA and Delta-LoRA with `LoraForgeTrainer` under DeepSpeed ZeRO-3 on 2 gloo ranks, or as one process.

tests/scale/test_zero3_training.py runs
    python -m torch.distributed.run --nproc_per_node 2 tests/scale/zero3_worker.py OUT zero3
(every case, then the resume runs) and, at the same time, one plain process
    python tests/scale/zero3_worker.py OUT single
that trains the same cases on the whole global batch of 8 (`per_device_train_batch_size` 4 on each
rank: the Trainer's sampler gives the ranks the two halves of the batch the single process takes).

DeepSpeed runs on the CPU through its CPU accelerator (`DS_ACCELERATOR=cpu`), which uses torch's gloo
when oneCCL is absent. accelerate turns DeepSpeed on only for accelerator devices, so the worker sets
up accelerate's process state as a GPU launch would (`ACCELERATE_USE_DEEPSPEED`, backend gloo) and
hands it to the Trainer (`use_configured_state`). `stage3_param_persistence_threshold: 0` partitions
every tensor, the adapter's small ones included (DeepSpeed's default keeps tensors under 1e5
elements whole on every rank).

Each sharded run saves its adapter with `trainer.save_model()` to OUT/adapter-<run> and writes OUT/<run>.<tag>.pt: the whole adapter state (every `lora_*` parameter gathered and
buffer; for in-place Delta-LoRA the base weights gathered) and the driver's logged values after every
step. The resume runs train 4 steps with a checkpoint at step 4, then a fresh model and Trainer
resume from it (DeepSpeed's own ZeRO-3 checkpoint: partitioned fp32 weights and optimizer state)
and train steps 5..8.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import traceback

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import loraforge  # noqa: E402
from loraforge import testing  # noqa: E402
from loraforge.core import sharding  # noqa: E402
from loraforge.core.layer import ForgeLinear  # noqa: E402

GLOBAL_BATCH, MAX_STEPS, LENGTH = 8, 8, 16
TARGETS = ["q_proj", "v_proj", "up_proj"]
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "example_configs", "axolotl", "zero3",
                       "zero3.json")
ENGINES = {
    # every tensor partitioned, the adapter's too
    "zero3": {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "stage3_gather_16bit_weights_on_model_save": True},
              "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"},
    # the shipped config (Axolotl's zero3.json): the threshold is 10 x hidden size, so the adapter's tensors
    # stay whole on every rank and the base weights are partitioned
    "zero3_shipped": SHIPPED,
    # ZeRO-2: whole tensors, fp32 master partitions in the optimizer
    "zero2": {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
              "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"},
}


def config(case: str):
    if case.startswith("salora"):  # window inside the run: gates sample on steps 3..6, then freeze
        return loraforge.SaLoRAConfig(r=4, target_modules=TARGETS, window_start=2, window_end=6, gate_lr=0.05,
                                      budget_control=case.split("_", 1)[1])
    return loraforge.DeltaLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, start_step=2, update_ratio=2.0,
                                     propagation=case.split("_", 1)[1])


def dataset():
    from datasets import Dataset

    ids = torch.randint(3, 512, (GLOBAL_BATCH * MAX_STEPS, LENGTH), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * LENGTH] * len(ids), "labels": ids})


def use_deepspeed_on_cpu() -> None:
    """accelerate's process state for DeepSpeed over gloo (accelerate picks DeepSpeed only on accelerators)."""
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")


class Logged(loraforge.LoraForgeTrainer):
    """Records the driver's values after every optimizer step (a collective when sharded: every rank logs).
    Each step draws SaLoRA's gate noise from a seed of its own: DeepSpeed's setup draws from the global RNG
    and a one-process Trainer's sampler does too, so the two runs would otherwise sample other gates."""

    def __init__(self, *args, logs: list, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from transformers import TrainerCallback

        trainer = self

        class Record(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                torch.manual_seed(1000 + state.global_step)

            def on_step_end(self, args, state, control, **kwargs):
                logs.append(trainer.forge_drivers()[0].log_values())

        self.add_callback(Record())


def trainer(case: str, out: str, name: str, engine, logs: list, steps: int = MAX_STEPS, save: bool = False):
    from accelerate.state import AcceleratorState
    from peft import get_peft_model
    from transformers import TrainingArguments

    AcceleratorState._reset_state()  # one Accelerator per Trainer; the process state (gloo, DeepSpeed) stays
    world = torch.distributed.get_world_size() if engine else 1
    ds = json.load(open(ENGINES[engine])) if isinstance(ENGINES.get(engine), str) else ENGINES.get(engine)
    launch = {"deepspeed": ds, "accelerator_config": {"use_configured_state": True}} if engine else {"use_cpu": True}
    args = TrainingArguments(
        output_dir=os.path.join(out, f"run-{name}"), per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=steps, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="steps" if save else "no", save_steps=4, report_to=[], disable_tqdm=True, seed=0,
        dataloader_num_workers=0, **launch)
    model = get_peft_model(testing.tiny_llama(seed=0), config(case))
    return model, Logged(model=model, args=args, train_dataset=dataset(), logs=logs)


def adapter_state(model, case: str) -> dict:
    """Every `lora_*` tensor whole: the parameters gathered in one `sharding.gather_many` call."""
    params = {n: t for n, t in model.named_parameters() if ".lora_" in n}
    state = dict(zip(params, sharding.gather_many(list(params.values()))))
    for name, m in model.named_modules():
        if not isinstance(m, ForgeLinear):
            continue
        for n, t in m.named_buffers():
            if "lora_" in n:
                state[f"{name}.{n}"] = t.detach().clone()
        if case == "delta_in_place":  # the whole W, to compare with the single process
            state[f"{name}.base_layer.weight"] = sharding.gather(m.get_base_layer().weight).clone()
    return state


def run(case: str, engine, out: str, tag: str) -> None:
    logs: list = []
    name = f"{engine or 'single'}-{case}"
    model, tr = trainer(case, out, f"{name}-{tag}", engine, logs)
    tr.train()
    if engine:  # the adapter as `save_model` writes it: gathered by DeepSpeed, saved by rank 0
        tr.save_model(os.path.join(out, f"adapter-{name}"))
    torch.save({"state": adapter_state(model, case), "logs": logs, "steps": loraforge.driver(model).step,
                "engines": engines(model), "gathers": gather_counts(model) if engine else None},
               os.path.join(out, f"{name}.{tag}.pt"))


def engines(model) -> set:
    """The engines holding the adapter's factors and the base weights as shards now (outside the forward)."""
    layer = loraforge.driver(model).layers[0]
    return {sharding.engine(t) for t in (layer.lora_A["default"].weight, layer.get_base_layer().weight)}


def collectives(run) -> int:
    """The process group's operations (barriers excluded) that `run()` makes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    return sum(1 for e in prof.events() if e.name.startswith("gloo:") and "barrier" not in e.name)


def gather_counts(model) -> dict:
    """Collectives to gather the adapter's factors: all in one `gather_many`, and one `gather` each."""
    ts = [t for n, t in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    return {"tensors": len(ts), "sharded": sum(sharding.engine(t) is not None for t in ts),
            "gather_many": collectives(lambda: sharding.gather_many(ts)),
            "gather": collectives(lambda: [sharding.gather(t) for t in ts])}


def run_resume(case: str, engine: str, out: str, tag: str) -> None:
    """4 steps with a checkpoint at step 4 (every rank writes its partitions), then a fresh model and Trainer
    resume from it to step 8."""
    logs: list = []
    name = f"{engine}-{case}-resume"
    folder = os.path.join(out, f"run-{name}")  # shared by the ranks: DeepSpeed's checkpoint is one folder
    _, first = trainer(case, out, name, engine, logs, save=True)

    class Stop(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 4:
                control.should_training_stop = True

    first.add_callback(Stop())
    first.train()  # "killed" after the checkpoint at step 4
    del first
    model, second = trainer(case, out, name, engine, logs)
    second.train(resume_from_checkpoint=os.path.join(folder, "checkpoint-4"))
    assert loraforge.driver(model).step == MAX_STEPS
    torch.save({"state": adapter_state(model, case), "logs": logs, "steps": loraforge.driver(model).step},
               os.path.join(out, f"{name}.{tag}.pt"))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)


CASES = ["salora_paper", "salora_schedule", "delta_in_place", "delta_folded"]
RUNS = [("zero3", case) for case in CASES] + [("zero3_shipped", "salora_schedule"), ("zero3_shipped", "delta_in_place"),
                                              ("zero2", "salora_schedule")]
RESUMES = [("zero3", "salora_paper"), ("zero3", "delta_in_place"), ("zero3", "delta_folded"),
           ("zero3_shipped", "delta_in_place"), ("zero3_shipped", "salora_paper")]


def main(argv: list[str]) -> int:
    out, mode, only = argv[0], argv[1], set(argv[2:])
    sharded = mode != "single"
    if sharded:
        use_deepspeed_on_cpu()
    tag = f"rank{torch.distributed.get_rank()}" if sharded else "single"
    runs = RUNS if sharded else [(None, case) for case in CASES]
    jobs = [(f"{e or 'single'}-{c}", lambda e=e, c=c: run(c, e, out, tag)) for e, c in runs]
    if sharded:
        jobs += [(f"{e}-{c}-resume", lambda e=e, c=c: run_resume(c, e, out, tag)) for e, c in RESUMES]
    for name, job in jobs:
        if only and name not in only:
            continue
        try:
            job()
        except Exception:  # reported per case by the test
            with open(os.path.join(out, f"{name}.{tag}.error"), "w") as f:
                f.write(traceback.format_exc())
    if sharded:
        torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    from two_ranks import exit_without_finalising

    exit_without_finalising(main(sys.argv[1:]))
