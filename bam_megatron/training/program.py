"""``pretrain_bam.py``: one program for every phase (seed, branch, mix), Megatron-LM's flags.

Order of work: arguments → where to start from (``start.py``: ``--load``, a fresh start from
``--pretrained-checkpoint``, or scratch; the checkpoint opened by ``checkpoint/opener``: found,
index files verified, read without running code; a resumed run already at ``--train-iters``
stops here with one line and exit code 0, touching nothing) → checks that need no process group
(tokenizer, checkpoint arguments and schedule, the ``--save`` directory) → process groups → the
checkpoint's tensor data verified (the ranks share the files) → the ``--save`` lock → model →
optimizer → checkpoint loaded → data → train / evaluate. ``pretrain(argv)`` returns
a summary (losses, validation, routing, why it stopped) on every rank; ``main(argv)`` turns a user
error (``BAMError``) into one line and exit code 1 — printed by one process per node when every
rank finds it (arguments, files, a collective decision), by the rank that found it otherwise.
"""

from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

from bam_megatron.errors import BAMError, CheckpointError, reports_job_errors
from bam_megatron.library_messages import quiet_libraries
from bam_megatron.training import arguments as cli


def _parse(argv: Optional[List[str]]):
    """Parsed and finalized arguments (``--use-checkpoint-args`` merged first) and the
    ``StartPoint``."""
    from bam_megatron.training.checkpoint_args import merge_checkpoint_args
    from bam_megatron.training.start import find_start

    parser = cli.build_parser()
    args = parser.parse_args(argv)
    start = find_start(args)  # a bad --load is a user error (exit 1), like any checkpoint problem
    try:
        if args.use_checkpoint_args and start.checkpoint:
            merge_checkpoint_args(args, start.checkpoint, parser.get_default, log=start.notes.append)
        elif args.use_checkpoint_args:
            start.notes.append("[checkpoint-args] no checkpoint to take arguments from: the command line's are used")
        cli.finalize_args(args, parser)
    except CheckpointError as exc:
        parser.error(str(exc))
    return args, start


def _prepare(args, start):
    """Everything checked before any process group: the BAM config, the tokenizer (and the
    padded vocabulary), the checkpoint to load (model and schedule) and the ``--save`` folder.
    Returns ``(bam_config, tokenizer)``."""
    from bam_megatron.data.tokenizers import build_tokenizer, padded_vocab_size
    from bam_megatron.training.configs import bam_config_from_args
    from bam_megatron.training.start import check_against_checkpoint

    bam = bam_config_from_args(args)
    tokenizer = build_tokenizer(
        args.tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
    )
    args.tokenizer_vocab_size = tokenizer.vocab_size
    args.padded_vocab_size = padded_vocab_size(
        tokenizer.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size
    )
    check_against_checkpoint(args, start)
    _check_data_vocabulary(args)
    return bam, tokenizer


def _check_data_vocabulary(args) -> None:
    """Token ids of the indexed data fit the model (where the files are small enough to scan)."""
    from bam_megatron.data.blends import parse_data_path, parse_named_data_paths
    from bam_megatron.data.index_check import check_token_ids

    if args.data_path:
        check_token_ids(parse_data_path(args.data_path)[0], args.padded_vocab_size, "--data-path")
    if args.valid_data_path:
        check_token_ids(parse_named_data_paths(args.valid_data_path).values(), args.padded_vocab_size, "--valid-data-path")


def _load(run, start) -> None:
    """Load the start point into the run (weights, and optimizer / scheduler / RNG as asked)."""
    from bam_megatron.checkpoint.train_state import load_checkpoint
    from bam_megatron.training.metrics import print_rank_0
    from bam_megatron.training.schedule import describe, restore_schedule

    args = run.args
    source = "the command line's"
    if start.checkpoint:
        began = time.monotonic()
        run.state, report = load_checkpoint(
            start.checkpoint, run.model, run.optimizer,
            load_optim=not args.no_load_optim, load_rng=not args.no_load_rng, finetune=start.finetune,
            fully_parallel=args.ckpt_fully_parallel_load,
        )
        if not start.finetune:
            restore_schedule(run.scheduler, start.checkpoint.common, not args.no_load_optim, report)
        print_rank_0(f"{report.line(run.state)} ({time.monotonic() - began:.2f} s)")
        source = report.schedule
    if not args.skip_train:
        print_rank_0(describe(run.scheduler, run.state.iteration, args.train_iters, args.global_batch_size, source))


