"""megatron-core / BAM config objects built once from the finalized arguments.

``transformer_config_from_args`` -> megatron-core ``TransformerConfig`` (shape, parallel layout,
FFN experts, recompute), ``bam_config_from_args`` -> ``BAMConfig`` (attention experts, block),
``optimizer_config_from_args`` -> ``OptimizerConfig``. megatron-core's own checks of a config
(``ValueError`` / ``AssertionError`` in ``__post_init__``) become a one-line ``BAMConfigError``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bam_megatron.errors import BAMConfigError
from bam_megatron.parallel.device import accelerator_available, default_params_dtype


def params_dtype(args) -> torch.dtype:
    """bf16 on GPU (unless --fp32), fp32 on CPU (where --bf16 is refused)."""
    if getattr(args, "bf16", False) and not accelerator_available():
        raise BAMConfigError("--bf16 needs a GPU; on the CPU training runs in fp32 (drop --bf16)")
    return default_params_dtype(args.fp32)


def transformer_config_from_args(args):
    """megatron-core ``TransformerConfig`` for ``args`` (shape, parallel layout, MoE, recompute)."""
    from megatron.core.transformer import TransformerConfig

    dtype = params_dtype(args)
    kwargs = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm,
        rotary_interleaved=args.rotary_interleaved,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=not accelerator_available(),
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
    )
    if args.recompute_modules is not None:
        kwargs["recompute_modules"] = args.recompute_modules
    if args.num_experts is not None:
        kwargs.update(_moe_kwargs(args))
    try:
        return TransformerConfig(**kwargs)
    except (ValueError, AssertionError) as exc:  # megatron-core's own checks of the settings
        text = str(exc).strip().splitlines()
        raise BAMConfigError(f"megatron-core rejects the model settings: {text[0] if text else exc!r}") from None


def _moe_kwargs(args) -> dict:
    """TransformerConfig fields of the FFN mixture of experts."""
    return dict(
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
        moe_router_topk=args.moe_router_topk,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
    )


def bam_config_from_args(args):
    """``BAMConfig`` (attention experts, routing, block type) of ``args`` (``arguments.bam_config``)."""
    from bam_megatron.training.arguments import bam_config

    return bam_config(args)


def gpt_model_kwargs(args) -> dict:
    """The keyword arguments of ``model.build.build_bam_model`` besides the two configs:
    vocabulary, positions, embedding tying."""
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
