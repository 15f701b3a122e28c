"""LayerNorm / RMSNorm in plain PyTorch that supports sequence parallelism.

megatron-core's torch norm (``WrappedTorchNorm``) refuses ``sequence_parallel``. Under sequence
parallelism a norm sees only this rank's slice of the sequence, so its weight gradient is partial
and must be summed over the tensor-parallel group; megatron-core's ``finalize_model_grads`` does
that for every parameter tagged ``sequence_parallel=True``, which is all this norm adds.
Checkpoint keys (``weight``, ``bias``) match megatron-core's norms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bam_megatron.parallel.device import param_device


class Norm(torch.nn.Module):
    """``config.normalization`` ("LayerNorm" or "RMSNorm") over the last dimension of
    ``[s, b, h]`` activations; constructor follows megatron-core's norm builders."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__()
        if config.normalization not in ("LayerNorm", "RMSNorm"):
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by the torch norm")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.hidden_size = hidden_size
        kwargs = {"dtype": config.params_dtype, "device": param_device(config)}
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, **kwargs))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, **kwargs))
        for p in self.parameters():
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        return F.layer_norm(x, (self.hidden_size,), self.weight, self.bias, self.eps)