def _execute(args, bam, tokenizer, start) -> dict:
    """Build the run on the initialised process groups, train and evaluate it."""
    from bam_megatron.parallel.distributed import get_device
    from bam_megatron.training.evaluate import run_validation
    from bam_megatron.training.loop import Trainer
    from bam_megatron.training.metrics import MetricsLogger, print_rank_0
    from bam_megatron.training.setup import banner, build_datasets_for, build_run
    from bam_megatron.training.start import carry_tokenizer_into_save, check_save_dir, check_save_space

    run = build_run(args, bam, get_device())
    check_save_dir(args, start)
    run.recorded_tokenizer = carry_tokenizer_into_save(args)
    run.tokenizer = tokenizer
    print_rank_0(banner(run))
    _load(run, start)
    check_save_space(run)
    run.datasets = build_datasets_for(args, tokenizer)
    print_rank_0(f"[data] {run.datasets.summary()}")
    run.logger = MetricsLogger(args)
    try:
        if not args.skip_train:
            train_iter = run.data_iterator(run.datasets.train, run.state.consumed_train_samples, cyclic=True)
            Trainer(run, train_iter).train()
        if not run.summary.get("exit_reason"):
            run_validation(run, run.state.iteration)
    finally:
        run.logger.finish()
    run.summary["iteration"] = run.state.iteration
    return run.summary


def _already_finished(args, start) -> bool:
    """A resumed run that is at (or past) ``--train-iters`` has nothing to do: one line, and
    nothing is built, locked or written (a requeued finished job, a re-run pipeline)."""
    if args.skip_train or not start.resume or start.iteration < args.train_iters:
        return False
    if os.environ.get("RANK", "0") == "0":  # one line for the whole job
        print(f"[train] already trained to iteration {start.iteration}; nothing to do "
              f"(--train-iters {args.train_iters}, checkpoint {start.ckpt_dir})", flush=True)
    return True


def pretrain(argv: Optional[List[str]] = None) -> dict:
    """Run ``pretrain_bam.py`` with ``argv``; returns a summary (final losses) on every rank."""
    try:
        args, start = _parse(argv)  # before any torch import: --help and argument errors answer at once
        if _already_finished(args, start):
            return {"train_losses": [], "valid": {}, "routing": {}, "iteration": start.iteration,
                    "exit_reason": "already trained"}
        bam, tokenizer = _prepare(args, start)
    except BAMError as exc:
        exc.same_on_every_rank = True  # found before any process group, from the same arguments and files
        raise
    from bam_megatron.checkpoint.opener import ensure_verified
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed
    from bam_megatron.training.start import hold_save_lock

    init_distributed(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.expert_model_parallel_size,
        args.expert_tensor_parallel_size,
        seed=args.seed,
        timeout_minutes=args.distributed_timeout_minutes,
    )
    try:
        start.announce()
        if start.checkpoint:  # every file checked before this run writes anything
            ensure_verified(start.checkpoint)
        with hold_save_lock(args):
            return _execute(args, bam, tokenizer, start)
    finally:
        destroy_distributed()


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry: a user error is one line and exit code 1; a bug keeps its traceback."""
    quiet_libraries()
    try:
        pretrain(argv)
    except BAMError as exc:
        if reports_job_errors() or not exc.same_on_every_rank:  # once per node when every rank has it
            # one write per line: the ranks of a torchrun job share stderr
            sys.stderr.write(f"pretrain_bam.py: error: {exc}\n")
            sys.stderr.flush()
        return 1
    return 0
