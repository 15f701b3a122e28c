"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p.

``logprobs`` are always the model's own log-probabilities of the chosen tokens (log-softmax of
the raw logits over the real vocabulary), whatever the sampling settings: temperature, top-k and
top-p change which token is drawn, not how likely the model found it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from bam_megatron.errors import InferenceError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen.

    Attributes:
        greedy: the most likely token (temperature, top-k and top-p are then ignored).
        temperature: logits are divided by it before sampling (> 0).
        top_k: sample among the k most likely tokens (0: all).
        top_p: sample among the most likely tokens whose probabilities sum to at least p
            (nucleus sampling; 1.0: all).
        seed: seed of the sampling generator.
    """

    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 1234

    def __post_init__(self):
        if not self.temperature > 0:
            raise InferenceError(f"--temperature must be positive, got {self.temperature}; use --greedy for argmax decoding")
        if self.top_k < 0:
            raise InferenceError(f"--top-k must be >= 0 (0: no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise InferenceError(f"--top-p must be in (0, 1], got {self.top_p}")


def _filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens before it already reach p (the most likely one always stays).
    drop = probs.cumsum(dim=-1) - probs >= p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: Optional[torch.Generator] = None,
    vocab_size: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row.

    Args:
        logits: ``[b, V]`` (any float dtype; computed in fp32).
        params: the sampling settings.
        generator: random source for sampling (unused when greedy).
        vocab_size: the tokenizer's vocabulary; padded entries beyond it are never chosen and
            do not count in the log-probabilities (default: all ``V``).

    Returns:
        ``ids [b]`` (int64) and their ``logprobs [b]`` (fp32, see the module docstring).
    """
    logits = logits.float()
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        logits = logits[..., :vocab_size]
    logprobs = torch.log_softmax(logits, dim=-1)
    if params.greedy:
        ids = logits.argmax(dim=-1)
    else:
        scaled = _filter_top_p(_filter_top_k(logits / params.temperature, params.top_k), params.top_p)
        probs = scaled.softmax(dim=-1)
        ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return ids, logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
