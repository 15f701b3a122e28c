"""Command line of ``pretrain_bam.py``, with Megatron-LM's flag names and meanings.

``parse_args`` returns an ``argparse.Namespace`` whose attribute names are Megatron-LM's
(``args.num_layers``, ``args.tensor_model_parallel_size``, ...); ``finalize_args`` fills the
derived defaults once. ``training/configs.py`` turns the result into megatron-core's
``TransformerConfig`` / ``OptimizerConfig`` and our ``BAMConfig``. This module imports neither
torch nor megatron-core, so ``--help`` and argument errors answer at once.
``MODEL_ARGS`` lists what defines the model (stored in every checkpoint and restored with
``--use-checkpoint-args``).

Errors in the arguments stop the program before any work with one line naming the flag and the
fix (``argparse``'s ``error``).
"""

from __future__ import annotations

import argparse
import os
from types import SimpleNamespace
from typing import List, Optional

from bam_megatron.checkpoint.opener.options import add_open_args
from bam_megatron.data.tokenizer_args import add_tokenizer_args
from bam_megatron.errors import LayoutError, reports_job_errors
from bam_megatron.model.model_args import ARCHITECTURE

# Arguments that define the model (and so must match a checkpoint that is loaded).
MODEL_ARGS = ARCHITECTURE


