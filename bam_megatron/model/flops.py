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

``parameter_counts`` gives the total and the per-token active parameters of the same shape
(``ModelShape``, built from the training arguments with ``ModelShape.from_args``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class ModelShape:
    """The sizes that determine a model's FLOPs and parameter count."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    gated_linear_unit: bool = True
    attn_experts: int = 1
    kv_sharing: bool = False
    attn_topk: Optional[int] = None  # None: soft routing (every attention expert is active)
    ffn_experts: int = 0
    ffn_topk: int = 1
    untied_output: bool = True
    sequential_block: bool = False
    bias: bool = False
    qkv_bias: bool = False  # biases on the query/key/value projection only (--add-qkv-bias)
    qk_layernorm: bool = False  # a norm over the head dim on queries and keys (--qk-layernorm)
    layernorm: bool = False  # LayerNorm (a bias per norm) instead of RMSNorm
    shared_ffn_size: int = 0  # an always-on shared FFN expert's hidden size (0: none)
    nexus_sizes: Optional[Tuple[int, int]] = None  # (D, P) of the Nexus router; None: linear router

    @classmethod
    def from_args(cls, args) -> "ModelShape":
        """The shape ``pretrain_bam.py``'s finalized arguments describe."""
        return cls(
            num_layers=args.num_layers, hidden_size=args.hidden_size,
            num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
            head_dim=args.kv_channels, ffn_hidden_size=args.ffn_hidden_size, vocab_size=args.padded_vocab_size,
            gated_linear_unit=args.swiglu, attn_experts=args.bam_attn_experts, kv_sharing=args.bam_kv_sharing,
            attn_topk=args.bam_attn_topk if args.bam_attn_routing == "topk" else None,
            ffn_experts=args.num_experts or 0, ffn_topk=args.moe_router_topk,
            untied_output=args.untie_embeddings_and_output_weights, sequential_block=args.bam_sequential_block,
            bias=args.add_bias_linear, qkv_bias=getattr(args, "add_qkv_bias", False),
            qk_layernorm=getattr(args, "qk_layernorm", False), layernorm=args.normalization == "LayerNorm",
            shared_ffn_size=getattr(args, "moe_shared_expert_intermediate_size", None) or 0,
            nexus_sizes=(args.nexus_domain_size, args.nexus_projection_size)
            if getattr(args, "moe_router_type", "linear") == "nexus" else None,
        )


def flops_per_token(*, seq_length: int, training: bool = True, shape: Optional[ModelShape] = None, **sizes) -> float:
    """FLOPs per token of one forward (+ backward when ``training``) pass; see module doc.
    ``shape``, or its fields as keywords."""
    m = shape or ModelShape(**sizes)
    d, h, g, dh = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim
    n_a = m.attn_experts
    n_kv = 1 if (n_a == 1 or m.kv_sharing) else n_a
    attn = 2 * d * dh * (n_a * h + n_kv * 2 * g + n_a * h)
    attn += 2 * 2 * seq_length * dh * n_a * h / 2
    if n_a > 1:
        attn += 2 * d * n_a
    per_expert = (3 if m.gated_linear_unit else 2) * 2 * d * m.ffn_hidden_size
    ffn = per_expert * (m.ffn_topk if m.ffn_experts else 1)
    if m.ffn_experts:
        ffn += 2 * d * m.ffn_experts
    ffn += (3 if m.gated_linear_unit else 2) * 2 * d * m.shared_ffn_size
    total = m.num_layers * (attn + ffn) + 2 * d * m.vocab_size
    return total * (3 if training else 1)


def parameter_counts(m: ModelShape) -> Tuple[int, int]:
    """``(total, active per token)`` parameters (weights, norms and their biases; linear biases
    when ``m.bias``, the query/key/value projection's when ``m.qkv_bias``).

    Active counts every attention expert under soft routing (``attn_topk=None``), ``attn_topk``
    of them under top-k routing, and ``ffn_topk`` FFN experts; embeddings count once (twice when
    the output layer is untied). ``shared_ffn_size``: an always-on shared FFN expert;
    ``nexus_sizes = (D, P)``: the Nexus router's projection (``2P·D + d·P``) in place of the linear
    router's ``N_f·d`` (its domain embeddings are buffers, not parameters)."""
    d, h, g, dh, f = m.hidden_size, m.num_attention_heads, m.num_query_groups, m.head_dim, m.ffn_hidden_size
    n_a = m.attn_experts
    shared_kv = m.kv_sharing and n_a > 1
    per_attn_expert = 2 * h * dh * d + (0 if shared_kv else 2 * g * dh * d)  # Q, O (+ K, V)
    per_ffn_expert = (3 if m.gated_linear_unit else 2) * d * f
    if m.bias or m.qkv_bias:
        per_attn_expert += (h + 2 * g) * dh
    if m.bias:
        per_attn_expert += d
        per_ffn_expert += (2 if m.gated_linear_unit else 1) * f + d
    norm = 2 if m.layernorm else 1  # weight (+ bias)
    if m.qk_layernorm:
        per_attn_expert += 2 * dh * norm
    n_f = max(m.ffn_experts, 1)
    router_f = m.ffn_experts * d
    if m.ffn_experts and m.nexus_sizes is not None:
        dom, proj = m.nexus_sizes
        router_f = 2 * proj * dom + d * proj
    shared_ffn = (3 if m.gated_linear_unit else 2) * d * m.shared_ffn_size
    layer_total = (n_a * per_attn_expert + (2 * g * dh * d if shared_kv else 0) + (n_a * d if n_a > 1 else 0)
                   + n_f * per_ffn_expert + shared_ffn + router_f + d * norm * (2 if m.sequential_block else 1))
    active_a = n_a if m.attn_topk is None else m.attn_topk
    active_f = m.ffn_topk if m.ffn_experts else 1
    layer_active = layer_total - (n_a - active_a) * per_attn_expert - (n_f - active_f) * per_ffn_expert
    outside = m.vocab_size * d * (2 if m.untied_output else 1) + d * norm  # embeddings, final norm
    return m.num_layers * layer_total + outside, m.num_layers * layer_active + outside
