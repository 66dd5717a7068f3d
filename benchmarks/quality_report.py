"""Table, paper-claim checks and plot from the quality benchmark's results file (finished runs only,
so it works on a partial file too).

Each system is reported at its best learning rate: the grid lr with the lowest held-out NLL on the
first seed, the one `quality.py` picks for the remaining seeds. A claim "X beats Y" holds when X's
mean NLL is lower by more than twice the standard error of the difference of the means, does not
hold when it is higher by that much, and is a tie otherwise.

Run: python benchmarks/quality_report.py [--results benchmarks/results/quality.jsonl] [--plot docs/quality.png]
"""
from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

LABELS = {
    "base": "base model (no training)", "lora8": "PEFT LoRA r=8", "lora4": "PEFT LoRA r=4",
    "salora_paper": "SaLoRA r=8, b=0.5, paper control (default)", "salora": "SaLoRA r=8, b=0.5, schedule control",
    "salora_b0": "SaLoRA schedule, probe: β=0 (no orth. term)", "salora_d1": "SaLoRA schedule, probe: b=1 (gates, no pruning)",
    "salora_w10_30": "SaLoRA schedule, probe: window 0.1-0.3 (steps 3-7)",
    "salora_w20_30": "SaLoRA schedule, probe: window 0.2-0.3 (steps 6-7)",
    "salora_w50_80": "SaLoRA schedule, probe: window 0.5-0.8 (steps 13-19)", "salora_glr1": "SaLoRA schedule, probe: gate_lr=1",
    "adalora": "PEFT AdaLoRA r=8→4", "delta0.5": "Delta-LoRA r=8 λ=0.5 (folded)", "delta2": "Delta-LoRA r=8 λ=2 (folded)",
    "cora_fb": "CoRA FB r=8", "cora_fb_alpaca": "CoRA FB r=8, basis from the alpaca fine-tune only", "cora_tb": "CoRA TB r=8",
}
CLAIMS = [  # (claim, better system, than system)
    ("SaLoRA (paper control, default) beats LoRA at equal final size", "salora_paper", "lora4"),
    ("SaLoRA (paper control) beats LoRA r=8 with fewer kept parameters", "salora_paper", "lora8"),
    ("SaLoRA (paper control) beats AdaLoRA at the same budget", "salora_paper", "adalora"),
    ("SaLoRA (schedule control) beats LoRA at equal final size", "salora", "lora4"),
    ("SaLoRA (schedule control) beats AdaLoRA at the same budget", "salora", "adalora"),
    ("SaLoRA's paper control beats its schedule control", "salora_paper", "salora"),
    ("SaLoRA schedule without its orthogonal term (β=0) beats it with β=0.1", "salora_b0", "salora"),
    ("Delta-LoRA (λ=0.5) beats LoRA at the same rank", "delta0.5", "lora8"),
    ("Delta-LoRA (λ=2) beats LoRA at the same rank", "delta2", "lora8"),
    ("CoRA FB matches LoRA at about equal trainable parameters", "cora_fb", "lora4"),
    ("CoRA TB beats LoRA at the same rank", "cora_tb", "lora8"),
    ("CoRA FB on a basis that saw no Yelp data matches LoRA at about equal trainable parameters", "cora_fb_alpaca", "lora4"),
    ("CoRA FB with a basis from the alpaca fine-tune alone matches it with all three", "cora_fb_alpaca", "cora_fb"),
]


