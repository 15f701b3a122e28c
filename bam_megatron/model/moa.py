"""Mixture of Attention (MoA): N attention experts, soft-routed, computed as one wide attention.

Per token ``h``, with router ``W_a [N, d]`` and ``p = softmax(W_a h)``::

    MoA(h) = sum_e p_e(h) * O_e · MHA(Q_e h, K_e h, V_e h)

Because ``O`` is linear, this equals one attention layer with ``N·H`` query heads whose outputs
are scaled by their expert's router weight before one output GEMM::

    MoA(h) = [O_1 … O_N] · concat_e(p_e · MHA_e(h))

so the hot path is: one QKV GEMM for all experts → RoPE → one fused attention call (torch SDPA)
→ router-weighted heads → one output GEMM. No Python loop over experts.

Variants:
- **KV experts** (``kv_sharing=False``): Q, K, V, O per expert → ``N·G`` KV heads; with a
  grouped-query seed (``G < H``) this is grouped-query attention inside each expert.
- **KV sharing** (``kv_sharing=True``): Q, O per expert, one K, V for all → ``G`` KV heads
  serving ``N·H`` query heads: grouped-query attention across experts. Query heads are ordered
  (group, expert, head) so that each KV head's query heads are contiguous, which is the layout
  SDPA's ``enable_gqa`` expects.

Parallelism:
- **Tensor parallelism** splits every expert's query groups (and their KV heads) over the TP
  ranks, like megatron-core's ``SelfAttention``; the router is replicated. With sequence
  parallelism the input is ``[s/TP, b, d]`` and is gathered along the sequence.
- **Expert parallelism** puts ``N/EP`` experts on each rank of the expert-parallel group. With
  soft routing every token needs every expert, so the tokens (batch dimension) are gathered
  across the group, each rank computes its experts' weighted sum for all of them, and the partial
  results are reduced and scattered back.

Parameters (local shapes; ``N_l = N/EP``, ``H_l = H/TP``, ``G_l = G/TP``, ``r = H/G``, ``dh``
head dim, ``d`` hidden size):

| name                  | local shape                      | checkpoint key / global shape       |
|-----------------------|----------------------------------|-------------------------------------|
| ``router.weight``     | ``[N, d]``                       | ``router.weight [N, d]``            |
| ``linear_qkv.weight`` | ``[N_l, G_l·(r+2)·dh, d]``       | ``linear_qkv.weight [N, G(r+2)dh, d]`` (KV experts) |
| ``linear_q.weight``   | ``[N_l, H_l·dh, d]``             | ``linear_q.weight [N, H·dh, d]`` (KV sharing) |
| ``linear_kv.weight``  | ``[G_l·2·dh, d]``                | ``linear_kv.weight [2G·dh, d]`` (KV sharing) |
| ``linear_proj.weight``| ``[N_l, d, H_l·dh]``             | ``linear_proj.weight [N, d, H·dh]`` |

Slice ``e`` of ``linear_qkv`` / ``linear_proj`` is exactly a dense megatron-core
``SelfAttention``'s ``linear_qkv`` / ``linear_proj`` weight (query-group interleaved
``[q (r heads) | k | v]`` rows), so upcycling copies a dense model's attention into an expert
verbatim. ``linear_q`` rows are the q rows of that layout and ``linear_kv`` rows are, per group,
``[k | v]``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.tensor_parallel import checkpoint as recompute_checkpoint
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.random import (
    get_cuda_rng_tracker,
    get_expert_parallel_rng_tracker_name,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from bam_megatron.model import kv_cache
from bam_megatron.model.config import BAMConfig
from bam_megatron.model.rope import apply_rope
from bam_megatron.model.sdpa import fused_attention, softmax_scale
from bam_megatron.parallel import comm
from bam_megatron.parallel.device import param_device


def _group(pg_collection, name: str, fallback):
    group = getattr(pg_collection, name, None) if pg_collection is not None else None
    return group if group is not None else fallback()


def route_attention(
    logits: torch.Tensor, routing: str, topk: int, renormalize: bool
) -> torch.Tensor:
    """Router weights over all attention experts.

    Args:
        logits: ``[..., N]`` router logits.
        routing: ``"soft"`` (softmax over all N) or ``"topk"`` (keep the k largest).
        topk: k for top-k routing.
        renormalize: top-k only: rescale the kept weights to sum to 1.

    Returns:
        ``[..., N]`` float32 weights; zero for experts a token is not routed to.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if routing == "soft":
        return probs
    top, idx = probs.topk(topk, dim=-1)
    if renormalize:
        top = top / top.sum(dim=-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, idx, top)


