"""Step time and training memory of SaLoRA vs plain PEFT LoRA, side by side in one process.

Same model (a small random Llama), same targets, rank, batch and optimizer (AdamW). Variants:
`lora` (peft.LoraConfig), `salora_before` (before the window: g = 1, orthogonal term on),
`salora_inside` (inside the window: Hard-Concrete sample per forward, orthogonal + budget terms,
λ ascent after each step) and `salora_after` (gates frozen: fixed gate, orthogonal term on).
One optimizer step of each variant in turn, repeated; the median step time of each is reported as a
ratio to `lora`'s. Memory: on CUDA the peak allocated memory of a step; on CPU (where no allocator
statistic exists) the bytes a step holds for backward (saved activations, counted once per storage,
parameters excluded) plus the bytes of trainable parameters, their gradients and AdamW's state.

Run: python benchmarks/bench_salora.py [--hidden 256 --layers 4 --seq 128 --batch 8 --rounds 30]
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

import torch
from peft import LoraConfig, get_peft_model

import loraforge
from loraforge import testing
from loraforge.salora import prune
from loraforge.salora.config import DEFAULT_TARGET_MODULES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import AllocationTrace, MiB, median, pick_device, timed  # noqa: E402

FAR = 10**9


class SavedBytes:
    """Bytes of the tensors autograd saves for backward, each storage once, parameters excluded."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen, self.total = set(), 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def build(variant: str, args):
    model = testing.tiny_llama(0, hidden=args.hidden, layers=args.layers).to(args.device)
    targets = list(DEFAULT_TARGET_MODULES)
    if variant == "lora":
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets))
        return model, None, [p for p in model.parameters() if p.requires_grad]
    start, end = {"salora_before": (FAR - 1, FAR), "salora_inside": (0, FAR), "salora_after": (0, FAR)}[variant]
    model = get_peft_model(model, loraforge.SaLoRAConfig(r=args.r, lora_alpha=2 * args.r, target_modules=targets,
                                                         window_start=start, window_end=end))
    driver = loraforge.driver(model).begin(max_steps=FAR)
    if variant == "salora_after":
        prune(model)
    gates = driver.param_groups(args.lr, 0.0)
    taken = {id(p) for g in gates for p in g["params"]}
    return model, driver, [{"params": [p for p in model.parameters() if p.requires_grad and id(p) not in taken]}, *gates]


def state_bytes(model, optimizer) -> int:
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return 2 * trainable + opt  # parameters + gradients + AdamW moments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cuda = device.type == "cuda"

    variants = ["lora", "salora_before", "salora_inside", "salora_after"]
    runs = {}
    for v in variants:
        model, driver, params = build(v, args)
        runs[v] = {"model": model.train(), "driver": driver, "opt": torch.optim.AdamW(params, lr=args.lr),
                   "times": [], "mem": []}
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 512, (args.batch, args.seq), generator=gen).to(device) for _ in range(4)]

    def step(run, x, saved: SavedBytes | None = None) -> None:
        model, driver, opt = run["model"], run["driver"], run["opt"]
        with saved.hooks() if saved else nullcontext():  # only the forward saves tensors for backward
            loss = model(input_ids=x, labels=x).loss
            if driver is not None:
                loss = loss + driver.regularization_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def memory(run, x) -> int:
        if cuda:  # absolute peak: the other variants' models stay resident and count too
            held = torch.cuda.memory_allocated(device)
            with AllocationTrace(device) as trace:
                step(run, x)
            return held + trace.peak
        saved = SavedBytes(run["model"])
        step(run, x, saved)
        return saved.total + state_bytes(run["model"], run["opt"])

    for i in range(args.warmup + args.rounds):
        for v in variants:  # one step of each variant in turn, so drifts in machine load hit all alike
            elapsed = timed(lambda: step(runs[v], batches[i % len(batches)]), device)
            if i >= args.warmup:
                runs[v]["times"].append(elapsed)
    for v in variants:  # memory in a separate pass: the saved-tensor hooks cost time
        runs[v]["mem"] = memory(runs[v], batches[0])

    base_t = median(runs["lora"]["times"])
    base_m = runs["lora"]["mem"]
    what = "peak CUDA memory" if cuda else "saved activations + params/grads/AdamW state"
    print(f"device {args.device}, threads {args.threads}, hidden {args.hidden}, layers {args.layers}, seq {args.seq}, "
          f"batch {args.batch}, r {args.r}, {args.rounds} alternating rounds")
    print(f"{'variant':>14}  {'median step':>11}  {'time ratio':>10}  {what:>44}  {'memory ratio':>12}")
    for v in variants:
        t, m = median(runs[v]["times"]), runs[v]["mem"]
        print(f"{v:>14}  {t * 1000:>9.1f}ms  {t / base_t:>10.3f}  {m / MiB:>42.2f}MB  {m / base_m:>12.3f}")


if __name__ == "__main__":
    main()
