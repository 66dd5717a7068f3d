"""Train loraforge adapters with `LoraForgeTrainer`, on one process or as one rank of a DDP run.

tests/scale/test_ddp_multiprocess.py runs it twice at once:
    accelerate launch --multi_gpu --num_processes 2 tests/scale/ddp_worker.py OUT CASE... sharded
(accelerate's torchrun launcher; `use_cpu=True, ddp_backend="gloo"` make it DDP on CPU; each rank
takes `per_device_train_batch_size = GLOBAL_BATCH // 2`) and as a plain process
    python tests/scale/ddp_worker.py OUT CASE...
(one process, the whole global batch). Each run writes `OUT/<case>.rank<r>.pt` (or `.single.pt`):
the adapter's persisted state (factors, gates, λ, window, snapshots, step counters), the base
weights of the adapted layers, the driver's logged values and the examples every optimizer step
saw. A case that raises writes its traceback instead, so one failing method does not hide the
others. `sharded` (ranks only) records what each method does under FSDP2 and FSDP1.
"""
from __future__ import annotations

import hashlib
import os
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # probe.py (tests/)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import loraforge  # noqa: E402
from loraforge import testing  # noqa: E402

GLOBAL_BATCH = 8
MAX_STEPS = 8
TARGETS = ["q_proj", "v_proj", "up_proj"]


def _probe(basis):
    from probe import ProbeConfig

    return ProbeConfig(target_modules=TARGETS)


def _salora(basis):
    # Window inside the run (steps 3..6 of 8): gates sample and train, λ ascends, then the gates freeze.
    return loraforge.SaLoRAConfig(r=4, target_modules=TARGETS, window_start=2, window_end=6, gate_lr=0.05)


def _delta(propagation):
    def make(basis):
        return loraforge.DeltaLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, start_step=2, update_ratio=2.0,
                                         propagation=propagation)
    return make


def _cora_fb(basis):
    return loraforge.CoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, basis_path=basis, freeze_b=True)


def _delta_k0():
    return loraforge.DeltaLoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, start_step=0, propagation="in_place")


CASES = {
    "probe": _probe,
    "salora": _salora,
    "delta_in_place": _delta("in_place"),
    "delta_folded": _delta("folded"),
    "cora_fb": _cora_fb,
}


