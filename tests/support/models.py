"""Tiny model configurations shared by the tests (fp32, CPU-sized)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

VOCAB = 96
SEQ = 16


def tiny_config(**overrides) -> TransformerConfig:
    """A 2-layer SwiGLU / RMSNorm / RoPE transformer config, no dropout, no biases."""
    kwargs = dict(
        num_layers=2,
        hidden_size=64,
        num_attention_heads=4,
        ffn_hidden_size=96,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        init_method_std=0.05,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def moe_overrides(num_experts: int, topk: int, pre_softmax: bool, **extra) -> dict:
    """TransformerConfig fields for an FFN mixture of ``num_experts`` experts."""
    return dict(
        num_moe_experts=num_experts,
        moe_router_topk=topk,
        moe_router_pre_softmax=pre_softmax,
        moe_token_dispatcher_type="alltoall",
        **extra,
    )


def batch(batch_size: int = 2, seed: int = 0):
    """Fixed tokens, position ids and labels ``[b, s]``."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=g)
    position_ids = torch.arange(SEQ).unsqueeze(0).expand(batch_size, SEQ)
    return tokens[:, :-1].contiguous(), position_ids.contiguous(), tokens[:, 1:].contiguous()
