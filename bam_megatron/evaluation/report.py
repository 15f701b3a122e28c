"""The results table of ``tools/evaluate_bam.py``: perplexity per domain next to accuracy per task.

A row is ``(model name, {domain: validation loss}, {task: metrics})``; either dict may be empty
when that kind of evaluation was not asked for. ``format_table`` gives Markdown
(``results.md``), ``write_csv`` the same numbers in full (``results.csv``: ``<domain>_ppl``,
``avg_ppl``, ``<domain>_loss``, ``<task>_acc``, ``<task>_acc_norm``, ``<task>_acc_stderr``,
``avg_acc``, ``avg_acc_norm``).
"""

from __future__ import annotations

import csv
import math
from typing import Dict, List, Sequence, Tuple

Row = Tuple[str, Dict[str, float], Dict[str, dict]]


def _ppls(losses: Dict[str, float], domains: Sequence[str]) -> List[float]:
    return [math.exp(losses[d]) for d in domains]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def format_table(rows: Sequence[Row], domains: Sequence[str], tasks: Sequence[str]) -> str:
    """Markdown: perplexity per domain and its average (lower is better), then accuracy per task
    and its average (percent, higher is better)."""
    head = ["model"] + [f"{d} ppl" for d in domains] + (["Avg ppl"] if domains else [])
    head += [f"{t} acc" for t in tasks] + (["Avg acc"] if tasks else [])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name, losses, metrics in rows:
        cells = []
        if domains:
            ppls = _ppls(losses, domains)
            cells += [f"{p:.2f}" for p in ppls] + [f"{_mean(ppls):.2f}"]
        if tasks:
            accs = [100 * metrics[t]["acc"] for t in tasks]
            cells += [f"{a:.1f}" for a in accs] + [f"{_mean(accs):.1f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: str, rows: Sequence[Row], domains: Sequence[str], tasks: Sequence[str]) -> None:
    """Every number of the table, unrounded, plus losses, ``acc_norm`` and standard errors."""
    header = ["model"]
    if domains:
        header += [f"{d}_ppl" for d in domains] + ["avg_ppl"] + [f"{d}_loss" for d in domains]
    for t in tasks:
        header += [f"{t}_acc", f"{t}_acc_norm", f"{t}_acc_stderr"]
    if tasks:
        header += ["avg_acc", "avg_acc_norm"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for name, losses, metrics in rows:
            out = [name]
            if domains:
                ppls = _ppls(losses, domains)
                out += [f"{p:.4f}" for p in ppls] + [f"{_mean(ppls):.4f}"] + [f"{losses[d]:.6f}" for d in domains]
            for t in tasks:
                out += [f"{metrics[t][k]:.4f}" for k in ("acc", "acc_norm", "acc_stderr")]
            if tasks:
                out += [f"{_mean([metrics[t][k] for t in tasks]):.4f}" for k in ("acc", "acc_norm")]
            w.writerow(out)
