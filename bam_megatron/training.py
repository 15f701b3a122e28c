"""The training loop of ``pretrain_bam.py`` on megatron-core's building blocks.

megatron-core has no training loop; this one wires its pieces the way Megatron-LM does:
``DistributedDataParallel`` (+ overlapped grad reduce), ``get_megatron_optimizer``,
``OptimizerParamScheduler`` (warm-up + linear/cosine decay, stepped in samples), the pipeline
schedules of ``get_forward_backward_func`` (no pipelining or 1F1B), ``finalize_model_grads``,
megatron-core datasets, torch_dist checkpoints (``train_checkpoint.py``) and the logs of
``metrics.py``. Order of work: arguments → process groups → tokenizer → checkpoint arguments
checked → model → optimizer → checkpoint loaded → data → train / evaluate.
"""

from __future__ import annotations

import math
import os
import sys
import time
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from bam_megatron import arguments as cli
from bam_megatron.checkpointing import CheckpointError
from bam_megatron.config import BAMConfigError, validate_bam_setup
from bam_megatron.distributed import get_device
from bam_megatron.routing import RoutingRecorder
from bam_megatron.metrics import MetricsLogger, memory_gib, print_rank_0, print_rank_last, training_line, validation_line


class TrainingError(RuntimeError):
    """A condition that stops training (bad input found up front, too many NaN steps)."""


# ------------------------------------------------------------------------------------ setup


def _merge_checkpoint_args(args) -> None:
    """``--use-checkpoint-args``: take the model arguments from the checkpoint in --load."""
    from bam_megatron.train_checkpoint import read_common, resolve_load_dir

    saved = read_common(resolve_load_dir(args.load)).get("args")
    if not saved:
        raise CheckpointError(f"--use-checkpoint-args: {args.load} records no arguments")
    for name in cli.MODEL_ARGS:
        if name in saved and name != "padded_vocab_size":
            setattr(args, name, saved[name])


def _check_checkpoint_matches(args, ckpt_dir: str) -> None:
    """One clear error when the checkpoint's model differs from the one asked for."""
    from bam_megatron.train_checkpoint import read_common

    saved = read_common(ckpt_dir).get("args") or {}
    for name in cli.MODEL_ARGS:
        if name in saved and saved[name] != getattr(args, name, None):
            flag = "--" + name.replace("_", "-")
            if name == "padded_vocab_size":
                if saved.get("tokenizer_vocab_size") == args.tokenizer_vocab_size:
                    raise CheckpointError(
                        f"checkpoint {ckpt_dir} pads the vocabulary to {saved[name]} but this run pads it "
                        f"to {args.padded_vocab_size} (the padding depends on --tensor-model-parallel-size); "
                        "set --make-vocab-size-divisible-by so that both pad to the same size"
                    )
                raise CheckpointError(
                    f"the tokenizer has {args.tokenizer_vocab_size} tokens (padded {args.padded_vocab_size}) but "
                    f"checkpoint {ckpt_dir} was trained with a padded vocabulary of {saved[name]}; use the "
                    "checkpoint's tokenizer"
                )
            raise CheckpointError(
                f"checkpoint {ckpt_dir} has {flag} {saved[name]!r} but {getattr(args, name, None)!r} "
                "was given; fix the flag or add --use-checkpoint-args"
            )


def _model_provider(args, config, bam, vp_stage=None):
    from bam_megatron.model import build_bam_model

    return build_bam_model(
        config,
        bam,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        vp_stage=vp_stage,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
    )


def _num_microbatches(args) -> int:
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp
    per_step = args.micro_batch_size * dp
    if args.global_batch_size % per_step:
        raise TrainingError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} × data-parallel size {dp}; pick a multiple of {per_step}"
        )
    return args.global_batch_size // per_step


def _args_dict(args) -> dict:
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


# ------------------------------------------------------------------------------------ steps


