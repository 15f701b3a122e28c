"""Adding an expert on disk: an MoE checkpoint + a dense checkpoint -> the MoE with one more
expert, streamed, validated and atomic like the Mix phase (``mix.py``).

``add_expert(moe_path, dense_path, output, AddExpertOptions(...))`` appends the dense model's FFN
as FFN expert ``n`` (and, for BAM, its attention as attention expert ``N``), gives the new expert
its router entry (Nexus: its domain embedding; linear routers: the mean row) and merges every
other tensor as ``(1-λ)·MoE + λ·dense`` (rules: ``extension.py``). The output is one torch_dist
checkpoint at iteration 0 without optimizer or RNG state, whose recorded arguments give the
new expert counts, so ``pretrain_bam.py --pretrained-checkpoint OUT --use-checkpoint-args``
fine-tunes it at any layout — also at an expert-parallel size that divides only the new count.

Streaming: tensors outside the layer stack are read whole (one from each input); every
``[L, ...]`` tensor block of layers by block of layers (``layer_blocks``: one layer for
checkpoints written by megatron-core), so memory is about one layer of the MoE's largest
tensor plus the write buffers. Expert tensors are written one chunk per (layer, expert), like
the Mix phase's, so an expert-parallel rank reads only its experts.

Every check happens before anything is written (the MoE is one, the dense model is dense and
fits it tensor by tensor, the vocabularies agree, the domain embedding fits the Nexus router,
the output does not exist); each problem is an ``UpcycleError`` of one line. The output is
written under ``<output>.tmp-*`` and renamed into place when complete.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from bam_megatron.checkpoint.dcp_reader import layer_blocks, shape_text
from bam_megatron.checkpoint.dcp_writer import PartWriter, PlannedTensor
from bam_megatron.checkpoint.layout import FORMAT_VERSION, iteration_dir
from bam_megatron.checkpoint.opener import (
    DEFAULT_OPTIONS,
    OpenOptions,
    carry_tokenizer,
    relative_tokenizer,
    unverified_inputs,
)
from bam_megatron.checkpoint.tool_output import OutputTransaction, check_free_space, check_output
from bam_megatron.errors import UpcycleError
from bam_megatron.progress import GIB, Progress
from bam_megatron.upcycle import extension as X
from bam_megatron.upcycle import mapping as U
from bam_megatron.upcycle import nexus
from bam_megatron.upcycle.plan import CARRIED_ARGS, UpcycleOptions, output_args
from bam_megatron.upcycle.seeds import SAME_ARGS, Architecture, Seed, check_same_tokenizer, check_seeds, open_seed

EXPERT_FC1 = U.LAYER_PREFIX + U.EXPERTS_PREFIX + "linear_fc1.weight"


@dataclass
class AddExpertOptions:
    """See ``tools/add_expert.py --help``."""

    domain_embedding: Optional[str] = None  # the new expert's (Nexus routers)
    domain: Optional[str] = None  # which domain of that file (when it holds several)
    merge_weight: Optional[float] = None  # λ; default 1/(n+1)


@dataclass
class Extension:
    """Everything checked, nothing written: the inputs, one rule per MoE tensor, the outputs."""

    moe: Seed
    dense: Seed
    arch: Architecture  # the dense model's
    attn: U.AttentionShape
    rules: Dict[str, X.ExtendRule]
    plan: Dict[str, PlannedTensor]
    args: dict
    num_models: int  # n: dense models already averaged into the MoE
    merge_weight: float
    domain: Optional[nexus.DomainEmbeddings] = None
    notes: List[str] = field(default_factory=list)

    @property
    def router(self) -> str:
        return "nexus" if self.domain is not None else "linear"


@dataclass
class AddExpertResult:
    extension: Extension
    output: str
    ckpt_dir: str
    bytes_read: int = 0
    bytes_written: int = 0
    num_parts: int = 0
    seconds: float = 0.0


def _check_moe(moe: Seed) -> int:
    """The MoE's FFN expert count (checked against its recorded arguments)."""
    fc1 = moe.tensors.get(EXPERT_FC1)
    if fc1 is None:
        raise UpcycleError(
            f"{moe.name} is not a mixture of experts (it has no {EXPERT_FC1}); give the output of "
            "upcycle_bam.py or a BAM / BTX training checkpoint"
        )
    n = int(fc1.shape[1])
    if moe.args.get("num_experts") not in (None, n):
        raise UpcycleError(f"{moe.name} records --num-experts {moe.args['num_experts']} but holds {n} FFN experts")
    return n


def _check_same_args(moe: Seed, dense: Seed) -> None:
    for name in SAME_ARGS:
        if name in moe.args and name in dense.args and moe.args[name] != dense.args[name]:
            raise UpcycleError(
                f"{dense.name} does not fit {moe.name}: --{name.replace('_', '-')} is {dense.args[name]!r} there "
                f"and {moe.args[name]!r} in the MoE"
            )


