"""Reading a checkpoint's pickles without running code from them.

A torch_dist checkpoint holds three kinds of pickle: ``.metadata`` (torch DCP's index, plain
``pickle``), ``common.pt`` (``torch.save``: iteration, recorded arguments, scheduler, ...) and the
byte items inside ``*.distcp`` (``torch.save``'d objects such as the RNG state). A pickle can name
any importable callable, so unpickling a file from someone else can run their code. Every read
here admits only an explicit allow-list of what these files actually contain:

- ``.metadata``: torch DCP's metadata and planner dataclasses and enums, ``torch.Size``, torch
  dtypes / layouts / memory formats, ``OrderedDict``, ``PosixPath`` (``load_metadata``);
- ``torch.save`` files: torch's own weights-only set (tensors, containers, primitive types) plus
  what this project and Megatron-LM record: ``argparse.Namespace`` (Megatron-LM's arguments),
  numpy arrays and dtypes (RNG states), ``SimpleNamespace``, ``PosixPath``, ``BytesIO``,
  ``signal.Signals`` and megatron-core's enums and ``OptimizerConfig`` (``load_torch``).
  megatron-core classes are imported only when a file names them.

Anything else is refused in one line naming the class and the file; ``--trust-checkpoint-code``
(``trust=True``) reads a user's own files with the full unpicklers instead.
"""

from __future__ import annotations

import enum
import importlib
import io
import os
import pickle
from typing import IO, List, Optional, Union

from bam_megatron.errors import CheckpointError, one_line

TRUST_FLAG = "--trust-checkpoint-code"

_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
_METADATA_NAMES = {("torch", "Size"), ("collections", "OrderedDict"), ("torch.serialization", "_get_layout"),
                   ("builtins", "set"), ("builtins", "frozenset"), ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath")}
# torch.save'd objects beyond torch's weights-only set (module.name as pickle names them).
_TORCH_NAMES = {
    "argparse.Namespace", "types.SimpleNamespace", "pathlib.PosixPath", "pathlib._local.PosixPath",
    "io.BytesIO", "_io.BytesIO", "signal.Signals", "collections.OrderedDict",
    "numpy.dtype", "numpy.ndarray", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "megatron.core.optimizer.optimizer_config.OptimizerConfig", "megatron.core.optimizer.OptimizerConfig",
}


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file names a class or function outside the allow-list."""


def refusal(name: str, path: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} would load {name}, which a checkpoint does not hold (unpickling it could run code from the "
        f"file); refusing to read it. If the checkpoint is your own, pass {TRUST_FLAG} to read it with the "
        "full unpickler"
    )


def _import(module: str, name: str):
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def _admitted_metadata_class(module: str, name: str):
    """The class / function ``.metadata`` may name, or None."""
    import torch

    if (module, name) in _METADATA_NAMES:
        return _import(module, name)
    if module == "torch":
        obj = getattr(torch, name, None)
        return obj if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)) else None
    if module in _DCP_MODULES:
        import dataclasses

        obj = _import(module, name)
        if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f, path: str):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        obj = _admitted_metadata_class(module, name)
        if obj is None:
            raise refusal(f"{module}.{name}", self.path)
        return obj


def load_metadata(f: IO[bytes], path: str, trust: bool = False):
    """torch DCP's ``Metadata`` from the open ``.metadata`` file ``f`` (``path``: for messages).

    Raises:
        UnsafeCheckpointError: it names something outside the allow-list.
        CheckpointError: it cannot be read (damaged, or not a DCP index).
    """
    try:
        metadata = pickle.load(f) if trust else _MetadataUnpickler(f, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # a damaged or foreign file: any unpickling error
        raise CheckpointError(f"cannot read {path} ({one_line(exc)}); the checkpoint is damaged or not torch_dist") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{path} holds a {type(metadata).__name__}, not a torch DCP index")
    return metadata


def read_metadata_file(ckpt_dir: str, trust: bool = False):
    """The DCP index (``.metadata``) of the checkpoint directory ``ckpt_dir``."""
    from bam_megatron.checkpoint.layout import DCP_METADATA_FILE

    path = os.path.join(ckpt_dir, DCP_METADATA_FILE)
    try:
        with open(path, "rb") as f:
            return load_metadata(f, path, trust)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path} ({exc.strerror or one_line(exc)}); the checkpoint is incomplete") from None


def _admitted_torch_global(qualified: str):
    """The object a ``torch.save`` file may name beyond torch's own weights-only set, or None."""
    module, _, name = qualified.rpartition(".")
    if qualified in _TORCH_NAMES or (module == "numpy.dtypes" and name.endswith("DType")):
        return _import(module, name)
    if module.startswith("megatron.core."):  # megatron-core's enums (AttnBackend, RerunMode, ...)
        obj = _import(module, name)
        if isinstance(obj, type) and issubclass(obj, enum.Enum):
            return obj
    return None


def _allowed_globals(source, path: str) -> List[object]:
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception as exc:  # not a torch.save zip file
        raise CheckpointError(f"cannot read {path} ({one_line(exc)}); the file is damaged or not a torch checkpoint") from None
    allowed = []
    for qualified in sorted(names):
        obj = _admitted_torch_global(qualified)
        if obj is None:
            raise refusal(qualified, path)
        allowed.append(obj)
    return allowed


def load_torch(source: Union[str, IO[bytes]], path: Optional[str] = None, trust: bool = False):
    """A ``torch.save`` file (a path or a seekable binary file) read without running code.

    Raises:
        UnsafeCheckpointError: it names something outside the allow-list.
        CheckpointError: it cannot be read (damaged or foreign).
    """
    import torch

    path = path or (source if isinstance(source, str) else "<bytes>")
    if trust:
        return torch.load(source, map_location="cpu", weights_only=False)
    if not isinstance(source, str):
        source = io.BytesIO(source.read())
    allowed = _allowed_globals(source, path)
    if not isinstance(source, str):
        source.seek(0)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # damaged data, or a construct the weights-only reader refuses
        raise CheckpointError(
            f"cannot read {path} ({one_line(exc)}); the file is damaged or holds objects a checkpoint does not "
            f"hold (if it is your own, {TRUST_FLAG} reads it with the full unpickler)"
        ) from None


def load_tensor(f: IO[bytes]):
    """One tensor stored by torch DCP (a ``torch.save``'d tensor; torch's weights-only reader)."""
    import torch

    return torch.load(f, map_location="cpu", weights_only=True)
