"""The Mixture of Attention's KV cache, kept in megatron-core's static inference context.

megatron-core's ``SelfAttention`` keeps its cache in
``inference_context.key_value_memory_dict[layer_number] = (keys, values)``, one buffer pair per
layer allocated on the first forward with the context (``max_sequence_length`` × ``max_batch_size``
slots), and fills positions ``[sequence_len_offset, sequence_len_offset + s)`` on every call. The
Mixture of Attention does the same in the same dictionary, so one context serves a model whose
layers mix both kinds and its size is measured the same way (``inference/cache.py``).

What one token costs (per layer, K and V, on one tensor-parallel rank):

| attention | heads cached | bytes per token and layer |
|---|---|---|
| dense / BTX | ``G/TP`` | ``2·(G/TP)·dh·bytes`` |
| BAM shared KV | ``G/TP`` (one K, V for all experts) | the dense model's |
| BAM KV experts | ``N·G/TP`` (one K, V per expert) | ``N`` times the dense model's |

Expert parallelism: the Mixture of Attention gathers the tokens of the expert-parallel group
along the batch (every rank computes its ``N/EP`` experts for all of them), so each rank caches
the group's ``EP·b`` sequences: its ``N/EP`` experts' K, V (KV experts: the group together holds
``N`` per sequence, as at one process) or the shared K, V (shared KV: every rank of the group
holds a copy, ``EP`` per sequence).

Layout: ``[EP, max_batch, max_seq, heads, dh]`` (batch-major, the layout the attention reads);
rank ``j``'s rows of the gathered batch are slot ``j`` of the first axis, and the context's
``batch_size_offset`` indexes the second.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def static_context(inference_context) -> Optional[object]:
    """The context if it is a static-batching one; None for None.

    Raises:
        NotImplementedError: a dynamic-batching context (paged KV cache, flash-attention
            kernels), which the Mixture of Attention does not support.
    """
    if inference_context is None:
        return None
    if not inference_context.is_static_batching():
        raise NotImplementedError(
            "MixtureOfAttention supports megatron-core's static inference context "
            "(StaticInferenceContext), not dynamic batching"
        )
    return inference_context


def append_key_value(
    context, layer_number: int, key: torch.Tensor, value: torch.Tensor, groups: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Store this step's keys and values; return all cached ones of these sequences.

    Args:
        context: a static inference context (``sequence_len_offset``, ``batch_size_offset``,
            ``max_batch_size``, ``max_sequence_length``, ``key_value_memory_dict``).
        layer_number: the layer's global number (the cache key).
        key, value: ``[groups·b, s, heads, dh]`` for positions ``[offset, offset + s)``; the
            batch is ``groups`` consecutive blocks of ``b`` rows (one per expert-parallel rank).
        groups: the expert-parallel size.

    Returns:
        ``keys, values [groups·b, offset + s, heads, dh]``.
    """
    rows, s, heads, dh = key.shape
    b = rows // groups
    start, first = context.sequence_len_offset, context.batch_size_offset
    end = start + s
    if end > context.max_sequence_length:
        raise ValueError(
            f"positions up to {end} exceed the inference context's max_sequence_length "
            f"{context.max_sequence_length}"
        )
    if first + b > context.max_batch_size:
        raise ValueError(
            f"batch rows up to {first + b} exceed the inference context's max_batch_size "
            f"{context.max_batch_size}"
        )
    memory = context.key_value_memory_dict.get(layer_number)
    if memory is None:
        shape = (groups, context.max_batch_size, context.max_sequence_length, heads, dh)
        memory = tuple(torch.empty(shape, dtype=key.dtype, device=key.device) for _ in range(2))
        context.key_value_memory_dict[layer_number] = memory
    out = []
    for buffer, new in zip(memory, (key, value)):
        buffer[:, first : first + b, start:end] = new.view(groups, b, s, heads, dh)
        out.append(buffer[:, first : first + b, :end].reshape(rows, end, heads, dh))
    return out[0], out[1]


def causal_mask_from(offset: int, queries: int, keys: int, device) -> Optional[torch.Tensor]:
    """Mask of ``queries`` new tokens at positions ``[offset, offset + queries)`` over ``keys``
    cached positions: ``None`` when a plain causal (or no) mask is right, else bool
    ``[1, 1, queries, keys]`` with True = masked (megatron-core's convention)."""
    if queries == 1 or offset == 0:
        return None
    rows = torch.arange(queries, device=device).unsqueeze(1) + offset
    cols = torch.arange(keys, device=device).unsqueeze(0)
    return (cols > rows).view(1, 1, queries, keys)
