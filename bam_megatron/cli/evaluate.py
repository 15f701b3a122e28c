"""Per-domain perplexity of checkpoints, as a table like the BAM paper's Table 1, plus routing.

    python tools/evaluate_bam.py \\
        --model seed=ckpt/seed --model "BTX=ckpt/btx" --model "BAM KV experts=ckpt/bam" \\
        --valid-data-path code:data/bin/code_valid_text_document math:data/bin/math_valid_text_document \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizer/tokenizer.json \\
        --eval-iters 8 --micro-batch-size 8 --out-dir results [--routing]

Each checkpoint is evaluated by ``pretrain_bam.py --skip-train --load CKPT --use-checkpoint-args``
on every named held-out set (so any checkpoint and any layout works: run this under torchrun and
add parallel flags, they are passed through). Writes ``results.md`` (rows = models, columns =
domains + average perplexity) and ``results.csv``; with ``--routing``, per BAM/BTX model the FFN
expert load and mean attention-router weight per layer and expert, per domain, as CSV and PNG
heatmaps. Unknown flags are passed to ``pretrain_bam.py``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT",
                   help="A row of the table: its name and checkpoint directory (repeatable, in order).")
    p.add_argument("--valid-data-path", nargs="+", required=True, metavar="DOMAIN:PREFIX",
                   help="Held-out sets, one column each.")
    p.add_argument("--eval-iters", type=int, default=10, help="Global batches evaluated per domain.")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--out-dir", required=True, help="Where results.md / results.csv / routing go.")
    p.add_argument("--routing", action="store_true", help="Also write routing statistics and heatmaps.")
    args, passthrough = p.parse_known_args(argv)
    models = []
    for entry in args.model:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            p.error(f"--model {entry!r} must be NAME=CHECKPOINT")
        models.append((name.strip(), path))
    return args, models, passthrough


def evaluate_model(path: str, args, passthrough) -> dict:
    from bam_megatron.training import pretrain

    argv = [
        "--load", path, "--use-checkpoint-args", "--skip-train", "--no-load-optim", "--no-load-rng",
        "--valid-data-path", *args.valid_data_path,
        "--eval-iters", str(args.eval_iters), "--micro-batch-size", str(args.micro_batch_size),
        *passthrough,
    ]
    return pretrain(argv)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_").lower()


def format_table(rows, domains) -> str:
    """Markdown table of perplexities: ``rows`` = [(model, {domain: loss})]."""
    head = "| model | " + " | ".join(domains) + " | Avg |"
    sep = "|---" * (len(domains) + 2) + "|"
    lines = [head, sep]
    for name, losses in rows:
        ppls = [math.exp(losses[d]) for d in domains]
        cells = [f"{p:.2f}" for p in ppls] + [f"{sum(ppls) / len(ppls):.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args, models, passthrough = parse_args(argv)
    from bam_megatron.errors import BAMError

    domains = [entry.partition(":")[0] if ":" in entry else os.path.basename(entry) for entry in args.valid_data_path]
    rows, routing = [], {}
    for name, path in models:
        print(f"[evaluate] {name}: {path}", file=sys.stderr, flush=True)
        try:
            summary = evaluate_model(path, args, passthrough)
        except BAMError as exc:
            print(f"evaluate_bam.py: error: {exc}", file=sys.stderr, flush=True)
            return 1
        missing = [d for d in domains if d not in summary["valid"]]
        if missing:
            print(f"evaluate_bam.py: error: no validation loss for {missing} from {path}", file=sys.stderr)
            return 1
        rows.append((name, {d: summary["valid"][d] for d in domains}))
        if summary.get("routing"):
            routing[name] = summary["routing"]

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    table = format_table(rows, domains)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write("Per-domain validation perplexity (lower is better)\n\n" + table + "\n")
    with open(os.path.join(args.out_dir, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", *[f"{d}_ppl" for d in domains], "avg_ppl", *[f"{d}_loss" for d in domains]])
        for name, losses in rows:
            ppls = [math.exp(losses[d]) for d in domains]
            w.writerow([name, *[f"{p:.4f}" for p in ppls], f"{sum(ppls) / len(ppls):.4f}",
                        *[f"{losses[d]:.6f}" for d in domains]])
    print(table, flush=True)
    if args.routing:
        from bam_megatron.training.routing import write_routing_report

        for name, per_domain in routing.items():
            for path in write_routing_report(per_domain, os.path.join(args.out_dir, "routing"), slug(name)):
                print(f"[evaluate] wrote {path}", file=sys.stderr)
    return 0

