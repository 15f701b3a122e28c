"""``open_checkpoint``: the one way every program opens a checkpoint.

Order of work, each step before anything later reads a byte it has not checked:

1. find the iteration directory the path names (``locate.py``: tracker, ``iter_*``, leftovers of
   an interrupted save);
2. verify the index files against ``checksums.json`` (``verify.py``), unless the checkpoint
   records none or ``--no-checkpoint-checksums``;
3. read ``.metadata`` and ``common.pt`` with the allow-listed unpicklers (``unpickle.py``) and
   check that every data file the index points into exists and is long enough;
4. read the recorded arguments once: the model as ``ModelArgs`` (this project's dict or
   Megatron-LM's Namespace; what the arguments leave unsaid read from the tensors), the
   tokenizer with absolute paths (``tokenizer.py``), the provenance;
5. verify the tensor data now (``tensors="verify"``, one-process tools), when a loader first
   reads it (``"defer"``: spread over the ranks of a job), or not at all (``"none"``: programs
   that read no tensor data, e.g. ``inspect_checkpoint.py``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, Dict, Optional

from bam_megatron.checkpoint import integrity
from bam_megatron.checkpoint.keys import LAYER_PREFIX
from bam_megatron.checkpoint.layout import COMMON_FILE, DCP_METADATA_FILE
from bam_megatron.checkpoint.opener import unpickle
from bam_megatron.checkpoint.opener.locate import checkpoint_root, locate
from bam_megatron.checkpoint.opener.options import OpenOptions
from bam_megatron.checkpoint.opener.record import Checkpoint, Provenance, Verification
from bam_megatron.checkpoint.opener.tokenizer import resolve_tokenizer
from bam_megatron.checkpoint.opener.verify import verify_data, verify_index
from bam_megatron.errors import CheckpointError
from bam_megatron.model.model_args import ARCHITECTURE, ModelArgs

TENSOR_MODES = ("verify", "defer", "none")
DEFAULT_OPTIONS = OpenOptions()


def plain_args(args: Any) -> Dict[str, Any]:
    """Recorded arguments as a dict of plain values (Megatron-LM records a ``Namespace``)."""
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if not isinstance(args, dict):
        return {}
    return {
        k: v
        for k, v in args.items()
        if isinstance(v, (bool, int, float, str, type(None)))
        or (isinstance(v, (list, tuple)) and all(isinstance(x, (bool, int, float, str)) for x in v))
    }


def _read_common(ckpt_dir: str, trust: bool) -> Dict[str, Any]:
    path = os.path.join(ckpt_dir, COMMON_FILE)
    if not os.path.isfile(path):
        return {}
    state = unpickle.load_torch(path, path, trust)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint's common state")
    return state


def _is_megatron_lm(common: Dict[str, Any]) -> bool:
    """Whether the common state was written by Megatron-LM (this project's writers all record
    ``format_version``; Megatron-LM records ``checkpoint_version`` and its arguments as a
    Namespace)."""
    return "format_version" not in common and ("checkpoint_version" in common or isinstance(common.get("args"), argparse.Namespace))


def _inferred(metadata) -> Dict[str, Any]:
    """What the tensors say where the recorded arguments may be silent."""
    keys = set(metadata.state_dict_metadata)
    out: Dict[str, Any] = {
        "bam_sequential_block": any(k in keys for k in (LAYER_PREFIX + "pre_mlp_layernorm.weight",
                                                        LAYER_PREFIX + "mlp.linear_fc1.layer_norm_weight")),
        "untie_embeddings_and_output_weights": "output_layer.weight" in keys,
    }
    embedding = metadata.state_dict_metadata.get("embedding.word_embeddings.weight")
    if embedding is not None and hasattr(embedding, "size"):
        out["padded_vocab_size"] = int(embedding.size[0])
    return out


def open_checkpoint(path: str, *, what: Optional[str] = None, options: OpenOptions = DEFAULT_OPTIONS,
                    tensors: str = "verify", progress: Optional[Callable[[str], None]] = None) -> Checkpoint:
    """Open the checkpoint ``path`` names (a root with its tracker, or one ``iter_*`` directory).

    Args:
        what: how messages name the input (default: the path), e.g. ``"--load ckpt"``.
        options: ``--no-checkpoint-checksums`` / ``--trust-checkpoint-code``.
        tensors: when the tensor data is verified: ``"verify"`` now, ``"defer"`` by the first
            loader (``ensure_verified``), ``"none"``: never read.
        progress: per-file lines while verifying now.

    Raises:
        CheckpointError: one line naming the input and what is wrong (missing, damaged, foreign,
            or holding pickles outside the allow-list).
    """
    if tensors not in TENSOR_MODES:
        raise ValueError(f"tensors must be one of {TENSOR_MODES}, got {tensors!r}")
    ckpt_dir, note = locate(path, what)
    ckpt_dir = os.path.abspath(ckpt_dir)
    manifest = integrity.read_manifest(ckpt_dir) if options.checksums else None
    if manifest is not None:
        verify_index(ckpt_dir, manifest)
    trust = options.trust_code
    if not os.path.isfile(os.path.join(ckpt_dir, DCP_METADATA_FILE)):
        raise CheckpointError(f"{ckpt_dir} has no {DCP_METADATA_FILE}: the checkpoint is incomplete")
    metadata = unpickle.read_metadata_file(ckpt_dir, trust)
    integrity.check_structure(ckpt_dir, metadata)
    common = _read_common(ckpt_dir, trust)
    recorded = plain_args(common.get("args"))
    root = checkpoint_root(ckpt_dir)
    tokenizer, notes, tok_problem = resolve_tokenizer(recorded, root, ckpt_dir)
    verification = Verification(enabled=options.checksums, recorded=manifest is not None,
                                data="pending" if manifest is not None else "no checksums")
    if tensors == "none" and manifest is not None:
        verification.data = "not read"
    iteration = common.get("iteration", 0)
    inferred = _inferred(metadata)
    known = tuple(n for n in ARCHITECTURE if recorded.get(n) is not None or n in inferred)
    ckpt = Checkpoint(
        path=path, root=root, dir=ckpt_dir, iteration=iteration if isinstance(iteration, int) else 0,
        model=ModelArgs.from_recorded(recorded, inferred, megatron_lm=_is_megatron_lm(common)), tokenizer=tokenizer,
        provenance=Provenance(common.get("upcycling") if isinstance(common.get("upcycling"), dict) else None,
                              common.get("hf_import") if isinstance(common.get("hf_import"), dict) else None),
        verification=verification, options=options, recorded_args=recorded, common=common, metadata=metadata,
        manifest=manifest, notes=([note] if note else []) + notes, tokenizer_problem=tok_problem, known_model_args=known,
    )
    if tensors == "verify":
        verify_data(ckpt, progress)
    return ckpt
