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

With a shared FFN expert (``shared_expert=True``, Nexus' layout) seed 0's FFN becomes the
always-on ``decoder.layers.mlp.shared_experts.linear_fc1/2.weight [L, F', d] / [L, d, F]`` (as it
is) and seeds 1..N-1 the N-1 routed experts (rule ``shared_stack``); the Nexus router's tensors
are made by ``upcycle/nexus.py``.

The dense ``linear_qkv`` rows are interleaved per query group ``[q (r heads) | k | v]``; the
``shared-kv`` split keeps that order (``linear_q`` rows: per group its r query heads;
``linear_kv`` rows: per group ``[k | v]``), which is what ``MixtureOfAttention`` expects.

Seeds written with Transformer Engine layers name the fused norms after the following linear
layer (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``);
``canonical_key`` maps them to ``input_layernorm`` / ``pre_mlp_layernorm``. ``tensor_rule`` says
what happens to one key (stack / average / split); ``upcycle_tensor`` and ``upcycle_state``
apply it to whole in-memory tensors, ``bam_megatron/upcycle_tool.py`` applies it slice by slice
to checkpoints on disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from bam_megatron.checkpoint.keys import (  # noqa: F401  (the key names, re-exported for the mapping's users)
    ATTN_PROJ,
    ATTN_QKV,
    ATTN_ROUTER_KEY,
    DENSE_GLOBAL_NAMES,
    DENSE_LAYER_NAMES,
    EXPERTS_PREFIX,
    FFN_ROUTER_KEY,
    LAYER_PREFIX,
    MLP_FC,
    NEXUS_DOMAIN_KEY,
    NEXUS_FC1_KEY,
    NEXUS_FC2_KEY,
    SHARED_FC1_KEY,
    SHARED_PREFIX,
    TE_NORM_NAMES,
    canonical_key,
    is_dense_key,
)

MODES = ("full", "shared-kv", "merged")
ROUTER_INITS = ("random", "zero")

STACK, AVERAGE, SPLIT_QKV, SHARED_STACK = "stack", "average", "split_qkv", "shared_stack"


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


@dataclass(frozen=True)
class Rule:
    """What the Mix phase does with one seed key.

    ``kind``:
        ``stack``: seed ``i``'s tensor becomes expert ``i`` of ``outputs[0]`` (expert axis after
        the layer axis).
        ``average``: the (weighted) mean of the seeds' tensors becomes ``outputs[0]``.
        ``split_qkv``: the query rows of seed ``i`` become expert ``i`` of ``outputs[0]``
        (``linear_q``), the mean of the seeds' key/value rows becomes ``outputs[1]``
        (``linear_kv``).
        ``shared_stack``: seed 0's tensor becomes ``outputs[0]`` (the shared expert) as it is,
        seed ``i >= 1``'s tensor expert ``i - 1`` of ``outputs[1]``.
    """

    kind: str
    outputs: Tuple[str, ...]


def tensor_rule(key: str, mode: str, shared_expert: bool = False) -> Rule:
    """The rule for the (canonical) seed ``key`` in ``mode`` (see the module table);
    ``shared_expert``: seed 0's FFN is the shared expert."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    layered = key.startswith(LAYER_PREFIX)
    name = key[len(LAYER_PREFIX) :] if layered else key
    if layered and name.startswith(ATTN_QKV) and mode != "merged":
        if mode == "full":
            return Rule(STACK, (key,))
        suffix = name[len(ATTN_QKV) :]
        return Rule(
            SPLIT_QKV,
            (f"{LAYER_PREFIX}self_attention.linear_q.{suffix}", f"{LAYER_PREFIX}self_attention.linear_kv.{suffix}"),
        )
    if layered and name.startswith(ATTN_PROJ) and mode != "merged":
        return Rule(STACK, (key,))
    if layered:
        for fc in MLP_FC:
            if name.startswith(fc):
                experts = LAYER_PREFIX + EXPERTS_PREFIX + name[len("mlp.") :]
                if shared_expert:
                    return Rule(SHARED_STACK, (LAYER_PREFIX + SHARED_PREFIX + name[len("mlp.") :], experts))
                return Rule(STACK, (experts,))
    return Rule(AVERAGE, (key,))


def upcycled_shapes(
    key: str, shape: Sequence[int], num_experts: int, mode: str, attn: AttentionShape, shared_expert: bool = False
) -> Dict[str, Tuple[int, ...]]:
    """Global shapes of the BAM tensors made from the seed tensor ``key`` of global ``shape``
    (``num_experts``: the number of seeds).

    A stacked ``[L, ...]`` tensor becomes ``[L, N, ...]`` (``[N, ...]`` outside the layer stack);
    ``split_qkv`` gives ``linear_q [L, N, G·r·dh, d]`` and ``linear_kv [L, G·2·dh, d]``;
    ``shared_stack`` gives the shared expert ``[L, ...]`` and ``[L, N-1, ...]``.
    """
    rule = tensor_rule(key, mode, shared_expert)
    shape = tuple(int(x) for x in shape)
    layered = key.startswith(LAYER_PREFIX)

    def stacked(s):
        return (s[0], num_experts) + s[1:] if layered else (num_experts,) + s

    if rule.kind == STACK:
        return {rule.outputs[0]: stacked(shape)}
    if rule.kind == SHARED_STACK:
        return {rule.outputs[0]: shape, rule.outputs[1]: (shape[0], num_experts - 1) + shape[1:]}
    if rule.kind == SPLIT_QKV:
        g, r, dh = attn.num_query_groups, attn.heads_per_group, attn.head_dim
        lead, rows, rest = shape[:-2], shape[-2], shape[-1:]
        if rows != g * (r + 2) * dh:
            raise ValueError(f"{key} has {rows} rows, expected {g * (r + 2) * dh}")
        return {
            rule.outputs[0]: stacked(lead + (g * r * dh,) + rest),
            rule.outputs[1]: lead + (g * 2 * dh,) + rest,
        }
    return {rule.outputs[0]: shape}


def upcycle_tensor(
    key: str,
    seeds: Sequence[torch.Tensor],
    *,
    mode: str,
    shape: AttentionShape,
    weights: Optional[Sequence[float]] = None,
    shared_expert: bool = False,
) -> Dict[str, torch.Tensor]:
    """Map one seed key (its tensor in every seed, in expert order) to the BAM tensors.

    Returns:
        ``{bam_key: tensor}`` — one entry, or two for ``shared-kv`` attention and for the FFN
        with a shared expert.
    """
    rule = tensor_rule(key, mode, shared_expert)
    layered = key.startswith(LAYER_PREFIX)
    if rule.kind == STACK:
        return {rule.outputs[0]: stack_experts(seeds, layered)}
    if rule.kind == SHARED_STACK:
        return {rule.outputs[0]: seeds[0].clone(), rule.outputs[1]: stack_experts(seeds[1:], layered)}
    if rule.kind == SPLIT_QKV:
        qs, kvs = zip(*(split_qkv(t, shape) for t in seeds))
        return {rule.outputs[0]: stack_experts(qs, layered), rule.outputs[1]: average(kvs, weights)}
    return {rule.outputs[0]: average(seeds, weights)}


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
    shared_expert: bool = False,
) -> Dict[str, torch.Tensor]:
    """Whole-state mapping of in-memory seeds (small models, tests) with linear routers.
    Streaming tools call ``upcycle_tensor`` key by key instead.

    Args:
        seeds: N dicts of global tensors (``load_plain_tensors`` output), expert order.
        shared_expert: seed 0's FFN is the shared expert (N-1 routed FFN experts).
    """
    keys = list(seeds[0])
    for i, s in enumerate(seeds[1:], start=1):
        if list(s) != keys:
            missing = sorted(set(keys) ^ set(s))
            raise ValueError(f"seed {i} has different tensors than seed 0 (first: {missing[0]})")
    out: Dict[str, torch.Tensor] = {}
    for key in keys:
        out.update(upcycle_tensor(key, [s[key] for s in seeds], mode=mode, shape=shape, weights=weights,
                                  shared_expert=shared_expert))
    ln = seeds[0][LAYER_PREFIX + "input_layernorm.weight"]
    num_layers, hidden = ln.shape
    gen = torch.Generator().manual_seed(seed)
    n = len(seeds)
    if mode != "merged":
        out[ATTN_ROUTER_KEY] = new_router(num_layers, n, hidden, init=router_init, std=router_std, generator=gen, dtype=ln.dtype)
    routed = n - 1 if shared_expert else n
    out[FFN_ROUTER_KEY] = new_router(num_layers, routed, hidden, init=router_init, std=router_std, generator=gen, dtype=ln.dtype)
    return out
