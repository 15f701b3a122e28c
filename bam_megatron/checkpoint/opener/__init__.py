"""Opening a checkpoint: one function for every program, verified, code-free, self-contained.

    ckpt = open_checkpoint("ckpt/bam", options=open_options(args))   # a typed Checkpoint
    ckpt.model, ckpt.tokenizer, ckpt.iteration, ckpt.provenance, ckpt.verification
    reader = tensor_reader(ckpt)                # regions of global tensors (the tools)
    with dcp_reads(ckpt): dist_checkpointing.load(...)   # megatron-core loads (training, models)

- ``locate.py``: which ``iter_*`` directory a path names (the tracker; leftovers of interrupted
  saves) — the only reader of trackers;
- ``unpickle.py``: ``.metadata``, ``common.pt`` and DCP byte items read with allow-listed
  unpicklers (``--trust-checkpoint-code`` for one's own older files) — the only ``torch.load``;
- ``verify.py``: checksums before use (index files on opening, tensor data before loading);
- ``tokenizer.py``: recorded tokenizer paths resolved against the checkpoint's folder; tokenizer
  files carried into every checkpoint a program writes;
- ``opening.py``: ``open_checkpoint``, the order of those steps; ``record.py``: ``Checkpoint``;
- ``options.py``: the programs' two flags.

Loading through megatron-core (``dist_checkpointing.load``) goes through the same checks:
``dcp_reads`` verifies the data first and routes torch DCP's and megatron-core's unpickling
through ``unpickle.py`` for the duration of the load (``patches/dcp_safe_reads.py``).
"""

from __future__ import annotations

import contextlib

from bam_megatron.checkpoint.opener.locate import checkpoint_root, has_checkpoint, locate, read_tracker, resolve_checkpoint_dir
from bam_megatron.checkpoint.opener.opening import DEFAULT_OPTIONS, open_checkpoint, plain_args
from bam_megatron.checkpoint.opener.options import OpenOptions, add_open_args, open_options
from bam_megatron.checkpoint.opener.record import Checkpoint, Provenance, Verification
from bam_megatron.checkpoint.opener.tokenizer import carry_tokenizer, relative_tokenizer
from bam_megatron.checkpoint.opener.verify import ensure_verified
from bam_megatron.errors import user_error_in


def tensor_reader(ckpt: Checkpoint, progress=None):
    """A ``CheckpointReader`` of the checkpoint's global tensors, its data verified first."""
    from bam_megatron.checkpoint.dcp_reader import CheckpointReader

    ensure_verified(ckpt, progress)
    return CheckpointReader(ckpt.dir, ckpt.metadata)


def unverified_inputs(inputs) -> list:
    """Lines naming the opened inputs whose data was not verified against checksums (none
    recorded, or ``--no-checkpoint-checksums``); a tool that writes a checkpoint from them
    writes no checksums over them (it cannot vouch for bytes it did not check)."""
    return [f"{c.path}: {c.verification.summary()}" for c in inputs if c.verification.data != "verified"]


@contextlib.contextmanager
def dcp_reads(ckpt: Checkpoint):
    """For a megatron-core / torch DCP load of ``ckpt``: its data verified first (collectively in
    a process group), every pickle read through the allow-listed unpicklers."""
    from bam_megatron.checkpoint.opener import unpickle
    from bam_megatron.patches.dcp_safe_reads import restricted_reads

    ensure_verified(ckpt)
    trust = ckpt.options.trust_code
    try:
        with restricted_reads(lambda f, path: unpickle.load_metadata(f, path, trust),
                              lambda source, path: unpickle.load_torch(source, path, trust)):
            yield
    except BaseException as exc:  # torch DCP wraps a refusal of ours in a (Base)CheckpointException
        refusal = user_error_in(exc)
        if refusal is not None and refusal is not exc:
            raise refusal from None
        raise


__all__ = [
    "DEFAULT_OPTIONS",
    "Checkpoint",
    "OpenOptions",
    "Provenance",
    "Verification",
    "add_open_args",
    "carry_tokenizer",
    "checkpoint_root",
    "dcp_reads",
    "ensure_verified",
    "has_checkpoint",
    "locate",
    "open_checkpoint",
    "open_options",
    "plain_args",
    "read_tracker",
    "relative_tokenizer",
    "resolve_checkpoint_dir",
    "tensor_reader",
    "unverified_inputs",
]
