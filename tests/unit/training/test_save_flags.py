"""Megatron-LM's checkpoint-writing flags: ``--async-save`` (off), ``--ckpt-fully-parallel-save``
and ``--ckpt-fully-parallel-load`` (on; ``--no-...`` turns them off, the positive spelling is
accepted), ``--ckpt-assume-constant-structure`` (off); the training loop's save options follow
them."""

import pytest

from bam_megatron.training import arguments
from bam_megatron.training.loop import _checkpointer

BASE = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--vocab-size", "128", "--mock-data", "--train-iters", "4", "--save", "ckpt"]


def _parse(extra):
    return arguments.build_parser().parse_args(BASE + extra)


def test_defaults():
    args = _parse([])
    assert (args.async_save, args.ckpt_fully_parallel_save, args.ckpt_fully_parallel_load,
            args.ckpt_assume_constant_structure) == (False, True, True, False)


@pytest.mark.parametrize("flag,name,value", [
    ("--async-save", "async_save", True),
    ("--no-ckpt-fully-parallel-save", "ckpt_fully_parallel_save", False),
    ("--ckpt-fully-parallel-save", "ckpt_fully_parallel_save", True),
    ("--no-ckpt-fully-parallel-load", "ckpt_fully_parallel_load", False),
    ("--ckpt-fully-parallel-load", "ckpt_fully_parallel_load", True),
    ("--ckpt-assume-constant-structure", "ckpt_assume_constant_structure", True),
])
def test_flags(flag, name, value):
    assert getattr(_parse([flag]), name) is value


def test_the_loop_saves_as_the_flags_say():
    args = _parse(["--async-save", "--no-ckpt-fully-parallel-save", "--ckpt-assume-constant-structure",
                   "--keep-last-checkpoints", "2", "--no-checkpoint-checksums"])
    saver = _checkpointer(args)
    o = saver.options
    assert saver.root == "ckpt" and saver.inflight is None
    assert (o.background, o.fully_parallel, o.constant_structure, o.keep_last, o.checksums) == (True, False, True, 2, False)
    args.save = None
    assert _checkpointer(args) is None  # no --save: nothing to save