class _Parser(argparse.ArgumentParser):
    """``argparse`` without the 60-line usage dump before an error: one line, exit code 2,
    printed once per node of a launched job (every rank finds the same error)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n" if reports_job_errors() else None)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=False, help="Number of transformer layers.")
    g.add_argument("--hidden-size", type=int, help="Transformer hidden size.")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="FFN hidden size (default 4×hidden, or 8/3×hidden rounded with --swiglu).")
    g.add_argument("--num-attention-heads", type=int, help="Number of attention heads.")
    g.add_argument("--group-query-attention", action="store_true", help="Use grouped-query attention (with --num-query-groups).")
    g.add_argument("--num-query-groups", type=int, default=None, help="Number of key/value head groups (GQA).")
    g.add_argument("--kv-channels", type=int, default=None, help="Head dimension (default hidden/heads).")
    g.add_argument("--seq-length", type=int, help="Sequence length of training samples.")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="Longest position (default --seq-length).")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU FFN (gated SiLU).")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm", help="Norm type.")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="Norm epsilon.")
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default="learned_absolute", help="Position embedding.")
    g.add_argument("--rotary-base", type=int, default=10000, help="RoPE base.")
    g.add_argument("--rotary-percent", type=float, default=1.0, help="Fraction of the head dim RoPE rotates.")
    g.add_argument("--rotary-interleaved", action="store_true", help="RoPE rotates interleaved pairs (0,1), (2,3), ... of each head (GPT-J / Cohere style) instead of its two halves.")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", help="Separate input embedding and output layer weights.")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false", help="No biases in linear layers.")
    g.add_argument("--add-qkv-bias", action="store_true", help="Biases on the query, key and value projections only (Qwen2 style; with --disable-bias-linear).")
    g.add_argument("--qk-layernorm", action="store_true", help="Normalise every query and key head (--normalization over the head dimension) before RoPE (Qwen3 style).")
    g.add_argument("--hidden-dropout", type=float, default=0.1, help="Dropout after attention and FFN.")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="Dropout on attention probabilities.")
    g.add_argument("--init-method-std", type=float, default=0.02, help="Std of the normal weight init.")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="Pad the vocabulary to a multiple of this × TP.")
    g.add_argument("--bf16", action="store_true", help="bf16 weights and compute (the default on GPU; needs a GPU).")
    g.add_argument("--fp32", action="store_true", help="fp32 on GPU too (CPU always uses fp32).")


def _add_bam_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("BAM (attention experts and block type)")
    g.add_argument("--bam-attn-experts", type=int, default=1, help="Attention experts per layer (1 = ordinary attention). Spread over --expert-model-parallel-size.")
    g.add_argument("--bam-attn-routing", choices=["soft", "topk"], default="soft", help="Attention routing: soft (all experts, the paper's default) or top-k.")
    g.add_argument("--bam-attn-topk", type=int, default=1, help="k for --bam-attn-routing topk.")
    g.add_argument("--bam-attn-topk-no-renormalize", dest="bam_attn_topk_renormalize", action="store_false", help="Top-k attention: keep the softmax weights as they are instead of renormalising the k kept ones to sum to 1.")
    g.add_argument("--bam-kv-sharing", action="store_true", help="Share K,V across attention experts (Q,O per expert).")
    g.add_argument("--bam-sequential-block", action="store_true", help="Sequential blocks (attention then FFN, two norms) instead of parallel blocks.")


def _add_moe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mixture of experts (FFN)")
    g.add_argument("--num-experts", type=int, default=None, help="FFN experts per layer (none: dense FFN).")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="Expert FFN size (default --ffn-hidden-size).")
    g.add_argument("--moe-router-topk", type=int, default=2, help="Experts per token.")
    g.add_argument("--moe-router-pre-softmax", action="store_true", help="Softmax over all experts before top-k (BAM style); otherwise softmax over the k chosen (BTX style).")
    g.add_argument("--moe-router-type", choices=["linear", "nexus"], default="linear", help="FFN router: linear (megatron-core's) or nexus (logits from domain embeddings through a learned SwiGLU projection; Gritsch et al. 2024).")
    g.add_argument("--nexus-domain-size", type=int, default=None, help="Nexus: size of the domain embeddings (default --hidden-size).")
    g.add_argument("--nexus-projection-size", type=int, default=None, help="Nexus: hidden size of the SwiGLU projection from domain to expert embeddings (default --hidden-size).")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None, help="An always-on shared FFN expert of this hidden size beside the routed ones (Nexus: the seed's FFN).")
    g.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"], default="aux_loss", help="Load-balancing method.")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0, help="Load-balancing loss coefficient.")
    g.add_argument("--moe-z-loss-coeff", type=float, default=None, help="Router z-loss coefficient.")
    g.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default="allgather", help="Token dispatcher.")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="Tensor-parallel size.")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="Pipeline-parallel size.")
    g.add_argument("--expert-model-parallel-size", type=int, default=1, help="Expert-parallel size (FFN and attention experts).")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None, help="Tensor parallelism inside experts (default: --tensor-model-parallel-size).")
    g.add_argument("--sequence-parallel", action="store_true", help="Sequence parallelism (required for MoE with TP > 1).")
    g.add_argument("--use-distributed-optimizer", action="store_true", help="Shard optimizer state over data-parallel ranks.")
    g.add_argument("--overlap-grad-reduce", action="store_true", help="Overlap the gradient reduce with the backward pass.")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10, help="Collective timeout.")


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("batches and schedule")
    g.add_argument("--micro-batch-size", type=int, default=1, help="Sequences per micro-batch per data-parallel rank.")
    g.add_argument("--global-batch-size", type=int, default=None, help="Sequences per step (default micro × data-parallel size); the rest is gradient accumulation.")
    g.add_argument("--train-iters", type=int, default=None, help="Training steps.")
    g.add_argument("--lr", type=float, default=1e-4, help="Peak learning rate.")
    g.add_argument("--min-lr", type=float, default=0.0, help="Final learning rate of the decay.")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="Linear warm-up steps.")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="Decay steps (default --train-iters).")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="linear", help="Decay shape.")
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam", help="Optimizer (adam = AdamW).")
    g.add_argument("--weight-decay", type=float, default=0.01, help="Weight decay (constant; see --weight-decay-incr-style).")
    g.add_argument("--start-weight-decay", type=float, default=None, help="Weight decay at the start of a linear / cosine --weight-decay-incr-style.")
    g.add_argument("--end-weight-decay", type=float, default=None, help="Weight decay at --train-iters of a linear / cosine --weight-decay-incr-style.")
    g.add_argument("--weight-decay-incr-style", choices=["constant", "linear", "cosine"], default="constant", help="How weight decay goes from --start-weight-decay to --end-weight-decay over --train-iters (constant: --weight-decay throughout).")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="Gradient-norm clipping (0: off).")
    g.add_argument("--seed", type=int, default=1234, help="Random seed (init, data order, dropout).")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None, help="Activation recompute.")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None, help="Full recompute method.")
    g.add_argument("--recompute-num-layers", type=int, default=None, help="Layers per recompute chunk (full).")
    g.add_argument("--recompute-modules", nargs="*", default=None, help="Selective recompute modules: core_attn mlp moe moe_act.")
    g.add_argument("--max-skipped-nan-iters", type=int, default=10, help="Skip up to this many steps with a NaN/inf loss or gradient, then stop (without saving).")
    g.add_argument("--check-for-nan-in-loss-and-grad", action="store_true", help="Stop at the first step with a NaN/inf loss or gradient, without saving (Megatron-LM's check; instead of skipping up to --max-skipped-nan-iters steps).")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None, help="Indexed dataset prefix, or a weighted blend: 0.3 code 0.7 web.")
    g.add_argument("--split", default="969,30,1", help="Train,valid,test proportions of --data-path.")
    g.add_argument("--valid-data-path", nargs="*", default=None, help="Named validation sets NAME:PREFIX (each logged by name).")
    g.add_argument("--mock-data", action="store_true", help="Synthetic data (no files).")
    g.add_argument("--data-cache-path", default=None, help="Where dataset index caches go (default: <--save>/data_cache).")
    g.add_argument("--num-workers", type=int, default=0, help="Data-loader worker processes.")
    g.add_argument("--eod-mask-loss", action="store_true", help="No loss on end-of-document tokens.")
    g.add_argument("--reset-position-ids", action="store_true", help="Restart positions after each end-of-document.")
    g.add_argument("--reset-attention-mask", action="store_true", help="No attention across documents.")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="Checkpoint directory to write.")
    g.add_argument("--load", default=None, help="Checkpoint directory to resume / start from.")
    g.add_argument("--save-interval", type=int, default=None, help="Steps between checkpoints (a final one is always written).")
    g.add_argument("--keep-last-checkpoints", type=int, default=None, help="Delete all but the newest K checkpoints.")
    g.add_argument("--finetune", action="store_true", help="Load only the weights; start at iteration 0 (branching from a seed).")
    g.add_argument("--no-load-optim", action="store_true", help="Do not load optimizer state.")
    g.add_argument("--no-load-rng", action="store_true", help="Do not load RNG state.")
    g.add_argument("--use-checkpoint-args", action="store_true", help="Take the model and tokenizer arguments from the checkpoint to load (one log line per replaced command-line value).")
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist", help="Checkpoint format (torch_dist, the only one).")
    g.add_argument("--async-save", action="store_true", help="Write periodic checkpoints in the background: training goes on while a helper process writes and checksums them; each is published (tracker) once complete. Costs up to one more copy of the checkpointed state in host memory while it runs.")
    g.add_argument("--ckpt-fully-parallel-save", dest="ckpt_fully_parallel_save", action="store_true", default=True, help="Spread the writing of replicated tensors over the data-parallel ranks, each written once (the default).")
    g.add_argument("--no-ckpt-fully-parallel-save", dest="ckpt_fully_parallel_save", action="store_false", help="Data-parallel rank 0 writes every replicated tensor.")
    g.add_argument("--ckpt-fully-parallel-load", dest="ckpt_fully_parallel_load", action="store_true", default=True, help="Read each replicated tensor once, spread over the data-parallel ranks, and broadcast it (the default).")
    g.add_argument("--no-ckpt-fully-parallel-load", dest="ckpt_fully_parallel_load", action="store_false", help="Every data-parallel rank reads the replicated tensors it needs.")
    g.add_argument("--ckpt-assume-constant-structure", action="store_true", help="The model and optimizer state keep their structure during the run: plan the save once and reuse the plan.")
    g.add_argument("--pretrained-checkpoint", default=None, help="What a fresh start loads when --load holds no checkpoint yet (weights only, like --finetune): one command line for a first run and its requeues.")
    g.add_argument("--exit-on-missing-checkpoint", action="store_true", help="Stop with an error when --load holds no checkpoint (default: warn and start from scratch, or from --pretrained-checkpoint).")
    g.add_argument("--override-opt-param-scheduler", action="store_true", help="Resuming: this command line's LR schedule replaces the checkpoint's; the step count continues.")
    g.add_argument("--use-checkpoint-opt-param-scheduler", action="store_true", help="Resuming: keep the checkpoint's LR schedule whatever this command line says.")
    g.add_argument("--force-save-lock", action="store_true", help="Take over the lock of --save even from a run that looks alive (only when you know it is gone).")
    g.add_argument("--allow-save-rewind", action="store_true", help="Save into a --save whose newest checkpoint is ahead of this run (its tracker moves back).")
    add_open_args(g)


def _add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=10, help="Steps between log lines.")
    g.add_argument("--eval-interval", type=int, default=1000, help="Steps between validations.")
    g.add_argument("--eval-iters", type=int, default=10, help="Micro-batches per validation (per set).")
    g.add_argument("--skip-train", action="store_true", help="Only evaluate.")
    g.add_argument("--full-validation", action="store_true", help="Every validation makes one pass over each held-out set (every sample once), instead of --eval-iters batches.")
    g.add_argument("--wandb-project", default=None, help="Log to this wandb project (WANDB_MODE=offline works without network).")
    g.add_argument("--wandb-exp-name", default=None, help="wandb run name.")
    g.add_argument("--wandb-save-dir", default=None, help="wandb directory.")
    g.add_argument("--tensorboard-dir", default=None, help="Write TensorBoard events here.")


def _add_exit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preemption and stopping early (save a checkpoint, exit 0)")
    g.add_argument("--exit-signal-handler", action="store_true", help="On --exit-signal: finish the current iteration, save a checkpoint, exit 0.")
    g.add_argument("--exit-signal", choices=["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"], default="SIGTERM", help="The signal --exit-signal-handler acts on (e.g. SIGUSR1 with #SBATCH --signal=USR1@300).")
    g.add_argument("--exit-duration-in-mins", type=float, default=None, help="Save and exit after this many minutes of training.")
    g.add_argument("--exit-interval", type=int, default=None, help="Save and exit after an iteration divisible by this.")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="pretrain_bam.py",
        description="Train dense seeds, branched experts and BAM mixture-of-experts models on "
        "megatron-core (GPU: NCCL, bf16; no GPU: gloo, fp32).",
        allow_abbrev=False,
    )

    _add_model_args(p)
    _add_bam_args(p)
    _add_moe_args(p)
    _add_parallel_args(p)
    _add_schedule_args(p)
    _add_data_args(p)
    add_tokenizer_args(p, default="NullTokenizer")
    _add_checkpoint_args(p)
    _add_logging_args(p)
    _add_exit_args(p)
    return p


def _check(parser: argparse.ArgumentParser, ok: bool, message: str) -> None:
    if not ok:
        parser.error(message)


def finalize_args(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    """Fill Megatron-LM's derived defaults and check the combination (one-line errors)."""
    parser = parser or build_parser()
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length"):
        _check(parser, getattr(args, name) is not None, f"--{name.replace('_', '-')} is required (or --use-checkpoint-args with --load)")
    _check(parser, args.skip_train or args.train_iters is not None, "--train-iters is required unless --skip-train")
    _check(parser, args.hidden_size % args.num_attention_heads == 0 or args.kv_channels is not None,
           f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {args.num_attention_heads}; set --kv-channels")
    _check(parser, not (args.bf16 and args.fp32), "--bf16 and --fp32 exclude each other")
    _check(parser, not (args.group_query_attention and args.num_query_groups is None),
           "--group-query-attention needs --num-query-groups")
    if args.num_query_groups is None:
        args.num_query_groups = args.num_attention_heads
    args.group_query_attention = args.num_query_groups != args.num_attention_heads  # recorded consistently
    tp = args.tensor_model_parallel_size
    _check(parser, tp >= 1 and args.num_attention_heads % tp == 0,
           f"--num-attention-heads {args.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}")
    _check(parser, args.num_query_groups % tp == 0,
           f"--num-query-groups {args.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}")
    if args.kv_channels is None:
        args.kv_channels = args.hidden_size // args.num_attention_heads
    if args.ffn_hidden_size is None:
        if args.swiglu:
            args.ffn_hidden_size = int((4 * args.hidden_size * 2 / 3) / 64) * 64
        else:
            args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    _finalize_batch(args, parser)
    _check(parser, args.min_lr <= args.lr, f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    _finalize_weight_decay(args, parser)
    if not args.skip_train and args.lr_decay_style != "constant":
        _check(parser, args.lr_warmup_iters < args.lr_decay_iters,
               f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than --lr-decay-iters "
               f"{args.lr_decay_iters} (default --train-iters)")
    sources = sum(bool(x) for x in (args.data_path, args.mock_data))
    _check(parser, sources == 1 or (args.skip_train and args.valid_data_path),
           "give exactly one of --data-path and --mock-data (or --skip-train with --valid-data-path)")
    if args.tokenizer_type == "NullTokenizer":
        _check(parser, args.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")
    if args.num_experts is not None:
        _check(parser, args.moe_router_topk <= args.num_experts,
               f"--moe-router-topk {args.moe_router_topk} is larger than --num-experts {args.num_experts}")
        if args.moe_router_topk == 1:
            _check(parser, args.moe_router_pre_softmax, "--moe-router-topk 1 needs --moe-router-pre-softmax")
    else:
        _check(parser, args.moe_router_type == "linear" and args.moe_shared_expert_intermediate_size is None,
               "--moe-router-type nexus and --moe-shared-expert-intermediate-size need --num-experts")
    if args.moe_router_type == "nexus":
        args.nexus_domain_size = args.nexus_domain_size or args.hidden_size
        args.nexus_projection_size = args.nexus_projection_size or args.hidden_size
    _check(parser, not (args.finetune and args.load is None), "--finetune needs --load")
    _check(parser, not (args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler),
           "--override-opt-param-scheduler and --use-checkpoint-opt-param-scheduler exclude each other")
    _check(parser, args.exit_interval is None or args.exit_interval >= 1, "--exit-interval must be at least 1")
    _check(parser, not (args.use_checkpoint_args and args.load is None and args.pretrained_checkpoint is None),
           "--use-checkpoint-args needs --load (or --pretrained-checkpoint)")
    _check(parser, args.recompute_granularity != "full" or args.recompute_method is not None,
           "--recompute-granularity full needs --recompute-method uniform|block")
    check_layout(args)
    return args


def bam_config(args):
    """``BAMConfig`` (attention experts, routing, block type) of ``args``; its own checks raise
    ``BAMConfigError``."""
    from bam_megatron.model.config import BAMConfig

    return BAMConfig(
        attn_experts=args.bam_attn_experts,
        attn_routing=args.bam_attn_routing,
        attn_topk=args.bam_attn_topk,
        attn_topk_renormalize=args.bam_attn_topk_renormalize,
        kv_sharing=args.bam_kv_sharing,
        parallel_block=not args.bam_sequential_block,
        ffn_router=args.moe_router_type,
        nexus_domain_size=args.nexus_domain_size,
        nexus_projection_size=args.nexus_projection_size,
    )


def _config_view(args) -> SimpleNamespace:
    """The fields of megatron-core's ``TransformerConfig`` that ``validate_bam_setup`` reads, from
    the arguments (``configs.transformer_config_from_args`` builds the real one later)."""
    return SimpleNamespace(
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        num_layers=args.num_layers, ffn_hidden_size=args.ffn_hidden_size, normalization=args.normalization,
        num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        sequence_parallel=args.sequence_parallel, add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias, qk_layernorm=args.qk_layernorm,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        recompute_granularity=args.recompute_granularity, recompute_modules=args.recompute_modules or [],
    )


def check_layout(args) -> None:
    """The model, the parallel sizes and the launched world fit each other, checked on the
    arguments alone (no torch, before any process group): the rules of
    ``model/config.validate_bam_setup`` (e.g. FFN experts with TP > 1 need --sequence-parallel),
    ``parallel/sizes.validate_parallel_layout`` with torchrun's / SLURM's ``WORLD_SIZE``, and
    the global batch over the data-parallel ranks. Both run again on the built objects.

    Raises:
        BAMConfigError, LayoutError: one line naming the flags and the fix.
    """
    from bam_megatron.model.config import validate_bam_setup
    from bam_megatron.parallel.sizes import validate_parallel_layout

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    world = _world_size()
    validate_parallel_layout(world, tp, pp, args.expert_model_parallel_size, args.expert_tensor_parallel_size)
    validate_bam_setup(_config_view(args), bam_config(args))
    per_step = args.micro_batch_size * max(1, world // (tp * pp))
    if args.global_batch_size % per_step:
        raise LayoutError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} × data-parallel size {per_step // args.micro_batch_size}; pick a "
            f"multiple of {per_step}"
        )


def _world_size() -> int:
    """The launched world size (torchrun / the SLURM launcher set ``WORLD_SIZE``; 1 without)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _finalize_weight_decay(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's weight-decay schedule: constant ``--weight-decay`` (start = end), or
    ``--start-weight-decay`` to ``--end-weight-decay`` (both needed) over ``--train-iters``."""
    if args.weight_decay_incr_style == "constant":
        _check(parser, args.start_weight_decay is None and args.end_weight_decay is None,
               "--start-weight-decay / --end-weight-decay need --weight-decay-incr-style linear or cosine "
               "(constant uses --weight-decay)")
        args.start_weight_decay = args.end_weight_decay = args.weight_decay
        return
    _check(parser, args.start_weight_decay is not None and args.end_weight_decay is not None,
           f"--weight-decay-incr-style {args.weight_decay_incr_style} needs --start-weight-decay and --end-weight-decay")
    _check(parser, 0.0 <= args.start_weight_decay <= args.end_weight_decay,
           f"--start-weight-decay {args.start_weight_decay} must be between 0 and --end-weight-decay "
           f"{args.end_weight_decay} (weight decay only increases)")


def _finalize_batch(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """``--global-batch-size`` defaults to one micro-batch per data-parallel rank (Megatron-LM:
    data-parallel size = world size / (TP × PP), the world size from torchrun's WORLD_SIZE)."""
    _check(parser, args.micro_batch_size >= 1, f"--micro-batch-size must be at least 1, got {args.micro_batch_size}")
    world = _world_size()
    model_parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size
    data_parallel = max(1, world // model_parallel)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * data_parallel
    _check(parser, args.global_batch_size >= 1, f"--global-batch-size must be at least 1, got {args.global_batch_size}")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse without filling defaults that may come from a checkpoint (``--use-checkpoint-args``);
    call ``finalize_args`` once the checkpoint arguments, if any, are merged."""
    return build_parser().parse_args(argv)
