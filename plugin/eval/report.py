"""A Markdown table shaped like the SaLoRA paper's Table 2 from `eval-style` results files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .prompts import TASKS


def load_results(paths) -> list[dict]:
    results = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"results file {str(path)!r} does not exist; pass files written by `eval-style --out`")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not {"system", "task", "metrics"} <= data.keys():
            raise ValueError(f"{path} is not an eval-style results file (needs system, task and metrics)")
        results.append(data)
    return results


def _cell(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def make_report(results: list[dict]) -> str:
    """Rows: systems in order of first appearance; columns: ACC ↑ / BLEU ↑ / PPL ↓ per direction.

    Only directions present in some file get columns, in the paper's order. When a system has
    two results for one direction the later one wins, with a warning on stderr.
    """
    tasks = [name for name in TASKS if any(r["task"] == name for r in results)]
    table: dict[str, dict[str, dict]] = {}
    for r in results:
        row = table.setdefault(r["system"], {})
        if r["task"] in row:
            print(f"eval-style-report: two results for {r['system']} / {r['task']}; keeping the later one",
                  file=sys.stderr)
        row[r["task"]] = r["metrics"]
    header = ["System"] + [f"{TASKS[t].title} {m}" for t in tasks for m in ("ACC ↑", "BLEU ↑", "PPL ↓")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for system, row in table.items():
        cells = [system]
        for t in tasks:
            metrics = row.get(t, {})
            cells += [_cell(metrics.get(k)) for k in ("acc", "bleu", "ppl")]
        lines.append("| " + " | ".join(cells) + " |")

    signatures = sorted({r["bleu"]["signature"] for r in results if r.get("bleu")})
    ppl_notes = sorted({f"{r['ppl']['normalize']} tokenisation" for r in results if r.get("ppl")})
    lines += ["", "How to read it: ACC ↑ is the % of outputs the style classifier puts in the target style (did "
              "the style change?); BLEU ↑ is the n-gram overlap with the human rewrites (was the content kept?); "
              "PPL ↓ is the perplexity of the outputs under an n-gram model of target-style text (do they read "
              "like it?). Read ACC and BLEU together: returning the input unchanged keeps a high BLEU with a low "
              "ACC, and a fixed word such as \"positive\" gets a high ACC with a BLEU near 0.",
              f"BLEU: sacrebleu {'; '.join(signatures) or 'n/a'}. "
              "PPL: KenLM corpus perplexity, </s> counted as a token"
              + (f" ({', '.join(ppl_notes)})." if ppl_notes else ".")]
    selves = [r["system"] for r in results if _scores_itself(r)]
    if selves:
        lines.append(f"{', '.join(sorted(set(selves)))}: BLEU against its own text (the outputs are the references), "
                     "100 by construction; its ACC and PPL are what human rewrites score.")
    return "\n".join(lines) + "\n"


def _scores_itself(result: dict) -> bool:
    """Whether a row's outputs are its references (the paper's Reference row): BLEU is then 100."""
    bleu = result.get("metrics", {}).get("bleu")
    return bleu is not None and bleu >= 99.99