def _check_source(key: str, rule: X.ExtendRule, moe: Seed, dense: Seed, attn: U.AttentionShape) -> None:
    """The dense tensor ``rule.source`` exists and fits the MoE tensor ``key``."""
    src = dense.tensors.get(rule.source)
    want = X.expected_dense_shape(rule, moe.tensors[key].shape, attn)
    if src is None:
        raise UpcycleError(f"{dense.name} has no tensor {rule.source}, which the MoE's {key} needs; it is not the same architecture")
    if key in ("embedding.word_embeddings.weight", "output_layer.weight") and src.shape[0] != want[0]:
        raise UpcycleError(
            f"{dense.name} has a vocabulary of {src.shape[0]} (padded) and {moe.name} one of {want[0]}; the new "
            "expert must be trained with the MoE's tokenizer"
        )
    if tuple(src.shape) != tuple(want):
        raise UpcycleError(
            f"{dense.name} does not fit {moe.name}: tensor {rule.source} has shape {shape_text(src.shape)} there, "
            f"the MoE's {key} needs {shape_text(want)}"
        )
    if src.dtype != moe.tensors[key].dtype:
        raise UpcycleError(f"{dense.name}: tensor {rule.source} is {src.dtype}, the MoE's {key} is {moe.tensors[key].dtype}")


def _rules(moe: Seed, dense: Seed, attn: U.AttentionShape, attention_experts: bool) -> Dict[str, X.ExtendRule]:
    """One checked rule per MoE tensor; every dense tensor must be used."""
    rules, used = {}, set()
    for key in moe.tensors:
        rule = X.extension_rule(key, attention_experts)
        if rule.source is not None:
            _check_source(key, rule, moe, dense, attn)
            used.add(rule.source)
        elif rule.kind in X.GROWS and len(moe.tensors[key].shape) < 2:
            raise UpcycleError(f"{moe.name}: {key} has shape {shape_text(moe.tensors[key].shape)}, not [layers, experts, ...]")
        rules[key] = rule
    unused = sorted(set(dense.tensors) - used)
    if unused:
        raise UpcycleError(f"{dense.name} has tensor {unused[0]}, which {moe.name} lacks; it is not the same architecture")
    return rules


def _domain(moe: Seed, opts: AddExpertOptions, notes: List[str]) -> Optional[nexus.DomainEmbeddings]:
    """The new expert's domain embedding ``[1, D]`` for a Nexus MoE (checked), else None."""
    if U.NEXUS_DOMAIN_KEY not in moe.tensors:
        if opts.domain_embedding:
            notes.append("linear router: --domain-embedding is not used (the new row is the mean of the others)")
        return None
    if not opts.domain_embedding:
        raise UpcycleError(f"{moe.name} has a Nexus router: give the new expert's --domain-embedding FILE (tools/domain_embeddings.py)")
    de = nexus.load_domain_embeddings(opts.domain_embedding)
    if opts.domain is None and len(de.names) > 1:
        raise UpcycleError(f"{opts.domain_embedding} holds {len(de.names)} domains ({', '.join(de.names)}); choose one with --domain NAME")
    de = de.select([opts.domain] if opts.domain else None)
    want = int(moe.tensors[U.NEXUS_DOMAIN_KEY].shape[2])
    if de.dim != want:
        raise UpcycleError(
            f"{opts.domain_embedding}: the domain embedding has {de.dim} values, the MoE's Nexus router takes {want}; "
            "compute it under the checkpoint the MoE's domain embeddings came from"
        )
    recorded = ((_moe_upcycling(moe) or {}).get("domain_embeddings") or {}).get("checkpoint")
    if recorded and de.provenance.get("checkpoint") and recorded != de.provenance["checkpoint"]:
        notes.append(f"note: the new domain embedding comes from {de.provenance['checkpoint']}, the MoE's from {recorded}; "
                     "embeddings of different checkpoints live in different spaces")
    return de


def _moe_upcycling(moe: Seed) -> Optional[dict]:
    return moe.checkpoint.provenance.upcycling


def _output_args(moe: Seed, arch: Architecture, n: int, attention_experts: bool) -> dict:
    """The MoE's recorded model and tokenizer arguments (the names a mix records) with the new
    expert counts; the tokenizer as carried in the output's ``tokenizer/`` folder."""
    keep = set(CARRIED_ARGS) | set(output_args(arch, 2, UpcycleOptions()))
    args = {k: v for k, v in moe.args.items() if k in keep}
    args.update(relative_tokenizer(moe.checkpoint.tokenizer).as_dict())
    args["num_experts"] = n + 1
    if attention_experts:
        args["bam_attn_experts"] = int(moe.args["bam_attn_experts"]) + 1
    return args