def _rng_neutral(data_iterator):
    """Yield from ``data_iterator`` without touching torch's global RNG.

    A DataLoader draws its base seed from the default generator when it starts an epoch; on
    CPU that generator also drives dropout, so a resumed run (whose loader starts after the RNG
    state is restored) would draw dropout masks other than the uninterrupted run's."""
    while True:
        state = torch.get_rng_state()
        try:
            batch = next(data_iterator)
        except StopIteration:
            return
        finally:
            torch.set_rng_state(state)
        yield batch


def _batch_to(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Masked mean of the per-token losses ``output [b, s]``."""
    losses = output.float()
    mask = loss_mask.float()
    loss = (losses * mask).sum() / mask.sum().clamp(min=1)
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(device, data_iterator, model):
    batch = _batch_to(next(data_iterator), device)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch.get("attention_mask"),
        labels=batch["labels"],
    )
    return output, partial(_loss_func, batch["loss_mask"])


def _reduce_losses(losses: List[dict]) -> Optional[float]:
    """Mean 'lm loss' over micro-batches and data-parallel ranks (last pipeline stage), shared
    with every rank so all agree on NaN handling."""
    from megatron.core import parallel_state as ps

    value = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
        stacked = torch.stack([d["lm loss"].float() for d in losses])
        value[0] = stacked.sum().item() / ps.get_tensor_model_parallel_world_size()
        value[1] = len(losses) / ps.get_tensor_model_parallel_world_size()
    device = get_device()
    value = value.to(device)
    dist.all_reduce(value)  # every rank of the last stage holds the same per-TP loss
    return (value[0] / value[1]).item() if value[1] > 0 else None


def _grads_finite(model) -> bool:
    """Whether the reduced gradients of every rank are finite (all ranks get the same answer).

    The fp32 optimizer applies whatever it gets (a NaN gradient norm turns every weight into
    NaN), so a step with a NaN/inf gradient must be skipped before ``optimizer.step()``. A sum is
    NaN/inf when any element is, without a temporary the size of the gradients."""
    device = get_device()
    sums = [
        buffer.grad_data.sum(dtype=torch.float32).to(device)
        for m in model
        for buffer in list(getattr(m, "buffers", [])) + list(getattr(m, "expert_parallel_buffers", []))
    ]
    bad = torch.zeros(1, dtype=torch.float32, device=device)
    if sums:
        bad[0] = (~torch.isfinite(torch.stack(sums))).any().float()
    dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def _moe_losses(num_layers: int, num_microbatches: int) -> Dict[str, float]:
    """Mean per-layer aux losses of one step from megatron-core's tracker (then cleared).

    The tracker sums over the step's micro-batches: divided by their number (as Megatron-LM's
    ``track_moe_metrics`` does). Some losses (the z-loss) are means over this rank's tokens only,
    others are already the same on every rank: the mean over all ranks makes both the value of
    the whole global batch, whatever the TP / EP / data-parallel layout."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    tracker = get_moe_layer_wise_logging_tracker()
    if not tracker:
        return {}
    reduce_aux_losses_tracker_across_ranks()
    out = {}
    for name, entry in tracker.items():
        values = entry["values"].float() / num_microbatches
        if dist.get_world_size() > 1:
            dist.all_reduce(values)  # every rank holds all layers after the pipeline reduce
            values /= dist.get_world_size()
        out[name] = values.sum().item() / num_layers
        for layer, v in enumerate(values.tolist(), start=1):
            out[f"moe/{name}/layer_{layer}"] = v
    clear_aux_losses_tracker()
    return out


def _routing_metrics(routing: dict) -> Dict[str, float]:
    """``RoutingRecorder.result()`` as flat log metrics: attention-router weights and FFN expert
    load (fractions) per layer and expert."""
    out = {}
    for kind, prefix in (("attention", "attn_router"), ("ffn", "ffn_load")):
        for layer, row in enumerate(routing[kind] or [], start=1):
            for e, value in enumerate(row):
                out[f"{prefix}/layer_{layer}/expert_{e}"] = value
    return out


# ------------------------------------------------------------------------------------ eval


