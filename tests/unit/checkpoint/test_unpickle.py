"""Reading checkpoint pickles without running code: the allow-list admits what this project and
Megatron-LM record, refuses anything else in one line (naming the class and the file) before
it runs, and ``--trust-checkpoint-code`` is the explicit way past it."""

import argparse
import datetime
import io
import os
import pickle
import random

import numpy as np
import pytest
import torch
from megatron.core.transformer.enums import AttnBackend, CudaGraphScope
from support.checkpoints import write_checkpoint

from bam_megatron.checkpoint.opener import unpickle
from bam_megatron.errors import CheckpointError


class Payload:
    """What an attacker pickles: unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_what_checkpoints_record_loads(tmp_path):
    state = {
        "args": argparse.Namespace(num_layers=2, attention_backend=AttnBackend.auto, params_dtype=torch.bfloat16,
                                   cuda_graph_scope=[CudaGraphScope.attn], save=None),
        "rng": {"np": np.random.get_state(), "random": random.getstate(), "torch": torch.get_rng_state()},
        "iteration": 7,
    }
    path = str(tmp_path / "common.pt")
    torch.save(state, path)
    got = unpickle.load_torch(path, path)
    assert got["args"].attention_backend is AttnBackend.auto and got["args"].params_dtype is torch.bfloat16
    assert got["args"].cuda_graph_scope == [CudaGraphScope.attn]
    assert np.array_equal(got["rng"]["np"][1], state["rng"]["np"][1]) and got["iteration"] == 7


def test_payload_in_a_torch_file_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "MARKER"
    path = str(tmp_path / "common.pt")
    torch.save({"args": {"num_layers": 2}, "x": Payload(marker)}, path)
    with pytest.raises(unpickle.UnsafeCheckpointError) as err:
        unpickle.load_torch(path, path)
    message = str(err.value)
    assert "posix.system" in message and path in message and "--trust-checkpoint-code" in message
    assert "\n" not in message
    assert not marker.exists()


def test_payload_in_the_dcp_index_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "MARKER"
    ckpt = write_checkpoint(str(tmp_path / "c"), {"iteration": 1})
    md = unpickle.read_metadata_file(ckpt)
    md.planner_data = Payload(marker)
    with open(os.path.join(ckpt, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    with pytest.raises(unpickle.UnsafeCheckpointError, match=r"\.metadata would load posix\.system"):
        unpickle.read_metadata_file(ckpt)
    assert not marker.exists()


def test_other_classes_need_the_trust_flag(tmp_path):
    path = str(tmp_path / "common.pt")
    torch.save({"when": datetime.date(2026, 1, 2)}, path)
    with pytest.raises(unpickle.UnsafeCheckpointError, match="datetime.date"):
        unpickle.load_torch(path, path)
    assert unpickle.load_torch(path, path, trust=True)["when"] == datetime.date(2026, 1, 2)


def test_a_file_that_is_not_a_torch_file_is_one_line(tmp_path):
    path = tmp_path / "common.pt"
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="damaged or not a torch checkpoint"):
        unpickle.load_torch(str(path), str(path))


def test_dcp_byte_items_go_through_the_allow_list_inside_restricted_reads(tmp_path):
    """torch DCP unpickles byte items (e.g. the RNG state) with the full unpickler; inside
    ``restricted_reads`` the same load refuses a payload, and the originals come back after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from bam_megatron.patches.dcp_safe_reads import restricted_reads

    marker = tmp_path / "MARKER"
    folder = str(tmp_path / "dcp")
    dcp.save({"obj": Payload(marker), "t": torch.ones(2)}, storage_writer=dcp.FileSystemWriter(folder), no_dist=True)
    assert not marker.exists()
    original = DefaultLoadPlanner.load_bytes
    with restricted_reads(lambda f, p: unpickle.load_metadata(f, p), lambda s, p: unpickle.load_torch(s, p)):
        with pytest.raises(BaseException) as err:  # torch DCP's CheckpointException is a BaseException
            dcp.load({"obj": None, "t": torch.zeros(2)}, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    assert "posix.system" in str(err.value)
    assert not marker.exists()
    assert DefaultLoadPlanner.load_bytes is original
    state = {"t": torch.zeros(2)}
    with restricted_reads(lambda f, p: unpickle.load_metadata(f, p), lambda s, p: unpickle.load_torch(s, p)):
        dcp.load(state, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    assert torch.equal(state["t"], torch.ones(2))


def test_tensor_slices_load(tmp_path):
    buf = io.BytesIO()
    torch.save(torch.arange(6.0), buf)
    buf.seek(0)
    assert torch.equal(unpickle.load_tensor(buf), torch.arange(6.0))
