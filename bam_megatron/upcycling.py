"""The BAM "Mix" mapping: dense seed tensors -> BAM tensors, as small pure functions.

Everything here works on *global* tensors in megatron-core's torch_dist checkpoint naming (what
``dist_checkpointing.load_plain_tensors`` returns), so it needs no process group and does not
depend on the parallel layout. Homogeneous decoder layers are stored stacked: a key
``decoder.layers.<name>`` holds ``[L, ...]`` (L layers); experts add an axis after it.

| seed key (dense)                               | BAM key                                      | rule |
|------------------------------------------------|----------------------------------------------|------|
| ``decoder.layers.self_attention.linear_qkv.weight [L, G(r+2)dh, d]`` | ``...self_attention.linear_qkv.weight [L, N, G(r+2)dh, d]`` | stack (``full``) |
|                                                | ``...self_attention.linear_q.weight [L, N, Hdh, d]`` + ``linear_kv.weight [L, 2Gdh, d]`` | stack q, average k/v (``shared-kv``) |
|                                                | same key, same shape                         | average (``merged``, BTX) |
| ``decoder.layers.self_attention.linear_proj.weight [L, d, Hdh]`` | ``... [L, N, d, Hdh]``            | stack (average for ``merged``) |
| ``decoder.layers.mlp.linear_fc1.weight [L, F', d]`` | ``decoder.layers.mlp.experts.experts.linear_fc1.weight [L, N, F', d]`` | stack |
| ``decoder.layers.mlp.linear_fc2.weight [L, d, F]`` | ``decoder.layers.mlp.experts.experts.linear_fc2.weight [L, N, d, F]`` | stack |
| anything else (embeddings, norms, output layer) | same key                                    | (weighted) average |
| —                                              | ``...self_attention.router.weight [L, N, d]``, ``...mlp.router.weight [L, N, d]`` | new: random or zero |

The dense ``linear_qkv`` rows are interleaved per query group ``[q (r heads) | k | v]``; the
``shared-kv`` split keeps that order (``linear_q`` rows: per group its r query heads;
``linear_kv`` rows: per group ``[k | v]``), which is what ``MixtureOfAttention`` expects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

MODES = ("full", "shared-kv", "merged")
ROUTER_INITS = ("random", "zero")

LAYER_PREFIX = "decoder.layers."
ATTN_QKV = "self_attention.linear_qkv."
ATTN_PROJ = "self_attention.linear_proj."
MLP_FC = ("mlp.linear_fc1.", "mlp.linear_fc2.")
EXPERTS_PREFIX = "mlp.experts.experts."
ATTN_ROUTER_KEY = LAYER_PREFIX + "self_attention.router.weight"
FFN_ROUTER_KEY = LAYER_PREFIX + "mlp.router.weight"


@dataclass(frozen=True)
class AttentionShape:
    """Head layout of the seeds' attention."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups


