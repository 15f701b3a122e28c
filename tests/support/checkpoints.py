"""Reading what a checkpoint holds in tests: always through the programs' opener."""

from __future__ import annotations

from bam_megatron.checkpoint.opener import open_checkpoint


def common_state(path: str) -> dict:
    """The non-tensor state of the checkpoint ``path`` names (index files verified, no tensor
    data read)."""
    return open_checkpoint(path, tensors="none").common


def index_of(path: str):
    """The torch DCP index (``Metadata``) of the checkpoint ``path`` names."""
    return open_checkpoint(path, tensors="none").metadata


def write_checkpoint(root: str, common: dict, iteration: int = 10, tensors=None) -> str:
    """A small torch_dist checkpoint in Megatron-LM's layout, written without a process group:
    ``tensors`` (default: a tiny embedding) through torch DCP, ``common`` as ``common.pt``
    (``torch.save``: a Namespace, enums or a test's payload stay as they are). Returns the
    ``iter_*`` directory."""
    import json
    import os

    import torch
    import torch.distributed.checkpoint as dcp

    from bam_megatron.checkpoint.layout import MEGATRON_CONFIG, TRACKER, iteration_dir

    ckpt = iteration_dir(root, iteration)
    os.makedirs(ckpt)
    tensors = tensors if tensors is not None else {"embedding.word_embeddings.weight": torch.zeros(8, 4)}
    dcp.save(dict(tensors), storage_writer=dcp.FileSystemWriter(ckpt), no_dist=True)
    torch.save(common, os.path.join(ckpt, "common.pt"))
    with open(os.path.join(ckpt, "metadata.json"), "w") as f:
        json.dump(MEGATRON_CONFIG, f)
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write(str(iteration))
    return ckpt
