"""The Nexus router (Gritsch et al., arXiv 2408.15901): FFN routing from domain embeddings.

Every routed FFN expert ``i`` has a fixed *domain embedding* ``d_i [D]``: the mean
representation of a sample of its training data under the seed (``tools/domain_embeddings.py``).
One small SwiGLU MLP, shared by all experts of a layer and trained with the model, projects it
to the expert's embedding in the hidden space; a token's logit for expert ``i`` is its dot
product with that embedding::

    e_i       = W2 · (silu(W1_gate · d_i) * (W1_up · d_i))     W1 = [W1_gate; W1_up] [2P, D], W2 [d, P]
    logits(x) = x · e_i                                         x [s, b, d] -> [s, b, N]

From the logits on, routing is megatron-core's ``TopKRouter``: softmax, top-k, load-balancing
loss, z-loss, capacity, the aux-loss bookkeeping and logging. Nexus pairs it with the seed's FFN
as an always-on shared expert and top-1 over the domain experts (megatron-core's shared-expert
support: ``moe_shared_expert_intermediate_size``). An expert added later needs no trained router
row: its entry is its domain embedding, projected by the trained ``W1``, ``W2``.

Tensors (per MoE layer; checkpoint keys under ``decoder.layers.mlp.router.``, layer axis first):

| name                    | local shape | global shape   | trained |
|-------------------------|-------------|----------------|---------|
| ``domain_embeddings``   | ``[N, D]``  | ``[L, N, D]``  | no (a persistent fp32 buffer) |
| ``projection_fc1.weight`` | ``[2P, D]`` | ``[L, 2P, D]`` | yes |
| ``projection_fc2.weight`` | ``[d, P]``  | ``[L, d, P]``  | yes |

All three are replicated on every rank (TP, EP and DP), like megatron-core's router weight, so
the checkpoint keys do not depend on the layout. The domain embeddings stay in fp32 whatever the
model's dtype (like megatron-core's expert bias): domains embedded by one model differ by a few
percent, which bf16 would blur; the projection is computed in fp32. Under sequence parallelism each TP rank routes
other tokens, so the projection's gradients are summed over TP (``sequence_parallel``
attribute, as for the linear router).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group
from megatron.core.utils import make_sharded_tensor_for_checkpoint

from bam_megatron.parallel.device import param_device

ROUTER_TYPES = ("linear", "nexus")
NEXUS_TENSORS = ("domain_embeddings", "projection_fc1.weight", "projection_fc2.weight")


@dataclass(frozen=True)
class NexusConfig:
    """Sizes of the Nexus projection: domain embeddings of ``domain_size`` (D) through a SwiGLU
    of ``projection_size`` (P) to the hidden size."""

    domain_size: int
    projection_size: int


def expert_embeddings(domain: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """``e = W2 · SwiGLU(W1 · d)`` for every expert, in fp32.

    Args:
        domain: ``[N, D]`` domain embeddings.
        fc1: ``[2P, D]`` (gate rows, then up rows).
        fc2: ``[d, P]``.

    Returns:
        ``[N, d]`` expert embeddings.
    """
    gate, up = F.linear(domain.float(), fc1.float()).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, fc2.float())


class _Weight(torch.nn.Module):
    """One parameter named ``weight`` (checkpoint keys read ``<name>.weight``)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)


class NexusRouter(TopKRouter):
    """megatron-core ``TopKRouter`` whose logits come from projected domain embeddings.

    ``forward(input [s, b, d]) -> (probs [T, N], routing_map [T, N])`` like ``TopKRouter``
    (``T = s·b``); only ``gating`` differs. Build it through the MoE spec's ``router`` builder
    (``specs.ffn_spec``), never by subclassing ``MoELayer``.
    """

    def __init__(self, config, pg_collection=None, *, nexus: NexusConfig):
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

            pg_collection = get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection)
        del self.weight  # the linear router's [N, d] weight: Nexus computes it instead
        self.bias = None
        self.nexus = nexus
        n, dsz, p, d = config.num_moe_experts, nexus.domain_size, nexus.projection_size, config.hidden_size
        # Drawn on the CPU from the default generator (identical on every rank, like the
        # linear router's weight), then moved where the model's parameters live.
        domain = torch.empty(n, dsz, dtype=torch.float32)
        fc1 = torch.empty(2 * p, dsz, dtype=torch.float32)
        fc2 = torch.empty(d, p, dtype=torch.float32)
        if config.perform_initialization:
            domain.normal_(0.0, 1.0)  # placeholders until a checkpoint brings the real ones
            config.init_method(fc1)
            config.init_method(fc2)
        device, dtype = param_device(config), config.params_dtype
        self.register_buffer("domain_embeddings", domain.to(device=device), persistent=True)
        self.projection_fc1 = _Weight(fc1.to(device=device, dtype=dtype))
        self.projection_fc2 = _Weight(fc2.to(device=device, dtype=dtype))
        for w in (self.projection_fc1.weight, self.projection_fc2.weight):
            w.sequence_parallel = config.sequence_parallel

    def expert_embeddings(self) -> torch.Tensor:
        """``[N, d]`` fp32 expert embeddings of this layer's experts."""
        return expert_embeddings(self.domain_embeddings, self.projection_fc1.weight, self.projection_fc2.weight)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """``input [s, b, d]`` -> logits ``[s, b, N]`` (in ``moe_router_dtype`` when set, else the
        input's dtype)."""
        dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        return torch.matmul(input.to(dtype), self.expert_embeddings().to(dtype).t())

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Layout-independent global keys: every tensor replicated (see the module docstring)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        replica = (0, self.tp_group.rank(), metadata["dp_cp_group"].rank())
        tensors = dict(zip(NEXUS_TENSORS, (self.domain_embeddings, self.projection_fc1.weight, self.projection_fc2.weight)))
        return {
            prefix + name: make_sharded_tensor_for_checkpoint(t, prefix + name, prepend_offsets=sharded_offsets, replica_id=replica)
            for name, t in tensors.items()
        }


def nexus_router_builder(nexus: NexusConfig):
    """The ``MoESubmodules.router`` builder (``(config=, pg_collection=) -> router``)."""

    def build(*, config, pg_collection=None):
        return NexusRouter(config, pg_collection, nexus=nexus)

    return build
