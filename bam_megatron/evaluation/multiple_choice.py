"""Zero- and few-shot multiple-choice accuracy by log-likelihood, as lm-evaluation-harness
computes it for its ``multiple_choice`` tasks.

Every choice of an item is scored by the summed log-likelihood of its tokens after the item's
context (``loglikelihood.py``); then, per item:

- ``acc``: the choice with the highest log-likelihood is the gold one;
- ``acc_norm``: the same after dividing each log-likelihood by the choice's length in
  characters (lm-evaluation-harness 0.4's ``acc_norm``);
- ``acc_bytes``: the same with the length in UTF-8 bytes (its ``acc_bytes``; equal to
  ``acc_norm`` for ASCII text).

Ties go to the first choice (``numpy.argmax``). Each metric is the mean over items, with its
standard error ``sqrt(p (1 - p) / (n - 1))``.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence

from bam_megatron.evaluation.loglikelihood import encode_pair, loglikelihoods
from bam_megatron.evaluation.tasks import FEWSHOT_DELIMITER, MCItem, fewshot_prefix


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _mean_and_stderr(hits: List[float]) -> tuple:
    n = len(hits)
    p = sum(hits) / n
    return p, (math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else 0.0)


def mc_metrics(items: Sequence[MCItem], lls: Sequence[Sequence[float]]) -> Dict[str, float]:
    """``acc``, ``acc_norm``, ``acc_bytes`` (and their ``*_stderr``) and ``n`` from each item's
    per-choice log-likelihoods."""
    hits = {"acc": [], "acc_norm": [], "acc_bytes": []}
    for item, ll in zip(items, lls):
        chars = [len(c) for c in item.choices]
        nbytes = [len(c.encode("utf-8")) for c in item.choices]
        hits["acc"].append(float(_argmax(ll) == item.gold))
        hits["acc_norm"].append(float(_argmax([x / n for x, n in zip(ll, chars)]) == item.gold))
        hits["acc_bytes"].append(float(_argmax([x / n for x, n in zip(ll, nbytes)]) == item.gold))
    out: Dict[str, float] = {"n": len(items)}
    for name, values in hits.items():
        out[name], out[f"{name}_stderr"] = _mean_and_stderr(values)
    return out


def build_requests(items: Sequence[MCItem], tokenize: Callable[[str], List[int]], prefix_id: int,
                   num_fewshot: int = 0, seed: int = 1234, delimiter: str = FEWSHOT_DELIMITER):
    """One (context ids, continuation ids) request per choice of every item, item by item."""
    requests = []
    for i, item in enumerate(items):
        context = fewshot_prefix(list(items), i, num_fewshot, seed, delimiter) + item.context
        requests.extend(encode_pair(tokenize, context, choice, prefix_id) for choice in item.choices)
    return requests


def score_task(model, items: Sequence[MCItem], tokenize: Callable[[str], List[int]], prefix_id: int, *,
               max_length: int, num_fewshot: int = 0, seed: int = 1234, batch_size: int = 16) -> Dict[str, object]:
    """Score every item of a task with ``model`` (any layout; every rank calls it with the same
    items). Returns the metrics of ``mc_metrics`` plus ``loglikelihoods`` per item."""
    requests = build_requests(items, tokenize, prefix_id, num_fewshot, seed)
    scores = loglikelihoods(model, requests, max_length=max_length, batch_size=batch_size)
    lls, k = [], 0
    for item in items:
        lls.append([s for s, _ in scores[k : k + len(item.choices)]])
        k += len(item.choices)
    return {**mc_metrics(items, lls), "loglikelihoods": lls}
