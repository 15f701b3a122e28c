"""Every program that reads a checkpoint opens it the same way: a checkpoint whose ``common.pt``
or ``.metadata`` carries a pickle payload is refused in one line and the payload never runs; a
checkpoint with one flipped byte in its tensor data is refused in one line; in both cases nothing
is written.

The payload's checkpoint has fresh checksums (whoever plants a payload can also rewrite
``checksums.json``), so the refusal comes from the allow-listed unpickler, not from the checksums.
"""

import json
import os
import pickle
import shutil

import pytest
import torch
from support.training import MOCK, NO_DROPOUT, TINY

from bam_megatron import training
from bam_megatron.checkpoint import integrity
from bam_megatron.checkpoint.opener import resolve_checkpoint_dir, unpickle
from bam_megatron.cli import add_expert, domain_embeddings, evaluate, generate, hf_export, inspect_checkpoint, upcycle

DENSE = TINY + NO_DROPOUT + MOCK


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A dense checkpoint trained 2 steps, an MoE mixed from it, an indexed dataset and a task file."""
    from bam_megatron.cli.preprocess import preprocess
    from bam_megatron.upcycle.mix import upcycle as mix
    from bam_megatron.upcycle.plan import UpcycleOptions

    d = tmp_path_factory.mktemp("inputs")
    dense = str(d / "dense")
    training.pretrain(DENSE + ["--train-iters", "2", "--save", dense, "--lr-warmup-iters", "1"])
    moe = str(d / "moe")
    mix([dense, dense], moe, UpcycleOptions(mode="full"))
    with open(d / "docs.jsonl", "w") as f:
        for i in range(20):
            f.write(json.dumps({"text": " ".join(str((i + k) % 100) for k in range(40))}) + "\n")
    preprocess(["--input", str(d / "docs.jsonl"), "--output-prefix", str(d / "docs"), "--tokenizer-type", "NullTokenizer",
                "--vocab-size", "128", "--append-eod", "--workers", "1"])
    tasks = d / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"context": "1 2 3", "choices": [" 4", " 9"], "gold": 0}) + "\n" for _ in range(2)))
    return {"dense": dense, "moe": moe, "prefix": str(d / "docs_text_document"), "tasks": str(tasks)}


def _rewrite_checksums(ckpt_dir: str) -> None:
    integrity.write_manifest(ckpt_dir, integrity.checksum_files(ckpt_dir, integrity.checkpoint_files(ckpt_dir)))


def _common_payload(ckpt_dir: str, marker) -> None:
    path = os.path.join(ckpt_dir, "common.pt")
    state = unpickle.load_torch(path, path)
    state["extra"] = Payload(marker)
    torch.save(state, path)
    _rewrite_checksums(ckpt_dir)


def _metadata_payload(ckpt_dir: str, marker) -> None:
    md = unpickle.read_metadata_file(ckpt_dir)
    md.planner_data = Payload(marker)
    with open(os.path.join(ckpt_dir, ".metadata"), "wb") as f:
        pickle.dump(md, f)
    _rewrite_checksums(ckpt_dir)


def _flip_a_byte(ckpt_dir: str, _marker) -> None:
    path = max((os.path.join(ckpt_dir, n) for n in os.listdir(ckpt_dir) if n.endswith(".distcp")), key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


FAULTS = {"common.pt payload": (_common_payload, "posix.system"),
          ".metadata payload": (_metadata_payload, "posix.system"),
          "flipped tensor byte": (_flip_a_byte, "does not match its checksum")}


def _programs(i, bad, out):
    """name -> (callable, argv); ``bad``: the damaged checkpoint in the role the program reads."""
    train = DENSE + ["--train-iters", "4", "--lr-warmup-iters", "1"]
    return {
        "inspect_checkpoint": (inspect_checkpoint.main, [bad]),
        "inspect_checkpoint --verify": (inspect_checkpoint.main, [bad, "--verify"]),
        "pretrain_bam --load": (training.main, train + ["--load", bad, "--save", out, "--override-opt-param-scheduler"]),
        "pretrain_bam --pretrained-checkpoint": (training.main, train + ["--load", out, "--save", out, "--pretrained-checkpoint", bad]),
        "upcycle_bam": (upcycle.main, ["-q", "-o", out, bad, i["dense"]]),
        "add_expert": (add_expert.main, ["-q", i["moe"], bad, "-o", out]),
        "hf_export": (hf_export.main, ["-q", bad, "-o", out]),
        "generate": (generate.main, ["-q", "--load", bad, "--prompt-token-ids", "1,2,3", "--output-format", "json",
                                     "--max-new-tokens", "2"]),
        "evaluate_bam": (evaluate.main, ["--model", f"m={bad}", "--tasks", f"t={i['tasks']}", "--out-dir", out]),
        "domain_embeddings": (domain_embeddings.main, ["-q", "--load", bad, "--domain", f"a:{i['prefix']}", "-o", out]),
    }


PROGRAMS = list(_programs({"dense": "", "moe": "", "tasks": "", "prefix": ""}, "", ""))
# inspect_checkpoint reads no tensor data; its --verify is the case that checks the data.
CASES = [(p, f) for p in PROGRAMS for f in FAULTS
         if not (p == "inspect_checkpoint" and f == "flipped tensor byte")
         and not (p == "inspect_checkpoint --verify" and f != "flipped tensor byte")]


@pytest.mark.parametrize("program,fault", CASES)
def test_program_refuses_in_one_line_and_writes_nothing(inputs, tmp_path, capsys, fault, program):
    damage, expected = FAULTS[fault]
    bad = str(tmp_path / "bad")
    shutil.copytree(inputs["dense"], bad)
    marker = tmp_path / "MARKER"
    damage(resolve_checkpoint_dir(bad), marker)
    out = str(tmp_path / "out")
    main, argv = _programs(inputs, bad, out)[program]
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    _stdout, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert rc == 1, err
    assert len(errors) == 1 and "Traceback" not in err, err
    assert expected in errors[0], errors[0]
    if "payload" in fault:
        assert "--trust-checkpoint-code" in errors[0]
    assert not marker.exists(), "the payload ran"
    assert not os.path.exists(out), os.listdir(out)


def test_a_tool_vouches_only_for_verified_inputs(inputs, tmp_path, capsys):
    """The upcycle tool records checksums over its output only when every input matched its
    own; from an input without checksums (older, or Megatron-LM's) it records none and says so."""
    verified = str(tmp_path / "verified")
    assert upcycle.main(["-q", "-o", verified, inputs["dense"], inputs["dense"]]) == 0
    assert os.path.isfile(os.path.join(resolve_checkpoint_dir(verified), "checksums.json"))
    plain = str(tmp_path / "plain")
    shutil.copytree(inputs["dense"], plain)
    os.remove(os.path.join(resolve_checkpoint_dir(plain), "checksums.json"))
    capsys.readouterr()
    out = str(tmp_path / "unvouched")
    assert upcycle.main(["-q", "-o", out, inputs["dense"], plain]) == 0
    assert "records no checksums" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(resolve_checkpoint_dir(out), "checksums.json"))
