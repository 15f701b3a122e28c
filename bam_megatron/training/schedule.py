"""The learning-rate schedule of a resumed run: Megatron-LM's rules, checked before any work.

megatron-core's ``OptimizerParamScheduler`` counts in samples (``num_steps`` grows by the global
batch size every step). When a run resumes a checkpoint that holds scheduler state:

- by default the command line's schedule (``--lr``, ``--min-lr``, ``--lr-warmup-iters``,
  ``--lr-decay-iters``, ``--lr-decay-style``, ``--weight-decay``, ``--train-iters``) must equal
  the checkpoint's; ``check_resumed_schedule`` stops with one line naming both values otherwise
  (Megatron-LM's refusal, before any process group exists);
- ``--override-opt-param-scheduler``: the command line's values win, the step count continues —
  the learning rates of a fresh run with the new schedule, at the same iterations;
- ``--use-checkpoint-opt-param-scheduler``: the checkpoint's values win.

With ``--no-load-optim`` (but not ``--finetune``) the command line's schedule continues from the
checkpoint's step count (``continue_schedule``).

Where the learning rate comes from: ``OptimizerParamScheduler.get_lr`` reads ``max_lr`` and
``min_lr`` from each optimizer param group (megatron-core puts ``--lr`` / ``--min-lr`` there when
it builds the optimizer) and falls back to its own values only for a group without them. Loading
a checkpoint's optimizer state replaces the param groups with the saved ones, so without more the
saved ``max_lr`` / ``min_lr`` would win over an overriding command line while the scheduler (and
its ``state_dict``) said otherwise. ``apply_to_param_groups`` makes the scheduler the one source:
after a load, every param group that follows the default schedule takes the scheduler's values.
``describe`` is the start-up line that says where the schedule stands, read back from the param
groups the optimizer steps with.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

from bam_megatron.errors import CheckpointError

# (state-dict names, old names, flag, value of the run, unit): "samples" values are shown in
# iterations of the respective global batch size.
_FIELDS: List[Tuple[str, Tuple[str, ...], str, Callable, str]] = [
    ("wd_incr_steps", (), "--train-iters", lambda a: a.train_iters * a.global_batch_size, "samples"),
    ("max_lr", ("start_lr",), "--lr", lambda a: float(a.lr), "value"),
    ("min_lr", (), "--min-lr", lambda a: float(a.min_lr), "value"),
    ("lr_warmup_steps", ("warmup_iter", "warmup_steps"), "--lr-warmup-iters",
     lambda a: a.lr_warmup_iters * a.global_batch_size, "samples"),
    ("lr_decay_steps", ("end_iter", "decay_steps"), "--lr-decay-iters",
     lambda a: a.lr_decay_iters * a.global_batch_size, "samples"),
    ("lr_decay_style", ("decay_style",), "--lr-decay-style", lambda a: a.lr_decay_style, "value"),
    ("start_wd", (), "--start-weight-decay", lambda a: float(a.start_weight_decay), "value"),
    ("end_wd", (), "--end-weight-decay", lambda a: float(a.end_weight_decay), "value"),
    ("wd_incr_style", (), "--weight-decay-incr-style", lambda a: a.weight_decay_incr_style, "value"),
]


def _saved(state: dict, name: str, old: Tuple[str, ...]):
    for key in (name,) + old:
        if key in state:
            return state[key]
    return None


def _shown(value, unit: str, gbs: Optional[int]) -> str:
    if unit == "samples":
        if gbs:
            return f"{value / gbs:g}"
        return f"{value} samples"
    return f"{value!r}" if isinstance(value, str) else f"{value:g}"


def check_resumed_schedule(args, saved_state: dict, saved_args: dict, ckpt_dir: str) -> None:
    """Refuse a resumed schedule that differs from the checkpoint's (see the module docstring).

    Raises:
        CheckpointError: one line naming the flag, both values and the two ways forward.
    """
    if args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    saved_gbs = saved_args.get("global_batch_size")
    for name, old, flag, ours_of, unit in _FIELDS:
        saved = _saved(saved_state, name, old)
        ours = ours_of(args)
        if saved is None or saved == ours:
            continue
        raise CheckpointError(
            f"{flag} {_shown(ours, unit, args.global_batch_size)} differs from the "
            f"{_shown(saved, unit, saved_gbs)} of the schedule in {ckpt_dir}"
            + (f" (in samples: {ours} here, {saved} there)" if unit == "samples" else "")
            + "; add --override-opt-param-scheduler to train with this command line's schedule "
            "(the step count continues), or --use-checkpoint-opt-param-scheduler to keep the "
            "checkpoint's"
        )


def apply_to_param_groups(scheduler) -> None:
    """Make the optimizer step with the scheduler's schedule (see the module docstring): every
    param group that follows the default schedule (megatron-core's ``default_config``; groups
    with their own learning rate keep it) takes the scheduler's ``max_lr`` / ``min_lr`` (and
    ``start_wd`` / ``end_wd`` where a group carries them), then ``lr`` and ``weight_decay`` are
    recomputed at the current step."""
    values = {"max_lr": scheduler.max_lr, "min_lr": scheduler.min_lr,
              "start_wd": scheduler.start_wd, "end_wd": scheduler.end_wd}
    for group in scheduler.optimizer.param_groups:
        if not group.get("default_config", True):
            continue
        for key, value in values.items():
            if key in ("max_lr", "min_lr") or key in group:
                group[key] = value
    scheduler.step(increment=0)


def continue_schedule(scheduler, saved_state: Optional[dict], consumed_samples: int) -> None:
    """``--no-load-optim``: keep the command line's schedule, continued from the checkpoint's
    step count (its scheduler's, else its consumed samples)."""
    steps = _saved(saved_state or {}, "num_steps", ("num_iters",))
    scheduler.num_steps = int(steps if steps is not None else consumed_samples)
    scheduler.step(increment=0)


def _default_group(scheduler) -> dict:
    """The first param group on the default schedule (the one the training line logs)."""
    groups = scheduler.optimizer.param_groups
    return next((g for g in groups if g.get("default_config", True)), groups[0] if groups else {})


def describe(scheduler, iteration: int, train_iters: int, gbs: int, source: str) -> str:
    """``[schedule] ...`` start-up line: step, total, warm-up and decay, the peak and final
    learning rates and the weight decay as the optimizer's param groups hold them, the learning
    rate of the next step, and where the schedule came from."""
    if scheduler is None:
        return f"[schedule] no training (iteration {iteration})"
    group = _default_group(scheduler)
    max_lr, min_lr = group.get("max_lr", scheduler.max_lr), group.get("min_lr", scheduler.min_lr)
    lr = scheduler.get_lr(group) if group else scheduler.max_lr
    if scheduler.wd_incr_style == "constant":
        wd = f"weight decay {scheduler.get_wd(group or None):g}"
    else:
        wd = (f"weight decay {scheduler.wd_incr_style} from {scheduler.start_wd:g} to {scheduler.end_wd:g} "
              f"(now {scheduler.get_wd(group or None):g})")
    return (
        f"[schedule] iteration {iteration} of {train_iters} ({scheduler.num_steps} of {train_iters * gbs} "
        f"samples); warm-up {scheduler.lr_warmup_steps / gbs:g} iterations, {scheduler.lr_decay_style} decay "
        f"to iteration {scheduler.lr_decay_steps / gbs:g} from {max_lr:g} to {min_lr:g}; {wd}; "
        f"learning rate now {lr:.6g} ({source})"
    )


def restore_schedule(scheduler, common: dict, load_optim: bool, report) -> None:
    """The scheduler: the checkpoint's state (megatron-core's rules for which values win), or with
    ``--no-load-optim`` the command line's schedule continued from the checkpoint's step. The
    loaded param groups then take the scheduler's values (they carry the saved ``max_lr`` /
    ``min_lr``, which megatron-core's ``get_lr`` prefers; ``apply_to_param_groups``). ``common``:
    the checkpoint's non-tensor state; ``report``: its ``LoadReport``, told what was restored."""
    if scheduler is None:
        return
    saved = common.get("opt_param_scheduler")
    if load_optim and saved:
        scheduler.load_state_dict(saved)
        apply_to_param_groups(scheduler)
        report.loaded.append("LR scheduler")
        report.schedule = (
            "the command line's (--override-opt-param-scheduler)" if scheduler.override_opt_param_scheduler
            else "the checkpoint's" if scheduler.use_checkpoint_opt_param_scheduler else "the checkpoint's (same values)"
        )
    elif int(common.get("iteration", 0)) > 0 or saved:
        continue_schedule(scheduler, saved, int(common.get("consumed_train_samples", 0)))
        report.schedule = "the command line's, continued from the checkpoint's step"