def write_basis(path: str, rank: int = 6) -> str:
    """A CoRA basis written by hand in its key scheme: per adapted module (its path in the base
    model), d_out × rank orthonormal columns (QR of a seeded Gaussian), the same on every rank."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    bases = {}
    for name, module in testing.tiny_llama(seed=0).named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            q, _ = torch.linalg.qr(torch.randn(module.out_features, rank, generator=gen))
            bases[name] = q.contiguous()
    save_file(bases, path)
    return path


def random_tokens(n: int, length: int = 32):
    """n distinct seeded token sequences (the Alpaca set cut to a short length would repeat its
    prompt header in every row, and the data-order check needs distinct examples)."""
    from datasets import Dataset

    ids = torch.randint(3, 512, (n, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * n, "labels": ids})


def _fingerprint(row: torch.Tensor) -> str:
    return hashlib.sha1(row.cpu().numpy().tobytes()).hexdigest()[:12]


def run_case(name: str, out_dir: str, per_device_batch: int, tag: str) -> None:
    from peft import get_peft_model
    from transformers import TrainingArguments

    from loraforge.core.layer import ForgeLinear

    # Each process writes its own basis file: no two processes write one file.
    config = CASES[name](write_basis(os.path.join(out_dir, f"basis.{tag}.safetensors")))
    data = random_tokens(GLOBAL_BATCH * MAX_STEPS)
    model = get_peft_model(testing.tiny_llama(seed=0), config)
    seen: list[list[str]] = []

    class Recording(loraforge.LoraForgeTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            seen.append([_fingerprint(r) for r in inputs["input_ids"]])
            return super().training_step(model, inputs, *args, **kwargs)

    args = TrainingArguments(
        output_dir=os.path.join(out_dir, f"run-{name}-{tag}"), per_device_train_batch_size=per_device_batch,
        max_steps=MAX_STEPS, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
        **({"ddp_backend": "gloo"} if tag != "single" else {}))
    trainer = Recording(model=model, args=args, train_dataset=data)
    trainer.train()

    # Everything the adapter persists (factors, gate logits, frozen gates, λ, window, snapshots, step
    # counters) is a `lora_*` parameter or buffer; in-place Delta-LoRA also writes the base weights.
    state = {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()] if ".lora_" in n}
    for n, m in model.named_modules():
        if isinstance(m, ForgeLinear):
            state[f"{n}.base_layer.weight"] = m.get_base_layer().weight.detach().clone()
    result = {
        "state": state,
        "logs": loraforge.driver(model).log_values(),
        "steps": loraforge.driver(model).step,
        "seen": seen,
        "world_size": trainer.args.world_size,
    }
    torch.save(result, os.path.join(out_dir, f"{name}.{tag}.pt"))


def run_sharded(out_dir: str, tag: str) -> None:
    """Shard the tiny model with FSDP2 (`fully_shard`) or FSDP1 (flat parameters) over gloo and record
    what each method does: every method trains (tests/scale/test_fsdp_sharded_training.py checks the results)."""
    import json

    import torch.distributed as dist
    from peft import get_peft_model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def fsdp2(model):
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    def fsdp1(model):
        return FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))

    def whole(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    basis = write_basis(os.path.join(out_dir, f"basis-sharded.{tag}.safetensors"))
    ids = torch.tensor(random_tokens(2)["input_ids"])
    outcome = {}
    for name, shard, early_driver in [("delta_in_place", fsdp2, False), ("delta_in_place", fsdp2, True),
                                      ("delta_folded", fsdp2, False), ("salora", fsdp2, False),
                                      ("cora_fb", fsdp2, False), ("delta_in_place", fsdp1, False),
                                      ("cora_fb", fsdp1, False), ("delta_k0", fsdp1, False)]:
        # delta_k0: K = 0, so the snapshot is read from the FSDP1 shards when the driver is made, before
        # any forward (before FSDP1's lazy initialisation).
        config = _delta_k0() if name == "delta_k0" else CASES[name](basis)
        if name == "salora":
            config.budget_control = "paper"  # the schedule control is refused on sharded gate logits
        model = get_peft_model(testing.tiny_llama(seed=0), config)
        if early_driver:  # made before sharding: must still find the sharded parameters
            loraforge.driver(model).begin(MAX_STEPS)
        wrapped = shard(model)
        opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
        before = [whole(p.detach()).clone() for p in wrapped.parameters() if p.requires_grad]
        key = f"{shard.__name__}/{name}{'+driver_before_sharding' if early_driver else ''}"
        try:
            if not early_driver:
                loraforge.driver(wrapped).begin(MAX_STEPS)
            for _ in range(2):
                wrapped(input_ids=ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad()
            outcome[key] = {"trained": True, "step": loraforge.driver(model).step}
        except RuntimeError as error:
            after = [whole(p.detach()) for p in wrapped.parameters() if p.requires_grad]
            outcome[key] = {"trained": False, "error": str(error),
                            "unchanged": all(torch.equal(a, b) for a, b in zip(before, after))}
    with open(os.path.join(out_dir, f"sharded.{tag}.json"), "w") as f:
        json.dump(outcome, f, indent=1)


def main(argv: list[str]) -> int:
    out_dir, names = argv[0], argv[1:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    tag = f"rank{rank}" if world > 1 else "single"
    for name in names:
        if name == "sharded" and world == 1:
            continue  # sharding needs more than one rank
        try:
            if name == "sharded":
                run_sharded(out_dir, tag)
            else:
                run_case(name, out_dir, GLOBAL_BATCH // world, tag)
        except Exception:  # reported per case by the test
            with open(os.path.join(out_dir, f"{name}.{tag}.error"), "w") as f:
                f.write(traceback.format_exc())
    return 0


if __name__ == "__main__":
    from two_ranks import exit_without_finalising

    exit_without_finalising(main(sys.argv[1:]))
