"""Nexus on disk: the domain-embeddings file, and the Nexus router of an upcycled checkpoint.

A domain-embeddings file (written by ``tools/domain_embeddings.py``, a small ``torch.save``
dict) holds one embedding per named domain and where it came from::

    {"format": FORMAT, "version": 1,
     "names": ["code", "legal", ...],            k domain names
     "embeddings": float32 [k, D],               row i: domain names[i]
     "representation": "...",                    what was averaged
     "checkpoint": "/abs/ckpt/iter_0000300", "iteration": 300,
     "datasets": {name: prefix}, "tokens": {name: count}, "seq_length": s, "seed": seed}

``nexus_router_tensors`` makes the router of an upcycled model (``model/nexus_router.py``): the
domain embeddings of the routed experts in expert order, repeated for every layer, and a freshly
initialised projection. Every problem with a file is an ``UpcycleError`` with one line.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from bam_megatron.checkpoint.opener.unpickle import load_torch
from bam_megatron.errors import UpcycleError, one_line
from bam_megatron.upcycle import mapping as U

FORMAT = "bam-megatron domain embeddings"
VERSION = 1


@dataclass
class DomainEmbeddings:
    """Named domain embeddings ``[k, D]`` (float32) and their provenance."""

    names: List[str]
    embeddings: torch.Tensor
    provenance: Dict[str, object] = field(default_factory=dict)
    path: str = ""

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def select(self, names: Optional[Sequence[str]]) -> "DomainEmbeddings":
        """The embeddings of ``names`` in that order (all of them, in file order, for None)."""
        if names is None:
            return self
        missing = [n for n in names if n not in self.names]
        if missing:
            raise UpcycleError(
                f"{self.path} has no domain {missing[0]!r}; it holds {', '.join(self.names)}"
            )
        rows = [self.names.index(n) for n in names]
        return DomainEmbeddings(list(names), self.embeddings[rows].clone(), self.provenance, self.path)

    def describe(self) -> dict:
        """Provenance to record in a checkpoint (no tensors)."""
        return {"file": self.path, "names": list(self.names), **self.provenance}


def save_domain_embeddings(de: DomainEmbeddings, path: str) -> None:
    """Write ``de`` to ``path`` atomically (a temporary file renamed into place)."""
    payload = {"format": FORMAT, "version": VERSION, "names": list(de.names),
               "embeddings": de.embeddings.detach().float().cpu().contiguous(), **de.provenance}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_domain_embeddings(path: str) -> DomainEmbeddings:
    """Read and check a domain-embeddings file.

    Raises:
        UpcycleError: missing, unreadable or malformed file (one line naming it).
    """
    fix = "write it with tools/domain_embeddings.py"
    if not os.path.isfile(path):
        raise UpcycleError(f"domain embeddings {path} do not exist; {fix}")
    try:
        data = load_torch(path, path)
    except Exception as exc:  # refused or damaged: the message says which
        raise UpcycleError(f"cannot read domain embeddings {path} ({one_line(exc)}); {fix}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UpcycleError(f"{path} is not a domain-embeddings file; {fix}")
    names, emb = data.get("names"), data.get("embeddings")
    if not (isinstance(names, list) and names and all(isinstance(n, str) and n for n in names)) or len(set(names)) != len(names):
        raise UpcycleError(f"{path} names no domains (or repeats one); {fix}")
    if not torch.is_tensor(emb) or emb.dim() != 2 or emb.shape[0] != len(names) or emb.shape[1] < 1:
        raise UpcycleError(f"{path}: the embeddings are not a [{len(names)}, D] tensor; {fix}")
    if not torch.isfinite(emb).all():
        raise UpcycleError(f"{path} holds non-finite embeddings; recompute it with tools/domain_embeddings.py")
    provenance = {k: v for k, v in data.items() if k not in ("format", "version", "names", "embeddings")}
    return DomainEmbeddings(list(names), emb.float(), provenance, os.path.abspath(path))


def load_upcycle_domains(path: Optional[str], names: Optional[Sequence[str]], routed: int) -> DomainEmbeddings:
    """The domain embeddings of ``routed`` experts (``--domain-embeddings`` [``--domains``])."""
    if path is None:
        raise UpcycleError("--router nexus needs --domain-embeddings FILE (from tools/domain_embeddings.py)")
    de = load_domain_embeddings(path).select(names)
    if len(de.names) != routed:
        raise UpcycleError(
            f"{path} gives {len(de.names)} domain embeddings ({', '.join(de.names)}) for {routed} routed FFN "
            "experts; give one per domain expert, in expert order (select them with --domains NAME ...)"
        )
    return de


def nexus_shapes(num_layers: int, routed: int, hidden: int, domain: int, projection: int) -> Dict[str, tuple]:
    """Global shapes of the Nexus router's checkpoint tensors."""
    return {
        U.NEXUS_DOMAIN_KEY: (num_layers, routed, domain),
        U.NEXUS_FC1_KEY: (num_layers, 2 * projection, domain),
        U.NEXUS_FC2_KEY: (num_layers, hidden, projection),
    }


def nexus_router_tensors(
    domains: torch.Tensor,
    num_layers: int,
    hidden: int,
    projection: int,
    *,
    init: str,
    std: float,
    generator: torch.Generator,
    dtype: torch.dtype,
) -> Dict[str, torch.Tensor]:
    """The Nexus router of an upcycled model (global tensors, keys of ``mapping``).

    Args:
        domains: ``[N, D]`` domain embeddings of the routed experts, expert order (the same in
            every layer).
        init: ``"random"``: ``W1``, ``W2`` normal(0, ``std``); ``"zero"``: ``W2 = 0`` (every
            expert embedding starts at zero: uniform routing) and ``W1`` random, so that the
            projection still learns (with both zero its gradients would stay zero).

    Returns:
        ``{domain_embeddings [L, N, D] (fp32), projection_fc1 [L, 2P, D], projection_fc2 [L, d, P]}``
        (the projection in ``dtype``).
    """
    if init not in U.ROUTER_INITS:
        raise ValueError(f"unknown router init {init!r}; choose one of {U.ROUTER_INITS}")
    n, dim = domains.shape
    fc1 = torch.empty(num_layers, 2 * projection, dim).normal_(0.0, std, generator=generator)
    fc2 = torch.zeros(num_layers, hidden, projection)
    if init == "random":
        fc2.normal_(0.0, std, generator=generator)
    emb = domains.float().unsqueeze(0).expand(num_layers, n, dim).contiguous()
    return {U.NEXUS_DOMAIN_KEY: emb, U.NEXUS_FC1_KEY: fc1.to(dtype), U.NEXUS_FC2_KEY: fc2.to(dtype)}


def default_merge_weight(num_models: int) -> float:
    """λ = 1/(n+1): the weight of a new dense model merged into ``n`` already averaged ones."""
    if num_models < 1:
        raise ValueError("num_models must be >= 1")
    return 1.0 / (num_models + 1)


def check_merge_weight(value: float) -> float:
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise UpcycleError(f"--merge-weight must be between 0 and 1 (exclusive), got {value}")
    return float(value)
