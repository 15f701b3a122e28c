"""The Mix phase on disk: N dense torch_dist checkpoints -> one BAM checkpoint, streamed.

``upcycle(seed_paths, output, UpcycleOptions(...))`` reads the seeds (checkpoints of
``pretrain_bam.py`` or Megatron-LM GPT torch_dist checkpoints, local or Transformer-Engine layer
names) one layer at a time, applies the mapping of ``bam_megatron/upcycling.py`` (``tensor_rule``)
and writes one torch_dist checkpoint in Megatron-LM's layout::

    <output>/latest_checkpointed_iteration.txt      "0"
    <output>/iter_0000000/                          *.distcp, .metadata, common.pt, metadata.json

whose common state records the model arguments (``args``; ``pretrain_bam.py --load <output>
--use-checkpoint-args`` rebuilds the BAM model from them), iteration 0, and no optimizer, RNG
or ``layout`` entry. It loads at any TP / PP / EP layout.

Streaming: nothing holds a whole seed. Every ``[L, ...]`` tensor is processed one layer at a
time (more precisely: in the smallest layer ranges that no stored chunk straddles, which is one
layer for checkpoints written by megatron-core, and the whole tensor for one written as a single
chunk); for each layer every seed's slice is read in turn (torch.distributed.checkpoint reads
only the stored chunks that overlap it; a slice that is exactly one stored chunk is loaded
without a copy). Expert slices go to the writer as they are, averaged tensors are accumulated in
fp32 (``_Mean``, bit-identical to ``upcycling.average``). Tensors outside the layer stack
(embeddings, final norm, output layer) come first, while the write buffers are empty: read one
seed at a time into one fp32 accumulator. Peak memory: one layer-slice of one seed + the fp32 mean
of one layer-slice + two write buffers of ``part_bytes`` (one being filled, one being written
by a background thread), or, for the largest tensor outside the layers, its fp32 accumulator
plus one seed's copy of it.

Writing in parts, then merging: ``torch.distributed.checkpoint.save`` needs its whole state dict
in memory, so the output is saved in parts of about ``part_bytes`` each, every part its own small
DCP checkpoint whose entries are chunks (``c<k>``) of the real tensors. The merge moves the
parts' ``.distcp`` files into the output directory under unique names and writes one DCP
``.metadata``: per real key its global shape and the list of chunks (offsets, sizes), and per
chunk its storage location (file, byte offset, length) taken from the part that wrote it. The
result is the same structure a multi-rank save produces, so megatron-core's
``dist_checkpointing.load`` / ``load_plain_tensors`` and torch's DCP reader read it like any other
checkpoint. Each expert is its own chunk ``[1, 1, ...]`` at (layer, expert), so a loader that
holds one expert (expert parallelism) reads only that expert's bytes.

Atomicity: everything is written under ``<output>.tmp-<random>`` and renamed to ``<output>`` at
the end (with ``force`` the previous output is moved aside to ``<output>.old-<random>`` only
then, and deleted after the rename). The
parts are fsynced by a background thread (unless ``sync=False``); the merged index, the common
state, ``metadata.json`` (which is what makes a directory a megatron checkpoint) and the tracker
are written in that order, after all data is on disk. A failed or interrupted run removes its
temporary directory; nothing under ``<output>`` is ever half-written.

All validation happens before any file is written: seeds exist and are readable torch_dist
checkpoints, share one architecture (same tensors, shapes, dtypes, heads, vocabulary), are
dense, and fit the mode; every problem is an ``UpcycleError`` with a one-line message.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from bam_megatron.checkpoint.dcp_reader import layer_blocks
from bam_megatron.checkpoint.dcp_writer import PartWriter
from bam_megatron.checkpoint.inspection import human_count
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
from bam_megatron.upcycle import mapping as U
from bam_megatron.upcycle import nexus
from bam_megatron.upcycle.plan import (
    OutputTensor,
    ParamCounts,
    UpcycleOptions,
    check_options,
    count_parameters,
    expert_names,
    output_args,
    plan_outputs,
)
from bam_megatron.upcycle.seeds import (
    Architecture,
    Seed,
    attention_expert_problem,
    check_same_tokenizer,
    check_seeds,
    open_seed,
)


class _Mean:
    """Weighted mean accumulated in fp32, seed by seed: bit-identical to ``upcycling.average``
    (the same fp32 products and sums in the same order). Lower-precision inputs are widened
    block by block through a small scratch buffer (a mixed-dtype ``add_`` is several times
    slower, and a whole fp32 copy per seed would double the memory)."""

    BLOCK = 1 << 22  # elements (16 MiB of fp32)

    def __init__(self):
        self.acc: Optional[torch.Tensor] = None
        self.dtype: Optional[torch.dtype] = None
        self._scratch: Optional[torch.Tensor] = None

    def add(self, t: torch.Tensor, weight: float) -> None:
        w = float(weight)
        src = t.contiguous().view(-1)
        n = src.numel()
        if self.acc is None:
            self.acc = torch.empty(t.shape, dtype=torch.float32)
            self.dtype = t.dtype
            acc = self.acc.view(-1)
            for i in range(0, n, self.BLOCK):
                block = acc[i : i + self.BLOCK]
                block.copy_(src[i : i + self.BLOCK])
                block.mul_(w)
            return
        acc = self.acc.view(-1)
        if src.dtype == torch.float32:
            acc.add_(src, alpha=w)
            return
        if self._scratch is None:
            self._scratch = torch.empty(min(n, self.BLOCK), dtype=torch.float32)
        for i in range(0, n, self.BLOCK):
            m = min(self.BLOCK, n - i)
            scratch = self._scratch[:m]
            scratch.copy_(src[i : i + m])
            acc[i : i + m].add_(scratch, alpha=w)

    def result(self) -> torch.Tensor:
        out = self.acc.to(self.dtype)
        self.acc = self._scratch = None
        return out


@dataclass
class UpcycleResult:
    output: str
    ckpt_dir: str
    seeds: List[Seed]
    arch: Architecture
    plan: Dict[str, OutputTensor]
    args: dict
    params: ParamCounts
    weights: List[float]
    options: UpcycleOptions
    router_std: float = 0.0
    bytes_read: int = 0
    bytes_written: int = 0
    num_parts: int = 0
    seconds: float = 0.0
    write_seconds: float = 0.0
    domains: Optional[nexus.DomainEmbeddings] = None  # the Nexus router's, in expert order
    notes: List[str] = field(default_factory=list)  # what the summary must say (unverified inputs, tokenizer)


def prepare(seed_paths: Sequence[str], output: str, opts: UpcycleOptions, force: bool = False,
            options: OpenOptions = DEFAULT_OPTIONS, progress=None):
    """All checks, no writing: returns ``(seeds, arch, plan, args, weights, domains)`` (``domains``:
    the Nexus router's domain embeddings, else ``None``). Every seed is opened (and its files
    verified) by ``checkpoint/opener``; the recorded tokenizer is seed 0's, carried in the
    output's ``tokenizer/`` folder."""
    weights = check_options(len(seed_paths), opts)
    check_output(output, seed_paths, force, UpcycleError, lambda i: f"seed {i}")
    seeds = [open_seed(p, i, options=options, progress=progress) for i, p in enumerate(seed_paths)]
    arch = check_seeds(seeds)
    check_same_tokenizer(seeds)
    problem = attention_expert_problem(arch) if opts.mode != "merged" else None
    if problem:
        raise UpcycleError(problem)
    domains = _nexus_domains(opts, len(seeds))
    plan = plan_outputs(arch, len(seeds), opts, domains)
    args = output_args(arch, len(seeds), opts, domains)
    args.update(relative_tokenizer(seeds[0].checkpoint.tokenizer).as_dict())
    check_free_space(output, sum(t.nbytes for t in plan.values()), UpcycleError)
    return seeds, arch, plan, args, weights, domains