def prepare(moe_path: str, dense_path: str, output: str, opts: AddExpertOptions, force: bool = False,
            options: OpenOptions = DEFAULT_OPTIONS, progress=None) -> Extension:
    """All checks, no writing (both inputs opened and verified by ``checkpoint/opener``)."""
    check_output(output, [moe_path, dense_path], force, UpcycleError, lambda i: ("MOE_CKPT", "DENSE_CKPT")[i])
    moe = open_seed(moe_path, 0, label=f"MOE_CKPT ({moe_path})", options=options, progress=progress)
    dense = open_seed(dense_path, 1, label=f"DENSE_CKPT ({dense_path})", options=options, progress=progress)
    n = _check_moe(moe)
    arch = check_seeds([dense])
    _check_same_args(moe, dense)
    check_same_tokenizer([moe, dense])
    attention_experts = int(moe.args.get("bam_attn_experts") or 1) > 1
    attn = arch.attn
    rules = _rules(moe, dense, attn, attention_experts)
    notes: List[str] = []
    domain = _domain(moe, opts, notes)
    shared = U.SHARED_FC1_KEY in moe.tensors
    num_models = n + int(shared)
    lam = nexus.default_merge_weight(num_models) if opts.merge_weight is None else nexus.check_merge_weight(opts.merge_weight)
    plan = {}
    for key, rule in rules.items():
        shape = tuple(moe.tensors[key].shape)
        plan[key] = PlannedTensor(key, X.grown_shape(shape) if rule.kind in X.GROWS else shape, moe.tensors[key].dtype)
    check_free_space(output, sum(t.nbytes for t in plan.values()), UpcycleError)
    args = _output_args(moe, arch, n, attention_experts)
    return Extension(moe, dense, arch, attn, rules, plan, args, num_models, lam, domain, notes)


def _write_block(writer: PartWriter, key: str, rule: X.ExtendRule, out: torch.Tensor, lo: int) -> None:
    """Expert tensors one chunk per (layer, expert); the rest as one chunk per block."""
    if rule.kind in (X.APPEND, X.APPEND_Q):
        rest = (0,) * (out.dim() - 2)
        for i in range(out.shape[0]):
            for e in range(out.shape[1]):
                writer.add(key, (lo + i, e) + rest, out[i : i + 1, e : e + 1])
        return
    writer.add(key, (lo,) + (0,) * (out.dim() - 1), out)


def _sources(ext: Extension, key: str):
    """The stored keys the output ``key`` reads: the MoE's and the dense model's (or None)."""
    rule = ext.rules[key]
    return ext.moe.tensors[key].source_key, (ext.dense.tensors[rule.source].source_key if rule.source else None)


def _blocks(ext: Extension, readers) -> Dict[str, list]:
    """Per ``[L, ...]`` output key, the layer blocks no stored chunk of its inputs straddles."""
    moe_r, dense_r = readers
    out = {}
    for key in ext.rules:
        if key.startswith(U.LAYER_PREFIX):
            src, dense_src = _sources(ext, key)
            chunks = [moe_r.chunks(src)] + ([dense_r.chunks(dense_src)] if dense_src else [])
            out[key] = layer_blocks(int(ext.moe.tensors[key].shape[0]), chunks)
    return out


def _stream(ext: Extension, readers, writer: PartWriter, blocks_of: Dict[str, list], progress) -> None:
    """Every output tensor: global ones whole, ``[L, ...]`` ones block of layers by block."""
    moe_r, dense_r = readers
    new_domain = ext.domain.embeddings[0] if ext.domain is not None else None
    for key, rule in ext.rules.items():
        src, dense_src = _sources(ext, key)
        shape = tuple(ext.moe.tensors[key].shape)
        if not key.startswith(U.LAYER_PREFIX):
            out = X.extend_tensor(rule, moe_r.read_full(src), dense_r.read_full(dense_src) if dense_src else None,
                                  merge_weight=ext.merge_weight, attn=ext.attn)
            writer.add(key, (0,) * out.dim(), out)
            writer.flush()
            progress(key)
            continue
        blocks = blocks_of[key]
        for i, (lo, hi) in enumerate(blocks):
            moe_t = moe_r.read([(src, (lo,) + (0,) * (len(shape) - 1), (hi - lo,) + shape[1:])])[0]
            dense_t = None
            if dense_src:
                dshape = tuple(ext.dense.tensors[rule.source].shape)
                dense_t = dense_r.read([(dense_src, (lo,) + (0,) * (len(dshape) - 1), (hi - lo,) + dshape[1:])])[0]
            out = X.extend_tensor(rule, moe_t, dense_t, merge_weight=ext.merge_weight, attn=ext.attn, domain=new_domain)
            _write_block(writer, key, rule, out, lo)
            progress(f"{key[len(U.LAYER_PREFIX):]} layers {hi}/{shape[0]}", always=i == len(blocks) - 1)


