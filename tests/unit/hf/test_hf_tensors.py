"""The pure tensor rules of the Hugging Face adapters."""

import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from bam_megatron.hf import tensors as T
from bam_megatron.upcycle.mapping import AttentionShape, split_qkv


def test_qkv_interleaving_is_megatrons_per_group_layout():
    heads, groups, dh, d = 6, 2, 4, 5
    q, k, v = torch.randn(heads * dh, d), torch.randn(groups * dh, d), torch.randn(groups * dh, d)
    qkv = T.interleave_qkv(q, k, v, groups, dh)
    r = heads // groups
    for g in range(groups):  # group g: its r query heads, then its key head, then its value head
        rows = qkv[g * (r + 2) * dh : (g + 1) * (r + 2) * dh]
        assert torch.equal(rows[: r * dh], q[g * r * dh : (g + 1) * r * dh])
        assert torch.equal(rows[r * dh : (r + 1) * dh], k[g * dh : (g + 1) * dh])
        assert torch.equal(rows[(r + 1) * dh :], v[g * dh : (g + 1) * dh])
    back = T.split_qkv(qkv, heads, groups, dh)
    assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))
    bias = T.interleave_qkv(q[:, 0], k[:, 0], v[:, 0], groups, dh)
    assert torch.equal(bias, qkv[:, 0])
    # the upcycle tool's shared-KV split of the same weight agrees
    q_rows, kv_rows = split_qkv(qkv, AttentionShape(heads, groups, dh))
    assert torch.equal(q_rows, q)
    assert all(torch.equal(a, b) for a, b in zip(T.split_kv(kv_rows, groups, dh), (k, v)))
    assert torch.equal(T.join_kv(k, v, groups, dh), kv_rows)


def test_gate_up_and_vocabulary_padding():
    gate, up = torch.randn(3, 2), torch.randn(3, 2)
    assert all(torch.equal(a, b) for a, b in zip(T.split_gate_up(T.join_gate_up(gate, up)), (gate, up)))
    padded = T.pad_rows(gate, 5)
    assert padded.shape == (5, 2) and torch.equal(padded[:3], gate) and not padded[3:].any()


def test_rope_permutation_turns_one_layout_into_the_other_exactly():
    """Interleaved RoPE on permuted query/key heads gives the dot products of halves-layout RoPE."""
    s, heads, dh = 7, 3, 8
    q, k = torch.randn(s, 1, heads, dh, dtype=torch.float64), torch.randn(s, 1, heads, dh, dtype=torch.float64)
    inv = 1.0 / (10000 ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    freqs = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    halves = torch.cat([freqs, freqs], -1)[:, None, None]
    inter = torch.repeat_interleave(freqs, 2, -1)[:, None, None]
    perm = T.rope_permutation(dh, dh, to_interleaved=True)

    def scores(a, b):
        return torch.einsum("shd,thd->hst", a[:, 0], b[:, 0])

    ref = scores(_apply_rotary_pos_emb_bshd(q, halves), _apply_rotary_pos_emb_bshd(k, halves))
    qp, kp = q[..., perm], k[..., perm]
    got = scores(_apply_rotary_pos_emb_bshd(qp, inter, rotary_interleaved=True),
                 _apply_rotary_pos_emb_bshd(kp, inter, rotary_interleaved=True))
    torch.testing.assert_close(got, ref)
    back = T.rope_permutation(dh, dh, to_interleaved=False)
    assert torch.equal(perm[back], torch.arange(dh))
    w = torch.randn(heads * dh, 4)
    assert torch.equal(T.permute_heads(w, perm).view(heads, dh, 4), w.view(heads, dh, 4)[:, perm])