def _input_notes(inputs) -> List[str]:
    """What the output cannot vouch for: unverified inputs (it then records no checksums) and a
    tokenizer whose files were not found (recorded as it was)."""
    notes = []
    unverified = unverified_inputs(inputs)
    if unverified:
        notes.append("the output records no checksums, since not every input was verified against its own ("
                     + "; ".join(unverified) + ")")
    if inputs[0].tokenizer_problem:
        notes.append(f"{inputs[0].tokenizer_problem}: the output records the tokenizer as seed 0 did")
    return notes


def _nexus_domains(opts: UpcycleOptions, n: int):
    """The routed experts' domain embeddings (checked) with ``--router nexus``, else None."""
    if opts.router != "nexus":
        return None
    return nexus.load_upcycle_domains(opts.domain_embeddings, opts.domains, opts.routed_experts(n))


def _mix_global_tensors(arch, seeds, readers, weights, writer, mode, progress, shared_expert=False) -> None:
    """Embeddings, final norm, output layer: averaged, one seed at a time. Done first, while the
    write buffers are empty: the largest (the embeddings) needs its fp32 mean and one seed's copy
    at the same time."""
    for key in arch.global_keys:
        if U.tensor_rule(key, mode, shared_expert).kind != U.AVERAGE:
            raise RuntimeError(f"internal error: {key} outside the layer stack is not averaged")
        mean = _Mean()
        for e, (seed, reader) in enumerate(zip(seeds, readers)):
            t = reader.read_full(seed.tensors[key].source_key)
            mean.add(t, weights[e])
            del t
        value = mean.result()
        writer.add(key, (0,) * value.dim(), value)
        writer.flush()  # written while the next tensor is read
        del value
        progress(key)