def average(tensors: Sequence[torch.Tensor], weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Weighted mean (uniform by default), computed in float32, returned in the input dtype."""
    if weights is None:
        weights = [1.0 / len(tensors)] * len(tensors)
    if len(weights) != len(tensors):
        raise ValueError(f"{len(weights)} weights for {len(tensors)} seeds")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for w, t in zip(weights, tensors):
        acc.add_(t.float(), alpha=float(w))
    return acc.to(tensors[0].dtype)


def stack_experts(tensors: Sequence[torch.Tensor], layered: bool) -> torch.Tensor:
    """Stack seed tensors as experts: axis 1 for layer-stacked ``[L, ...]`` tensors, else 0."""
    return torch.stack(list(tensors), dim=1 if layered else 0)


def split_qkv(qkv: torch.Tensor, shape: AttentionShape) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split a dense ``linear_qkv`` weight into its query rows and key/value rows.

    Args:
        qkv: ``[..., G·(r+2)·dh, d]`` with rows interleaved per group ``[q (r heads) | k | v]``.

    Returns:
        ``q [..., G·r·dh, d]`` (per group its r heads) and ``kv [..., G·2·dh, d]`` (per group
        ``[k | v]``).
    """
    g, r, dh = shape.num_query_groups, shape.heads_per_group, shape.head_dim
    lead, rows, d = qkv.shape[:-2], qkv.shape[-2], qkv.shape[-1]
    if rows != g * (r + 2) * dh:
        raise ValueError(
            f"linear_qkv has {rows} rows, expected {g * (r + 2) * dh} for {shape.num_attention_heads} "
            f"heads, {g} query groups and head dim {dh}"
        )
    grouped = qkv.reshape(*lead, g, (r + 2) * dh, d)
    q = grouped[..., : r * dh, :].reshape(*lead, g * r * dh, d)
    kv = grouped[..., r * dh :, :].reshape(*lead, g * 2 * dh, d)
    return q, kv


def upcycle_tensor(
    key: str,
    seeds: Sequence[torch.Tensor],
    *,
    mode: str,
    shape: AttentionShape,
    weights: Optional[Sequence[float]] = None,
) -> Dict[str, torch.Tensor]:
    """Map one seed key (its tensor in every seed, in expert order) to the BAM tensors.

    Returns:
        ``{bam_key: tensor}`` — one entry, or two for ``shared-kv`` attention.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    layered = key.startswith(LAYER_PREFIX)
    name = key[len(LAYER_PREFIX) :] if layered else key
    if name.startswith(ATTN_QKV) and mode != "merged":
        if mode == "full":
            return {key: stack_experts(seeds, layered)}
        qs, kvs = zip(*(split_qkv(t, shape) for t in seeds))
        suffix = name[len(ATTN_QKV) :]
        return {
            f"{LAYER_PREFIX}self_attention.linear_q.{suffix}": stack_experts(qs, layered),
            f"{LAYER_PREFIX}self_attention.linear_kv.{suffix}": average(kvs, weights),
        }
    if name.startswith(ATTN_PROJ) and mode != "merged":
        return {key: stack_experts(seeds, layered)}
    for fc in MLP_FC:
        if name.startswith(fc):
            new_key = LAYER_PREFIX + EXPERTS_PREFIX + name[len("mlp.") :]
            return {new_key: stack_experts(seeds, layered)}
    return {key: average(seeds, weights)}


def new_router(
    num_layers: int,
    num_experts: int,
    hidden_size: int,
    *,
    init: str,
    std: float,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A freshly initialised router weight ``[L, N, d]``: normal(0, std) or zeros."""
    if init not in ROUTER_INITS:
        raise ValueError(f"unknown router init {init!r}; choose one of {ROUTER_INITS}")
    out = torch.zeros(num_layers, num_experts, hidden_size, dtype=torch.float32)
    if init == "random":
        out.normal_(0.0, std, generator=generator)
    return out.to(dtype)


def upcycle_state(
    seeds: Sequence[Dict[str, torch.Tensor]],
    *,
    mode: str,
    shape: AttentionShape,
    weights: Optional[Sequence[float]] = None,
    router_init: str = "random",
    router_std: float = 0.02,
    seed: int = 0,
) -> Dict[str, torch.Tensor]:
    """Whole-state mapping of in-memory seeds (small models, tests). Streaming tools call
    ``upcycle_tensor`` key by key instead.

    Args:
        seeds: N dicts of global tensors (``load_plain_tensors`` output), expert order.
    """
    keys = list(seeds[0])
    for i, s in enumerate(seeds[1:], start=1):
        if list(s) != keys:
            missing = sorted(set(keys) ^ set(s))
            raise ValueError(f"seed {i} has different tensors than seed 0 (first: {missing[0]})")
    out: Dict[str, torch.Tensor] = {}
    for key in keys:
        out.update(upcycle_tensor(key, [s[key] for s in seeds], mode=mode, shape=shape, weights=weights))
    ln = seeds[0][LAYER_PREFIX + "input_layernorm.weight"]
    num_layers, hidden = ln.shape
    gen = torch.Generator().manual_seed(seed)
    n = len(seeds)
    if mode != "merged":
        out[ATTN_ROUTER_KEY] = new_router(num_layers, n, hidden, init=router_init, std=router_std, generator=gen, dtype=ln.dtype)
    out[FFN_ROUTER_KEY] = new_router(num_layers, n, hidden, init=router_init, std=router_std, generator=gen, dtype=ln.dtype)
    return out