def _common_state(ext: Extension, moe_path: str, dense_path: str) -> dict:
    upcycling = dict(_moe_upcycling(ext.moe) or {})
    added = list(upcycling.get("added_experts") or [])
    added.append({
        "moe": os.path.abspath(moe_path), "moe_iteration": ext.moe.iteration,
        "dense": os.path.abspath(dense_path), "dense_iteration": ext.dense.iteration,
        "merge_weight": ext.merge_weight, "router": ext.router,
        "domain_embedding": ext.domain.describe() if ext.domain is not None else None,
    })
    upcycling["added_experts"] = added
    return {"args": ext.args, "iteration": 0, "consumed_train_samples": 0, "skipped_iterations": 0,
            "format_version": FORMAT_VERSION, "upcycling": upcycling}


def add_expert(
    moe_path: str,
    dense_path: str,
    output: str,
    opts: AddExpertOptions,
    *,
    force: bool = False,
    part_bytes: int = 128 * 1024**2,
    sync: bool = True,
    crc32: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    options: OpenOptions = DEFAULT_OPTIONS,
) -> AddExpertResult:
    """Write ``moe_path`` + ``dense_path`` as one more expert to ``output``.

    Raises:
        UpcycleError: bad input, before anything is written.
    """
    start = time.perf_counter()
    ext = prepare(moe_path, dense_path, output, opts, force, options, progress)
    unverified = unverified_inputs([ext.moe.checkpoint, ext.dense.checkpoint])
    if unverified:
        ext.notes.append("the output records no checksums, since not every input was verified against its own ("
                         + "; ".join(unverified) + ")")
    output = os.path.abspath(output)
    readers = []
    with OutputTransaction(output, error=UpcycleError, sync=sync) as out:
        writer = out.keep(PartWriter(os.path.join(out.tmp, "parts"), part_bytes, sync, crc32))
        readers = [ext.moe.reader(), ext.dense.reader()]
        carry_tokenizer(ext.moe.checkpoint.tokenizer, out.tmp)
        blocks_of = _blocks(ext, readers)
        total = sum(len(b) for b in blocks_of.values()) + len(ext.rules) - len(blocks_of) + 1
        report = Progress("add-expert", progress, total, lambda: sum(r.bytes_read for r in readers), lambda: writer.bytes_written)
        _stream(ext, readers, writer, blocks_of, report)
        out.finish_checkpoint(writer, ext.plan, _common_state(ext, moe_path, dense_path), checksums=not unverified)
        report(f"merged {writer.num_parts} parts")
    return AddExpertResult(ext, output, iteration_dir(output, 0), sum(r.bytes_read for r in readers),
                           writer.bytes_written, writer.num_parts, time.perf_counter() - start)


def format_summary(result: AddExpertResult) -> str:
    """The end-of-run lines: what was added where, λ, the new expert counts."""
    ext, args = result.extension, result.extension.args
    n = args["num_experts"] - 1
    router = (f"Nexus: domain embedding {ext.domain.names[0]!r} from {ext.domain.path} through the trained projection"
              if ext.domain is not None else "linear: the new row is the mean of the existing rows")
    attn = args.get("bam_attn_experts", 1)
    lines = [
        f"MoE with an added expert: {result.ckpt_dir}",
        f"  FFN experts per layer: {n} -> {n + 1} (new expert {n} = the FFN of {ext.dense.path})"
        + (" + 1 shared (unchanged)" if U.SHARED_FC1_KEY in ext.moe.tensors else ""),
        (f"  attention experts per layer: {attn - 1} -> {attn} (new expert {attn - 1} = the attention of {ext.dense.path})"
         if attn > 1 else "  attention: merged with the same weight as the other shared tensors (BTX)"),
        f"  router entry of the new expert: {router}",
        f"  merged (1-λ)·MoE + λ·dense with λ = {ext.merge_weight:.4g} (1/(n+1), n = {ext.num_models} dense models in the MoE"
        + (")" if abs(ext.merge_weight - 1 / (ext.num_models + 1)) < 1e-12 else "; set by --merge-weight)")
        + ": embeddings, norms, output layer" + (", K/V" if U.LAYER_PREFIX + "self_attention.linear_kv.weight" in ext.rules else "")
        + ("" if attn > 1 else ", attention"),
        *[f"  {note}" for note in ext.notes],
        f"  read {result.bytes_read / GIB:.2f} GiB, wrote {result.bytes_written / GIB:.2f} GiB in {result.num_parts} parts, "
        f"{result.seconds:.1f} s",
    ]
    return "\n".join(lines)