def _stack_chunks(reader, source: str, lo: int, hi: int, expert: Optional[int], out_key: str, writer) -> None:
    """Each stored chunk of a seed's ``[L, ...]`` tensor in layers ``[lo, hi)`` becomes a chunk
    ``[1, 1, ...]`` of expert ``expert`` in ``out_key``, as it is (``expert=None``: a chunk
    ``[1, ...]`` of the ``[L, ...]`` tensor ``out_key``, e.g. the shared expert)."""
    for chunk in reader.chunks_within(source, lo, hi):
        t = reader.read([(source, chunk.offsets, chunk.sizes)])[0]
        c_lo = int(chunk.offsets[0])
        for layer in range(c_lo, c_lo + int(chunk.sizes[0])):
            part = t[layer - c_lo : layer - c_lo + 1]
            if expert is None:
                writer.add(out_key, (layer,) + tuple(int(o) for o in chunk.offsets[1:]), part)
                continue
            offsets = (layer, expert) + tuple(int(o) for o in chunk.offsets[1:])
            writer.add(out_key, offsets, part.unsqueeze(1))


def _mix_layer_block(key, rule, arch, seeds, readers, weights, writer, lo: int, hi: int) -> None:
    """Layers ``[lo, hi)`` of one ``[L, ...]`` seed tensor in every seed -> the output chunks."""
    shape = arch.shapes[key]
    rest = (0,) * (len(shape) - 1)
    mean = _Mean()
    for e, (seed, reader) in enumerate(zip(seeds, readers)):
        source = seed.tensors[key].source_key
        if rule.kind == U.STACK:
            _stack_chunks(reader, source, lo, hi, e, rule.outputs[0], writer)
            continue
        if rule.kind == U.SHARED_STACK:  # seed 0: the shared expert; seed e: routed expert e - 1
            _stack_chunks(reader, source, lo, hi, None if e == 0 else e - 1, rule.outputs[int(e > 0)], writer)
            continue
        t = reader.read([(source, (lo,) + rest, (hi - lo,) + shape[1:])])[0]
        if rule.kind == U.SPLIT_QKV:
            q, kv = U.split_qkv(t, arch.attn)
            mean.add(kv, weights[e])
            for layer in range(lo, hi):
                writer.add(rule.outputs[0], (layer, e) + rest, q[layer - lo : layer - lo + 1].unsqueeze(1))
            del q, kv
        else:
            mean.add(t, weights[e])
        del t
    if mean.acc is not None:
        writer.add(rule.outputs[-1], (lo,) + rest, mean.result())


def _mix_layer_tensors(arch, seeds, readers, weights, writer, mode, blocks_of, progress, shared_expert=False) -> None:
    """Every ``[L, ...]`` tensor, block of layers by block of layers (see ``layer_blocks``)."""
    for key in arch.layer_keys:
        rule = U.tensor_rule(key, mode, shared_expert)
        blocks = blocks_of[key]
        name = key[len(U.LAYER_PREFIX):]
        for i, (lo, hi) in enumerate(blocks):
            _mix_layer_block(key, rule, arch, seeds, readers, weights, writer, lo, hi)
            progress(f"{name} layers {hi}/{arch.num_layers}", always=i == len(blocks) - 1)


