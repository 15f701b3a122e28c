"""Where a run starts and where it may write — decided before any work, the same on every rank.

``find_start`` follows Megatron-LM: ``--load DIR`` resumes the checkpoint in DIR; when DIR is
absent or holds no checkpoint yet, the run starts from ``--pretrained-checkpoint`` (weights only,
like ``--finetune``) or from scratch, with one warning (``--exit-on-missing-checkpoint`` makes it
an error). So one command line — ``--load X --save X --pretrained-checkpoint SEED`` — serves the
first submission of a job and every requeue.

``check_save_dir`` refuses a ``--save`` that cannot be written, and one whose newest checkpoint is
ahead of this run (saving there would move its tracker back) unless ``--allow-save-rewind``;
``hold_save_lock`` makes the run the only writer of ``--save`` (``checkpoint/lock.py``);
``check_save_space`` compares the free space with the size a checkpoint of this model will have.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from typing import List, Optional

from bam_megatron.checkpoint.layout import TRACKER
from bam_megatron.checkpoint.opener import Checkpoint, has_checkpoint, locate, open_checkpoint, open_options, read_tracker
from bam_megatron.data.tokenizer_files import TOKENIZER_DIR
from bam_megatron.errors import CheckpointError, human_bytes

# What a run of ours leaves in a --save folder before its first checkpoint.
_OWN_LEFTOVERS = (".bam_save.lock", "wandb", "tensorboard", "data_cache", TRACKER + ".tmp", TOKENIZER_DIR)


@dataclass
class StartPoint:
    """The checkpoint a run loads (None: from scratch), how, and the lines that say so."""

    checkpoint: Optional[Checkpoint] = None  # opened: index verified, tensor data verified at load
    finetune: bool = False  # weights only, iteration 0
    iteration: int = 0
    notes: List[str] = field(default_factory=list)

    @property
    def ckpt_dir(self) -> Optional[str]:
        return self.checkpoint.dir if self.checkpoint is not None else None

    @property
    def resume(self) -> bool:
        return self.checkpoint is not None and not self.finetune

    def announce(self) -> None:
        from bam_megatron.training.metrics import print_rank_0

        for note in self.notes:
            print_rank_0(note)


def _holds_only_leftovers(path: str) -> bool:
    """An absent folder, or one with nothing but what a run of ours writes before its first
    checkpoint (lock, logs, an unfinished ``iter_*.tmp``)."""
    if not os.path.isdir(path):
        return not os.path.exists(path)
    for name in os.listdir(path):
        if name in _OWN_LEFTOVERS or (name.startswith("iter_") and ".tmp" in name) or ".old-" in name:
            continue
        return False
    return True


def find_start(args) -> StartPoint:
    """The start point of ``args`` (see the module docstring); the checkpoint it names is opened
    (``checkpoint/opener``: found, its index files verified and read without running code).

    Raises:
        CheckpointError: ``--load`` is not a checkpoint folder, or is empty with
            ``--exit-on-missing-checkpoint``; the checkpoint is damaged or unsafe to read.
    """
    start = StartPoint()
    path, what = None, None
    if args.load and has_checkpoint(args.load):
        path, what = args.load, f"--load {args.load}"
        start.finetune = bool(args.finetune)
    elif args.load:
        if not _holds_only_leftovers(args.load):
            locate(args.load, f"--load {args.load}")  # raises, naming the problem
        if args.exit_on_missing_checkpoint:
            raise CheckpointError(f"--load {args.load} holds no checkpoint (--exit-on-missing-checkpoint is set)")
        source = f"--pretrained-checkpoint {args.pretrained_checkpoint}" if args.pretrained_checkpoint else "scratch"
        start.notes.append(f"[checkpoint] WARNING: --load {args.load} holds no checkpoint yet: starting from {source}")
    if path is None and args.pretrained_checkpoint:
        path, what = args.pretrained_checkpoint, f"--pretrained-checkpoint {args.pretrained_checkpoint}"
        start.finetune = True
    if path is not None:
        start.checkpoint = open_checkpoint(path, what=what, options=open_options(args), tensors="defer")
        start.notes += start.checkpoint.notes
    if start.resume:
        start.iteration = start.checkpoint.iteration
    return start


def check_against_checkpoint(args, start: StartPoint) -> None:
    """The model matches the checkpoint; a resumed schedule matches its (``schedule.py``)."""
    from bam_megatron.training.checkpoint_args import check_checkpoint_matches
    from bam_megatron.training.schedule import check_resumed_schedule

    ckpt = start.checkpoint
    if ckpt is None:
        return
    check_checkpoint_matches(args, ckpt)
    sched = ckpt.common.get("opt_param_scheduler")
    if start.resume and sched and not args.skip_train and not args.no_load_optim:
        check_resumed_schedule(args, sched, ckpt.recorded_args, ckpt.dir)


def _probe_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".bam_write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise CheckpointError(f"--save {folder} cannot be written ({reason.lower()}); choose a writable folder") from None


def check_save_dir(args, start: StartPoint) -> None:
    """``--save`` is a writable folder whose tracker is not ahead of this run."""
    if not args.save or args.skip_train:
        return
    if os.path.exists(args.save) and not os.path.isdir(args.save):
        raise CheckpointError(f"--save {args.save} exists and is not a directory")
    _probe_writable(args.save)
    ahead = read_tracker(args.save) if os.path.isfile(os.path.join(args.save, TRACKER)) else None
    if ahead is not None and ahead > start.iteration and not args.allow_save_rewind:
        raise CheckpointError(
            f"--save {args.save} holds a checkpoint at iteration {ahead}, ahead of this run (which starts at "
            f"iteration {start.iteration}): saving there would move its tracker back; resume it with --load "
            f"{args.save}, choose another --save, or add --allow-save-rewind"
        )


def carry_tokenizer_into_save(args) -> dict:
    """Rank 0 copies the run's tokenizer files into ``<--save>/tokenizer/`` (once; a resumed run
    finds them there); every rank returns the tokenizer arguments its checkpoints record:
    relative to the checkpoint folder, so that the checkpoints open from anywhere.

    Raises:
        CheckpointError: ``<--save>/tokenizer/`` holds another tokenizer (every rank).
    """
    import torch.distributed as dist

    from bam_megatron.checkpoint.opener import carry_tokenizer, relative_tokenizer
    from bam_megatron.data.tokenizer_args import TokenizerArgs
    from bam_megatron.parallel.distributed import first_problem

    if not args.save or args.skip_train:
        return {}
    tok = TokenizerArgs.from_namespace(args)
    problem = None
    if dist.get_rank() == 0:
        try:
            carry_tokenizer(tok, args.save)
        except CheckpointError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"cannot copy the tokenizer into --save {args.save} ({exc.strerror or exc}); choose a writable folder"
    problem = first_problem(problem)
    if problem:
        raise CheckpointError(problem)
    return relative_tokenizer(tok).as_dict()


@contextlib.contextmanager
def hold_save_lock(args):
    """Rank 0 holds the lock of ``--save`` for the run; every rank stops if it cannot."""
    import torch.distributed as dist

    from bam_megatron.checkpoint.lock import SaveLock
    from bam_megatron.parallel.distributed import first_problem
    from bam_megatron.training.metrics import print_rank_0

    lock, problem = None, None
    if args.save and not args.skip_train and dist.get_rank() == 0:
        try:
            lock = SaveLock.acquire(args.save, force=args.force_save_lock, log=print_rank_0)
        except CheckpointError as exc:
            problem = str(exc)
    problem = first_problem(problem)
    if problem:
        raise CheckpointError(problem)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()


def expected_checkpoint_bytes(run) -> int:
    """About the size of one checkpoint: every parameter (counted once) in its dtype, plus
    Adam's two fp32 moments and, for a 16-bit model, its fp32 master copy."""
    from bam_megatron.training.setup import parameter_totals

    total, _active = parameter_totals(run.args)
    weight = 2 if _is_16bit(run) else 4
    optimizer = 0 if run.optimizer is None else (8 + (4 if weight == 2 else 0))
    return int(total * (weight + optimizer))


def _is_16bit(run) -> bool:
    import torch

    return any(p.dtype in (torch.bfloat16, torch.float16) for m in run.model for p in m.parameters())


def check_save_space(run) -> None:
    """Stop before training when ``--save`` has less free space than one checkpoint needs."""
    args = run.args
    if not args.save or args.skip_train:
        return
    need, free = expected_checkpoint_bytes(run), shutil.disk_usage(args.save).free
    if free < need:
        raise CheckpointError(
            f"not enough free space in --save {args.save} for a checkpoint of this model (about "
            f"{human_bytes(need)} needed, {human_bytes(free)} free); free space or choose another --save"
        )
