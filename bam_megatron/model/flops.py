"""Model FLOPs per token (the "model TFLOP/s" numerator), for dense, BTX and BAM models.

Matrix multiplications only, 2 FLOPs per multiply-add, forward pass; training (forward +
backward) is 3× that. With ``d`` hidden size, ``H`` heads, ``G`` query groups, ``dh`` head dim,
``F`` FFN size, ``s`` sequence length, ``V`` vocabulary, ``N_a`` attention experts (all active
under soft routing; ``k_a`` under top-k), ``N_f`` FFN experts of which ``k`` are active:

    attention projections  2·d·dh·(N_a·H [Q] + N_kv·2G [K,V] + N_a·H [O])
                           with N_kv = N_a (KV experts), 1 (shared KV or dense)
    attention scores       2·2·s·dh·N_a·H · 1/2          (QK^T and PV, causal: half the matrix)
    attention router       2·d·N_a                       (when N_a > 1)
    FFN (SwiGLU)           k·3·2·d·F   (gated: 2·d·2F + 2·F·d; non-gated: 2·2·d·F)
    shared FFN expert      3·2·d·F_s                     (always on, when there is one)
    FFN router             2·d·N_f                       (when there are FFN experts; the Nexus
                                                         router's projection of N_f domain
                                                         embeddings is per step, not per token)
    output layer           2·d·V                         (once, not per layer)

Top-k attention routing still computes every expert (the fused kernel masks the weights), so
``N_a`` counts all attention experts in both routing modes: the FLOPs actually executed.
"""

from __future__ import annotations

from typing import Optional, Tuple


def flops_per_token(
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    head_dim: int,
    ffn_hidden_size: int,
    seq_length: int,
    vocab_size: int,
    gated_linear_unit: bool = True,
    attn_experts: int = 1,
    kv_sharing: bool = False,
    ffn_experts: int = 0,
    ffn_topk: int = 1,
    shared_ffn_size: int = 0,
    training: bool = True,
) -> float:
    """FLOPs per token of one forward (+ backward when ``training``) pass; see module doc."""
    d, h, g, dh = hidden_size, num_attention_heads, num_query_groups, head_dim
    n_a = attn_experts
    n_kv = 1 if (n_a == 1 or kv_sharing) else n_a
    attn = 2 * d * dh * (n_a * h + n_kv * 2 * g + n_a * h)
    attn += 2 * 2 * seq_length * dh * n_a * h / 2
    if n_a > 1:
        attn += 2 * d * n_a
    per_expert = (3 if gated_linear_unit else 2) * 2 * d * ffn_hidden_size
    ffn = per_expert * (ffn_topk if ffn_experts else 1)
    if ffn_experts:
        ffn += 2 * d * ffn_experts
    ffn += (3 if gated_linear_unit else 2) * 2 * d * shared_ffn_size
    total = num_layers * (attn + ffn) + 2 * d * vocab_size
    return total * (3 if training else 1)


def parameter_counts(
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    head_dim: int,
    ffn_hidden_size: int,
    vocab_size: int,
    gated_linear_unit: bool = True,
    attn_experts: int = 1,
    kv_sharing: bool = False,
    attn_topk: Optional[int] = None,
    ffn_experts: int = 0,
    ffn_topk: int = 1,
    shared_ffn_size: int = 0,
    nexus_sizes: Optional[Tuple[int, int]] = None,
    untied_output: bool = True,
    sequential_block: bool = False,
    bias: bool = False,
) -> Tuple[int, int]:
    """``(total, active per token)`` parameters (weights, norms; biases when ``bias``).

    Active counts every attention expert under soft routing (``attn_topk=None``), ``attn_topk``
    of them under top-k routing, and ``ffn_topk`` FFN experts; embeddings count once (twice when
    the output layer is untied). ``shared_ffn_size``: an always-on shared FFN expert;
    ``nexus_sizes = (D, P)``: the Nexus router's projection (``2P·D + d·P``) in place of the linear
    router's ``N_f·d`` (its domain embeddings are buffers, not parameters)."""
    d, h, g, dh, f = hidden_size, num_attention_heads, num_query_groups, head_dim, ffn_hidden_size
    n_a = attn_experts
    q_o = 2 * h * dh * d  # Q and O of one attention expert
    kv = 2 * g * dh * d  # K and V of one expert (or the shared ones)
    per_attn_expert = q_o + (0 if kv_sharing and n_a > 1 else kv)
    shared_attn = kv if kv_sharing and n_a > 1 else 0
    router_a = n_a * d if n_a > 1 else 0
    per_ffn_expert = (3 if gated_linear_unit else 2) * d * f
    if bias:
        per_attn_expert += (h + 2 * g) * dh + d
        per_ffn_expert += (2 if gated_linear_unit else 1) * f + d
    router_f = ffn_experts * d
    if ffn_experts and nexus_sizes is not None:
        dom, proj = nexus_sizes
        router_f = 2 * proj * dom + d * proj
    shared_ffn = (3 if gated_linear_unit else 2) * d * shared_ffn_size
    norms = d * (2 if sequential_block else 1)
    n_f = max(ffn_experts, 1)
    layer_total = n_a * per_attn_expert + shared_attn + router_a + n_f * per_ffn_expert + shared_ffn + router_f + norms
    active_a = n_a if attn_topk is None else attn_topk
    active_f = ffn_topk if ffn_experts else 1
    layer_active = layer_total - (n_a - active_a) * per_attn_expert - (n_f - active_f) * per_ffn_expert
    outside = vocab_size * d * (2 if untied_output else 1) + d  # embeddings, final norm
    return num_layers * layer_total + outside, num_layers * layer_active + outside
