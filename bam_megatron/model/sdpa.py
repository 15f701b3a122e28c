"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``.

``fused_attention`` is the one attention call shared by dense attention and the Mixture of
Attention. ``SDPAttention`` plugs it into megatron-core's ``SelfAttention`` as its
``core_attention`` submodule (the dense seeds' attention): on an H100 it runs about twice as fast
as megatron-core's local ``DotProductAttention`` (flash / cuDNN kernels instead of a
materialised score matrix), and it matches it exactly on CPU.

Masks follow megatron-core's convention: a boolean tensor where ``True`` means "masked out".
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


def fused_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attention_mask: Optional[torch.Tensor],
    causal: bool,
    scale: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """One fused attention call; grouped-query attention when ``key`` has fewer heads.

    Args:
        query: ``[b, hq, s, d]``.
        key, value: ``[b, hk, s, d]``; ``hq`` must be a multiple of ``hk``. Query head ``i``
            attends with key/value head ``i // (hq // hk)``.
        attention_mask: ``None`` or bool ``[b or 1, 1, s, s]``, ``True`` = masked. When given it
            is used as is (it already encodes causality).
        causal: apply a causal mask when ``attention_mask`` is ``None``.
        scale: softmax scale (usually ``1/sqrt(d)``).
        dropout_p: attention dropout probability (pass 0 in eval).

    Returns:
        ``[b, hq, s, d]``.
    """
    hq, hk = query.shape[1], key.shape[1]
    if hq % hk:
        raise ValueError(f"query heads {hq} are not a multiple of key/value heads {hk}")
    mask = None if attention_mask is None else ~attention_mask
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=causal and mask is None,
        scale=scale,
        enable_gqa=hq != hk,
    )


def softmax_scale(config, head_dim: int) -> float:
    """The attention softmax scale megatron-core would use for ``config``."""
    if config.softmax_scale is not None:
        return config.softmax_scale
    return 1.0 / math.sqrt(head_dim)


class SDPAttention(MegatronModule):
    """megatron-core ``core_attention`` built on torch SDPA (no parameters).

    Takes ``query [s, b, hq, d]``, ``key``/``value [s, b, hk, d]`` and returns ``[s, b, hq*d]``,
    the contract of megatron-core's ``DotProductAttention``.
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPAttention does not support context parallelism")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.scale = softmax_scale

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None or packed_seq_params is not None:
            raise NotImplementedError("SDPAttention supports neither attention_bias nor packed sequences")
        mask_type = attn_mask_type or self.attn_mask_type
        s, b, hq, d = query.shape
        scale = self.scale if self.scale is not None else softmax_scale(self.config, d)
        out = fused_attention(
            query.permute(1, 2, 0, 3),
            key.permute(1, 2, 0, 3),
            value.permute(1, 2, 0, 3),
            attention_mask=attention_mask,
            causal=mask_type == AttnMaskType.causal,
            scale=scale,
            dropout_p=self.dropout_p if self.training else 0.0,
        )
        # [b, hq, s, d] -> [s, b, hq*d]
        return out.permute(2, 0, 1, 3).reshape(s, b, hq * d)
