"""The table of examples/nexus.sh: old- and new-domain perplexity of the Nexus and linear-router
MoEs before and after adding an expert, and the relative gains the Nexus paper reports.

    python examples/nexus_table.py runs/nexus/results/results.csv --old code legal english --new math \\
        --out runs/nexus/results/nexus.md

Reads the ``results.csv`` of tools/evaluate_bam.py (rows named as examples/nexus.sh names them),
prints the table and writes it to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import sys
from typing import Dict, List

STAGES = ("mixed and trained (before adding)", "+ {new} expert (after adding)", "+ {new} expert, fine-tuned",
          "fine-tuned without the new expert")
# Gritsch et al. 2024 (Nexus): relative gains over the linear-router baseline.
ANCHOR_MIX, ANCHOR_EXTEND = 2.1, 18.8


def read_rows(path: str) -> Dict[str, Dict[str, float]]:
    with open(path, newline="") as f:
        return {r["model"]: {k[:-4]: float(v) for k, v in r.items() if k.endswith("_ppl")} for r in csv.DictReader(f)}


def gain(base: float, new: float) -> float:
    """Relative perplexity reduction of ``new`` against ``base``, in percent."""
    return 100.0 * (base - new) / base


def table(rows: Dict[str, Dict[str, float]], old: List[str], new: str) -> List[str]:
    cols = old + ["old avg", f"{new} (new)"]
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, ppl in rows.items():
        values = [ppl[d] for d in old] + [sum(ppl[d] for d in old) / len(old), ppl[new]]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    return lines


def summary(rows: Dict[str, Dict[str, float]], old: List[str], new: str) -> List[str]:
    def get(router: str, stage: int) -> Dict[str, float]:
        return rows[f"{router}: {STAGES[stage].format(new=new)}"]

    def old_avg(ppl: Dict[str, float]) -> float:
        return sum(ppl[d] for d in old) / len(old)

    lines = [f"- initial mix, old domains (avg ppl): Nexus {old_avg(get('nexus', 0)):.2f} vs linear {old_avg(get('linear', 0)):.2f}: "
             f"{gain(old_avg(get('linear', 0)), old_avg(get('nexus', 0))):+.1f}% (paper: up to +{ANCHOR_MIX}%)"]
    for router in ("nexus", "linear"):
        before, added, with_new, without = (get(router, i) for i in range(4))
        lines.append(
            f"- {router}: {new} ppl {before[new]:.2f} before adding, {added[new]:.2f} after adding, {with_new[new]:.2f} after "
            f"the fine-tune vs {without[new]:.2f} for the same fine-tune without the new expert: "
            f"{gain(without[new], with_new[new]):+.1f}%; old domains {old_avg(with_new):.2f} vs {old_avg(without):.2f} "
            f"({gain(old_avg(without), old_avg(with_new)):+.1f}%)")
    n_gain = gain(get("linear", 2)[new], get("nexus", 2)[new])
    lines.append(f"- extended Nexus vs extended linear, {new} after the fine-tune: {n_gain:+.1f}% "
                 f"(paper: +{ANCHOR_EXTEND}% for extending with a new expert)")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("csv", help="results.csv of tools/evaluate_bam.py")
    p.add_argument("--old", nargs="+", required=True, help="The domains of the initial mix.")
    p.add_argument("--new", required=True, help="The domain whose expert was added.")
    p.add_argument("--out", required=True, help="Markdown file to write.")
    args = p.parse_args(argv)
    rows = read_rows(args.csv)
    text = "\n".join(["Validation perplexity (lower is better); relative gains: perplexity reduction", ""]
                     + table(rows, args.old, args.new) + [""] + summary(rows, args.old, args.new)) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    sys.stdout.write("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
