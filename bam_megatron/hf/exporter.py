"""``tools/hf_export.py``: a checkpoint of ours (any saved TP / PP / EP layout) -> a Hugging Face
model folder: safetensors shards, ``config.json``, ``generation_config.json``, tokenizer files
and, for ``BAMForCausalLM``, ``configuration_bam.py`` + ``modeling_bam.py``.

The class is the first that holds the model exactly (``adapters.EXPORTERS``): dense sequential
-> Llama / Qwen2 / Qwen3, dense parallel LayerNorm with zero norm biases -> Cohere, BTX-style
sequential MoE with renormalised top-k -> Mixtral, everything else -> ``BAMForCausalLM``.

Order of work: every check first — output path, the checkpoint's index and recorded arguments
(``spec_from_checkpoint``), the class, a *plan* made by running the adapter on ``meta`` tensors
(every output tensor's name, shape and dtype, and every stored model tensor used), the tokenizer
files, the free space. Then the weights stream: ``CheckpointReader`` reads one layer's slice of
each global tensor (only the stored chunks that overlap it, at whatever layout they were saved),
the adapter maps it, ``SafetensorsWriter`` puts it at its planned place. All under
``<output>.tmp-*``, renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from bam_megatron.checkpoint.dcp_reader import is_model_entry
from bam_megatron.checkpoint.opener import DEFAULT_OPTIONS, Checkpoint, OpenOptions, open_checkpoint, tensor_reader
from bam_megatron.checkpoint.tool_output import OWNER_FILE, OutputTransaction, check_free_space, check_output
from bam_megatron.data.tokenizer_files import files_of
from bam_megatron.errors import CheckpointError, HFError
from bam_megatron.hf import tokenizer_files as TF
from bam_megatron.hf.adapters import export_candidates
from bam_megatron.hf.adapters.base import HF_LAYER_PREFIX, Adapter
from bam_megatron.hf.safetensors_io import PlannedEntry, SafetensorsWriter
from bam_megatron.hf.spec import LP, ModelSpec, spec_from_checkpoint
from bam_megatron.progress import Progress
from bam_megatron.upcycle.mapping import canonical_key

BAM_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bam_model")
BAM_MODEL_FILES = ("configuration_bam.py", "modeling_bam.py")
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
FP32_SUFFIXES = ("mlp.router.domain_embeddings",)


@dataclass
class ExportOptions:
    architecture: str = "auto"  # or a model type: llama, qwen2, qwen3, cohere, mixtral, bam
    dtype: Optional[torch.dtype] = None  # default: as stored
    shard_bytes: int = 5 * 1024**3
    tokenizer: Optional[str] = None  # a tokenizer file / folder instead of the recorded one
    no_tokenizer: bool = False
    sync: bool = True
    force: bool = False
    open: OpenOptions = DEFAULT_OPTIONS  # how the checkpoint is opened (checksums, trust)


@dataclass
class ExportResult:
    output: str
    architecture: str
    spec: ModelSpec
    not_native: List[str] = field(default_factory=list)  # "Llama: parallel blocks", ...
    tokenizer: Optional[TF.TokenizerFiles] = None
    files: List[str] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


class _Source:
    """The checkpoint's model tensors by canonical key, read a layer (or a whole global) at a time
    (from an opened, verified checkpoint)."""

    def __init__(self, ckpt: Checkpoint):
        self.keys: Dict[str, str] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.dtypes: Dict[str, torch.dtype] = {}
        for key, md in ckpt.metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata) and is_model_entry(key):
                name = canonical_key(key)
                self.keys[name], self.shapes[name], self.dtypes[name] = key, tuple(int(x) for x in md.size), md.properties.dtype
        self.reader = tensor_reader(ckpt)

    def read_global(self, name: str) -> torch.Tensor:
        return self.reader.read_full(self.keys[name])

    def read_layer(self, name: str, layer: int) -> torch.Tensor:
        shape = self.shapes[name]
        return self.reader.read([(self.keys[name], (layer,) + (0,) * (len(shape) - 1), (1,) + shape[1:])])[0][0]


def _getter(fn: Callable[[str], torch.Tensor], used: set, prefix: str, source: _Source) -> Callable[[str], torch.Tensor]:
    """``get(name)`` for an adapter: each tensor read once per unit, recorded as used."""
    cache: Dict[str, torch.Tensor] = {}

    def get(name: str) -> torch.Tensor:
        if name not in cache:
            if prefix + name not in source.shapes:
                raise HFError(f"the checkpoint has no tensor {prefix + name}, which its other tensors imply; it is incomplete "
                              "or from a model this export does not support")
            used.add(prefix + name)
            cache[name] = fn(name)
        return cache[name]
    return get


def _meta(source: _Source, layered: bool):
    def make(name: str) -> torch.Tensor:
        key = LP + name if layered else name
        shape = source.shapes[key][1:] if layered else source.shapes[key]
        return torch.empty(shape, dtype=source.dtypes[key], device="meta")
    return make


def _choose(spec: ModelSpec, source: _Source, forced: str) -> Tuple[Adapter, List[str]]:
    """The first class that holds the model exactly; the reasons the ones before it do not."""
    reasons = []
    for adapter in export_candidates(forced):
        problem = adapter.export_problem(spec)
        if problem is None:
            problem = adapter.value_problem(source.read_global, lambda n: source.read_global(LP + n), spec)
        if problem is None:
            return adapter, reasons
        if forced != "auto":
            raise HFError(f"--architecture {forced}: {adapter.architecture} cannot hold this model exactly ({problem}); use --architecture auto")
        reasons.append(f"{adapter.architecture.replace('ForCausalLM', '')}: {problem}")
    raise RuntimeError("internal error: no export class, not even BAMForCausalLM, holds the model")


def _out_dtype(name: str, t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.dtype:
    """``--dtype`` casts every tensor but the Nexus domain embeddings (float32, as trained)."""
    return t.dtype if dtype is None or name.endswith(FP32_SUFFIXES) else dtype


def _plan(adapter: Adapter, spec: ModelSpec, source: _Source, dtype: Optional[torch.dtype]) -> List[PlannedEntry]:
    """Every output tensor in writing order; checks that every stored model tensor is used."""
    used: set = set()
    entries: List[PlannedEntry] = []
    out = adapter.export_globals(_getter(_meta(source, False), used, "", source), spec)
    entries += [PlannedEntry(n, tuple(t.shape), _out_dtype(n, t, dtype)) for n, t in out.items()]
    for layer in range(spec.num_layers):
        out = adapter.export_layer(_getter(_meta(source, True), used, LP, source), spec)
        entries += [PlannedEntry(f"{HF_LAYER_PREFIX}{layer}.{n}", tuple(t.shape), _out_dtype(n, t, dtype)) for n, t in out.items()]
    unused = sorted(set(source.shapes) - used)
    if unused:
        raise HFError(f"the checkpoint has tensor {unused[0]}, which {adapter.architecture} has no place for; "
                      "this export does not support that model feature")
    return entries


def _tokenizer(opts: ExportOptions, ckpt: Checkpoint) -> Optional[TF.TokenizerFiles]:
    """The files of the checkpoint's tokenizer (as the opener found them) or of ``--tokenizer``."""
    if opts.no_tokenizer:
        return None
    if opts.tokenizer:
        return TF.from_override(opts.tokenizer)
    if ckpt.tokenizer.tokenizer_type in (None, "NullTokenizer"):
        return None
    try:
        tok = ckpt.require_tokenizer()
    except CheckpointError as exc:
        raise HFError(f"{exc} (--tokenizer here), or --no-tokenizer") from None
    files = files_of(tok)
    if files is None:
        raise HFError(f"the tokenizer files of {ckpt.dir} ({', '.join(tok.paths().values())}) cannot be read; "
                      "pass --tokenizer PATH (the tokenizer's file or folder) or --no-tokenizer")
    return files


