"""Text generation with the KV cache, for dense, BTX and BAM models at any layout.

Static batching, as megatron-core's static text-generation controller does it: the prompts of a
batch are prefilled together up to the shortest one's length (one forward over those positions
fills every layer's KV cache); after that every step feeds one position per sequence — the next
prompt token for sequences whose prompt is longer, the token just chosen for the others — and
reads the cache for all earlier positions. A sequence stops after ``max_new_tokens`` new tokens,
at ``eos_id`` (kept as its last token) or at the model's context length.

    results = generate(model, [[5, 17, 3], [9, 9]], max_new_tokens=16,
                       sampling=SamplingParams(greedy=True), max_sequence_length=2048)
    results[0].generated_ids, results[0].logprobs

Every rank calls ``generate`` with the same prompts; data-parallel ranks serve their own share
(``lockstep.py``) and every rank returns all results.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from bam_megatron.errors import InferenceError
from bam_megatron.inference import lockstep
from bam_megatron.inference.cache import new_context
from bam_megatron.inference.pipeline import broadcast_from_last_stage, forward_logits, is_last_stage
from bam_megatron.inference.sampling import SamplingParams, sample
from bam_megatron.parallel.device import get_device, synchronize


@dataclass
class Generation:
    """One prompt's result: its tokens, the new tokens and their log-probabilities."""

    prompt_ids: List[int]
    generated_ids: List[int]
    logprobs: List[float]


@dataclass
class GenerationStats:
    """Time spent in forward passes (the device synchronised), for benchmarks."""

    prefill_tokens: int = 0  # positions of all sequences processed by prefill forwards
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # sequences × decode steps (one position each)
    decode_steps: int = 0
    decode_seconds: float = 0.0


def check_prompts(prompts: Sequence[Sequence[int]], max_sequence_length: int, vocab_size: Optional[int] = None) -> None:
    """Every prompt has at least one token, leaves room for one new token, and (with
    ``vocab_size``) only ids of the vocabulary.

    Raises:
        InferenceError: one line naming the prompt and the fix.
    """
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise InferenceError(f"prompt {i} is empty; give at least one token")
        if len(p) >= max_sequence_length:
            raise InferenceError(
                f"prompt {i} has {len(p)} tokens but the model's context is {max_sequence_length} "
                f"tokens; shorten it to at most {max_sequence_length - 1} tokens"
            )
        if vocab_size is not None and (min(p) < 0 or max(p) >= vocab_size):
            raise InferenceError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size})")


def _pick(logits, sampling, generator, vocab_size, shape, device):
    """Tokens and log-probabilities chosen on the last stage, on every rank: ``[b]``, ``[b]``."""
    picked = None
    if is_last_stage():
        ids, lp = sample(logits[:, -1], sampling, generator, vocab_size)
        picked = torch.stack([ids.double(), lp.double()], dim=-1)
    picked = broadcast_from_last_stage(picked, shape, torch.float64, device)
    return picked[:, 0].long(), picked[:, 1].float()