def evaluate(forward_backward_func, model, data_iterator, args, num_microbatches, device) -> Optional[float]:
    """Mean validation loss over ``--eval-iters`` steps of one global batch."""
    for m in model:
        m.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for _ in range(args.eval_iters):
            try:
                losses = forward_backward_func(
                    forward_step_func=partial(_forward_step, device),
                    data_iterator=data_iterator,
                    model=model,
                    num_microbatches=num_microbatches,
                    seq_length=args.seq_length,
                    micro_batch_size=args.micro_batch_size,
                    forward_only=True,
                )
            except StopIteration:
                break
            loss = _reduce_losses(losses)
            if loss is None:
                break
            total += loss
            count += 1
    for m in model:
        m.train()
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    clear_aux_losses_tracker()
    return total / count if count else None


# ------------------------------------------------------------------------------------ main


def pretrain(argv: Optional[List[str]] = None) -> dict:
    """Run ``pretrain_bam.py`` with ``argv``; returns a summary (final losses) on every rank."""
    args = cli.parse_args(argv)
    parser = cli.build_parser()
    try:
        if args.use_checkpoint_args:
            if args.load is None:
                parser.error("--use-checkpoint-args needs --load")
            _merge_checkpoint_args(args)
        cli.finalize_args(args, parser)
    except CheckpointError as exc:
        parser.error(str(exc))
    return _run(args)


