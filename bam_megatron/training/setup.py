"""Building a training run: model, optimizer, scheduler, data — each built once.

``Run`` holds everything the loop and the evaluation work with; ``build_run`` makes it in
Megatron-LM's order (model → DDP → optimizer + scheduler → checkpoint → data), after the process
groups exist. Nothing here mutates the arguments.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

from bam_megatron.checkpoint.train_state import TrainState
from bam_megatron.errors import TrainingError
from bam_megatron.training import configs


@dataclass
class Run:
    """One training (or evaluation) run's objects."""

    args: object
    device: torch.device
    model: List[torch.nn.Module]
    optimizer: Optional[object]
    scheduler: Optional[object]
    forward_backward_func: Callable
    num_microbatches: int
    flops_per_token: float
    tokenizer: object = None
    datasets: object = None
    logger: object = None
    state: TrainState = field(default_factory=TrainState)
    recorded_tokenizer: dict = field(default_factory=dict)  # tokenizer arguments the saves record
    summary: dict = field(default_factory=lambda: {"train_losses": [], "valid": {}, "routing": {}})

    def data_iterator(self, dataset, consumed: int = 0, cyclic: bool = False):
        """Micro-batches of ``dataset`` for this data-parallel rank, from sample ``consumed``."""
        from bam_megatron.data.sampler import build_data_iterator
        from bam_megatron.training.step import rng_neutral

        return rng_neutral(build_data_iterator(
            dataset, micro_batch_size=self.args.micro_batch_size, consumed_samples=consumed,
            num_workers=self.args.num_workers, cyclic=cyclic,
        ))


def num_microbatches(args) -> int:
    """Micro-batches per step per data-parallel rank (``--global-batch-size`` is finalized)."""
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    per_step = args.micro_batch_size * dp
    if args.global_batch_size % per_step:
        raise TrainingError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} × data-parallel size {dp}; pick a multiple of {per_step}"
        )
    return args.global_batch_size // per_step


def build_model(args, config, bam, device) -> List[torch.nn.Module]:
    """This rank's model chunk(s) (BAM blocks on megatron-core's GPTModel) wrapped in DDP."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    from bam_megatron.model.build import build_bam_model
    from bam_megatron.training.configs import gpt_model_kwargs

    model = build_bam_model(config, bam, **gpt_model_kwargs(args)).to(device)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=args.overlap_grad_reduce,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    chunks = [DistributedDataParallel(config, ddp_config, model)]
    config.no_sync_func = chunks[0].no_sync
    config.finalize_model_grads_func = finalize_model_grads
    if args.overlap_grad_reduce:
        config.grad_sync_func = chunks[0].start_grad_sync
    return chunks


def build_scheduler(args, optimizer):
    """megatron-core's ``OptimizerParamScheduler`` (warm-up + decay, stepped in samples); which
    of its values and a checkpoint's win on resume follows Megatron-LM (``schedule.py``)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    gbs = args.global_batch_size
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=args.lr_decay_iters * gbs,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style=args.weight_decay_incr_style,
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
    )


def build_optimizer(args, model):
    """``(optimizer, scheduler)``, or ``(None, None)`` with ``--skip-train``."""
    if args.skip_train:
        return None, None
    from megatron.core.optimizer import get_megatron_optimizer

    optimizer = get_megatron_optimizer(configs.optimizer_config_from_args(args), model)
    return optimizer, build_scheduler(args, optimizer)


def model_flops_per_token(args) -> float:
    """Training FLOPs per token of the model ``args`` describe (``model/flops.py``)."""
    from bam_megatron.model.flops import ModelShape, flops_per_token

    return flops_per_token(shape=ModelShape.from_args(args), seq_length=args.seq_length)


def parameter_totals(args):
    """``(total, active per token)`` parameters of the model ``args`` describe."""
    from bam_megatron.model.flops import ModelShape, parameter_counts

    return parameter_counts(ModelShape.from_args(args))


