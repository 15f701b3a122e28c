"""megatron-core's MoE layer with a synchronisation-free token dispatch when experts are local.

When every FFN expert lives on this rank (expert-parallel size 1, expert tensor-parallel size
1, no capacity limit), dispatching is a pure permutation. megatron-core's dispatchers still
build it with host synchronisations (``tokens_per_expert.cpu()``, ``nonzero`` / ``tolist``)
and many small kernels, which makes a MoE layer CPU-bound on a fast GPU.
``LocalSortTokenDispatcher`` does the same permutation on the device without any host sync:

    expert_ids [T·k]  = the k experts of every token (from the router's routing map)
    order             = stable argsort(expert_ids)          -> tokens grouped by expert
    tokens_per_expert = bincount(expert_ids)                 (a device tensor)
    dispatch          = hidden[token_of(order)]             [T·k, h]
    combine           = zeros[T, h].index_add_(token_of(order), expert_output)

``enable_local_dispatch(model)`` switches the ``MoELayer``s of a built model (router, aux losses,
experts and checkpoint keys unchanged) to this dispatcher where the conditions hold and keeps
megatron-core's dispatcher otherwise (expert parallelism, expert TP, capacity factors).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer


class LocalSortTokenDispatcher:
    """Token dispatcher for local experts (the interface ``MoELayer.forward`` calls)."""

    def __init__(self, config, num_experts: int):
        self.config = config
        self.num_experts = num_experts
        self.topk = config.moe_router_topk
        self.shared_experts = None
        self.cudagraph_attrs = []
        self.valid_cudagraph_attrs = None
        self._shape = None
        self._token_index = None

    def set_shared_experts(self, shared_experts):
        self.shared_experts = shared_experts

    def dispatch_preprocess(self, tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
        """``tokens [s, b, h]``, ``routing_map [T, N]`` (k True per token), ``probs [T, N]``."""
        self._shape = tokens.shape
        hidden = tokens.reshape(-1, tokens.shape[-1])
        # The k chosen experts of each token, in expert order: [T, k].
        expert_ids = torch.topk(routing_map.to(torch.int8), self.topk, dim=1, sorted=False).indices
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        self._token_index = torch.div(order, self.topk, rounding_mode="floor")
        self._expert_index = flat[order]
        self._tokens_per_expert = torch.bincount(flat, minlength=self.num_experts)
        return hidden, probs

    def token_dispatch(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        return hidden_states, probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        """-> (tokens grouped by expert ``[T·k, h]``, tokens per expert ``[N]``, their probs ``[T·k]``)."""
        permuted = hidden_states.index_select(0, self._token_index)
        permuted_probs = probs[self._token_index, self._expert_index]
        return permuted, self._tokens_per_expert, permuted_probs

    def combine_preprocess(self, expert_output: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(
            (self._shape[:-1].numel(), expert_output.shape[-1]),
            dtype=expert_output.dtype,
            device=expert_output.device,
        )
        return out.index_add(0, self._token_index, expert_output)

    def token_combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.view(self._shape)


def local_dispatch_applies(config, ep_size: int, expert_tp_size: int) -> bool:
    """Whether ``LocalSortTokenDispatcher`` can stand in for megatron-core's dispatcher."""
    return (
        ep_size == 1
        and expert_tp_size == 1
        and config.moe_expert_capacity_factor is None
        and not config.moe_pad_expert_input_to_capacity
        and not config.moe_latent_size
    )


def enable_local_dispatch(model: torch.nn.Module) -> int:
    """Give every megatron-core ``MoELayer`` in ``model`` whose experts are all local the
    sync-free dispatcher; returns how many were switched. Router, experts, aux losses and
    checkpoint keys are untouched."""
    switched = 0
    for module in model.modules():
        if isinstance(module, MoELayer) and not isinstance(module.token_dispatcher, LocalSortTokenDispatcher):
            current = module.token_dispatcher  # knows the expert-parallel / expert-TP sizes
            if local_dispatch_applies(module.config, current.ep_size, current.tp_size):
                module.token_dispatcher = LocalSortTokenDispatcher(module.config, module.num_local_experts)
                switched += 1
    return switched
