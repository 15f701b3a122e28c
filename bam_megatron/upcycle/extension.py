"""Adding an expert to a mixture of experts: the rules, as small pure functions on tensors.

A trained (or freshly mixed) BAM / BTX checkpoint with ``n`` FFN experts and a dense model of
the same architecture (a new domain expert, branched from the same seed) become a model with
``n + 1`` FFN experts — and, for BAM, ``N + 1`` attention experts. Keys are megatron-core's global
checkpoint keys (layer axis first, then the expert axis); ``dense`` keys are canonical
(``mapping.canonical_key``).

| MoE key                                              | rule          | output |
|------------------------------------------------------|---------------|--------|
| ``decoder.layers.mlp.experts.experts.X [L, n, ...]`` | ``append``    | ``[L, n+1, ...]``: expert n = dense ``decoder.layers.mlp.X`` |
| ``...self_attention.linear_qkv / linear_proj.* [L, N, ...]`` (attention experts) | ``append`` | expert N = the dense attention |
| ``...self_attention.linear_q.weight [L, N, H·dh, d]`` (shared KV) | ``append_q``  | expert N = the dense ``linear_qkv``'s query rows |
| ``...self_attention.linear_kv.weight [L, 2G·dh, d]`` (shared KV)  | ``merge_kv``  | ``(1-λ)·MoE + λ·`` the dense key/value rows |
| ``...self_attention.router.weight [L, N, d]``, ``...mlp.router.weight [L, n, d]`` (linear) | ``router_row`` | new row = the mean of the existing rows |
| ``...mlp.router.domain_embeddings [L, n, D]`` (Nexus) | ``domain``   | new row = the new domain embedding, every layer |
| ``...mlp.router.projection_fc1/2.weight`` (Nexus), ``...mlp.shared_experts.*`` | ``copy`` | unchanged |
| anything else (embeddings, norms, output layer; BTX's averaged attention) | ``merge`` | ``(1-λ)·MoE + λ·dense`` |

λ defaults to ``1/(n+1)`` with ``n`` the dense models already averaged into the MoE (its FFN
experts, plus one for a shared expert): the merged weights stay the uniform mean over every
dense model, as if all had been mixed at once.

**The linear routers' rule.** A linear router has no input that describes a new expert, so its
new row is the mean of the existing rows (per layer): the new expert's logit for every token is
the mean of the others' logits — neutral, no token's top-1 choice changes at the start (the new
logit never exceeds the largest), the soft attention router gives the new attention expert a
share like an average expert's, and the fine-tune learns the row. The Nexus router needs no rule:
the new expert's router entry is its domain embedding through the trained projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from bam_megatron.upcycle import mapping as U

APPEND, APPEND_Q, MERGE, MERGE_KV, ROUTER_ROW, DOMAIN, COPY = (
    "append", "append_q", "merge", "merge_kv", "router_row", "domain", "copy")
# Rules whose output gains an expert along axis 1 (after the layer axis).
GROWS = (APPEND, APPEND_Q, ROUTER_ROW, DOMAIN)
QKV = U.LAYER_PREFIX + "self_attention.linear_qkv.weight"


@dataclass(frozen=True)
class ExtendRule:
    """What happens to one MoE key; ``source``: the dense key it reads (None: none)."""

    kind: str
    source: Optional[str]


def extension_rule(key: str, attention_experts: bool) -> ExtendRule:
    """The rule for the MoE ``key`` (see the module table); ``attention_experts``: the MoE has a
    Mixture of Attention (BAM), not averaged attention (BTX)."""
    lp = U.LAYER_PREFIX
    name = key[len(lp):] if key.startswith(lp) else None
    if name is None:
        return ExtendRule(MERGE, key)
    if name.startswith(U.EXPERTS_PREFIX):
        return ExtendRule(APPEND, lp + "mlp." + name[len(U.EXPERTS_PREFIX):])
    if key in (U.ATTN_ROUTER_KEY, U.FFN_ROUTER_KEY, lp + "mlp.router.bias"):
        return ExtendRule(ROUTER_ROW, None)
    if key == U.NEXUS_DOMAIN_KEY:
        return ExtendRule(DOMAIN, None)
    if key in (U.NEXUS_FC1_KEY, U.NEXUS_FC2_KEY) or name.startswith(U.SHARED_PREFIX):
        return ExtendRule(COPY, None)
    if name == "self_attention.linear_q.weight":
        return ExtendRule(APPEND_Q, QKV)
    if name == "self_attention.linear_kv.weight":
        return ExtendRule(MERGE_KV, QKV)
    if attention_experts and name.startswith((U.ATTN_QKV, U.ATTN_PROJ)):
        return ExtendRule(APPEND, key)
    return ExtendRule(MERGE, key)


def grown_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """``[L, n, ...]`` -> ``[L, n + 1, ...]``."""
    return (shape[0], shape[1] + 1) + tuple(shape[2:])


def expected_dense_shape(rule: ExtendRule, moe_shape: Tuple[int, ...], attn: U.AttentionShape) -> Optional[Tuple[int, ...]]:
    """The shape the dense ``rule.source`` must have for the MoE tensor of ``moe_shape``."""
    g, r, dh = attn.num_query_groups, attn.heads_per_group, attn.head_dim
    if rule.kind == APPEND:
        return (moe_shape[0],) + tuple(moe_shape[2:])
    if rule.kind in (APPEND_Q, MERGE_KV):
        return (moe_shape[0], g * (r + 2) * dh, moe_shape[-1])
    if rule.kind == MERGE:
        return tuple(moe_shape)
    return None


def dense_part(rule: ExtendRule, dense: torch.Tensor, attn: U.AttentionShape) -> torch.Tensor:
    """The dense tensor a rule uses: the query rows (``append_q``), the key/value rows
    (``merge_kv``), else the tensor itself."""
    if rule.kind == APPEND_Q:
        return U.split_qkv(dense, attn)[0]
    if rule.kind == MERGE_KV:
        return U.split_qkv(dense, attn)[1]
    return dense


def new_router_row(router: torch.Tensor) -> torch.Tensor:
    """The linear routers' rule: ``[L, n, ...]`` -> the mean row ``[L, 1, ...]`` (fp32 mean, in
    the router's dtype)."""
    return router.float().mean(dim=1, keepdim=True).to(router.dtype)


def extend_tensor(
    rule: ExtendRule,
    moe: torch.Tensor,
    dense: Optional[torch.Tensor],
    *,
    merge_weight: float,
    attn: U.AttentionShape,
    domain: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One MoE tensor (whole, or a block of its layers) with the new expert.

    Args:
        moe: the MoE's tensor ``[L, ...]`` (or ``[...]`` outside the layer stack).
        dense: the dense model's ``rule.source`` over the same layers (None for rules without).
        merge_weight: λ, the dense model's weight in ``merge`` / ``merge_kv``.
        domain: ``[D]`` the new expert's domain embedding (``domain`` rule).
    """
    if rule.kind == COPY:
        return moe
    if rule.kind == ROUTER_ROW:
        return torch.cat([moe, new_router_row(moe)], dim=1)
    if rule.kind == DOMAIN:
        row = domain.to(moe.dtype).expand(moe.shape[0], 1, moe.shape[2])
        return torch.cat([moe, row], dim=1)
    part = dense_part(rule, dense, attn)
    if rule.kind in (APPEND, APPEND_Q):
        return torch.cat([moe, part.unsqueeze(1).to(moe.dtype)], dim=1)
    return U.average([moe, part], [1.0 - merge_weight, merge_weight])