def _open(ckpt: str, opts: ExportOptions, progress) -> Tuple[Checkpoint, dict]:
    """The checkpoint opened (files verified, read without running code) and its recorded
    arguments, the model's as the opener read them."""
    try:
        opened = open_checkpoint(ckpt, options=opts.open, tensors="verify", progress=progress)
    except CheckpointError as exc:
        raise HFError(str(exc)) from None
    if not opened.recorded_args:
        raise HFError(f"{ckpt} records no model arguments (common state 'args'); pass a checkpoint written by "
                      "pretrain_bam.py, the upcycle tool, hf_import.py or Megatron-LM")
    args = {**opened.recorded_args, **{n: getattr(opened.model, n) for n in opened.known_model_args}}
    return opened, args


def hf_export(ckpt: str, output: str, opts: ExportOptions, progress: Optional[Callable[[str], None]] = None) -> ExportResult:
    """Write checkpoint ``ckpt`` as a Hugging Face model folder at ``output``.

    Raises:
        HFError: bad input, before anything is written.
    """
    start = time.perf_counter()
    check_output(output, [ckpt], opts.force, HFError, lambda i: "the checkpoint")
    opened, args = _open(ckpt, opts, progress)
    source = _Source(opened)
    spec = spec_from_checkpoint(args, source.shapes, ckpt)
    adapter, reasons = _choose(spec, source, opts.architecture)
    entries = _plan(adapter, spec, source, opts.dtype)
    tok = _tokenizer(opts, opened)
    check_free_space(output, sum(e.nbytes for e in entries), HFError)
    result = ExportResult(os.path.abspath(output), adapter.architecture, spec, reasons, tok)
    with OutputTransaction(result.output, error=HFError, sync=opts.sync) as out:
        writer = out.keep(SafetensorsWriter(out.tmp, entries, opts.shard_bytes, opts.sync))
        report = Progress("hf_export", progress, spec.num_layers + 2, lambda: source.reader.bytes_read, lambda: writer.bytes_written)
        _write_weights(adapter, spec, source, writer, opts.dtype, report)
        writer.close()
        _write_metadata(out.tmp, adapter, spec, entries, tok)
        result.files = sorted(n for n in os.listdir(out.tmp) if n != OWNER_FILE)
    report(f"done: {result.output}")
    result.bytes_read, result.bytes_written = source.reader.bytes_read, writer.bytes_written
    result.seconds = time.perf_counter() - start
    return result