def _generate_batch(model, rows, batch_size, max_new_tokens, sampling, generator, max_seq, eos_id, vocab_size, stats):
    """Generate for ``rows`` (this rank's prompts of one batch, possibly none), padded to
    ``batch_size`` rows; the shapes are agreed with all ranks. Returns one Generation per row."""
    device = get_device()
    real = len(rows)
    local_min = min((len(r) for r in rows), default=max_seq)
    local_total = max((min(len(r) + max_new_tokens, max_seq) for r in rows), default=0)
    neg_min, total = lockstep.agree_max([-local_min, local_total])
    min_len = -neg_min
    tokens = torch.zeros(batch_size, total, dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    length = torch.tensor([len(r) for r in rows] + [min_len] * (batch_size - real), device=device)
    end = (length + max_new_tokens).clamp(max=max_seq)
    done = torch.arange(batch_size, device=device) >= real  # padding rows never generate
    count = torch.zeros(batch_size, dtype=torch.long, device=device)
    logprobs = torch.zeros(batch_size, total, device=device)
    context = new_context(batch_size, total)
    prev = 0
    for cur in range(min_len, total):
        start = time.perf_counter()
        positions = torch.arange(prev, cur, device=device).unsqueeze(0).expand(batch_size, -1)
        logits = forward_logits(model, tokens[:, prev:cur], positions, context)
        ids, lp = _pick(logits, sampling, generator, vocab_size, (batch_size, 2), device)
        context.increment_sequence_len_offset(cur - prev)
        synchronize(device)
        seconds = time.perf_counter() - start
        if prev == 0:
            context.enable_decode_mode()
            stats.prefill_tokens += batch_size * cur
            stats.prefill_seconds += seconds
        else:
            stats.decode_tokens += batch_size
            stats.decode_steps += 1
            stats.decode_seconds += seconds
        writing = (length <= cur) & ~done
        tokens[:, cur] = torch.where(writing, ids, tokens[:, cur])
        logprobs[:, cur] = torch.where(writing, lp, logprobs[:, cur])
        count += writing.long()
        if eos_id is not None:
            done |= writing & (ids == eos_id)
        done |= cur + 1 >= end
        prev = cur
        if lockstep.all_true(bool(done.all())):
            break
    out = []
    for i, r in enumerate(rows):
        n, a = int(count[i]), len(r)
        out.append(Generation(list(r), tokens[i, a : a + n].tolist(), logprobs[i, a : a + n].tolist()))
    return out


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    max_sequence_length: int,
    batch_size: int = 8,
    eos_id: Optional[int] = None,
    vocab_size: Optional[int] = None,
    stats: Optional[GenerationStats] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> List[Generation]:
    """Generate up to ``max_new_tokens`` tokens after each prompt (see the module docstring).

    Args:
        model: this rank's ``GPTModel`` (eval mode), built for inference (no sequence
            parallelism).
        prompts: token ids, the same list on every rank.
        max_new_tokens: new tokens per prompt (fewer at ``eos_id`` or the context's end).
        sampling: greedy or sampling settings.
        max_sequence_length: the model's context (prompt + new tokens).
        batch_size: sequences per forward on each data-parallel rank.
        eos_id: stop a sequence after this token (None: never).
        vocab_size: the tokenizer's vocabulary (padded logits beyond it are never chosen).
        stats: filled with prefill / decode timings when given.
        progress: called with a line per batch.

    Returns:
        One ``Generation`` per prompt, in order, on every rank.

    Raises:
        InferenceError: an empty prompt, or one that does not fit the context.
    """
    check_prompts(prompts, max_sequence_length, vocab_size)
    if batch_size < 1:
        raise InferenceError(f"batch size must be at least 1, got {batch_size}")
    if max_new_tokens < 1:
        return [Generation(list(p), [], []) for p in prompts]
    stats = stats if stats is not None else GenerationStats()
    share = lockstep.data_parallel_share(prompts)
    batches = [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
    (num_batches,) = lockstep.agree_max([len(batches)])
    generator = torch.Generator(device=get_device())
    generator.manual_seed(sampling.seed)
    local = {}
    with torch.no_grad():
        for k in range(num_batches):
            index = batches[k] if k < len(batches) else []
            start = time.perf_counter()
            rows = _generate_batch(
                model, [prompts[i] for i in index], batch_size, max_new_tokens, sampling, generator,
                max_sequence_length, eos_id, vocab_size, stats,
            )
            local.update(zip(index, rows))
            if progress is not None:
                new = sum(len(g.generated_ids) for g in rows)
                progress(f"batch {k + 1}/{num_batches}: {len(index)} prompts, {new} new tokens "
                         f"in {time.perf_counter() - start:.2f} s")
    merged = lockstep.gather_by_index(local)
    return [merged[i] for i in range(len(prompts))]
