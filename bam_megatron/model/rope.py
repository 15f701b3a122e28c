"""Rotary position embedding for the Mixture of Attention's query and key heads.

megatron-core's unfused RoPE makes about six passes over its input (cos/sin products, the
rotated half built with ``cat``, then a final ``cat`` with the non-rotated part). MoA applies it
to N times as many query heads as dense attention, so on a GPU we compile the same formula with
``torch.compile`` into one kernel (forward and backward). Elsewhere megatron-core's function is
used as is. Both follow megatron-core's layout: ``t [s, b, h, d]`` (any strides) and
``freqs [s, 1, 1, d_rot]``.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb


def _rope_halves(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE over the full head dim: ``t·cos + rotate_half(t)·sin``."""
    x1, x2 = t.chunk(2, dim=-1)
    cos, sin = freqs.cos().to(t.dtype), freqs.sin().to(t.dtype)
    return t * cos + torch.cat((-x2, x1), dim=-1) * sin


@functools.lru_cache(maxsize=None)
def _compiled_rope():
    return torch.compile(_rope_halves, dynamic=False, fullgraph=True)


def _can_fuse(t: torch.Tensor, freqs: torch.Tensor, config) -> bool:
    return (
        t.is_cuda
        and freqs.shape[-1] == t.shape[-1]
        and not config.rotary_interleaved
        and not config.multi_latent_attention
        and not config.apply_rope_fusion
    )


def apply_rope(t: torch.Tensor, freqs: torch.Tensor, config) -> torch.Tensor:
    """RoPE on ``t [s, b, h, d]`` with megatron-core's ``freqs [s, 1, 1, d]``."""
    if _can_fuse(t, freqs, config):
        return _compiled_rope()(t, freqs)
    return apply_rotary_pos_emb(t, freqs, config=config)
