"""``pretrain_bam.py``: one program for every phase (seed, branch, mix), Megatron-LM's flags.

Order of work: arguments → checks that need no process group (tokenizer, checkpoint arguments,
output directory) → process groups → model → optimizer → checkpoint loaded → data → train /
evaluate. ``pretrain(argv)`` returns a summary (losses, validation, routing) on every rank;
``main(argv)`` turns a user error (``BAMError``) into one line and exit code 1.
"""

from __future__ import annotations

import os
import sys
from typing import List, Optional

from bam_megatron.errors import BAMError, CheckpointError
from bam_megatron.training import arguments as cli


def _parse(argv: Optional[List[str]]):
    """Parsed and finalized arguments (``--use-checkpoint-args`` merged first)."""
    from bam_megatron.training.checkpoint_args import merge_checkpoint_args

    parser = cli.build_parser()
    args = parser.parse_args(argv)
    try:
        if args.use_checkpoint_args:
            if args.load is None:
                parser.error("--use-checkpoint-args needs --load")
            merge_checkpoint_args(args)
        cli.finalize_args(args, parser)
    except CheckpointError as exc:
        parser.error(str(exc))
    return args


def _prepare(args):
    """Everything checked before any process group: the BAM config, the tokenizer (and the
    padded vocabulary), the checkpoint to load and the output directory. Returns
    ``(bam_config, tokenizer, load_dir)``."""
    from bam_megatron.checkpoint.layout import resolve_checkpoint_dir
    from bam_megatron.data.tokenizers import build_tokenizer, padded_vocab_size
    from bam_megatron.training.checkpoint_args import check_checkpoint_matches
    from bam_megatron.training.configs import bam_config_from_args

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
    load_dir = resolve_checkpoint_dir(args.load, f"--load {args.load}") if args.load else None
    if load_dir:
        check_checkpoint_matches(args, load_dir)
    if args.save and os.path.exists(args.save) and not os.path.isdir(args.save):
        raise CheckpointError(f"--save {args.save} exists and is not a directory")
    return bam, tokenizer, load_dir


def _load(run, load_dir: Optional[str]) -> None:
    """Load ``--load`` into the run (weights, and optimizer / scheduler / RNG as asked)."""
    from bam_megatron.checkpoint.train_state import load_checkpoint
    from bam_megatron.training.metrics import print_rank_0

    if not load_dir:
        return
    args = run.args
    run.state = load_checkpoint(
        load_dir, run.model, run.optimizer, run.scheduler,
        load_optim=not args.no_load_optim, load_rng=not args.no_load_rng, finetune=args.finetune,
    )
    print_rank_0(f"[checkpoint] loaded {load_dir} at iteration {run.state.iteration}")


def _execute(args, bam, tokenizer, load_dir) -> dict:
    """Build the run on the initialised process groups, train and evaluate it."""
    from bam_megatron.parallel.distributed import get_device
    from bam_megatron.training.evaluate import run_validation
    from bam_megatron.training.loop import Trainer
    from bam_megatron.training.metrics import MetricsLogger, print_rank_0
    from bam_megatron.training.setup import build_datasets_for, build_run

    run = build_run(args, bam, get_device())
    run.tokenizer = tokenizer
    _load(run, load_dir)
    run.datasets = build_datasets_for(args, tokenizer)
    print_rank_0(f"[data] {run.datasets.summary()}")
    run.logger = MetricsLogger(args)
    try:
        if not args.skip_train:
            train_iter = run.data_iterator(run.datasets.train, run.state.consumed_train_samples, cyclic=True)
            Trainer(run, train_iter).train()
        run_validation(run, run.state.iteration)
    finally:
        run.logger.finish()
    run.summary["iteration"] = run.state.iteration
    return run.summary


def pretrain(argv: Optional[List[str]] = None) -> dict:
    """Run ``pretrain_bam.py`` with ``argv``; returns a summary (final losses) on every rank."""
    args = _parse(argv)  # before any torch import: --help and argument errors answer at once
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    bam, tokenizer, load_dir = _prepare(args)
    init_distributed(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.expert_model_parallel_size,
        args.expert_tensor_parallel_size,
        seed=args.seed,
        timeout_minutes=args.distributed_timeout_minutes,
    )
    try:
        return _execute(args, bam, tokenizer, load_dir)
    finally:
        destroy_distributed()


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry: a user error is one line and exit code 1; a bug keeps its traceback."""
    try:
        pretrain(argv)
    except BAMError as exc:
        # one write per line: the ranks of a torchrun job share stderr
        sys.stderr.write(f"pretrain_bam.py: error: {exc}\n")
        sys.stderr.flush()
        return 1
    return 0
