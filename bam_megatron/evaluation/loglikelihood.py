"""Log-likelihood of continuations, the lm-evaluation-harness way, at any TP / PP / EP layout.

``encode_pair`` splits a (context, continuation) pair into token ids as lm-evaluation-harness
does for causal models: trailing whitespace of the context moves to the continuation, the whole
text is encoded once and the continuation is what follows the context's own encoding; an empty
context is replaced by one prefix token (the end-of-document token).

``loglikelihoods`` scores the requests: each is cut to its last ``max_length + 1`` tokens
(the context loses its beginning), the model reads all but the last, and the request's score
is the sum of the log-probabilities (log-softmax over the model's whole padded vocabulary, as in
its training loss) of the continuation's tokens, with whether each of them was the argmax.
Requests are sorted by length, spread over data-parallel ranks and run in right-padded batches
whose shapes all ranks agree on (``inference/lockstep.py``); every rank gets all results.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch

from bam_megatron.errors import InferenceError
from bam_megatron.inference import lockstep
from bam_megatron.inference.pipeline import forward_logits, is_last_stage
from bam_megatron.parallel.device import get_device

Request = Tuple[List[int], List[int]]  # (context ids, continuation ids)


def encode_pair(tokenize: Callable[[str], List[int]], context: str, continuation: str, prefix_id: int) -> Request:
    """Token ids of ``context`` and ``continuation`` (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return [prefix_id], list(tokenize(continuation))
    whole = list(tokenize(context + continuation))
    context_ids = list(tokenize(context))
    return context_ids, whole[len(context_ids):]


def _window(request: Request, max_length: int) -> Tuple[List[int], List[int]]:
    """``(input ids, continuation targets)`` of one request, cut to ``max_length`` inputs."""
    context, continuation = request
    if not continuation:
        raise InferenceError("a continuation encodes to no tokens; every choice needs some text")
    if len(continuation) > max_length:
        raise InferenceError(
            f"a continuation of {len(continuation)} tokens does not fit the model's context of {max_length}"
        )
    full = (context + continuation)[-(max_length + 1):]
    return full[:-1], continuation


def _score_batch(model, windows: Sequence[Tuple[List[int], List[int]]], rows: int, width: int) -> List[Tuple[float, bool]]:
    """Forward one right-padded batch ``[rows, width]``; scores of ``windows`` (last stage)."""
    device = get_device()
    tokens = torch.zeros(rows, width, dtype=torch.long, device=device)
    for r, (inp, _) in enumerate(windows):
        tokens[r, : len(inp)] = torch.tensor(inp, dtype=torch.long)
    positions = torch.arange(width, device=device).unsqueeze(0).expand(rows, -1)
    # Only the positions that predict continuation tokens go through the output layer.
    longest = max((len(c) for _, c in windows), default=1)
    select = torch.zeros(rows, longest, dtype=torch.long, device=device)
    for r, (inp, cont) in enumerate(windows):
        select[r, : len(cont)] = torch.arange(len(inp) - len(cont), len(inp), device=device)
    logits = forward_logits(model, tokens, positions, select=select)
    if not is_last_stage():
        return []
    out = []
    for r, (inp, cont) in enumerate(windows):
        n = len(cont)
        rows_logits = logits[r, :n].float()  # [n, V]: predictions of cont
        target = torch.tensor(cont, device=device)
        logprobs = torch.log_softmax(rows_logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        greedy = bool((rows_logits.argmax(dim=-1) == target).all())
        out.append((float(logprobs.sum()), greedy))
    return out


def loglikelihoods(model, requests: Sequence[Request], *, max_length: int, batch_size: int = 16) -> List[Tuple[float, bool]]:
    """``(sum of continuation log-probabilities, continuation is greedy)`` per request, in order,
    on every rank (see the module docstring). Every rank passes the same requests."""
    from megatron.core import parallel_state as ps

    windows = [_window(r, max_length) for r in requests]
    share = sorted(lockstep.data_parallel_share(windows), key=lambda i: (-len(windows[i][0]), i))
    batches = [share[k : k + batch_size] for k in range(0, len(share), batch_size)]
    (count,) = lockstep.agree_max([len(batches)])
    widths = lockstep.agree_max([max(len(windows[i][0]) for i in b) for b in batches] + [1] * (count - len(batches)))
    keep = is_last_stage() and ps.get_tensor_model_parallel_rank() == 0
    local = {}
    with torch.no_grad():
        for k in range(count):
            index = batches[k] if k < len(batches) else []
            scores = _score_batch(model, [windows[i] for i in index], batch_size, widths[k])
            if keep:
                local.update(zip(index, scores))
    merged = lockstep.gather_by_index(local)
    return [merged[i] for i in range(len(requests))]