def _run(args) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from bam_megatron.data import build_data_iterator, build_datasets
    from bam_megatron.distributed import destroy_distributed, init_distributed
    from bam_megatron.flops import flops_per_token
    from bam_megatron.tokenizer import build_tokenizer, padded_vocab_size
    from bam_megatron.train_checkpoint import TrainState, load_checkpoint, resolve_load_dir, save_checkpoint

    # Everything that can be checked without a process group is checked first.
    config_bam = cli.bam_config_from_args(args)
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
    load_dir = resolve_load_dir(args.load) if args.load else None
    if load_dir:
        _check_checkpoint_matches(args, load_dir)
    if args.save and os.path.exists(args.save) and not os.path.isdir(args.save):
        raise CheckpointError(f"--save {args.save} exists and is not a directory")

    info = init_distributed(
        args.tensor_model_parallel_size,
        args.pipeline_model_parallel_size,
        args.expert_model_parallel_size,
        args.expert_tensor_parallel_size,
        seed=args.seed,
        timeout_minutes=args.distributed_timeout_minutes,
    )
    logger = None
    try:
        device = info.device
        config = cli.transformer_config_from_args(args)
        validate_bam_setup(config, config_bam)
        num_microbatches = _num_microbatches(args)

        model = [_model_provider(args, config, config_bam)]
        for m in model:
            m.to(device)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=args.overlap_grad_reduce,
            use_distributed_optimizer=args.use_distributed_optimizer,
        )
        model = [DistributedDataParallel(config, ddp_config, m) for m in model]
        config.no_sync_func = model[0].no_sync
        config.finalize_model_grads_func = finalize_model_grads
        if args.overlap_grad_reduce:
            config.grad_sync_func = model[0].start_grad_sync

        optimizer = None
        scheduler = None
        if not args.skip_train:
            optimizer = get_megatron_optimizer(cli.optimizer_config_from_args(args), model)
            gbs = args.global_batch_size
            scheduler = OptimizerParamScheduler(
                optimizer,
                init_lr=0.0,
                max_lr=args.lr,
                min_lr=args.min_lr,
                lr_warmup_steps=args.lr_warmup_iters * gbs,
                lr_decay_steps=args.lr_decay_iters * gbs,
                lr_decay_style=args.lr_decay_style,
                start_wd=args.weight_decay,
                end_wd=args.weight_decay,
                wd_incr_steps=args.train_iters * gbs,
                wd_incr_style="constant",
            )

        state = TrainState()
        if load_dir:
            state = load_checkpoint(
                load_dir, model, optimizer, scheduler,
                load_optim=not args.no_load_optim, load_rng=not args.no_load_rng, finetune=args.finetune,
            )
            print_rank_0(f"[checkpoint] loaded {load_dir} at iteration {state.iteration}")

        datasets = build_datasets(
            tokenizer,
            args.seq_length,
            data_path=args.data_path,
            split=args.split if args.data_path else None,
            valid_sets=args.valid_data_path,
            mock_data=args.mock_data,
            train_iters=args.train_iters or 0,
            global_batch_size=args.global_batch_size,
            eval_iters=args.eval_iters,
            eval_interval=args.eval_interval,
            seed=args.seed,
            reset_position_ids=args.reset_position_ids,
            reset_attention_mask=args.reset_attention_mask,
            eod_mask_loss=args.eod_mask_loss,
            data_cache_path=args.data_cache_path,
        )
        print_rank_0(f"[data] {datasets.summary()}")

        def iterator(dataset, consumed=0, cyclic=False):
            return _rng_neutral(build_data_iterator(
                dataset, micro_batch_size=args.micro_batch_size, consumed_samples=consumed,
                num_workers=args.num_workers, cyclic=cyclic,
            ))

        forward_backward_func = get_forward_backward_func()
        logger = MetricsLogger(args)
        summary: dict = {"train_losses": [], "valid": {}, "routing": {}}

        def run_validation(iteration: int) -> None:
            sets = []
            if datasets.valid is not None:
                sets.append((None, datasets.valid))
            sets += list(datasets.valid_sets.items())
            metrics = {}
            for name, ds in sets:
                with RoutingRecorder(model, args.num_layers) as recorder:
                    loss = evaluate(forward_backward_func, model, iterator(ds, cyclic=True), args, num_microbatches, device)
                routing = recorder.result()  # collective: every rank
                if name is not None and (routing["attention"] or routing["ffn"]):
                    summary["routing"][name] = routing
                if loss is None:
                    continue
                print_rank_last(validation_line(iteration, loss, name))
                key = f"validation/{name}" if name else "validation"
                metrics[f"{key}/lm loss"] = loss
                metrics[f"{key}/lm loss PPL"] = math.exp(min(20.0, loss))
                summary["valid"][name or "valid"] = loss
            logger.log(metrics, iteration)

        if not args.skip_train:
            state = _train(
                args, model, optimizer, scheduler, forward_backward_func, state,
                iterator(datasets.train, state.consumed_train_samples, cyclic=True),
                num_microbatches, device, logger, summary, run_validation, save_checkpoint,
                flops_per_token(
                    num_layers=args.num_layers, hidden_size=args.hidden_size,
                    num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
                    head_dim=args.kv_channels, ffn_hidden_size=args.ffn_hidden_size,
                    seq_length=args.seq_length, vocab_size=args.padded_vocab_size,
                    gated_linear_unit=args.swiglu, attn_experts=args.bam_attn_experts,
                    kv_sharing=args.bam_kv_sharing, ffn_experts=args.num_experts or 0,
                    ffn_topk=args.moe_router_topk,
                ),
            )
        run_validation(state.iteration)
        summary["iteration"] = state.iteration
        return summary
    finally:
        if logger is not None:
            logger.finish()
        destroy_distributed()


