"""Pure tensor rules shared by the Hugging Face adapters (no I/O, no process group).

megatron-core's fused ``linear_qkv`` weight ``[G·(r+2)·dh, d]`` holds, per query group ``g``,
its ``r = H/G`` query heads, then its key head, then its value head; Hugging Face models keep
``q_proj [H·dh, d]``, ``k_proj`` and ``v_proj [G·dh, d]`` apart, query head ``h`` using key/value
head ``h // r`` — the same grouping, so the rules are reshapes. Biases ``[rows]`` follow the same
rules (the functions act on axis 0). SwiGLU's ``linear_fc1 [2F, d]`` is ``[gate; up]``.

RoPE comes in two layouts of the rotated pairs inside a head: *halves* (dims ``i`` and
``i + rot/2``; Llama, megatron-core's default) and *interleaved* (dims ``2i`` and ``2i + 1``;
Cohere, ``--rotary-interleaved``). Permuting the query and key rows of every head with
``rope_permutation`` turns one into the other exactly (queries and keys are permuted alike, so
their dot products do not change).
"""

from __future__ import annotations

from typing import Tuple

import torch


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """``q [H·dh, ...]``, ``k``, ``v [G·dh, ...]`` -> megatron's ``[G·(r+2)·dh, ...]``."""
    rest = q.shape[1:]
    qg = q.reshape(groups, -1, *rest)
    kg = k.reshape(groups, head_dim, *rest)
    vg = v.reshape(groups, head_dim, *rest)
    return torch.cat([qg, kg, vg], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's ``linear_qkv [G·(r+2)·dh, ...]`` -> ``q [H·dh, ...]``, ``k``, ``v [G·dh, ...]``."""
    r, rest = heads // groups, qkv.shape[1:]
    grouped = qkv.reshape(groups, (r + 2) * head_dim, *rest)
    q = grouped[:, : r * head_dim].reshape(heads * head_dim, *rest)
    k = grouped[:, r * head_dim : (r + 1) * head_dim].reshape(groups * head_dim, *rest)
    v = grouped[:, (r + 1) * head_dim :].reshape(groups * head_dim, *rest)
    return q, k, v


def split_kv(kv: torch.Tensor, groups: int, head_dim: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shared-KV ``linear_kv [2·G·dh, ...]`` (per group ``[k | v]``) -> ``k``, ``v [G·dh, ...]``."""
    rest = kv.shape[1:]
    grouped = kv.reshape(groups, 2 * head_dim, *rest)
    return grouped[:, :head_dim].reshape(-1, *rest), grouped[:, head_dim:].reshape(-1, *rest)


def join_kv(k: torch.Tensor, v: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """``k``, ``v [G·dh, ...]`` -> shared-KV ``linear_kv [2·G·dh, ...]``."""
    rest = k.shape[1:]
    return torch.cat([k.reshape(groups, head_dim, *rest), v.reshape(groups, head_dim, *rest)], dim=1).reshape(-1, *rest)


def split_gate_up(fc1: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """SwiGLU ``linear_fc1 [2F, ...]`` -> ``gate``, ``up [F, ...]``."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def join_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gate``, ``up [F, ...]`` -> ``linear_fc1 [2F, ...]``."""
    return torch.cat([gate, up], dim=0)


def rope_permutation(head_dim: int, rotary_dims: int, to_interleaved: bool) -> torch.Tensor:
    """Index ``p [dh]`` with ``new = old[p]`` per head, turning halves-layout RoPE rows into the
    interleaved layout (``to_interleaved``) or back. Dims past ``rotary_dims`` stay."""
    half = rotary_dims // 2
    p = torch.arange(head_dim)
    p[0:rotary_dims:2] = torch.arange(half)
    p[1:rotary_dims:2] = torch.arange(half, rotary_dims)
    return p if to_interleaved else torch.argsort(p)


def permute_heads(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Apply ``rope_permutation`` inside every head of ``t [n·dh, ...]`` (rows of a query or key
    projection, its bias) or of a per-head ``[dh]`` norm weight."""
    dh = perm.numel()
    rest = t.shape[1:]
    return t.reshape(-1, dh, *rest).index_select(1, perm).reshape(t.shape)


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t [V, ...]`` with zero rows appended up to ``rows`` (vocabulary padding)."""
    if t.shape[0] == rows:
        return t
    out = torch.zeros((rows,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    return out
