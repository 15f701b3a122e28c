"""megatron-core / BAM config objects, built from typed settings.

``transformer_config(ModelArgs, ParallelLayout, ComputeSettings)`` -> megatron-core
``TransformerConfig`` (shape, parallel layout, FFN experts, recompute) — what every program uses,
with the model as a checkpoint records it (``checkpoint/opener``) or as a training command line
gives it (``transformer_config_from_args``: the argument namespace stops there);
``bam_config_from_args`` -> ``BAMConfig`` (attention experts, block), ``gpt_model_kwargs`` (both
read a ``ModelArgs`` or a namespace), ``optimizer_config_from_args`` -> ``OptimizerConfig``. megatron-core's own checks of a config
(``ValueError`` / ``AssertionError`` in ``__post_init__``) become a one-line ``BAMConfigError``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from bam_megatron.errors import BAMConfigError
from bam_megatron.model.model_args import ModelArgs
from bam_megatron.parallel.device import accelerator_available, default_params_dtype


@dataclass(frozen=True)
class ParallelLayout:
    """Where the model runs: megatron-core's parallel sizes."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    sequence_parallel: bool = False

    @classmethod
    def from_namespace(cls, args) -> "ParallelLayout":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class ComputeSettings:
    """How the model computes: precision, activation recompute, token dispatcher."""

    fp32: bool = False
    bf16: bool = False
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[Tuple[str, ...]] = None
    moe_token_dispatcher_type: str = "allgather"

    @classmethod
    def from_namespace(cls, args) -> "ComputeSettings":
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def params_dtype(compute) -> torch.dtype:
    """bf16 on GPU (unless --fp32), fp32 on CPU (where --bf16 is refused)."""
    if getattr(compute, "bf16", False) and not accelerator_available():
        raise BAMConfigError("--bf16 needs a GPU; on the CPU training runs in fp32 (drop --bf16)")
    return default_params_dtype(compute.fp32)


def transformer_config_from_args(args):
    """megatron-core ``TransformerConfig`` of a training command line."""
    return transformer_config(ModelArgs.from_namespace(args), ParallelLayout.from_namespace(args),
                              ComputeSettings.from_namespace(args))


def transformer_config(model: ModelArgs, layout: ParallelLayout, compute: ComputeSettings):
    """megatron-core ``TransformerConfig`` of a model at a layout (shape, MoE, recompute)."""
    from megatron.core.transformer import TransformerConfig

    dtype = params_dtype(compute)
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        rotary_interleaved=model.rotary_interleaved,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=layout.tensor_model_parallel_size,
        pipeline_model_parallel_size=layout.pipeline_model_parallel_size,
        expert_model_parallel_size=layout.expert_model_parallel_size,
        expert_tensor_parallel_size=layout.expert_tensor_parallel_size,
        sequence_parallel=layout.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not accelerator_available(),
        recompute_granularity=compute.recompute_granularity,
        recompute_method=compute.recompute_method,
        recompute_num_layers=compute.recompute_num_layers,
    )
    if compute.recompute_modules is not None:
        kwargs["recompute_modules"] = list(compute.recompute_modules)
    if model.num_experts is not None:
        kwargs.update(_moe_kwargs(model, compute))
    try:
        return TransformerConfig(**kwargs)
    except (ValueError, AssertionError) as exc:  # megatron-core's own checks of the settings
        text = str(exc).strip().splitlines()
        raise BAMConfigError(f"megatron-core rejects the model settings: {text[0] if text else exc!r}") from None


def _moe_kwargs(model: ModelArgs, compute: ComputeSettings) -> dict:
    """TransformerConfig fields of the FFN mixture of experts."""
    return dict(
        num_moe_experts=model.num_experts,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size or model.ffn_hidden_size,
        moe_router_topk=model.moe_router_topk,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_router_load_balancing_type=model.moe_router_load_balancing_type,
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_z_loss_coeff=model.moe_z_loss_coeff,
        moe_token_dispatcher_type=compute.moe_token_dispatcher_type,
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
    )


def bam_config_from_args(args):
    """``BAMConfig`` (attention experts, routing, block type) of a ``ModelArgs`` or a command line
    (the same names; ``arguments.bam_config``)."""
    from bam_megatron.training.arguments import bam_config

    return bam_config(args)


def gpt_model_kwargs(args) -> dict:
    """The keyword arguments of ``model.build.build_bam_model`` besides the two configs:
    vocabulary, positions, embedding tying (of a ``ModelArgs`` or a command line)."""
    return dict(
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
    )


def optimizer_config_from_args(args):
    """megatron-core ``OptimizerConfig`` (AdamW / SGD, clipping, distributed optimizer)."""
    from megatron.core.optimizer import OptimizerConfig

    dtype = params_dtype(args)
    return OptimizerConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
