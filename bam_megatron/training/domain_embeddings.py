"""Domain embeddings for the Nexus router: one vector per domain, from a dense checkpoint.

For each domain (a named Megatron indexed dataset), ``compute_domain_embeddings`` samples about
``tokens`` tokens of it (whole documents in a seeded random order, concatenated and cut into
sequences of the model's length), runs them through the model of one checkpoint (normally the
dense seed every expert was branched from, so that all domains — also ones added later — are
embedded in one space) and averages:

    d_domain = mean over the sampled tokens t of  h_t      h_t = the final hidden state of token t
                                                                 (after the final norm) [d]

**Why the final hidden state.** Nexus (Gritsch et al. 2024) embeds each domain's data with a
separate embedding model and averages; the closest thing inside our own seed is its last
representation, the one the output layer reads: contextual (the embedding-layer output would
be a bag-of-words average of token embeddings, which only tells the domains' unigram
statistics apart) and on the scale the final norm fixes, whatever the checkpoint. It needs no
extra model and no network, and a domain added later is embedded the same way from the same
checkpoint.

One process (CPU, or one GPU in the checkpoint's precision); the model is built from the
checkpoint's recorded arguments at TP = PP = EP = 1 and loads from any saved layout.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from bam_megatron.errors import DataConfigError

REPRESENTATION = "mean of the final hidden states (the output of the final norm) over the sampled tokens"


@dataclass
class DomainSample:
    """The sampled token ids of one domain, ``[n, s]`` (the last row may be shorter: ``tail``)."""

    name: str
    prefix: str
    rows: np.ndarray
    tail: Optional[np.ndarray]

    @property
    def tokens(self) -> int:
        return int(self.rows.size + (0 if self.tail is None else self.tail.size))


def sample_domain(name: str, prefix: str, tokens: int, seq_length: int, seed: int) -> DomainSample:
    """About ``tokens`` tokens of the indexed dataset ``prefix``: whole documents in a random
    order (from ``seed`` and the domain's name, so a domain's sample does not depend on the other
    domains of the call), concatenated, cut into rows of ``seq_length``; all of it when smaller."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    order = np.random.default_rng([seed, zlib.crc32(name.encode())]).permutation(len(ds))
    parts, have = [], 0
    for i in order:
        doc = np.asarray(ds[int(i)], dtype=np.int64)
        parts.append(doc)
        have += doc.size
        if have >= tokens:
            break
    flat = np.concatenate(parts)[:tokens]
    full = flat.size // seq_length
    rows = flat[: full * seq_length].reshape(full, seq_length)
    tail = flat[full * seq_length :] if flat.size % seq_length else None
    return DomainSample(name, prefix, rows, tail)


def build_loaded_model(ckpt, device):
    """The checkpoint's model (an opened ``Checkpoint``; this process, TP = PP = EP = 1) in eval
    mode, its weights verified and loaded."""
    from bam_megatron.checkpoint.weights import load_model_weights
    from bam_megatron.model.build import build_bam_model
    from bam_megatron.training.configs import (
        ComputeSettings,
        ParallelLayout,
        bam_config_from_args,
        gpt_model_kwargs,
        transformer_config,
    )

    model_args = ckpt.require_model_args().replace(hidden_dropout=0.0, attention_dropout=0.0)
    config = transformer_config(model_args, ParallelLayout(), ComputeSettings())
    model = build_bam_model(config, bam_config_from_args(model_args), **gpt_model_kwargs(model_args)).to(device)
    load_model_weights(model, ckpt)
    return model.eval()


@torch.no_grad()
def mean_final_hidden_state(model, sample: DomainSample, micro_batch: int, device) -> torch.Tensor:
    """``[d]`` float64 mean of the final norm's output over every token of ``sample``."""
    captured: List[torch.Tensor] = []
    hook = model.decoder.final_layernorm.register_forward_hook(lambda _m, _i, out: captured.append(out))
    total, count = None, 0
    batches = [sample.rows[i : i + micro_batch] for i in range(0, len(sample.rows), micro_batch)]
    if sample.tail is not None:
        batches.append(sample.tail[None])
    try:
        for rows in batches:
            tokens = torch.as_tensor(rows, device=device)
            positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
            captured.clear()
            model(tokens, positions, None)
            hidden = captured[-1].double()  # [s, b, d]
            part = hidden.sum(dim=(0, 1))
            total = part if total is None else total + part
            count += hidden.shape[0] * hidden.shape[1]
    finally:
        hook.remove()
    return (total / count).cpu()


def check_datasets(domains: Dict[str, str], vocab_size: int) -> None:
    """Every dataset is whole and its token ids fit the model's vocabulary (one-line errors)."""
    from bam_megatron.data.index_check import check_indexed_dataset, check_token_ids

    for name, prefix in domains.items():
        if not (os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")):
            raise DataConfigError(f"--domain {name}:{prefix}: no {prefix}.idx / .bin; give the prefix of an indexed dataset")
        check_indexed_dataset(prefix, f"--domain {name}")
        check_token_ids([prefix], vocab_size, f"--domain {name}")


def compute_domain_embeddings(
    ckpt,
    domains: Dict[str, str],
    *,
    tokens: int,
    seq_length: Optional[int] = None,
    micro_batch: int = 8,
    seed: int = 1234,
    progress: Callable[[str], None] = lambda _m: None,
):
    """Domain embeddings ``[k, d]`` of ``domains`` (name -> dataset prefix) under the opened
    checkpoint ``ckpt`` (``checkpoint.opener.Checkpoint``).

    Returns:
        ``upcycle.nexus.DomainEmbeddings`` with its provenance (checkpoint, datasets, tokens).
    """
    from bam_megatron.parallel.distributed import destroy_distributed, get_device, init_distributed
    from bam_megatron.upcycle.nexus import DomainEmbeddings

    model_args = ckpt.require_model_args()
    seq = seq_length or model_args.seq_length
    check_datasets(domains, model_args.padded_vocab_size)
    init_distributed(seed=seed)
    try:
        device = get_device()
        model = build_loaded_model(ckpt, device)
        rows, counts = [], {}
        for name, prefix in domains.items():
            sample = sample_domain(name, prefix, tokens, seq, seed)
            rows.append(mean_final_hidden_state(model, sample, micro_batch, device).float())
            counts[name] = sample.tokens
            progress(f"[domain-embeddings] {name}: {sample.tokens:,} tokens of {prefix}, |d| = {rows[-1].norm():.3f}")
    finally:
        destroy_distributed()
    provenance = {
        "representation": REPRESENTATION, "checkpoint": ckpt.dir,
        "iteration": ckpt.iteration, "datasets": {k: os.path.abspath(v) for k, v in domains.items()},
        "tokens": counts, "seq_length": seq, "seed": seed,
    }
    return DomainEmbeddings(list(domains), torch.stack(rows), provenance)


def parse_domains(specs: Sequence[str]) -> Dict[str, str]:
    """``["code:PREFIX", ...]`` -> ``{"code": PREFIX}`` (one-line errors)."""
    out: Dict[str, str] = {}
    for spec in specs:
        name, sep, prefix = spec.partition(":")
        if not sep or not name or not prefix:
            raise DataConfigError(f"--domain {spec!r} is not NAME:PREFIX (e.g. code:data/code_train_text_document)")
        if name in out:
            raise DataConfigError(f"--domain {name} is given twice")
        out[name] = prefix
    return out