def _train(args, model, optimizer, scheduler, forward_backward_func, state, train_iter,
           num_microbatches, device, logger, summary, run_validation, save_checkpoint, fpt):
    from megatron.core import parallel_state as ps

    # Routing statistics of the training steps since the last log line (not of evaluations).
    recorder = RoutingRecorder(model, args.num_layers)
    args_dict = _args_dict(args)
    world = dist.get_world_size()
    nan_iters = 0
    window_start, window_iters = time.perf_counter(), 0
    last_saved = None

    def save():
        nonlocal last_saved
        if args.save and last_saved != state.iteration:
            path = save_checkpoint(args.save, state, model, optimizer, scheduler, args_dict, args.keep_last_checkpoints)
            last_saved = state.iteration
            print_rank_0(f"[checkpoint] saved {path}")

    for m in model:
        m.train()
    while state.iteration < args.train_iters:
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        with recorder:
            losses = forward_backward_func(
                forward_step_func=partial(_forward_step, device),
                data_iterator=train_iter,
                model=model,
                num_microbatches=num_microbatches,
                seq_length=args.seq_length,
                micro_batch_size=args.micro_batch_size,
                forward_only=False,
            )
        loss = _reduce_losses(losses)
        state.consumed_train_samples += args.global_batch_size
        state.iteration += 1
        bad_loss = loss is None or not math.isfinite(loss)
        if bad_loss or not _grads_finite(model):
            nan_iters += 1
            state.skipped_iterations += 1
            what = f"loss is {loss}" if bad_loss else "gradient is not finite"
            print_rank_last(f"[train] iteration {state.iteration}: {what}; step skipped "
                            f"({nan_iters}/{args.max_skipped_nan_iters} allowed)")
            if nan_iters > args.max_skipped_nan_iters:
                raise TrainingError(
                    f"{nan_iters} steps with a NaN/inf loss or gradient (more than --max-skipped-nan-iters "
                    f"{args.max_skipped_nan_iters}); stopping without saving. Lower --lr or check the data"
                )
            from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

            clear_aux_losses_tracker()  # the skipped step's aux losses must not reach the next log
            continue
        ok, grad_norm, _ = optimizer.step()
        if ok:
            scheduler.step(increment=args.global_batch_size)
        else:
            state.skipped_iterations += 1
        summary["train_losses"].append(loss)
        window_iters += 1

        if state.iteration % args.log_interval == 0 or state.iteration == args.train_iters:
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = (time.perf_counter() - window_start) / max(window_iters, 1)
            tokens_per_s = args.global_batch_size * args.seq_length / elapsed
            metrics = {"lm loss": loss}
            metrics.update(_moe_losses(args.num_layers, num_microbatches))
            lr = optimizer.param_groups[0]["lr"]
            line_losses = {k: v for k, v in metrics.items() if "/" not in k}
            print_rank_last(training_line(
                iteration=state.iteration, train_iters=args.train_iters,
                consumed_samples=state.consumed_train_samples, elapsed_ms=elapsed * 1e3,
                tflops_per_gpu=fpt * tokens_per_s / world / 1e12, tokens_per_s=tokens_per_s,
                lr=lr, global_batch_size=args.global_batch_size, losses=line_losses,
                grad_norm=grad_norm, skipped=state.skipped_iterations, nan_iters=nan_iters,
                memory=memory_gib(device),
            ))
            metrics.update(_routing_metrics(recorder.result()))  # collective: every rank logs here
            recorder = RoutingRecorder(model, args.num_layers)
            metrics.update({
                "learning-rate": lr, "grad-norm": grad_norm if grad_norm is not None else float("nan"),
                "throughput/tokens_per_s": tokens_per_s, "iteration-time-ms": elapsed * 1e3,
                "consumed-samples": state.consumed_train_samples,
            })
            logger.log(metrics, state.iteration)
            window_start, window_iters = time.perf_counter(), 0
        else:
            from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

            clear_aux_losses_tracker()

        paused = False
        if args.eval_interval and state.iteration % args.eval_interval == 0 and state.iteration < args.train_iters:
            run_validation(state.iteration)
            paused = True
        if args.save_interval and state.iteration % args.save_interval == 0:
            save()
            paused = True
        if paused:  # keep evaluation and checkpoint time out of the step time
            window_start, window_iters = time.perf_counter(), 0
    save()
    return state


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry: clear one-line errors for bad input, exit code 1."""
    from bam_megatron.data import DataConfigError
    from bam_megatron.tokenizer import TokenizerConfigError

    try:
        pretrain(argv)
    except (CheckpointError, BAMConfigError, TrainingError, DataConfigError, TokenizerConfigError, ValueError) as exc:
        # one write per line: the ranks of a torchrun job share stderr
        sys.stderr.write(f"pretrain_bam.py: error: {exc}\n")
        sys.stderr.flush()
        return 1
    return 0