class AttentionRouter(torch.nn.Module):
    """Linear attention router ``W_a``: ``[.., d] -> [.., N]`` logits (no bias)."""

    def __init__(self, hidden_size: int, num_experts: int, dtype, device):
        super().__init__()
        self.weight = torch.nn.Parameter(
            torch.empty(num_experts, hidden_size, dtype=dtype, device=device)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class ExpertWeight(torch.nn.Module):
    """Holds one fused weight (a plain ``weight`` parameter) so checkpoint keys read
    ``<name>.weight`` like megatron-core's linear layers."""

    def __init__(self, shape, dtype, device):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(*shape, dtype=dtype, device=device))


class MixtureOfAttention(MegatronModule):
    """Soft (or top-k) routed Mixture of Attention, fused; see the module docstring.

    The constructor and ``forward`` follow megatron-core's ``SelfAttention`` contract, so the
    module drops into the ``self_attention`` slot of a ``TransformerLayer`` spec or of the BAM
    parallel layer: input ``[s, b, d]`` (``[s/TP, b, d]`` under sequence parallelism), output
    ``(out [same shape], None)``.
    """

    def __init__(
        self,
        config,
        bam_config: BAMConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType = AttnMaskType.causal,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        **unused,
    ):
        super().__init__(config=config)
        if not bam_config.is_moa:
            raise ValueError("MixtureOfAttention needs bam_config.attn_experts > 1")
        self.bam = bam_config
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type

        self.tp_group = _group(pg_collection, "tp", parallel_state.get_tensor_model_parallel_group)
        self.ep_group = _group(pg_collection, "ep", parallel_state.get_expert_model_parallel_group)
        self.dp_cp_group = _group(
            pg_collection,
            "dp_cp",
            lambda: parallel_state.get_data_parallel_group(with_context_parallel=True),
        )
        self.expt_dp_group = _group(
            pg_collection, "expt_dp", parallel_state.get_expert_data_parallel_group
        )
        tp, ep = self.tp_group.size(), self.ep_group.size()
        self.tp_size, self.tp_rank = tp, self.tp_group.rank()
        self.ep_size, self.ep_rank = ep, self.ep_group.rank()

        n = bam_config.attn_experts
        heads = config.num_attention_heads
        groups = config.num_query_groups or heads
        if n % ep or heads % tp or groups % tp or heads % groups:
            raise ValueError(
                f"MoA layout does not divide: experts {n} / EP {ep}, heads {heads} and query "
                f"groups {groups} / TP {tp}"
            )
        self.num_experts = n
        self.num_local_experts = n // ep
        self.heads_per_group = heads // groups
        self.local_groups = groups // tp
        self.local_heads = heads // tp
        self.head_dim = config.kv_channels
        self.kv_sharing = bam_config.kv_sharing
        self.sequence_parallel = config.sequence_parallel
        self.recompute_core_attn = (
            config.recompute_granularity == "selective" and "core_attn" in config.recompute_modules
        )
        self.expert_parallel = ep > 1

        d, dh, nl = config.hidden_size, self.head_dim, self.num_local_experts
        dtype, device = config.params_dtype, param_device(config)
        self.router = AttentionRouter(d, n, dtype, device)
        self.linear_qkv = self.linear_q = self.linear_kv = None  # the variant's ones are set below
        if self.kv_sharing:
            self.linear_q = ExpertWeight((nl, self.local_heads * dh, d), dtype, device)
            self.linear_kv = ExpertWeight((self.local_groups * 2 * dh, d), dtype, device)
        else:
            out = self.local_groups * (self.heads_per_group + 2) * dh
            self.linear_qkv = ExpertWeight((nl, out, d), dtype, device)
        self.linear_proj = ExpertWeight((nl, d, self.local_heads * dh), dtype, device)

        self._set_parallel_attributes()
        if config.perform_initialization:
            self._initialize()
        # Mean router weight per expert over the last forward's tokens (for logging), [N].
        self.last_router_mean: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ parameters

    def _expert_weights(self):
        """(module, tp_axis of the local weight) for every per-expert fused weight."""
        if self.kv_sharing:
            return [(self.linear_q, 1), (self.linear_proj, 2)]
        return [(self.linear_qkv, 1), (self.linear_proj, 2)]

    def _set_parallel_attributes(self):
        for module, tp_axis in self._expert_weights():
            set_tensor_model_parallel_attributes(module.weight, True, tp_axis, 1)
            module.weight.allreduce = not self.expert_parallel
        if self.kv_sharing:
            set_tensor_model_parallel_attributes(self.linear_kv.weight, True, 0, 1)
        # The router is replicated over TP; under sequence parallelism each TP rank sees a
        # different slice of the sequence, so its gradient is summed over TP like the norms'.
        self.router.weight.sequence_parallel = self.sequence_parallel

    def _global_shape_and_offsets(self, module):
        """Global shape of ``module.weight`` and, per sharded axis, (axis, rank, fragments)."""
        local = module.weight.shape
        if module is self.router:
            return tuple(local), []
        if module is self.linear_kv:
            return (local[0] * self.tp_size, local[1]), [(0, self.tp_rank, self.tp_size)]
        tp_axis = 1 if module is not self.linear_proj else 2
        shape = list(local)
        shape[0] *= self.ep_size
        shape[tp_axis] *= self.tp_size
        return tuple(shape), [
            (0, self.ep_rank, self.ep_size),
            (tp_axis, self.tp_rank, self.tp_size),
        ]

    def _initialize(self):
        """Initialise like megatron-core: normal(0, std) for the input projections and the
        router, the scaled ``output_layer_init_method`` for ``linear_proj``.

        With ``use_cpu_initialization`` the full (global) tensor is drawn on CPU from the default
        generator and this rank's shard is copied out, so the weights do not depend on the
        parallel layout. Otherwise each shard is drawn under megatron-core's RNG tracker (the
        expert-parallel stream for per-expert weights).
        """
        cfg = self.config
        for module in self._modules.values():
            init = cfg.output_layer_init_method if module is self.linear_proj else cfg.init_method
            weight = module.weight
            if module is self.router:
                with torch.no_grad():
                    init(weight)  # default generator: identical on every rank
                continue
            if cfg.use_cpu_initialization:
                shape, offsets = self._global_shape_and_offsets(module)
                full = torch.empty(shape, dtype=torch.float32)
                for part in full if full.dim() == 3 else [full]:
                    init(part)
                index = [slice(None)] * full.dim()
                for axis, rank, frags in offsets:
                    size = shape[axis] // frags
                    index[axis] = slice(rank * size, (rank + 1) * size)
                with torch.no_grad():
                    weight.copy_(full[tuple(index)])
            else:
                name = (
                    get_expert_parallel_rng_tracker_name()
                    if module is not self.linear_kv
                    else None
                )
                fork = get_cuda_rng_tracker().fork(name) if name else get_cuda_rng_tracker().fork()
                with fork, torch.no_grad():
                    for part in weight if weight.dim() == 3 else [weight]:
                        init(part)

    # ------------------------------------------------------------------ forward

    def _fused_input_weight(self) -> torch.Tensor:
        """``[rows, d]`` weight of the one QKV GEMM, rows in head order the attention expects."""
        d = self.config.hidden_size
        if not self.kv_sharing:
            return self.linear_qkv.weight.reshape(-1, d)  # (expert, group, [q|k|v]) rows
        nl, gl, rdh = self.num_local_experts, self.local_groups, self.heads_per_group * self.head_dim
        # (expert, group, head) -> (group, expert, head): each KV head's queries contiguous.
        q = self.linear_q.weight.view(nl, gl, rdh, d).transpose(0, 1).reshape(-1, d)
        return torch.cat([q, self.linear_kv.weight], dim=0)

    def _fused_output_weight(self) -> torch.Tensor:
        """``[d, heads]`` weight of the one output GEMM, columns in the fused head order."""
        nl, d = self.num_local_experts, self.config.hidden_size
        w = self.linear_proj.weight  # [N_l, d, H_l*dh]
        if not self.kv_sharing:
            return w.transpose(0, 1).reshape(d, -1)  # (expert, group, head)
        gl, rdh = self.local_groups, self.heads_per_group * self.head_dim
        return w.view(nl, d, gl, rdh).permute(1, 2, 0, 3).reshape(d, -1)  # (group, expert, head)

    def _router_weights(self, x_bs: torch.Tensor) -> torch.Tensor:
        """Router weights of this rank's experts for the (EP-gathered) tokens.

        Args:
            x_bs: ``[B, s_local, d]`` (``s_local = s/TP`` under sequence parallelism).

        Returns:
            ``[B, s, N_l]``, in the activation dtype.
        """
        logits = self.router(x_bs)
        probs = route_attention(
            logits, self.bam.attn_routing, self.bam.attn_topk, self.bam.attn_topk_renormalize
        )
        if not torch.is_grad_enabled() or self.training:
            self.last_router_mean = probs.detach().mean(dim=(0, 1))
        probs = probs.to(x_bs.dtype)
        # The router gradient from the heads of this TP rank is partial: sum it over TP.
        if self.sequence_parallel:
            probs = comm.all_gather(probs, 1, self.tp_group)
        else:
            probs = comm.copy_to_group(probs, self.tp_group)
        start = self.ep_rank * self.num_local_experts
        return probs[..., start : start + self.num_local_experts]

    def _project_qkv(self, x: torch.Tensor, rotary_pos_emb, offset: int = 0):
        """One QKV GEMM for all local experts, then RoPE.

        Args:
            x: ``[B, s, d]`` (all tokens of the EP group, the whole sequence or, with a KV
                cache, the new tokens).
            rotary_pos_emb: megatron-core's ``freqs [S, 1, 1, dh]`` (or a (q, k) pair) for
                positions ``0..S-1``, ``S >= offset + s``.
            offset: position of the first token (the KV cache's filled length).

        Returns:
            ``q [B, s, heads, dh]`` (fused head order), ``k, v [B, s, kv_heads, dh]``.
        """
        bsz, s = x.shape[0], x.shape[1]
        nl, gl, r, dh = self.num_local_experts, self.local_groups, self.heads_per_group, self.head_dim
        qkv = F.linear(x, self._fused_input_weight())  # [B, s, rows]
        if self.kv_sharing:
            q_rows = gl * nl * r * dh
            q = qkv[..., :q_rows].view(bsz, s, gl * nl * r, dh)
            kv = qkv[..., q_rows:].view(bsz, s, gl, 2, dh)
            k, v = kv[..., 0, :], kv[..., 1, :]
        else:
            qkv = qkv.view(bsz, s, nl * gl, r + 2, dh)
            q = qkv[..., :r, :].reshape(bsz, s, nl * gl * r, dh)
            k, v = qkv[..., r, :], qkv[..., r + 1, :]
        if rotary_pos_emb is not None:
            q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
            q_emb, k_emb = q_emb[offset : offset + s], k_emb[offset : offset + s]
            # megatron's RoPE takes [s, b, h, d] (freqs [s, 1, 1, d]); a transposed view is fine.
            q = apply_rope(q.transpose(0, 1), q_emb, self.config).transpose(0, 1)
            k = apply_rope(k.transpose(0, 1), k_emb, self.config).transpose(0, 1)
        return q, k, v

    def _weighted_output(self, out: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """Scale every head by its expert's router weight, then one output GEMM.

        Args:
            out: ``[B, s, heads, dh]`` attention output in the fused head order.
            probs: ``[B, s, N_l]`` router weights of the local experts.

        Returns:
            ``[B, s, d]``, this rank's partial sum.
        """
        bsz, s = out.shape[0], out.shape[1]
        nl, gl, r, dh = self.num_local_experts, self.local_groups, self.heads_per_group, self.head_dim
        if self.kv_sharing:
            out = out.reshape(bsz, s, gl, nl, r * dh) * probs[:, :, None, :, None]
        else:
            out = out.reshape(bsz, s, nl, gl * r * dh) * probs[..., None]
        return F.linear(out.reshape(bsz, s, -1), self._fused_output_weight())

    def _attention(self, q, k, v, attention_mask, causal: bool) -> torch.Tensor:
        return fused_attention(
            q,
            k,
            v,
            attention_mask=attention_mask,
            causal=causal,
            scale=softmax_scale(self.config, self.head_dim),
            dropout_p=self.config.attention_dropout if self.training else 0.0,
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        key_value_states=None,
        inference_context=None,
        rotary_pos_emb=None,
        rotary_pos_cos=None,
        rotary_pos_sin=None,
        rotary_pos_cos_sin=None,
        attention_bias=None,
        packed_seq_params=None,
        sequence_len_offset=None,
        **unused,
    ):
        """``hidden_states [s_local, b, d]`` -> ``(output [s_local, b, d], None)``.

        With megatron-core's static ``inference_context`` the ``s`` tokens are positions
        ``[offset, offset + s)`` of each sequence (``offset = sequence_len_offset``): their keys
        and values join the context's KV cache (``kv_cache.py``) and the queries attend over all
        cached positions; ``attention_mask`` is then not used (causal over the cache).
        """
        context = kv_cache.static_context(inference_context or unused.get("inference_params"))
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("MixtureOfAttention supports neither packed sequences nor attention_bias")
        if key_value_states is not None:
            raise NotImplementedError("MixtureOfAttention is self-attention only")
        if context is not None and self.sequence_parallel:
            raise NotImplementedError(
                "MixtureOfAttention inference runs without sequence parallelism; build the model "
                "with sequence_parallel=False (inference/load.py does)"
            )

        b = hidden_states.shape[1]
        # Tokens to [batch, seq, d] (what the GEMMs and the flash kernels read), then gather the
        # expert-parallel group's tokens along the batch.
        x = comm.all_gather(hidden_states.transpose(0, 1).contiguous(), 0, self.ep_group)
        probs = self._router_weights(x)  # [B, s, N_l]
        if self.sequence_parallel:
            x = comm.all_gather(x, 1, self.tp_group)
        else:
            x = comm.copy_to_group(x, self.tp_group)
        offset = context.sequence_len_offset if context is not None else 0
        q, k, v = self._project_qkv(x, rotary_pos_emb, offset)

        causal = self.attn_mask_type == AttnMaskType.causal
        if context is not None:
            k, v = kv_cache.append_key_value(context, self.layer_number, k, v, self.ep_size)
            mask = kv_cache.causal_mask_from(offset, q.shape[1], k.shape[1], q.device)
            causal = causal and q.shape[1] > 1 and mask is None
        else:
            mask = attention_mask
            if mask is not None and mask.shape[0] > 1 and self.ep_size > 1:
                mask = comm.all_gather(mask, 0, self.ep_group)
        attention = functools.partial(self._attention, causal=causal)
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask)
        if self.recompute_core_attn and self.training:
            out = recompute_checkpoint(attention, False, *args)
        else:
            out = attention(*args)
        out = out.transpose(1, 2)  # [B, s, heads, dh]; contiguous for flash / cuDNN kernels

        out = self._weighted_output(out, probs)  # [B, s, d], partial over TP and EP

        if self.sequence_parallel:
            out = comm.reduce_scatter(out, 1, self.tp_group)
        else:
            out = comm.all_reduce(out, self.tp_group)
        out = comm.reduce_scatter(out, 0, self.ep_group)  # back to this rank's b sequences
        assert out.shape[0] == b
        return out.transpose(0, 1).contiguous(), None

    # ------------------------------------------------------------------ checkpoint

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Global, layout-independent keys: experts on axis 0, TP shards on their head axis.

        ``sharded_offsets`` (e.g. the layer axis prepended by ``TransformerBlock``) are kept in
        front of this module's own axes.
        """
        pre = len(sharded_offsets)
        tp_rank = self.tp_rank
        dp_rank = self.dp_cp_group.rank()
        result = {}
        for name, module in self._modules.items():
            _, offsets = self._global_shape_and_offsets(module)
            if module is self.router:
                replica = (0, tp_rank, dp_rank)
            elif module is self.linear_kv:
                replica = (0, 0, dp_rank)
            else:
                replica = (0, 0, self.expt_dp_group.rank())
            key = f"{prefix}{name}.weight"
            result[key] = ShardedTensor.from_rank_offsets(
                key,
                module.weight,
                *sharded_offsets,
                *[(axis + pre, rank, frags) for axis, rank, frags in offsets],
                replica_id=replica,
                prepend_axis_num=pre,
            )
        return result
