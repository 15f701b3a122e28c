"""The fused Mixture of Attention equals a plain per-expert reference (outputs and gradients)."""

import math

import pytest
import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from support.models import tiny_config

from bam_megatron.model.config import BAMConfig
from bam_megatron.model.moa import MixtureOfAttention, route_attention

S, B = 12, 3


def _rotate(t, freqs):
    """RoPE written out: t [s, b, h, d], freqs [s, 1, 1, d] (halves layout)."""
    d = t.shape[-1]
    x1, x2 = t[..., : d // 2], t[..., d // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return t * freqs.cos() + rotated * freqs.sin()


def reference_moa(x, router_w, qkv, proj, freqs, *, heads, groups, head_dim, kv_sharing, routing, topk, renorm):
    """Loop over experts and heads.

    x [s, b, d]; router_w [N, d]; qkv: KV experts -> list of dense linear_qkv [G(r+2)dh, d];
    KV sharing -> (list of q [H dh, d], kv [2G dh, d]); proj: list of [d, H dh].
    """
    s, b, _ = x.shape
    r, dh = heads // groups, head_dim
    probs = torch.softmax(x @ router_w.t(), dim=-1)
    if routing == "topk":
        top, idx = probs.topk(topk, dim=-1)
        if renorm:
            top = top / top.sum(-1, keepdim=True)
        probs = torch.zeros_like(probs).scatter(-1, idx, top)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    out = torch.zeros_like(x)
    n = router_w.shape[0]
    for e in range(n):
        if kv_sharing:
            q = (x @ qkv[0][e].t()).view(s, b, groups, r, dh).reshape(s, b, heads, dh)
            kv = (x @ qkv[1].t()).view(s, b, groups, 2, dh)
        else:
            w = (x @ qkv[e].t()).view(s, b, groups, r + 2, dh)
            q = w[:, :, :, :r].reshape(s, b, heads, dh)
            kv = w[:, :, :, r:]
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]
        q, k = _rotate(q, freqs), _rotate(k, freqs)
        heads_out = []
        for h in range(heads):
            g = h // r
            scores = torch.einsum("sbd,tbd->bst", q[:, :, h], k[:, :, g]) / math.sqrt(dh)
            scores = scores.masked_fill(causal, float("-inf"))
            heads_out.append(torch.einsum("bst,tbd->sbd", scores.softmax(-1), v[:, :, g]))
        o = torch.cat(heads_out, dim=-1)
        out = out + probs[..., e : e + 1] * (o @ proj[e].t())
    return out


CASES = [
    # kv_sharing, routing, topk, renorm, groups
    (False, "soft", 1, True, 4),
    (True, "soft", 1, True, 4),
    (False, "soft", 1, True, 2),
    (True, "soft", 1, True, 2),
    (False, "topk", 2, True, 4),
    (True, "topk", 2, False, 2),
    (False, "topk", 1, False, 2),
]


@pytest.mark.parametrize("kv_sharing,routing,topk,renorm,groups", CASES)
def test_fused_moa_matches_reference(single_process, kv_sharing, routing, topk, renorm, groups):
    n, heads = 3, 4
    config = tiny_config(num_query_groups=groups)
    bam = BAMConfig(
        attn_experts=n, kv_sharing=kv_sharing, attn_routing=routing, attn_topk=topk,
        attn_topk_renormalize=renorm,
    )
    moa = MixtureOfAttention(config, bam, layer_number=1)
    with torch.no_grad():  # a router strong enough that routing matters
        moa.router.weight.normal_(0, 0.5)
    dh = config.kv_channels
    freqs = RotaryEmbedding(kv_channels=dh, rotary_percent=1.0)(S)
    x = torch.randn(S, B, config.hidden_size, requires_grad=True)

    out, bias = moa(x, attention_mask=None, rotary_pos_emb=freqs)
    assert bias is None and out.shape == x.shape

    router_w = moa.router.weight.detach().clone().requires_grad_()
    if kv_sharing:
        qs = moa.linear_q.weight.detach().clone().requires_grad_()
        kv = moa.linear_kv.weight.detach().clone().requires_grad_()
        qkv_ref, leaves = (list(qs), kv), [qs, kv]
    else:
        qkv = moa.linear_qkv.weight.detach().clone().requires_grad_()
        qkv_ref, leaves = list(qkv), [qkv]
    proj = moa.linear_proj.weight.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref = reference_moa(
        x_ref, router_w, qkv_ref, list(proj), freqs, heads=heads, groups=groups, head_dim=dh,
        kv_sharing=kv_sharing, routing=routing, topk=topk, renorm=renorm,
    )
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)

    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(moa.router.weight.grad, router_w.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(moa.linear_proj.weight.grad, proj.grad, atol=1e-5, rtol=1e-4)
    fused = [moa.linear_q.weight, moa.linear_kv.weight] if kv_sharing else [moa.linear_qkv.weight]
    for a, b in zip(fused, leaves):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4)
    assert moa.router.weight.grad.abs().sum() > 0
    # Logged router statistics: the mean routing weight of each expert.
    assert moa.last_router_mean.shape == (n,)
    if routing == "soft" or renorm:
        torch.testing.assert_close(moa.last_router_mean.sum(), torch.tensor(1.0))
    else:
        assert 0 < moa.last_router_mean.sum() < 1


def test_route_attention_topk_rules():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    soft = route_attention(logits, "soft", 1, True)
    torch.testing.assert_close(soft, torch.softmax(logits, -1))
    renorm = route_attention(logits, "topk", 2, True)
    assert (renorm[0, 2:] == 0).all()
    torch.testing.assert_close(renorm.sum(), torch.tensor(1.0))
    truncated = route_attention(logits, "topk", 2, False)
    torch.testing.assert_close(truncated[0, :2], soft[0, :2])
