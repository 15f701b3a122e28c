"""The Mix phase's inputs: open N dense checkpoints and check that they share one model.

``open_seed`` reads a seed's indexes and recorded arguments (no tensor data); ``check_seeds``
checks that all seeds are dense GPT models of one architecture and describes it
(``Architecture``). Every problem is an ``UpcycleError`` with a one-line message, raised before
anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from bam_megatron.checkpoint.dcp_reader import CheckpointReader, is_model_entry, shape_text
from bam_megatron.checkpoint.opener import DEFAULT_OPTIONS, Checkpoint, OpenOptions, open_checkpoint, tensor_reader
from bam_megatron.data.tokenizer_files import files_of
from bam_megatron.errors import CheckpointError, UpcycleError
from bam_megatron.upcycle import mapping as U

# Megatron-LM options that change what the seed's tensors mean and that the BAM model lacks.
# (--qk-layernorm, --add-qkv-bias and --rotary-interleaved are supported: the first two with
# merged attention only, see ``attention_expert_problem``.)
UNSUPPORTED_SEED_FLAGS = ("squared_relu", "apply_layernorm_1p")
# Recorded arguments (besides the model's shape) that must agree between seeds.
SAME_ARGS = (
    "num_attention_heads",
    "normalization",
    "norm_epsilon",
    "position_embedding_type",
    "rotary_base",
    "rotary_percent",
    "rotary_interleaved",
    "tokenizer_type",
    "vocab_size",
)


@dataclass
class SeedTensor:
    source_key: str  # the key in the seed's checkpoint (e.g. a Transformer Engine name)
    shape: Tuple[int, ...]
    dtype: torch.dtype


@dataclass
class Seed:
    """One input checkpoint: where it is, what it records, its model tensors by canonical key."""

    index: int
    path: str
    checkpoint: Checkpoint = field(repr=False)  # opened: verified, read without running code
    args: dict  # recorded arguments, the model's as the opener read them (Megatron-LM's made ours)
    tensors: Dict[str, SeedTensor]
    label: Optional[str] = None  # how messages name it (default "seed <index> (<path>)")

    @property
    def name(self) -> str:
        return self.label or f"seed {self.index} ({self.path})"

    @property
    def ckpt_dir(self) -> str:
        return self.checkpoint.dir

    @property
    def iteration(self) -> Optional[int]:
        return self.checkpoint.iteration if "iteration" in self.checkpoint.common else None

    def reader(self) -> CheckpointReader:
        return tensor_reader(self.checkpoint)


def open_seed(path: str, index: int, label: Optional[str] = None, options: OpenOptions = DEFAULT_OPTIONS,
              progress=None) -> Seed:
    """Open (and check) one input checkpoint: its files verified against their checksums before
    anything is read (``checkpoint/opener``), its indexes read. ``label`` names it in messages
    (default ``seed <index> (<path>)``)."""
    what = label or f"seed {index} ({path})"
    try:
        ckpt = open_checkpoint(path, what=what, options=options, tensors="verify", progress=progress)
    except CheckpointError as exc:
        raise UpcycleError(f"{what}: {exc}" if not str(exc).startswith(what) else str(exc)) from None
    args = {**ckpt.recorded_args, **{n: getattr(ckpt.model, n) for n in ckpt.known_model_args}}
    if not ckpt.recorded_args:
        raise UpcycleError(
            f"{what} records no model arguments (common state 'args'); pass a checkpoint written "
            "by pretrain_bam.py or Megatron-LM"
        )
    tensors: Dict[str, SeedTensor] = {}
    for key, md in ckpt.metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata) or not is_model_entry(key):
            continue
        canonical = U.canonical_key(key)
        if canonical in tensors:
            raise UpcycleError(f"{what} holds both {tensors[canonical].source_key} and {key}, which are the same tensor")
        tensors[canonical] = SeedTensor(key, tuple(int(x) for x in md.size), md.properties.dtype)
    if not tensors:
        raise UpcycleError(f"{what} holds no model tensors")
    return Seed(index, path, ckpt, args, tensors, label)


def check_same_tokenizer(seeds: Sequence[Seed]) -> None:
    """Seeds whose tokenizer files are at hand carry the same files (a mix of models trained
    with different tokenizers is meaningless)."""
    import filecmp

    first = files_of(seeds[0].checkpoint.tokenizer)
    if first is None:
        return
    for seed in seeds[1:]:
        other = files_of(seed.checkpoint.tokenizer)
        if other is None:
            continue
        for name in first.main:
            if name in other.files and not filecmp.cmp(first.files[name], other.files[name], shallow=False):
                raise UpcycleError(
                    f"{seed.name} was trained with another tokenizer than seed 0 ({other.files[name]} differs from "
                    f"{first.files[name]}); mix checkpoints that share one tokenizer"
                )


@dataclass
class Architecture:
    """The seeds' common model, as read from their tensors and recorded arguments."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    attn: U.AttentionShape
    padded_vocab_size: int
    sequential: bool
    gated: bool
    bias: bool  # biases on every linear layer (no --disable-bias-linear)
    qkv_bias: bool  # biases on the query/key/value projection only (--add-qkv-bias)
    qk_layernorm: bool
    dtype: torch.dtype
    shapes: Dict[str, Tuple[int, ...]]  # canonical seed key -> global shape
    args: dict  # seed 0's recorded arguments

    @property
    def layer_keys(self) -> List[str]:
        return [k for k in self.shapes if k.startswith(U.LAYER_PREFIX)]

    @property
    def global_keys(self) -> List[str]:
        return [k for k in self.shapes if not k.startswith(U.LAYER_PREFIX)]


