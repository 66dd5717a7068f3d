"""Does each method help? Every adapter trained the same way on SmolLM2-135M-Instruct and human data.

Task "yelp": supervised sentiment transfer on the shipped human rewrites, both directions pooled
(`quality_data.py`: fixed splits, 400 train / 80 test pairs); score: held-out NLL per response
token (all test responses, and per direction). Every system sees the same batches in the same
order for a seed, the same number of steps, a constant learning rate from the same grid (each
system is reported at its best one), AdamW without weight decay.

Task "alpaca" (`--task alpaca`): instruction tuning on alpaca_mini's fixed train split; scores: the
held-out NLL on its test split and, as the SaLoRA paper's zero-shot style-transfer protocol in
miniature, the NLL of the Yelp test rewrites under the instruction-tuned model (`zero_shot_yelp`).

Systems (`SYSTEMS`): the base model; PEFT LoRA r=8 and r=4 (r=4 holds what SaLoRA keeps at its
default target density 0.5); PEFT AdaLoRA r 8 -> 4 over the same window as SaLoRA, with
`update_and_allocate` called after every step and its orthogonal term in the loss; SaLoRA with the
"schedule" and "paper" budget control; Delta-LoRA (folded) at λ = 0.5 and 2; CoRA FB and TB on a
basis that `loraforge cora-extract` writes from three LoRA fine-tunes of SmolLM2 made here (Yelp
neg2pos only, Yelp pos2neg only, alpaca_mini), from their weight deltas.

Run order, so that a cut-short run still has the most useful rows: the base model; the CoRA
fine-tunes; seed 0 at every grid lr for the main systems, and one lr a grid step beyond the grid's
edge for a system whose best grid lr is on that edge; the other seeds at each main system's best
lr (the probes, `PROBES`: one setting of a main system changed, run at that system's best lr, seed
0 before these seeds and the others after); then the same as the main systems for the extra
systems. Every finished run is one JSON line in `--out`; a rerun skips the runs already there
(resumable). `quality_report.py` renders the table and plot.

Run: OMP_NUM_THREADS=1 python benchmarks/quality.py [--task yelp] [--quick] [--seeds 0 1 2] [--steps 24]
     [--lrs 1e-3 3e-3] [--systems lora8 ...] [--out benchmarks/results/quality.jsonl]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_data as qd  # noqa: E402
import quality_style  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MAIN = ["lora8", "lora4", "salora_paper", "salora", "adalora", "delta0.5", "cora_fb", "cora_tb"]
EXTRA = ["delta2"]
#: One-factor probes of a main system, run at that system's best lr (cause measurements, not a sweep).
PROBES = {"salora_b0": "salora", "salora_d1": "salora", "salora_w10_30": "salora", "salora_w20_30": "salora",
          "salora_w50_80": "salora", "salora_glr1": "salora", "cora_fb_alpaca": "cora_fb"}
#: The one setting each SaLoRA probe changes from `salora` (the "schedule" control); windows are shares of
#: the run: gates on steps 3-7, 6-7 and 13-19 of 24.
SALORA_PROBES = {"salora_b0": dict(orth_reg_weight=0.0), "salora_d1": dict(target_density=1.0),
                 "salora_w10_30": dict(window_start=0.1, window_end=0.3),
                 "salora_w20_30": dict(window_start=0.2, window_end=0.3),
                 "salora_w50_80": dict(window_start=0.5, window_end=0.8), "salora_glr1": dict(gate_lr=1.0)}
SYSTEMS = ["base", *MAIN, *PROBES, *EXTRA]
BASIS_SOURCES = {"ft_neg2pos": "neg2pos", "ft_pos2neg": "pos2neg", "ft_alpaca": "alpaca"}


def adapter_config(system: str, steps: int, basis: str | None):
    """The adapter of `system` for a run of `steps` steps (windows and K scale with the run)."""
    import loraforge
    from peft import AdaLoraConfig, LoraConfig

    start, end = round(0.2 * steps), round(0.5 * steps)
    if system.startswith("lora"):
        r = int(system[4:])
        return LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS)
    common = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS)
    if system == "adalora":
        # Rank budget 8 -> 4 per module on average, falling over the same 0.2-0.5 window as SaLoRA's.
        return AdaLoraConfig(init_r=8, target_r=4, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                             tinit=start, tfinal=steps - end, deltaT=1, total_step=steps)
    if system in ("salora", "salora_paper"):
        return loraforge.SaLoRAConfig(**common, budget_control="paper" if system == "salora_paper" else "schedule")
    if system in SALORA_PROBES:  # probes of the "schedule" control, each with one setting changed
        return loraforge.SaLoRAConfig(**common, budget_control="schedule", **SALORA_PROBES[system])
    if system.startswith("delta"):
        # The paper's K = 500 is for runs of thousands of steps; here W starts to move after 10% of the run.
        return loraforge.DeltaLoRAConfig(**common, update_ratio=float(system[5:]), start_step=max(1, steps // 10))
    if system in ("cora_fb", "cora_tb", "cora_fb_alpaca"):
        return loraforge.CoRAConfig(**common, basis_path=basis, freeze_b=system != "cora_tb")
    raise ValueError(f"unknown system {system!r}")


def load_base(model_path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)


@torch.no_grad()
def held_out_nll(model, examples: dict[str, list], pad_id: int, batch: int = 20) -> dict[str, float]:
    """NLL per response token over each named set of examples and over all of them."""
    model.eval()
    out, tot_nll, tot_n = {}, 0.0, 0
    for name, exs in examples.items():
        nll = n = 0
        for i in range(0, len(exs), batch):
            b = qd.collate(exs[i:i + batch], pad_id)
            labels = b.pop("labels")
            logits = model(**b).logits[:, :-1]
            target = labels[:, 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                           ignore_index=-100, reduction="sum"))
            n += int((target != -100).sum())
        out[name] = nll / n
        tot_nll, tot_n = tot_nll + nll, tot_n + n
    out["all"] = tot_nll / tot_n
    model.train()
    return out


def kept_parameters(model, system: str) -> tuple[int, dict]:
    """Parameters the trained adapter keeps (pruned ranks dropped) and, for the adaptive methods, the ranks."""
    modules = dict(model.named_modules())
    if system.startswith("salora"):
        from loraforge.salora import gate_summary

        s = gate_summary(model)
        kept = 0
        for row in s["modules"]:
            m = modules.get(row["module"]) or modules["base_model.model." + row["module"]]
            base = getattr(m, "base_layer", m)
            kept += row["export_rank"] * (base.in_features + base.out_features)
        return kept, {"ranks": [row["export_rank"] for row in s["modules"]], "export_density": s["export_density"]}
    if system == "adalora":
        kept, ranks = 0, []
        for m in modules.values():
            if hasattr(m, "lora_E") and "default" in m.lora_E:
                k = int((m.lora_E["default"].detach() != 0).sum())
                ranks.append(k)
                kept += k * (m.in_features + m.out_features + 1)
        return kept, {"ranks": ranks}
    return sum(p.numel() for p in model.parameters() if p.requires_grad), {}


@torch.no_grad()
def mean_gate(model) -> tuple[float, float]:
    """SaLoRA: the mean over all ranks of the gate the next training step multiplies its rank by (its
    expectation inside the window), weighted by the parameters each rank carries; and C."""
    from loraforge.salora.layer import HardConcreteGate, expected_gate, prob_nonzero

    num = den = c = 0.0
    for m in model.modules():
        for axis in getattr(m, "forge_axes", {}).get("default", []):
            if not isinstance(axis, HardConcreteGate):
                continue
            cfg, la, w = axis.config, axis.logits().float(), m.in_features + m.out_features
            gate = {"ones": torch.ones_like(la), "frozen": axis.frozen_gate.float(),
                    "sample": expected_gate(la, cfg.temperature, cfg.gamma, cfg.zeta)}.get(axis.phase, axis.deterministic())
            num, den = num + w * float(gate.sum()), den + w * la.numel()
            c += w * float(prob_nonzero(la, cfg.temperature, cfg.gamma, cfg.zeta).sum())
    return num / den, c / den


def train(model, system: str, data, steps: int, lr: float, log=None, trace=None) -> tuple[float, float]:
    """Train `steps` steps of the batches in `data`; return the last 5 steps' mean loss and the seconds.
    `trace` (a list), for SaLoRA: gets (mean gate, C) before each step."""
    import loraforge

    drv = None
    if system.startswith(("salora", "delta", "cora")):
        drv = loraforge.driver(model).begin(max_steps=steps)
    groups = drv.param_groups(lr, 0.0) if drv is not None else []
    taken = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    opt = torch.optim.AdamW([{"params": rest}, *groups], lr=lr, weight_decay=0.0)
    model.train()
    losses, t0 = [], time.time()
    for step, batch in enumerate(data, start=1):
        if trace is not None:
            trace.append([round(v, 4) for v in mean_gate(model)])
        loss = model(**batch).loss  # AdaLoRA's forward adds its orthogonal term to this loss
        if drv is not None:
            reg = drv.regularization_loss()
            loss = loss if reg is None else loss + reg
        loss.backward()
        opt.step()
        if system == "adalora":
            model.base_model.update_and_allocate(step)
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if log and (step % 10 == 0 or step == steps):
            log(f"    step {step}/{steps} loss {losses[-1]:.4f} ({time.time() - t0:.0f}s)")
    return sum(losses[-5:]) / len(losses[-5:]), time.time() - t0


def make_basis(args, tokenizer, log, names: tuple = tuple(BASIS_SOURCES)) -> str:
    """Fine-tune LoRA r=8 on the data sets `names` (of `BASIS_SOURCES`) and extract CoRA's basis from them
    with `loraforge cora-extract`."""
    from peft import get_peft_model

    from loraforge_cli import main as cli

    work = Path(args.out).with_suffix("").as_posix() + "_cora"
    basis = os.path.join(work, "basis.safetensors" if names == tuple(BASIS_SOURCES) else f"basis_{'+'.join(names)}.safetensors")
    if os.path.exists(basis):
        return basis
    os.makedirs(work, exist_ok=True)
    dirs = []
    for name in names:
        source = BASIS_SOURCES[name]
        folder = os.path.join(work, name)
        dirs.append(folder)
        if os.path.exists(os.path.join(folder, "adapter_config.json")):
            continue
        pairs = qd.alpaca_pairs("train") if source == "alpaca" else qd.yelp_pairs(source, "train")
        torch.manual_seed(100)
        model = get_peft_model(load_base(args.model), adapter_config("lora8", args.basis_steps, None))
        log(f"  CoRA source fine-tune {name}: {args.basis_steps} steps")
        data = qd.batches(qd.encode(tokenizer, pairs), 100, args.basis_steps, args.batch, tokenizer.pad_token_id)
        train(model, "lora8", data, args.basis_steps, args.basis_lr, log)
        model.save_pretrained(folder)
    rc = cli(["cora-extract", "--models", *dirs, "--base", args.model, "--rank", "8", "--targets", ",".join(TARGETS),
              "--source", "deltas", "--out", basis])
    if rc != 0:
        raise SystemExit(f"cora-extract failed with exit code {rc}")
    return basis


def key(r: dict) -> tuple:
    return r["task"], r["system"], r["lr"], r["seed"], r["steps"]


def done_rows(path: str) -> dict:
    """Finished runs by key; a later line of the same key (a rerun that added the style scores) wins."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {key(r): r for r in map(json.loads, filter(str.strip, f))}


