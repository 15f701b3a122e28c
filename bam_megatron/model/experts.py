"""FFN experts computed with grouped GEMMs on GPU.

``GroupedGemmExperts`` is megatron-core's ``SequentialMLP`` (same parameters, same checkpoint
keys, same results) whose forward, on a GPU with bf16 weights, runs all local experts as two
``torch._grouped_mm`` calls (torch-private: ``patches/torch_grouped_mm.py``) over the
expert-sorted tokens instead of a Python loop of per-expert MLPs (about 30 small kernels per
expert per step). Without Transformer Engine's grouped GEMM this is the difference between a CPU-launch-bound and a GPU-bound MoE layer.
Anywhere else (CPU, fp32, biases, quantisation) it is exactly ``SequentialMLP``.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.experts import SequentialMLP

from bam_megatron.patches import torch_grouped_mm


def grouped_mm_available() -> bool:
    """torch has ``_grouped_mm`` and the current GPU runs it (Hopper or newer)."""
    return torch_grouped_mm.available()


class GroupedGemmExperts(SequentialMLP):
    """``SequentialMLP`` with a grouped-GEMM fast path (see module docstring)."""

    def _use_grouped(self, x: torch.Tensor) -> bool:
        cfg = self.config
        return (
            self.num_local_experts > 1
            and x.is_cuda
            and x.dtype == torch.bfloat16
            and not (cfg.fp8 or cfg.fp4)
            and not cfg.add_bias_linear
            and not cfg.moe_apply_probs_on_input
            and cfg.activation_func_clamp_value is None
            and not cfg.glu_linear_offset
            and grouped_mm_available()
        )

    def forward(self, permuted_local_hidden_states, tokens_per_expert, permuted_probs):
        """``permuted_local_hidden_states [T, d]`` sorted by local expert, ``tokens_per_expert
        [N_l]``, ``permuted_probs [T]`` -> ``([T, d], None)``."""
        x = permuted_local_hidden_states
        if not self._use_grouped(x):
            return super().forward(x, tokens_per_expert, permuted_probs)
        offsets = torch.cumsum(
            torch.as_tensor(tokens_per_expert).to(device=x.device, dtype=torch.int32), 0, dtype=torch.int32
        )
        # [N_l, out, in] weights -> [N_l, in, out] (column-major views, no copy)
        w1 = torch.stack([e.linear_fc1.weight for e in self.local_experts]).transpose(1, 2)
        w2 = torch.stack([e.linear_fc2.weight for e in self.local_experts]).transpose(1, 2)
        h = torch_grouped_mm.grouped_mm(x, w1, offsets)
        if self.config.gated_linear_unit:
            gate, linear = h.chunk(2, dim=-1)
            h = self.config.activation_func(gate) * linear
        else:
            h = self.config.activation_func(h)
        h = (h * permuted_probs.unsqueeze(-1)).to(x.dtype)
        return torch_grouped_mm.grouped_mm(h, w2, offsets), None