def _check_dense(seed: Seed) -> None:
    for key in seed.tensors:
        if U.is_dense_key(key):
            continue
        if "router" in key or "experts." in key or "linear_q." in key or "linear_kv." in key:
            raise UpcycleError(
                f"{seed.name} is not a dense model (it has {key}); the Mix phase takes dense "
                "checkpoints: the seed and the domain experts branched from it"
            )
        raise UpcycleError(f"{seed.name} has tensor {key}, which the BAM model does not support")
    for flag in UNSUPPORTED_SEED_FLAGS:
        if seed.args.get(flag):
            raise UpcycleError(f"{seed.name} was trained with --{flag.replace('_', '-')}, which the BAM model does not support")


def attention_expert_problem(arch: Architecture) -> Optional[str]:
    """Why the seeds' attention cannot become attention experts (None when it can): attention
    experts have no biases and no query/key norms (as in the paper)."""
    if arch.bias or arch.qkv_bias:
        which = "on every linear layer" if arch.bias else "on the query/key/value projection, --add-qkv-bias"
        return (
            f"the seeds have linear-layer biases ({which}) but attention experts have none (as in the "
            "paper); use --attention-experts merged or seeds trained with --disable-bias-linear"
        )
    if arch.qk_layernorm:
        return (
            "the seeds normalise queries and keys (--qk-layernorm) but attention experts have no "
            "query/key norms; use --attention-experts merged (BTX)"
        )
    return None


def check_seeds(seeds: Sequence[Seed]) -> Architecture:
    """Check that all seeds are dense and share one architecture; describe it.

    Raises:
        UpcycleError: naming the first tensor (or argument) that differs, with both values.
    """
    first = seeds[0]
    for seed in seeds:
        _check_dense(seed)
    for seed in seeds[1:]:
        _check_same_as_first(seed, first)
    return _describe(first)


def _check_same_as_first(seed: Seed, first: Seed) -> None:
    """The same tensors (shapes, dtypes) and the same recorded settings as seed 0."""
    where = f"{seed.name} does not match seed 0 ({first.path})"
    for key, t0 in first.tensors.items():
        t = seed.tensors.get(key)
        if t is None:
            raise UpcycleError(f"{where}: it has no tensor {key}")
        if t.shape != t0.shape:
            raise UpcycleError(f"{where}: tensor {key} has shape {shape_text(t.shape)} there and {shape_text(t0.shape)} in seed 0")
        if t.dtype != t0.dtype:
            raise UpcycleError(f"{where}: tensor {key} is {t.dtype} there and {t0.dtype} in seed 0")
    for key in seed.tensors:
        if key not in first.tensors:
            raise UpcycleError(f"{where}: it has tensor {key}, which seed 0 lacks")
    for name in SAME_ARGS:
        if name in seed.args and name in first.args and seed.args[name] != first.args[name]:
            raise UpcycleError(
                f"{where}: --{name.replace('_', '-')} is {seed.args[name]!r} there and "
                f"{first.args[name]!r} in seed 0"
            )