def _write_routers(arch, n: int, opts: UpcycleOptions, plan, writer, domains=None) -> float:
    """Fresh attention / FFN routers (``[L, N, d]``; the Nexus router: the routed experts' domain
    embeddings and a fresh projection); returns the std used."""
    std = opts.router_std if opts.router_std is not None else float(arch.args.get("init_method_std", 0.02))
    gen = torch.Generator().manual_seed(opts.seed)
    for key in (U.ATTN_ROUTER_KEY, U.FFN_ROUTER_KEY):
        if key in plan:
            rows = plan[key].shape[1]
            router = U.new_router(arch.num_layers, rows, arch.hidden_size, init=opts.router_init, std=std, generator=gen, dtype=arch.dtype)
            writer.add(key, (0, 0, 0), router)
    if domains is not None:
        projection = plan[U.NEXUS_FC2_KEY].shape[2]
        tensors = nexus.nexus_router_tensors(domains.embeddings, arch.num_layers, arch.hidden_size, projection,
                                             init=opts.router_init, std=std, generator=gen, dtype=arch.dtype)
        for key, value in tensors.items():
            writer.add(key, (0,) * value.dim(), value)
    return std


def _common_state(args: dict, seeds, weights, opts: UpcycleOptions, std: float, domains=None) -> dict:
    """The output's common state: arguments, iteration 0 and where everything came from."""
    return {
        "args": args,
        "iteration": 0,
        "consumed_train_samples": 0,
        "skipped_iterations": 0,
        "format_version": FORMAT_VERSION,
        "upcycling": {
            "mode": opts.mode,
            "seeds": [os.path.abspath(s.path) for s in seeds],
            "expert_names": expert_names([s.path for s in seeds], opts),
            "seed_iterations": [s.iteration for s in seeds],
            "weights": list(weights),
            "router_init": opts.router_init,
            "router_std": std,
            "router_seed": opts.seed,
            "router": opts.router,
            "shared_expert": opts.has_shared_expert,
            "domain_embeddings": domains.describe() if domains is not None else None,
        },
    }


def upcycle(
    seed_paths: Sequence[str],
    output: str,
    opts: UpcycleOptions,
    *,
    force: bool = False,
    part_bytes: int = 128 * 1024**2,
    sync: bool = True,
    crc32: bool = False,
    progress: Optional[Callable[[str], None]] = None,
    options: OpenOptions = DEFAULT_OPTIONS,
) -> UpcycleResult:
    """Write the BAM checkpoint of ``seed_paths`` (expert order: seed first) to ``output``.

    Raises:
        UpcycleError: bad input, before anything is written.
    """
    start = time.perf_counter()
    seeds, arch, plan, args, weights, domains = prepare(seed_paths, output, opts, force, options, progress)
    notes = _input_notes([s.checkpoint for s in seeds])
    n = len(seeds)
    output = os.path.abspath(output)
    with OutputTransaction(output, error=UpcycleError, sync=sync) as out:
        writer = out.keep(PartWriter(os.path.join(out.tmp, "parts"), part_bytes, sync, crc32))
        readers = [s.reader() for s in seeds]
        result = UpcycleResult(output, iteration_dir(output, 0), seeds, arch, plan, args,
                               count_parameters(plan, n, args), weights, opts, domains=domains, notes=notes)
        carry_tokenizer(seeds[0].checkpoint.tokenizer, out.tmp)
        blocks_of = {
            key: layer_blocks(arch.num_layers, [r.chunks(s.tensors[key].source_key) for s, r in zip(seeds, readers)])
            for key in arch.layer_keys
        }
        total = sum(len(b) for b in blocks_of.values()) + len(arch.global_keys) + 2
        report = Progress("upcycle", progress, total, lambda: sum(r.bytes_read for r in readers), lambda: writer.bytes_written)
        shared = opts.has_shared_expert
        _mix_global_tensors(arch, seeds, readers, weights, writer, opts.mode, report, shared)
        _mix_layer_tensors(arch, seeds, readers, weights, writer, opts.mode, blocks_of, report, shared)
        result.router_std = _write_routers(arch, n, opts, plan, writer, result.domains)
        report("routers")
        common = _common_state(args, seeds, weights, opts, result.router_std, result.domains)
        out.finish_checkpoint(writer, plan, common, checksums=not unverified_inputs([s.checkpoint for s in seeds]))
        report(f"merged {writer.num_parts} parts")
    result.bytes_read = sum(r.bytes_read for r in readers)
    result.bytes_written = writer.bytes_written
    result.num_parts = writer.num_parts
    result.write_seconds = writer.seconds
    result.seconds = time.perf_counter() - start
    return result