def banner(run) -> str:
    """The start-up lines: model size, layout, batch, precision."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    args = run.args
    total, active = parameter_totals(args)
    experts = f"{args.bam_attn_experts} attention expert(s), {args.num_experts or 0} FFN expert(s)"
    if args.moe_shared_expert_intermediate_size:
        experts += " + 1 shared"
    if args.num_experts and args.moe_router_type == "nexus":
        experts += " (Nexus router)"
    return (
        f"[run] model: {total:,} parameters ({active:,} active per token); {args.num_layers} layers, "
        f"hidden {args.hidden_size}, {experts}, {'sequential' if args.bam_sequential_block else 'parallel'} blocks\n"
        f"[run] layout: world {dist.get_world_size()} = TP {ps.get_tensor_model_parallel_world_size()} x "
        f"PP {ps.get_pipeline_model_parallel_world_size()} x DP {ps.get_data_parallel_world_size()} "
        f"(EP {ps.get_expert_model_parallel_world_size()}); device {run.device}\n"
        f"[run] batch: {args.global_batch_size} sequences x {args.seq_length} tokens = "
        f"{args.global_batch_size * args.seq_length:,} tokens per step ({run.num_microbatches} micro-batch(es) "
        f"of {args.micro_batch_size} per data-parallel rank)"
    )


def build_datasets_for(args, tokenizer):
    """megatron-core GPT datasets for the run's data flags. Their indexes are cached where
    ``data_cache_path`` says; when the default cache under ``--save`` cannot be written (a full
    or read-only disk: the run's own checks report that where it matters, at the save), they are
    built in memory instead."""
    from bam_megatron.data.datasets import build_datasets
    from bam_megatron.errors import disk_error
    from bam_megatron.training.metrics import print_rank_0

    def build(cache):
        return build_datasets(
            tokenizer,
            args.seq_length,
            data_path=args.data_path,
            split=args.split if args.data_path else None,
            valid_sets=args.valid_data_path,
            mock_data=args.mock_data,
            train_iters=args.train_iters or 0,
            global_batch_size=args.global_batch_size,
            eval_iters=args.eval_iters,
            eval_interval=None,  # every evaluation reads the same samples: one evaluation's worth
            full_validation=args.full_validation,
            seed=args.seed,
            reset_position_ids=args.reset_position_ids,
            reset_attention_mask=args.reset_attention_mask,
            eod_mask_loss=args.eod_mask_loss,
            data_cache_path=cache,
        )

    cache = data_cache_path(args)
    try:
        return build(cache)
    except Exception as exc:  # megatron-core wraps the cache's OSError in a plain Exception
        what = disk_error(exc)
        if what is None or args.data_cache_path:
            raise
        print_rank_0(f"[data] cannot cache the dataset indexes in {cache} ({what}): building them in memory")
        shutil.rmtree(cache, ignore_errors=True)
        return build(None)


def data_cache_path(args) -> Optional[str]:
    """Where the dataset indexes are cached: ``--data-cache-path``, else ``<--save>/data_cache`` (a
    requeued or resumed run reuses them), else nowhere (built in memory; also for ``--mock-data``,
    whose synthetic indexes are cheaper to build than to store)."""
    if args.data_cache_path:
        return args.data_cache_path
    if args.save and not args.skip_train and not args.mock_data:
        return os.path.join(args.save, "data_cache")
    return None


def build_run(args, bam, device) -> Run:
    """Model, optimizer and scheduler of a run (checkpoint and data come next)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from bam_megatron.model.config import validate_bam_setup

    config = configs.transformer_config_from_args(args)
    validate_bam_setup(config, bam)
    micro = num_microbatches(args)
    model = build_model(args, config, bam, device)
    optimizer, scheduler = build_optimizer(args, model)
    return Run(
        args=args, device=device, model=model, optimizer=optimizer, scheduler=scheduler,
        forward_backward_func=get_forward_backward_func(), num_microbatches=micro,
        flops_per_token=model_flops_per_token(args),
    )