def plan(args, results: list[dict]):
    """The (system, lr, seed) runs wanted, in priority order, and a resolver for the lrs not known yet
    ("best": the lowest seed-0 NLL so far; "edge": one grid step beyond the grid's edge when the grid's best
    lr sits on it, else no run)."""
    def seed0(system):
        return {r["lr"]: r["nll"]["all"] for r in results if r["task"] == args.task and r["system"] == system
                and r["seed"] == args.seeds[0] and r["steps"] == args.steps}

    def resolve(system, which):
        if which == "parent":
            return resolve(PROBES[system], "best")
        sweep = seed0(system)
        if which == "best":
            return min(sweep, key=sweep.get) if sweep else None
        grid = sorted(args.lrs)
        if len(grid) < 2 or any(lr not in sweep for lr in grid):
            return None
        best = min(grid, key=sweep.get)
        if best == grid[0]:
            return float(f"{grid[0] * grid[0] / grid[1]:.2g}")
        if best == grid[-1]:
            return float(f"{grid[-1] * grid[-1] / grid[-2]:.2g}")
        return None

    runs = [("base", 0.0, 0)] if "base" in args.systems else []
    probes = [s for s in PROBES if s in args.systems]
    for name, group in (("main", MAIN), ("extra", EXTRA)):
        group = [s for s in group if s in args.systems]
        runs += [(s, lr, args.seeds[0]) for s in group for lr in args.lrs]
        runs += [(s, "edge", args.seeds[0]) for s in group]
        if name == "main":
            runs += [(s, "parent", args.seeds[0]) for s in probes]
        runs += [(s, "best", seed) for s in group for seed in args.seeds[1:]]
        if name == "main":
            runs += [(s, "parent", seed) for s in probes for seed in args.seeds[1:]]
    if getattr(args, "style", False):  # the style scores of each system at its best lr, first seed
        runs += [(s, "best", args.seeds[0]) for s in args.systems if s != "base"]
    return runs, resolve


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["yelp", "alpaca"], default="yelp",
                        help="yelp: supervised sentiment transfer; alpaca: instruction tuning, then zero-shot Yelp NLL")
    parser.add_argument("--quick", action="store_true", help="4 main systems, 1 seed, 12 steps, one lr (a smoke run)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3])
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--basis-steps", type=int, default=16, help="steps of each CoRA source fine-tune")
    parser.add_argument("--basis-lr", type=float, default=5e-3)
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--out", default="benchmarks/results/quality.jsonl")
    parser.add_argument("--style", action="store_true",
                        help="task yelp: also score eval-style ACC / BLEU / PPL per direction (greedy rewrites of the "
                             "test sources) for every run made, and rerun the first seed at each system's best lr "
                             "where its row has no style scores yet")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.lrs = args.seeds[:1], 12, args.lrs[-1:]
        args.basis_steps = 8
        args.systems = [s for s in args.systems if s in ("base", "lora8", "salora", "adalora", "cora_fb")]
    from peft import get_peft_model
    from transformers import AutoTokenizer

    from loraforge.models import default_model_path

    args.model = args.model or default_model_path()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    log = lambda msg: print(time.strftime("%H:%M:%S ") + msg, flush=True)  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    yelp_test = {d: qd.encode(tokenizer, qd.yelp_pairs(d, "test")) for d in qd.DIRECTIONS}
    if args.task == "yelp":
        train_ex, test_ex = [e for d in qd.DIRECTIONS for e in qd.encode(tokenizer, qd.yelp_pairs(d, "train"))], yelp_test
    else:
        train_ex, test_ex = qd.encode(tokenizer, qd.alpaca_pairs("train")), {"alpaca": qd.encode(tokenizer, qd.alpaca_pairs("test"))}
    results = []
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = [json.loads(line) for line in f if line.strip()]
    runs, resolve = plan(args, results)
    bases, scorer = {}, None
    for system, lr, seed in runs:
        if isinstance(lr, str):
            lr = resolve(system, lr)
            if lr is None:
                continue
        done = done_rows(args.out).get((args.task, system, lr, seed, args.steps))
        want_style = args.style and args.task == "yelp" and seed == args.seeds[0] and lr == resolve(system, "best")
        if done is not None and (not want_style or "style" in done):
            continue
        # cora_fb_alpaca: a basis from the instruction fine-tune alone, which saw no Yelp data
        names = ("ft_alpaca",) if system == "cora_fb_alpaca" else tuple(BASIS_SOURCES)
        if system.startswith("cora") and names not in bases:
            bases[names] = make_basis(args, tokenizer, log, names)
        log(f"{system} lr {lr:g} seed {seed}")
        torch.manual_seed(seed)
        model = load_base(args.model)
        row = {"task": args.task, "system": system, "lr": lr, "seed": seed, "steps": args.steps, "batch": args.batch}
        if done is not None:  # a rerun for the style scores: the earlier NLL, to show the rerun reproduces it
            row["rerun_of_nll"] = done["nll"]["all"]
        if system == "base":
            trainable, kept, extra, last, wall = 0, 0, {}, None, 0.0
        else:
            model = get_peft_model(model, adapter_config(system, args.steps, bases.get(names)))
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            data = qd.batches(train_ex, seed, args.steps, args.batch, pad)
            trace = [] if system.startswith("salora") else None
            last, wall = train(model, system, data, args.steps, lr, log, trace)
            kept, extra = kept_parameters(model, system)
            if trace:
                extra["gate_trace"] = trace  # per step: mean gate (parameter-weighted), C
            # How far training moved the trainable parameters (0 would mean the method never trained).
            extra["moved"] = sum(float((p.detach() - start[n]).pow(2).sum()) for n, p in model.named_parameters()
                                 if n in start) ** 0.5
        row.update(nll=held_out_nll(model, test_ex, pad), trainable=trainable, kept=kept, train_loss=last,
                   wall_s=round(wall, 1), **extra)
        if args.style and args.task == "yelp":
            if scorer is None:
                scorer = quality_style.StyleScorer(quality_style.default_folder(args.out), log)
            t0 = time.time()
            row["style"] = quality_style.style_of(model, tokenizer, scorer)
            if system == "base":
                row["style_yardsticks"] = scorer.yardsticks()
            log("  -> style " + "; ".join(f"{d} ACC {v['acc']:.1f} BLEU {v['bleu']:.1f} PPL {v['ppl']:.0f}"
                                          for d, v in row["style"].items()) + f" ({time.time() - t0:.0f}s)")
        if args.task == "alpaca":
            # SaLoRA's zero-shot protocol in miniature: an instruction-tuned model asked for the rewrite it never
            # trained on, scored by the NLL of the human rewrite
            row["zero_shot_yelp"] = held_out_nll(model, yelp_test, pad)
        detail = ", ".join(f"{k} {v:.4f}" for k, v in row["nll"].items() if k != "all")
        log(f"  -> held-out NLL {row['nll']['all']:.4f} ({detail}); trainable {trainable:,}, kept {kept:,}; {wall:.0f}s")
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        results.append(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
