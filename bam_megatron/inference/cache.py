"""The KV cache of a generation: megatron-core's ``StaticInferenceContext`` and its size.

One context serves every layer kind: megatron-core's ``SelfAttention`` (dense seeds, BTX) and the
Mixture of Attention (``model/kv_cache.py``) both keep ``(keys, values)`` per layer in
``context.key_value_memory_dict``, allocated for ``max_batch_size`` sequences of
``max_sequence_length`` positions on the first forward. ``cache_bytes`` and
``cache_bytes_per_token`` measure exactly what was allocated on this rank.
"""

from __future__ import annotations


def new_context(max_batch_size: int, max_sequence_length: int):
    """A fresh static inference context (empty cache, prefill mode, offsets 0)."""
    from megatron.core.inference.contexts.static_context import StaticInferenceContext

    return StaticInferenceContext(max_batch_size, max_sequence_length)


def cache_bytes(context) -> int:
    """Bytes of all K and V buffers allocated in ``context`` on this rank."""
    return sum(
        t.numel() * t.element_size()
        for pair in context.key_value_memory_dict.values()
        for t in pair
    )


def cache_bytes_per_token(context) -> float:
    """Bytes of KV cache per cached token (one position of one sequence) on this rank, all
    layers: ``cache_bytes / (max_batch_size · max_sequence_length)``."""
    return cache_bytes(context) / (context.max_batch_size * context.max_sequence_length)


def expected_bytes_per_token(config, bam, dtype_bytes: int, layers: int) -> int:
    """What one token should cost on one rank at EP = 1: per layer K and V of the cached heads —
    ``G/TP`` for dense attention and shared KV, ``N·G/TP`` for KV experts."""
    groups = (config.num_query_groups or config.num_attention_heads) // config.tensor_model_parallel_size
    heads = groups * (bam.attn_experts if bam.is_moa and not bam.kv_sharing else 1)
    return 2 * layers * heads * config.kv_channels * dtype_bytes
