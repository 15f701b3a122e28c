"""What opening a checkpoint gives every program: one typed record (no torch import).

``Checkpoint`` holds where the checkpoint is (the path given, its root, the resolved iteration
directory), what it is (iteration, the model as ``ModelArgs``, the tokenizer as ``TokenizerArgs``
with absolute paths, where its experts came from), what was verified, and the safely read
contents that the loaders need (``common``: the non-tensor state; ``metadata``: the DCP index).
Programs read these fields instead of ``common.pt``, trackers or recorded arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from bam_megatron.checkpoint.keys import canonical_key, is_model_entry
from bam_megatron.checkpoint.opener.options import OpenOptions
from bam_megatron.data.tokenizer_args import TokenizerArgs
from bam_megatron.errors import CheckpointError
from bam_megatron.model.model_args import ModelArgs


@dataclass(frozen=True)
class Provenance:
    """Where the model came from, as the tools that made it recorded."""

    upcycling: Optional[dict] = None  # tools/upcycle_bam.py (and add_expert.py's additions)
    hf_import: Optional[dict] = None  # tools/hf_import.py

    @property
    def expert_names(self) -> Optional[List[str]]:
        names = (self.upcycling or {}).get("expert_names")
        return list(names) if names else None


@dataclass
class Verification:
    """What was checked of the checkpoint's files before any of their contents was used.

    ``data``: ``"verified"`` (every data file matched its checksum), ``"pending"`` (verified by the
    loader before it reads: ``opener.ensure_verified``), ``"not read"`` (the program reads no tensor
    data), ``"no checksums"`` (none recorded, or ``--no-checkpoint-checksums``: only the
    structure was checked)."""

    enabled: bool  # checksums asked for
    recorded: bool  # the checkpoint has checksums.json
    data: str = "pending"
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @property
    def checked(self) -> bool:
        """Whether the checksums are being compared at all."""
        return self.enabled and self.recorded

    def summary(self) -> str:
        if not self.enabled:
            return "checksums not verified (--no-checkpoint-checksums)"
        if not self.recorded:
            return "no checksums recorded (structure checked only)"
        if self.data == "verified":
            return f"all {self.files} files match their checksums ({self.bytes / 2**30:.2f} GiB in {self.seconds:.1f} s)"
        return "index files match their checksums; tensor data " + ("not read" if self.data == "not read" else "verified when loaded")


@dataclass
class Checkpoint:
    """One opened checkpoint (see the module docstring)."""

    path: str  # as the user gave it
    root: str  # absolute: the folder relative paths are recorded against
    dir: str  # absolute: the iteration directory
    iteration: int
    model: ModelArgs
    tokenizer: TokenizerArgs  # paths absolute where found
    provenance: Provenance
    verification: Verification
    options: OpenOptions
    recorded_args: Dict[str, Any]  # every plain-valued recorded argument, as recorded
    common: Dict[str, Any] = field(repr=False, default_factory=dict)  # the non-tensor state
    metadata: Any = field(repr=False, default=None)  # torch DCP Metadata
    manifest: Optional[Dict[str, Dict[str, int]]] = field(repr=False, default=None)
    notes: List[str] = field(default_factory=list)  # lines for the program's log
    tokenizer_problem: Optional[str] = None  # a recorded tokenizer file that cannot be found
    known_model_args: Tuple[str, ...] = ()  # the ``model`` fields the checkpoint says (recorded or read from tensors)

    # ---------------------------------------------------------------------------- contents

    @property
    def has_model_args(self) -> bool:
        return self.model.missing() is None

    def require_model_args(self) -> ModelArgs:
        """The model, or one line saying the checkpoint does not record it."""
        missing = self.model.missing()
        if missing:
            raise CheckpointError(
                f"checkpoint {self.dir} does not record its model arguments ({missing} is absent); use a "
                "checkpoint written by pretrain_bam.py, the upcycle tool, hf_import.py or Megatron-LM"
            )
        return self.model

    def require_tokenizer(self, **overrides) -> TokenizerArgs:
        """The tokenizer with ``overrides`` (None: not given) applied; one line when a recorded
        file that is still needed cannot be found."""
        tok = self.tokenizer.replace(**overrides)
        given = {k for k, v in overrides.items() if v is not None}
        if self.tokenizer_problem and not given & set(tok.paths()):
            raise CheckpointError(self.tokenizer_problem)
        return tok

    def tensor_entries(self) -> Dict[str, Any]:
        """The DCP index's tensor entries (``TensorStorageMetadata``) by stored key."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}

    def model_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """Global shapes of the model tensors by canonical key (Transformer Engine names mapped)."""
        return {canonical_key(k): tuple(int(x) for x in v.size)
                for k, v in self.tensor_entries().items() if is_model_entry(k)}

    @property
    def has_optimizer_state(self) -> bool:
        return any(k.startswith("optimizer") or ".optimizer." in k for k in self.metadata.state_dict_metadata)

    @property
    def has_rng_state(self) -> bool:
        return any(k.startswith("rng_state") for k in self.metadata.state_dict_metadata)