def _describe(first: Seed) -> Architecture:
    """The architecture seed 0's tensors and recorded arguments describe (checked)."""
    shapes = {k: t.shape for k, t in first.tensors.items()}
    what = first.name
    lp = U.LAYER_PREFIX
    for required in (lp + "input_layernorm.weight", lp + "self_attention.linear_qkv.weight",
                     lp + "self_attention.linear_proj.weight", lp + "mlp.linear_fc1.weight",
                     lp + "mlp.linear_fc2.weight", "embedding.word_embeddings.weight"):
        if required not in shapes:
            raise UpcycleError(f"{what} has no tensor {required}; it is not a GPT model checkpoint")
    num_layers, hidden = shapes[lp + "input_layernorm.weight"]
    for key, s in shapes.items():
        if key.startswith(lp) and s[0] != num_layers:
            raise UpcycleError(f"{what}: {key} has {s[0]} layers, {lp}input_layernorm.weight has {num_layers}")
    heads = first.args.get("num_attention_heads")
    if not isinstance(heads, int) or heads <= 0:
        raise UpcycleError(f"{what} records no --num-attention-heads")
    proj_cols = shapes[lp + "self_attention.linear_proj.weight"][-1]
    if proj_cols % heads:
        raise UpcycleError(f"{what}: linear_proj has {proj_cols} columns, not a multiple of {heads} heads")
    head_dim = proj_cols // heads
    qkv_rows = shapes[lp + "self_attention.linear_qkv.weight"][1]
    groups2 = qkv_rows // head_dim - heads
    groups = groups2 // 2
    if qkv_rows % head_dim or groups2 % 2 or groups <= 0 or heads % groups:
        raise UpcycleError(
            f"{what}: linear_qkv has {qkv_rows} rows, which fits no query-group count for {heads} "
            f"heads of dimension {head_dim}"
        )
    ffn = shapes[lp + "mlp.linear_fc2.weight"][-1]
    fc1_rows = shapes[lp + "mlp.linear_fc1.weight"][1]
    if fc1_rows not in (ffn, 2 * ffn):
        raise UpcycleError(f"{what}: linear_fc1 has {fc1_rows} rows for an FFN of {ffn}")
    linear_biases = [lp + n for n in U.DENSE_LAYER_NAMES if n.endswith(".bias") and "layernorm" not in n]
    present = [k in shapes for k in linear_biases]
    qkv_bias_only = [k == lp + "self_attention.linear_qkv.bias" for k in linear_biases]
    if any(present) and not all(present) and present != qkv_bias_only:
        missing = linear_biases[present.index(False)]
        raise UpcycleError(
            f"{what} has biases on some linear layers but not {missing}; the BAM model needs all, "
            "the query/key/value projection's only (--add-qkv-bias) or none (--disable-bias-linear)"
        )
    pos = first.args.get("position_embedding_type", "rope")
    if "embedding.position_embeddings.weight" in shapes:
        pos = "learned_absolute"
    if pos not in ("rope", "learned_absolute"):
        raise UpcycleError(f"{what} uses --position-embedding-type {pos}; the BAM model supports rope and learned_absolute")
    return Architecture(
        num_layers=int(num_layers),
        hidden_size=int(hidden),
        ffn_hidden_size=int(ffn),
        attn=U.AttentionShape(heads, groups, head_dim),
        padded_vocab_size=int(shapes["embedding.word_embeddings.weight"][0]),
        sequential=lp + "pre_mlp_layernorm.weight" in shapes,
        gated=fc1_rows == 2 * ffn,
        bias=all(present),
        qkv_bias=present == qkv_bias_only,
        qk_layernorm=lp + "self_attention.q_layernorm.weight" in shapes,
        dtype=first.tensors[lp + "input_layernorm.weight"].dtype,
        shapes=dict(shapes),
        args=dict(first.args),
    )
