"""Per-domain perplexity and multiple-choice accuracy of checkpoints, as one table, plus routing.

    python tools/evaluate_bam.py \\
        --model seed=ckpt/seed --model "BTX=ckpt/btx" --model "BAM KV experts=ckpt/bam" \\
        --valid-data-path code:data/bin/code_valid_text_document math:data/bin/math_valid_text_document \\
        --tasks code=data/tasks/code.jsonl math=data/tasks/math.jsonl --num-fewshot 0 \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tokenizer/tokenizer.json \\
        --eval-iters 8 --micro-batch-size 8 --out-dir results [--routing]

Perplexity: each checkpoint is evaluated by ``pretrain_bam.py --skip-train --load CKPT
--use-checkpoint-args`` on every named held-out set (so any checkpoint and any layout works: run
this under torchrun and add parallel flags, they are passed through). Accuracy: each
``--tasks`` file (JSONL: ``{"context": ..., "choices": [...], "gold": i}`` per line, see
``bam_megatron/evaluation/tasks.py``) is scored zero- or few-shot (``--num-fewshot``) by
log-likelihood as lm-evaluation-harness scores multiple-choice tasks: ``acc`` (the choice with
the highest summed log-likelihood) and ``acc_norm`` (divided by the choice's length in
characters). Writes ``results.md`` (rows = models; columns = perplexity per domain and its
average, accuracy per task and its average) and ``results.csv`` (all numbers, with ``acc_norm``
and standard errors); with ``--routing``, per BAM/BTX model the FFN expert load and mean
attention-router weight per layer and expert, per domain, as CSV and PNG heatmaps whose experts
are named after the checkpoints they were upcycled from. Unknown flags are passed to
``pretrain_bam.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

from bam_megatron.checkpoint.opener.options import add_open_args
from bam_megatron.cli.console import user_error
from bam_megatron.library_messages import quiet_libraries

PROG = "evaluate_bam.py"
LAYOUT_FLAGS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, metavar="NAME=CHECKPOINT",
                   help="A row of the table: its name and checkpoint directory (repeatable, in order).")
    p.add_argument("--valid-data-path", nargs="+", default=None, metavar="DOMAIN:PREFIX",
                   help="Held-out sets: one perplexity column each.")
    p.add_argument("--tasks", nargs="+", default=None, metavar="[NAME=]FILE",
                   help="Multiple-choice task files (JSONL): one accuracy column each (name: the file's stem).")
    p.add_argument("--num-fewshot", type=int, default=0, help="Solved examples before each task item (default 0).")
    p.add_argument("--fewshot-seed", type=int, default=1234, help="Seed of the few-shot example choice.")
    p.add_argument("--task-batch-size", type=int, default=16, help="Sequences per forward when scoring tasks.")
    p.add_argument("--task-limit", type=int, default=None, help="Score only the first N items of each task.")
    p.add_argument("--eval-iters", type=int, default=10, help="Global batches evaluated per domain.")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--out-dir", required=True, help="Where results.md / results.csv / routing go.")
    p.add_argument("--routing", action="store_true", help="Also write routing statistics and heatmaps.")
    for name in LAYOUT_FLAGS:
        p.add_argument("--" + name.replace("_", "-"), type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer-model", default=None, help=argparse.SUPPRESS)
    add_open_args(p.add_argument_group("checkpoints"))
    args, passthrough = p.parse_known_args(argv)
    if not args.valid_data_path and not args.tasks:
        p.error("give --valid-data-path (perplexity) and/or --tasks (accuracy)")
    if args.num_fewshot < 0:
        p.error(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    models = []
    for entry in args.model:
        name, sep, path = entry.partition("=")
        if not sep or not name or not path:
            p.error(f"--model {entry!r} must be NAME=CHECKPOINT")
        models.append((name.strip(), path))
    args.task_files = [_task(entry) for entry in args.tasks or []]
    for name in LAYOUT_FLAGS:  # used here for the tasks, and by pretrain_bam.py for perplexity
        passthrough += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.tokenizer_model:
        passthrough += ["--tokenizer-model", args.tokenizer_model]
    passthrough += ["--no-checkpoint-checksums"] * (not args.checkpoint_checksums)
    passthrough += ["--trust-checkpoint-code"] * args.trust_checkpoint_code
    return args, models, passthrough


def _task(entry: str):
    name, sep, path = entry.partition("=")
    if not sep:
        path, name = entry, os.path.splitext(os.path.basename(entry))[0]
    return name, path


def evaluate_model(path: str, args, passthrough) -> dict:
    from bam_megatron.training import pretrain

    argv = [
        "--load", path, "--use-checkpoint-args", "--skip-train", "--no-load-optim", "--no-load-rng",
        "--valid-data-path", *args.valid_data_path,
        "--eval-iters", str(args.eval_iters), "--micro-batch-size", str(args.micro_batch_size),
        *passthrough,
    ]
    return pretrain(argv)


def score_tasks(path: str, args) -> dict:
    from bam_megatron.checkpoint.opener import open_options
    from bam_megatron.evaluation.checkpoint_tasks import evaluate_checkpoint_on_tasks

    return evaluate_checkpoint_on_tasks(
        path, args.task_files, num_fewshot=args.num_fewshot, fewshot_seed=args.fewshot_seed,
        batch_size=args.task_batch_size, limit=args.task_limit, tokenizer_model=args.tokenizer_model,
        layout=tuple(getattr(args, n) for n in LAYOUT_FLAGS), options=open_options(args),
    )


def expert_names(path: str, args):
    """The names the upcycle tool recorded for the experts of checkpoint ``path`` (or None)."""
    from bam_megatron.checkpoint.opener import open_checkpoint, open_options

    return open_checkpoint(path, options=open_options(args), tensors="none").provenance.expert_names


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_").lower()


def _evaluate_all(args, models, passthrough, domains):
    """``(rows, routing)`` for every model; user errors propagate."""
    from bam_megatron.errors import CheckpointError

    rows, routing = [], {}
    for name, path in models:
        print(f"[evaluate] {name}: {path}", file=sys.stderr, flush=True)
        losses, metrics = {}, {}
        if domains:
            summary = evaluate_model(path, args, passthrough)
            missing = [d for d in domains if d not in summary["valid"]]
            if missing:
                raise CheckpointError(f"no validation loss for {missing} from {path}")
            losses = {d: summary["valid"][d] for d in domains}
            if summary.get("routing"):
                routing[name] = (summary["routing"], expert_names(path, args))
        if args.task_files:
            metrics = score_tasks(path, args)
            accs = ", ".join(f"{t} {100 * m['acc']:.1f}%" for t, m in metrics.items())
            print(f"[evaluate] {name}: accuracy {accs}", file=sys.stderr, flush=True)
        rows.append((name, losses, metrics))
    return rows, routing


def main(argv=None) -> int:
    quiet_libraries()
    args, models, passthrough = parse_args(argv)
    from bam_megatron.errors import BAMError
    from bam_megatron.evaluation.report import format_table, write_csv

    domains = [e.partition(":")[0] if ":" in e else os.path.basename(e) for e in args.valid_data_path or []]
    tasks = [name for name, _ in args.task_files]
    try:
        rows, routing = _evaluate_all(args, models, passthrough, domains)
    except BAMError as exc:
        return user_error(PROG, exc)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    table = format_table(rows, domains, tasks)
    what = " and ".join(filter(None, [
        "Per-domain validation perplexity (lower is better)" if domains else "",
        f"{args.num_fewshot}-shot multiple-choice accuracy in % (higher is better)" if tasks else "",
    ]))
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write(what + "\n\n" + table + "\n")
    write_csv(os.path.join(args.out_dir, "results.csv"), rows, domains, tasks)
    print(table, flush=True)
    if args.routing:
        from bam_megatron.training.routing import write_routing_report

        for name, (per_domain, names) in routing.items():
            for path in write_routing_report(per_domain, os.path.join(args.out_dir, "routing"), slug(name), expert_names=names):
                print(f"[evaluate] wrote {path}", file=sys.stderr)
    return 0
