"""``tools/hf_import.py``: a local Hugging Face model folder -> a checkpoint of ours.

Dense Llama / Mistral / Qwen2 / Qwen3 / Cohere models become dense checkpoints; a
``BAMForCausalLM`` folder (an export of ours, e.g. fine-tuned with PEFT LoRA and merged) becomes
the checkpoint of its model again: BTX, BAM, Nexus, shared expert — whatever it holds.

    <output>/latest_checkpointed_iteration.txt        "0"
    <output>/iter_0000000/                            torch_dist weights + common state (args)
    <output>/tokenizer/                               the folder's tokenizer files

The recorded arguments are this project's model arguments (``ModelSpec.to_args``) plus the
tokenizer flags (paths relative to ``<output>``), so ``pretrain_bam.py --pretrained-checkpoint
<output> --use-checkpoint-args --load RUN --save RUN`` trains the model (into its own folder: the
import stays as it is) and ``tools/upcycle_bam.py`` mixes it.

Order of work (the upcycle tool's): every check first — output path, ``config.json`` (the
adapter refuses, naming the field, whatever is not exact), the safetensors index, then a *plan*
made by running the adapter on ``meta`` tensors (every tensor the mapping needs exists with a
shape that fits, nothing unknown is left over, the outputs have the shapes of a checkpoint of
that model), the tokenizer, the free space. Then the weights stream: the globals, then one
layer at a time (read the layer's Hugging Face tensors, map, hand to ``PartWriter``), written
under ``<output>.tmp-*`` and renamed into place when complete.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set

import torch

from bam_megatron.checkpoint.dcp_writer import PartWriter, PlannedTensor
from bam_megatron.checkpoint.layout import FORMAT_VERSION, iteration_dir
from bam_megatron.checkpoint.tool_output import OutputTransaction, check_free_space, check_output
from bam_megatron.errors import HFError, one_line
from bam_megatron.hf import tokenizer_files as TF
from bam_megatron.hf.adapters import HFConfig, importer_for
from bam_megatron.hf.adapters.base import HF_LAYER_PREFIX, Adapter
from bam_megatron.hf.safetensors_io import SafetensorsFolder
from bam_megatron.hf.spec import LP, NEXUS_DOMAIN, ModelSpec, checkpoint_shapes
from bam_megatron.progress import Progress

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older transformers versions saved


@dataclass
class ImportOptions:
    seq_length: Optional[int] = None  # default: min(max_position_embeddings, 4096)
    vocab_multiple: int = 128  # pad the vocabulary to a multiple of this
    dtype: Optional[torch.dtype] = None  # default: as stored
    part_bytes: int = 128 * 1024**2
    sync: bool = True
    force: bool = False


@dataclass
class ImportResult:
    output: str
    architecture: str
    spec: ModelSpec
    args: dict
    tokenizer: Optional[TF.TokenizerFiles]
    notes: List[str] = field(default_factory=list)
    bytes_read: int = 0
    bytes_written: int = 0
    seconds: float = 0.0


@dataclass
class _Plan:
    adapter: Adapter
    cfg: HFConfig
    spec: ModelSpec
    weights: SafetensorsFolder
    outputs: Dict[str, PlannedTensor]
    dtype: torch.dtype


def _meta_getter(weights: SafetensorsFolder, prefix: str, used: Set[str], cfg: HFConfig) -> Callable[[str], torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        full = prefix + name
        info = weights.tensors.get(full)
        if info is None:
            raise HFError(f"{weights.folder} has no tensor {full}, which {os.path.basename(cfg.path)} implies; the weights do not match the config")
        used.add(full)
        return torch.empty(info.shape, dtype=info.dtype, device="meta")
    return get


def _run(fn, what: str, cfg: HFConfig):
    try:
        return fn()
    except RuntimeError as exc:  # a reshape that does not fit: the tensors contradict config.json
        raise HFError(f"{cfg.path}: the tensors of {what} do not fit the config ({one_line(exc)})") from None


def plan_import(hf_dir: str, opts: ImportOptions) -> _Plan:
    """All checks on the input, no tensor data read. Raises ``HFError`` (one line)."""
    cfg = HFConfig.read(hf_dir)
    adapter = importer_for(cfg)
    spec = adapter.spec_from_config(cfg, opts.seq_length, opts.vocab_multiple)
    weights = SafetensorsFolder(hf_dir)
    used: Set[str] = set()
    produced = dict(_run(lambda: adapter.import_globals(_meta_getter(weights, "", used, cfg), spec, cfg), "the embeddings", cfg))
    for layer in range(spec.num_layers):
        get = _meta_getter(weights, f"{HF_LAYER_PREFIX}{layer}.", used, cfg)
        out = _run(lambda: adapter.import_layer(get, spec), f"layer {layer}", cfg)
        produced.update({f"{LP}{name}@{layer}": t for name, t in out.items()})
    if adapter.tied(cfg):
        used.add("lm_head.weight")
    left = sorted(n for n in weights.tensors if n not in used and not n.endswith(IGNORED_SUFFIXES))
    if left:
        raise HFError(f"{hf_dir} has tensor {left[0]} ({len(left)} unused), which {os.path.basename(cfg.path)} does not describe; "
                      "the model has parts this project does not represent")
    dtype = opts.dtype or weights.tensors["model.embed_tokens.weight"].dtype
    return _Plan(adapter, cfg, spec, weights, _check_outputs(produced, spec, dtype, cfg), dtype)


def _check_outputs(produced: Dict[str, torch.Tensor], spec: ModelSpec, dtype, cfg: HFConfig) -> Dict[str, PlannedTensor]:
    """The mapped tensors have the keys and shapes of a checkpoint of ``spec`` (the Nexus domain
    embeddings are stored in float32 whatever the model's dtype, as training keeps them)."""
    expected = checkpoint_shapes(spec)
    outputs: Dict[str, PlannedTensor] = {}
    for key, t in produced.items():
        base, _, layer = key.partition("@")
        shape = tuple(t.shape) if not layer else (spec.num_layers,) + tuple(t.shape)
        if expected.get(base) != shape:
            raise HFError(f"{cfg.path}: the weights give {base} the shape {list(shape)}, the config implies "
                          f"{list(expected.get(base) or [])}; the weights do not match the config")
        outputs[base] = PlannedTensor(base, shape, _stored_dtype(base, dtype))
    missing = sorted(set(expected) - set(outputs))
    if missing:
        raise RuntimeError(f"internal error: the import produced no {missing[0]}")
    return outputs


def _stored_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if key == NEXUS_DOMAIN else dtype


def _tokenizer(hf_dir: str, spec: ModelSpec, opts: ImportOptions, notes: List[str]):
    """The folder's tokenizer and the recorded tokenizer / padding arguments."""
    tok = TF.find_in_folder(hf_dir)
    args = {"make_vocab_size_divisible_by": opts.vocab_multiple}
    if tok is None:
        notes.append(f"{hf_dir} has no tokenizer files: pass the tokenizer flags when training")
        return None, args
    args.update(tok.args())
    count = TF.json_vocab_size(tok.files["tokenizer.json"]) if "tokenizer.json" in tok.files else None
    if count is None:
        return tok, args
    if count > spec.vocab_size:
        raise HFError(f"{tok.files['tokenizer.json']} has {count} tokens but the model only {spec.vocab_size} embedding rows")
    args["tokenizer_vocab_size"] = count
    if -(-count // opts.vocab_multiple) * opts.vocab_multiple != spec.vocab_size:
        multiple = next(m for m in range(1, spec.vocab_size + 1) if spec.vocab_size % m == 0 and m > spec.vocab_size - count)
        args["make_vocab_size_divisible_by"] = multiple
        notes.append(f"the tokenizer has {count} tokens for {spec.vocab_size} embedding rows: train with "
                     f"--make-vocab-size-divisible-by {multiple} (recorded) so that the vocabulary pads to the model's")
    return tok, args


def _training_args(cfg: HFConfig) -> dict:
    """Training settings of the Hugging Face model, recorded for ``--use-checkpoint-args`` (which
    restores them unless the training command line gives them): its init std and no dropout."""
    return {"init_method_std": float(cfg.get("initializer_range", 0.02)), "hidden_dropout": 0.0,
            "attention_dropout": float(cfg.get("attention_dropout", 0.0))}


def _write_weights(plan: _Plan, writer: PartWriter, report: Callable[[str], None]) -> None:
    """Globals, then one layer at a time: read, map, cast, queue (``writer`` writes behind)."""
    weights, spec, dtype = plan.weights, plan.spec, plan.dtype
    for key, t in plan.adapter.import_globals(lambda n: weights.read(n), spec, plan.cfg).items():
        writer.add(key, (0,) * t.dim(), t.to(dtype))
        writer.flush()
    report("embeddings, final norm, output layer")
    for layer in range(spec.num_layers):
        prefix = f"{HF_LAYER_PREFIX}{layer}."
        out = plan.adapter.import_layer(lambda n: weights.read(prefix + n), spec)
        for name, t in out.items():
            writer.add(LP + name, (layer,) + (0,) * t.dim(), t.to(_stored_dtype(LP + name, dtype)).unsqueeze(0))
        del out
        report(f"layer {layer + 1}/{spec.num_layers}")


def hf_import(hf_dir: str, output: str, opts: ImportOptions, progress: Optional[Callable[[str], None]] = None) -> ImportResult:
    """Convert the Hugging Face folder ``hf_dir`` into a checkpoint at ``output``.

    Raises:
        HFError: bad input, before anything is written.
    """
    start = time.perf_counter()
    if not os.path.isdir(hf_dir):
        raise HFError(f"{hf_dir} is not a folder; pass a local Hugging Face model folder (config.json + *.safetensors)")
    check_output(output, [hf_dir], opts.force, HFError, lambda i: "the input folder")
    plan = plan_import(hf_dir, opts)
    notes: List[str] = []
    tok, tok_args = _tokenizer(hf_dir, plan.spec, opts, notes)
    args = {**plan.spec.to_args(), **tok_args, **_training_args(plan.cfg)}
    check_free_space(output, sum(t.nbytes for t in plan.outputs.values()), HFError)
    result = ImportResult(os.path.abspath(output), plan.adapter.architecture, plan.spec, args, tok, notes)
    try:
        with OutputTransaction(result.output, error=HFError, sync=opts.sync) as out:
            writer = out.keep(PartWriter(os.path.join(out.tmp, "parts"), opts.part_bytes, opts.sync))
            report = Progress("hf_import", progress, plan.spec.num_layers + 3, lambda: plan.weights.bytes_read,
                              lambda: writer.bytes_written)
            _write_weights(plan, writer, report)
            if tok is not None:
                TF.copy_files(tok, os.path.join(out.tmp, TF.TOKENIZER_DIR))
            out.finish_checkpoint(writer, plan.outputs, _common_state(args, hf_dir, plan))
            report(f"merged {writer.num_parts} parts")
        report(f"done: {iteration_dir(result.output, 0)}")
    finally:
        plan.weights.close()
    result.bytes_read, result.bytes_written = plan.weights.bytes_read, writer.bytes_written
    result.seconds = time.perf_counter() - start
    return result


def _common_state(args: dict, hf_dir: str, plan: _Plan) -> dict:
    cfg = plan.cfg
    return {
        "args": args,
        "iteration": 0,
        "consumed_train_samples": 0,
        "skipped_iterations": 0,
        "format_version": FORMAT_VERSION,
        "hf_import": {
            "source": os.path.abspath(hf_dir),
            "architecture": plan.adapter.architecture,
            "hf_vocab_size": int(cfg.get("vocab_size")),
            **{k: cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "logit_scale") if cfg.get(k) is not None},
        },
    }