def _write_weights(adapter: Adapter, spec: ModelSpec, source: _Source, writer: SafetensorsWriter, dtype, report) -> None:
    used: set = set()

    def cast(name: str, t: torch.Tensor) -> torch.Tensor:
        return t.to(_out_dtype(name, t, dtype))

    for name, t in adapter.export_globals(_getter(source.read_global, used, "", source), spec).items():
        writer.write(name, cast(name, t))
    report("embeddings, final norm, output layer")
    for layer in range(spec.num_layers):
        get = _getter(lambda n, layer=layer: source.read_layer(LP + n, layer), used, LP, source)
        for name, t in adapter.export_layer(get, spec).items():
            writer.write(f"{HF_LAYER_PREFIX}{layer}.{name}", cast(name, t))
        report(f"layer {layer + 1}/{spec.num_layers}")


def _write_metadata(folder: str, adapter: Adapter, spec: ModelSpec, entries: List[PlannedEntry], tok) -> None:
    """``config.json``, ``generation_config.json``, the tokenizer files, the BAM model code."""
    config = adapter.export_config(spec)
    dtype = DTYPE_NAMES.get(entries[0].dtype, "float32")
    special = TF.special_token_ids(tok)
    generation = {"_from_model_config": True, **special}
    if tok is not None:
        TF.write_for_transformers(tok, folder)
        gen_path = os.path.join(folder, "generation_config.json")
        if os.path.isfile(gen_path):
            with open(gen_path) as f:
                generation = json.load(f)
            special = {k: generation[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if generation.get(k) is not None}
    config.update({"dtype": dtype, "torch_dtype": dtype, "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **special})
    _write_json(os.path.join(folder, "config.json"), config)
    _write_json(os.path.join(folder, "generation_config.json"), generation)
    if adapter.architecture == "BAMForCausalLM":
        for name in BAM_MODEL_FILES:
            shutil.copyfile(os.path.join(BAM_MODEL_DIR, name), os.path.join(folder, name))


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