def load(path: str) -> list[dict]:
    """The finished runs; of several lines of one run (a rerun that added the style scores) the last."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return list({(r["task"], r["system"], r["lr"], r["seed"], r["steps"]): r for r in rows}.values())


def summarise(rows: list[dict]) -> dict[str, dict]:
    """Per system: its best lr (first seed), the runs at that lr, and the seed-0 NLL at every lr."""
    by_system = defaultdict(list)
    for r in rows:
        by_system[r["system"]].append(r)
    out = {}
    for system, runs in by_system.items():
        first = min(r["seed"] for r in runs)
        sweep = {r["lr"]: r["nll"]["all"] for r in runs if r["seed"] == first}
        best = min(sweep, key=sweep.get)
        at = [r for r in runs if r["lr"] == best]
        out[system] = {"lr": best, "sweep": sweep, "runs": at, "steps": at[0]["steps"]}
    return out


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else float("nan")


def table(summary: dict) -> str:
    lines = ["| system | best lr (grid: NLL on seed 0) | seeds | held-out NLL / token | neg→pos | pos→neg | "
             "trainable params | kept params | train s / run |", "|---|---|---|---|---|---|---|---|---|"]
    for system in [s for s in LABELS if s in summary]:
        s = summary[system]
        runs = s["runs"]
        cells = []
        for key in ("all", "neg2pos", "pos2neg"):
            # task alpaca: the directions are the zero-shot Yelp NLLs of the instruction-tuned model
            m, sd = mean_sd([r.get("zero_shot_yelp", r["nll"])[key] if key != "all" else r["nll"]["all"] for r in runs])
            cells.append(f"{m:.4f}" + ("" if sd != sd else f" ± {sd:.4f}"))
        sweep = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in sorted(s["sweep"].items()))
        lr = "–" if system == "base" else f"{s['lr']:g} ({sweep})"
        kept = statistics.mean(r["kept"] for r in runs)
        wall = statistics.mean(r["wall_s"] for r in runs)
        lines.append(f"| {LABELS[system]} | {lr} | {len(runs)} | {' | '.join(cells)} | {runs[0]['trainable']:,} | "
                     f"{kept:,.0f} | {wall:.0f} |")
    return "\n".join(lines)


def style_table(summary: dict) -> str:
    """eval-style ACC / BLEU / PPL per direction of the runs at the best lr that have them (mean over those runs)."""
    dirs = ("neg2pos", "pos2neg")
    head = " | ".join(f"{d.replace('2', '→')} {m}" for d in dirs for m in ("ACC ↑", "BLEU ↑", "PPL ↓"))
    lines = [f"| system | seeds | {head} |", "|---|---|" + "---|" * 6]

    def cells(styles: list[dict]) -> str:
        return " | ".join(f"{statistics.mean(st[d][m] for st in styles):.1f}" for d in dirs for m in ("acc", "bleu", "ppl"))

    base = summary.get("base", {}).get("runs", [{}])[0].get("style_yardsticks")
    if base:
        lines.append(f"| human rewrites (the references) | – | {cells([base['human']])} |")
        lines.append(f"| source copied unchanged | – | {cells([base['copy']])} |")
    for system in [s for s in LABELS if s in summary]:
        styles = [r["style"] for r in summary[system]["runs"] if "style" in r]
        if styles:
            lines.append(f"| {LABELS[system]} | {len(styles)} | {cells(styles)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def claims(summary: dict) -> str:
    lines = ["| claim | X | Y | NLL X − Y (± 2 SE) | on SmolLM2 |", "|---|---|---|---|---|"]
    for text, x, y in CLAIMS:
        if x not in summary or y not in summary:
            lines.append(f"| {text} | {x} | {y} | not run | – |")
            continue
        a = [r["nll"]["all"] for r in summary[x]["runs"]]
        b = [r["nll"]["all"] for r in summary[y]["runs"]]
        diff = statistics.mean(a) - statistics.mean(b)
        if len(a) < 2 or len(b) < 2:
            lines.append(f"| {text} | {x} | {y} | {diff:+.4f} (one seed) | undecided |")
            continue
        se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
        verdict = "tie" if abs(diff) <= 2 * se else ("X better" if diff < 0 else "X worse")
        if "matches" in text:
            verdict = {"tie": "holds (tie)", "X better": "holds (better)", "X worse": "does not hold"}[verdict]
        else:
            verdict = {"tie": "does not hold (tie)", "X better": "holds", "X worse": "does not hold (worse)"}[verdict]
        lines.append(f"| {text} | {x} ({len(a)} seeds) | {y} ({len(b)} seeds) | {diff:+.4f} ± {2 * se:.4f} | {verdict} |")
    return "\n".join(lines)


def plot(summary: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for system in [s for s in LABELS if s in summary and s != "base" and "probe" not in LABELS[s]]:  # probes: the table
        runs = summary[system]["runs"]
        m, sd = mean_sd([r["nll"]["all"] for r in runs])
        x = runs[0]["trainable"] / 1e6
        ax.errorbar(x, m, yerr=0 if sd != sd else sd, fmt="o", capsize=4, label=f"{LABELS[system]} ({len(runs)} seeds)")
        ax.annotate(system, (x, m), textcoords="offset points", xytext=(6, 3), fontsize=7)
    steps = next(iter(summary.values()))["steps"]
    base = f"; base model {summary['base']['runs'][0]['nll']['all']:.3f}" if "base" in summary else ""
    ax.set_xlabel("trainable parameters (millions)")
    ax.set_ylabel("held-out NLL per response token (lower is better)")
    ax.set_title(f"SmolLM2-135M-Instruct, Yelp human rewrites, {steps} steps, mean ± sd over seeds{base}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results/quality.jsonl")
    parser.add_argument("--plot", help="write the plot (PNG) here")
    parser.add_argument("--task", default="yelp", choices=["yelp", "alpaca"])
    args = parser.parse_args()
    summary = summarise([r for r in load(args.results) if r["task"] == args.task])
    print(table(summary))
    print()
    print(claims(summary))
    styles = style_table(summary)
    if styles:
        print()
        print(styles)
    if args.plot:
        plot(summary, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