def format_summary(result: UpcycleResult) -> str:
    """The end-of-run table: parameters, expert counts, where every expert came from."""
    args, mode = result.args, result.options.mode
    p = result.params
    kv = {"full": "Q, K, V, O per expert", "shared-kv": "Q, O per expert; K, V shared (weighted mean)", "merged": "none: attention averaged (BTX)"}[mode]
    attn_experts = args["bam_attn_experts"] if mode != "merged" else 0
    routing = "soft over all" if args["bam_attn_routing"] == "soft" else f"top-{args['bam_attn_topk']}"
    ffn_routing = f"top-{args['moe_router_topk']}" + (", softmax before top-k" if args["moe_router_pre_softmax"] else ", softmax over the chosen")
    ffn_routing += ", Nexus router" if args.get("moe_router_type") == "nexus" else ", linear router"
    shared = result.options.has_shared_expert
    lines = [
        f"{'BTX' if mode == 'merged' else 'BAM'} checkpoint: {result.ckpt_dir}",
        f"  mode {mode}; {args['num_layers']} layers, {'sequential' if args['bam_sequential_block'] else 'parallel'} blocks, "
        f"hidden {args['hidden_size']}, {args['num_attention_heads']} heads ({args['num_query_groups']} KV groups), "
        f"FFN {args['ffn_hidden_size']}, vocabulary {args['padded_vocab_size']}, {str(result.arch.dtype).replace('torch.', '')}",
        f"  parameters: total {p.total:,} ({human_count(p.total)}), active per token {p.active:,} ({human_count(p.active)})",
        f"  attention experts per layer: {attn_experts} ({kv}" + (f"; routing {routing})" if attn_experts else ")"),
        f"  FFN experts per layer: {args['num_experts']}" + (" + 1 shared (seed 0's FFN, always on)" if shared else "")
        + f" (routing {ffn_routing})",
        f"  routers: {'attention + FFN' if mode != 'merged' else 'FFN'}, {result.options.router_init} init"
        + (f" (std {result.router_std:g}, seed {result.options.seed})" if result.options.router_init == "random" else ""),
        *([f"  Nexus router: domain embeddings of {', '.join(result.domains.names)} (experts 0..) from "
           f"{result.domains.path} (D {args['nexus_domain_size']}, projection {args['nexus_projection_size']})"]
          if result.domains is not None else []),
        "  averaged (weights " + ", ".join(f"{w:.4g}" for w in result.weights) + "): embeddings, norms, output layer"
        + ({"shared-kv": ", K/V", "merged": ", attention"}.get(mode, "")),
        "",
    ]
    rows = [("expert", "name", "attention from", "FFN from", "iteration")]
    names = expert_names([s.path for s in result.seeds], result.options)
    for s, name in zip(result.seeds, names):
        attn_src = s.path if mode != "merged" else "(averaged)"
        ffn_src = ("shared: " if shared and s.index == 0 else "") + s.path
        rows.append((str(s.index), name, attn_src, ffn_src, "" if s.iteration is None else str(s.iteration)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        lines.append("  " + " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  " + "-+-".join("-" * w for w in widths))
    lines.append("")
    lines.append(
        f"  read {result.bytes_read / GIB:.2f} GiB, wrote {result.bytes_written / GIB:.2f} GiB in "
        f"{result.num_parts} parts, {result.seconds:.1f} s"
    )
    lines += [f"  note: {note}" for note in result.notes]
    return "\n".join(lines)
