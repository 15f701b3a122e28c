"""The Mix phase tool (tools/upcycle_bam.py) on real training checkpoints.

Seeds are trained with ``pretrain_bam.py`` (``bam_megatron.training.pretrain``) for a few steps;
the upcycled checkpoints are evaluated through ``pretrain_bam.py --skip-train --load
--use-checkpoint-args`` in one process and under torchrun at TP2, EP2, PP2 and TP2×EP2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from megatron.core.transformer.enums import AttnBackend
from support import REPO_ROOT as ROOT  # noqa: E402
from support.checkpoints import common_state, index_of

from bam_megatron.checkpoint import integrity
from bam_megatron.checkpoint.dcp_reader import CheckpointReader, is_model_entry, layer_blocks
from bam_megatron.checkpoint.dcp_writer import PartWriter
from bam_megatron.checkpoint.opener import resolve_checkpoint_dir
from bam_megatron.checkpoint.weights import read_global_tensors, save_global_tensors
from bam_megatron.upcycle.mapping import AttentionShape, average, split_qkv, upcycle_state
from bam_megatron.upcycle.mix import upcycle
from bam_megatron.upcycle.plan import OutputTensor, UpcycleOptions

LP = "decoder.layers."

MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
    "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--hidden-dropout", "0", "--attention-dropout", "0",
]
DATA = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--mock-data", "--seed", "1234"]
EVAL = DATA + ["--eval-iters", "2", "--micro-batch-size", "2", "--global-batch-size", "4"]



def _save_global(tensors, path):
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    init_distributed(seed=1234)
    try:
        save_global_tensors(tensors, str(path))
    finally:
        destroy_distributed()


upcycle_cli = importlib.import_module("bam_megatron.cli.upcycle")
inspect_cli = importlib.import_module("bam_megatron.cli.inspect_checkpoint")


def _pretrain(argv):
    from bam_megatron.training import pretrain

    return pretrain(argv)


def _train_seed(path, seed, iters, *extra):
    _pretrain(MODEL + list(extra) + [
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--mock-data", "--seed", str(seed),
        "--train-iters", str(iters), "--micro-batch-size", "2", "--eval-iters", "1",
        "--eval-interval", "1000", "--log-interval", "100", "--lr", "1e-3", "--save", str(path),
    ])
    return str(path)


def _eval(load):
    """Validation loss of a checkpoint through pretrain_bam.py (one process)."""
    summary = _pretrain(["--skip-train", "--load", str(load), "--use-checkpoint-args"] + EVAL)
    return summary["valid"]["valid"]


def _model_tensors(ckpt):
    return {k: v for k, v in read_global_tensors(resolve_checkpoint_dir(str(ckpt), "x")).items()
            if torch.is_tensor(v) and is_model_entry(k)}


def _run_cli(argv, capsys):
    rc = upcycle_cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """Dense checkpoints: a, b, c (parallel blocks, distinct inits / steps) and s (sequential
    blocks, grouped-query attention)."""
    root = tmp_path_factory.mktemp("seeds")
    return {
        "a": _train_seed(root / "a", 1234, 2),
        "b": _train_seed(root / "b", 99, 2),
        "c": _train_seed(root / "c", 7, 3),
        "s": _train_seed(root / "s", 5, 2, "--bam-sequential-block", "--group-query-attention", "--num-query-groups", "2"),
    }


@pytest.fixture(scope="module")
def dense_losses(seeds):
    return {name: _eval(seeds[name]) for name in ("a", "s")}


# ------------------------------------------------------------------------------ equivalence

IDENTITY_CASES = {
    # name: (seed, N, tool flags)
    "full/soft/ffn-topN-pre-softmax": ("a", 3, ["--attention-experts", "full", "--moe-router-topk", "3"]),
    "shared-kv/gqa/sequential/ffn-top2-renormalised": (
        "s", 3, ["--attention-experts", "shared-kv", "--moe-router-topk", "2", "--no-moe-router-pre-softmax"]),
    "merged/ffn-top2-renormalised": ("a", 3, ["--attention-experts", "merged", "--moe-router-topk", "2", "--no-moe-router-pre-softmax"]),
    "full/sequential/ffn-topN": ("s", 2, ["--attention-experts", "full", "--moe-router-topk", "2", "--router-std", "0.5"]),
}


@pytest.mark.parametrize("name", list(IDENTITY_CASES))
def test_identical_seeds_keep_the_dense_validation_loss(seeds, dense_losses, tmp_path, capsys, name):
    seed, n, flags = IDENTITY_CASES[name]
    out = tmp_path / "bam"
    rc, stdout, err = _run_cli(["-o", out, *flags, *([seeds[seed]] * n)], capsys)
    assert rc == 0, err
    assert "FFN experts per layer" in stdout and "[upcycle]" in err
    loss = _eval(out)
    assert abs(loss - dense_losses[seed]) < 1e-5, (loss, dense_losses[seed])


# ------------------------------------------------------------------------------ exact mapping


def _check_exact(seeds_t, out_t, mode, weights, attn):
    n = len(seeds_t)
    for e, s in enumerate(seeds_t):
        fc1 = out_t[LP + "mlp.experts.experts.linear_fc1.weight"][:, e]
        assert torch.equal(fc1, s[LP + "mlp.linear_fc1.weight"])
        assert torch.equal(out_t[LP + "mlp.experts.experts.linear_fc2.weight"][:, e], s[LP + "mlp.linear_fc2.weight"])
        if mode == "full":
            assert torch.equal(out_t[LP + "self_attention.linear_qkv.weight"][:, e], s[LP + "self_attention.linear_qkv.weight"])
        if mode == "shared-kv":
            q, _ = split_qkv(s[LP + "self_attention.linear_qkv.weight"], attn)
            assert torch.equal(out_t[LP + "self_attention.linear_q.weight"][:, e], q)
        if mode != "merged":
            assert torch.equal(out_t[LP + "self_attention.linear_proj.weight"][:, e], s[LP + "self_attention.linear_proj.weight"])
    averaged = ["embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight",
                LP + "input_layernorm.weight"]
    if mode == "merged":
        averaged += [LP + "self_attention.linear_qkv.weight", LP + "self_attention.linear_proj.weight"]
    for key in averaged:
        expected = average([s[key] for s in seeds_t], weights)
        assert torch.equal(out_t[key], expected), key
        manual = sum(w * s[key].double() for w, s in zip(weights, seeds_t))
        torch.testing.assert_close(out_t[key].double(), manual, atol=1e-6, rtol=0)
    if mode == "shared-kv":
        kvs = [split_qkv(s[LP + "self_attention.linear_qkv.weight"], attn)[1] for s in seeds_t]
        assert torch.equal(out_t[LP + "self_attention.linear_kv.weight"], average(kvs, weights))
        manual = sum(w * kv.double() for w, kv in zip(weights, kvs))
        torch.testing.assert_close(out_t[LP + "self_attention.linear_kv.weight"].double(), manual, atol=1e-6, rtol=0)
    routers = [LP + "mlp.router.weight"] + ([] if mode == "merged" else [LP + "self_attention.router.weight"])
    for key in routers:
        assert out_t[key].shape == (2, n, 64)
    assert (LP + "self_attention.router.weight" in out_t) == (mode != "merged")


@pytest.mark.parametrize("mode,weights", [("full", None), ("shared-kv", [1.0, 2.0, 5.0]), ("merged", [3.0, 1.0, 0.0])])
def test_distinct_seeds_experts_are_copies_and_the_rest_is_the_mean(seeds, tmp_path, capsys, mode, weights):
    paths = [seeds["a"], seeds["b"], os.path.join(seeds["c"], "iter_0000003")]  # root or iter_* dir
    out = tmp_path / "bam"
    argv = ["-o", out, "--attention-experts", mode, "--part-size-mb", "0.05", "--seed", "11", *paths]
    if weights:
        argv += ["--weights", *weights]
    rc, _, err = _run_cli(argv, capsys)
    assert rc == 0, err
    seeds_t = [_model_tensors(p) for p in paths]
    assert not torch.equal(seeds_t[0][LP + "mlp.linear_fc1.weight"], seeds_t[1][LP + "mlp.linear_fc1.weight"])
    out_t = _model_tensors(out)
    norm = [1 / 3] * 3 if weights is None else [w / sum(weights) for w in weights]
    attn = AttentionShape(4, 4, 16)
    _check_exact(seeds_t, out_t, mode, norm, attn)
    # The streamed result is the in-memory mapping, bit for bit (routers included).
    ref = upcycle_state(seeds_t, mode=mode, shape=attn, weights=norm, router_init="random", router_std=0.02, seed=11)
    assert sorted(ref) == sorted(out_t)
    for key, value in ref.items():
        assert torch.equal(out_t[key], value), key
    # Many parts were written and merged into one checkpoint; no temporary files are left.
    ckpt = os.path.join(out, "iter_0000000")
    assert len([f for f in os.listdir(ckpt) if f.endswith(".distcp")]) > 3
    assert sorted(os.listdir(out)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
    common = common_state(ckpt)
    assert common["iteration"] == 0 and "layout" not in common and "rng_state" not in common
    assert not any(k.startswith(("optimizer", "rng_state")) for k in index_of(ckpt).state_dict_metadata)
    args = common["args"]
    from bam_megatron.training.arguments import MODEL_ARGS

    assert set(MODEL_ARGS) <= set(args)
    assert args["num_experts"] == 3 and args["bam_attn_experts"] == (1 if mode == "merged" else 3)
    assert args["bam_kv_sharing"] == (mode == "shared-kv") and args["bam_sequential_block"] is False
    assert args["moe_router_topk"] == 1 and args["moe_router_pre_softmax"] is True


def test_irregular_seed_chunks_and_transformer_engine_names(seeds, tmp_path, capsys):
    """A seed whose stored chunks straddle layers and rows, and a Megatron-LM style seed with
    Transformer Engine norm names and a Namespace of arguments, give the same model as the
    plain seed they were made from."""
    src = seeds["s"]
    ckpt = resolve_checkpoint_dir(src, "s")
    tensors = _model_tensors(src)

    # Irregular chunks: the [L, ...] tensors split across both layers (rows 0:5 of every layer
    # in one chunk, the rest split per layer), written with the tool's own part writer.
    odd = tmp_path / "odd" / "iter_0000002"
    writer = PartWriter(str(tmp_path / "odd_parts"), part_bytes=20_000, sync=False)
    plan = {}
    for key, t in tensors.items():
        plan[key] = OutputTensor(key, tuple(t.shape), t.dtype, "shared")
        if key.startswith(LP) and t.dim() >= 2 and t.shape[1] > 5:
            writer.add(key, (0,) + (0,) * (t.dim() - 1), t[:, :5].clone())
            for layer in range(t.shape[0]):
                writer.add(key, (layer, 5) + (0,) * (t.dim() - 2), t[layer:layer + 1, 5:].clone())
        else:
            writer.add(key, (0,) * t.dim(), t)
    writer.merge(str(odd), plan)
    shutil.copy(os.path.join(ckpt, "common.pt"), odd / "common.pt")
    shutil.copy(os.path.join(ckpt, "metadata.json"), odd / "metadata.json")
    (tmp_path / "odd" / "latest_checkpointed_iteration.txt").write_text("2")
    assert len(index_of(str(odd)).state_dict_metadata[LP + "mlp.linear_fc1.weight"].chunks) == 3

    # Megatron-LM with Transformer Engine: fused-norm names, arguments as a Namespace.
    te = tmp_path / "te" / "iter_0000010"
    renamed = {}
    for key, t in tensors.items():
        key = key.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        key = key.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")
        renamed[key] = t
    _save_global(renamed, te)

    saved_args = common_state(ckpt)["args"]
    ns = argparse.Namespace(**{k: saved_args[k] for k in (
        "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length",
        "max_position_embeddings", "swiglu", "normalization", "norm_epsilon", "position_embedding_type",
        "rotary_base", "rotary_percent", "untie_embeddings_and_output_weights", "add_bias_linear",
        "padded_vocab_size", "init_method_std", "kv_channels")},
        group_query_attention=True, num_query_groups=2, params_dtype=torch.float32,
        attention_backend=AttnBackend.auto, tokenizer_type="NullTokenizer", vocab_size=128)
    torch.save({"args": ns, "iteration": 10, "checkpoint_version": 3.0}, te / "common.pt")
    (tmp_path / "te" / "latest_checkpointed_iteration.txt").write_text("10")

    outs = {}
    for name, path in (("plain", src), ("odd", tmp_path / "odd"), ("te", tmp_path / "te")):
        out = tmp_path / f"bam_{name}"
        rc, _, err = _run_cli(["-o", out, "--attention-experts", "shared-kv", "-q", path, path], capsys)
        assert rc == 0, err
        outs[name] = _model_tensors(out)
    for name in ("odd", "te"):
        assert sorted(outs[name]) == sorted(outs["plain"])
        for key, value in outs["plain"].items():
            assert torch.equal(outs[name][key], value), (name, key)
    args = common_state(str(tmp_path / "bam_te" / "iter_0000000"))["args"]
    assert args["bam_sequential_block"] is True and args["num_query_groups"] == 2


# ------------------------------------------------------------------------------ layouts

LAYOUTS = {
    "tp2": (2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    "ep2": (2, ["--expert-model-parallel-size", "2"]),
    "pp2": (2, ["--pipeline-model-parallel-size", "2"]),
    "tp2xep2": (4, ["--tensor-model-parallel-size", "2", "--expert-model-parallel-size", "2", "--sequence-parallel"]),
}
LOSS_LINE = re.compile(r"validation loss at iteration 0 \| lm loss value: ([0-9.E+-]+)")


def _torchrun(nproc, argv):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           os.path.join(ROOT, "pretrain_bam.py"), *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return float(LOSS_LINE.search(proc.stdout).group(1))


def test_cli_output_loads_at_every_layout(seeds, tmp_path):
    """The real command line (BAM defaults: KV experts, FFN top-1), then the output evaluated at
    one process and under torchrun at TP2, EP2, PP2 and TP2×EP2."""
    out = tmp_path / "bam"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "upcycle_bam.py"), "-o", str(out),
                           seeds["a"], seeds["b"]], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "[upcycle]" in proc.stderr and "merged" in proc.stderr
    assert "attention experts per layer: 2" in proc.stdout and "active per token" in proc.stdout
    assert seeds["a"] in proc.stdout and seeds["b"] in proc.stdout

    single = _eval(out)
    argv = ["--skip-train", "--load", str(out), "--use-checkpoint-args"] + EVAL
    for name, (nproc, flags) in LAYOUTS.items():
        loss = _torchrun(nproc, argv + flags)
        assert abs(loss - single) < 1e-5, (name, loss, single)


# ------------------------------------------------------------------------------ bad input


def _damaged(tmp_path, seeds, checksums=False):
    """A seed whose index is not a pickle (without its checksums: foreign or older; with them:
    caught by the checksums first)."""
    d = tmp_path / ("damaged" + "-checksums" * checksums)
    shutil.copytree(seeds["a"], d)
    ckpt = d / "iter_0000002"
    (ckpt / ".metadata").write_bytes(b"not a pickle")
    if not checksums:
        (ckpt / "checksums.json").unlink()
    return d


def _other_shape(tmp_path, seeds):
    t = _model_tensors(seeds["a"])
    t[LP + "mlp.linear_fc2.weight"] = t[LP + "mlp.linear_fc2.weight"][..., :96].contiguous()
    t[LP + "mlp.linear_fc1.weight"] = t[LP + "mlp.linear_fc1.weight"][:, :192].contiguous()
    d = tmp_path / "other" / "iter_0000001"
    _save_global(t, d)
    common = common_state(resolve_checkpoint_dir(seeds["a"], "a"))
    torch.save({"args": common["args"], "iteration": 1}, d / "common.pt")
    return d


def _other_heads(tmp_path, seeds):
    d = tmp_path / "heads"
    shutil.copytree(seeds["b"], d)
    common_path = d / "iter_0000002" / "common.pt"
    common = common_state(str(d / "iter_0000002"))
    common["args"]["num_attention_heads"] = 8
    torch.save(common, common_path)
    ckpt = str(d / "iter_0000002")
    integrity.write_manifest(ckpt, integrity.checksum_files(ckpt, integrity.checkpoint_files(ckpt)))
    return d


BAD_INPUTS = {
    # name: (argv builder(tmp_path, seeds, out) -> list, expected fragment)
    "missing seed": (lambda tp, s, o: ["-o", o, s["a"], tp / "nope"], "seed 1 (" ),
    "not a checkpoint": (lambda tp, s, o: (os.makedirs(tp / "empty"), ["-o", o, s["a"], tp / "empty"])[1], "is not a torch_dist checkpoint"),
    "damaged checkpoint": (lambda tp, s, o: ["-o", o, s["a"], _damaged(tp, s)], "cannot read"),
    "damaged checkpoint with checksums": (lambda tp, s, o: ["-o", o, s["a"], _damaged(tp, s, checksums=True)],
                                          "(truncated or replaced)"),
    "different shapes": (lambda tp, s, o: ["-o", o, s["a"], s["b"], _other_shape(tp, s)], "has shape [2, 192, 64] there and [2, 256, 64] in seed 0"),
    "different heads": (lambda tp, s, o: ["-o", o, s["a"], _other_heads(tp, s)], "--num-attention-heads is 8 there and 4 in seed 0"),
    "different block type": (lambda tp, s, o: ["-o", o, s["a"], s["s"]], "does not match seed 0"),
    "shared-kv with one seed": (lambda tp, s, o: ["-o", o, "--attention-experts", "shared-kv", s["a"]], "needs at least 2 seeds"),
    "weights count": (lambda tp, s, o: ["-o", o, s["a"], s["b"], "--weights", "1", "2", "3"], "--weights has 3 values for 2 seeds"),
    "top-k above N": (lambda tp, s, o: ["-o", o, "--moe-router-topk", "3", s["a"], s["b"]], "--moe-router-topk 3"),
    "output exists": (lambda tp, s, o: (os.makedirs(o), ["-o", o, s["a"], s["b"]])[1], "exists; pass --force"),
    "output is a seed": (lambda tp, s, o: ["-o", s["b"], "--force", s["a"], s["b"]], "overlaps seed 1"),
    "not dense": (lambda tp, s, o: ["-o", o, tp / "bam_in", s["a"]], "is not a dense model"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gives_one_line_and_no_output(seeds, tmp_path, capsys, name):
    if name == "not dense":
        rc, _, err = _run_cli(["-o", tmp_path / "bam_in", "-q", seeds["a"], seeds["b"]], capsys)
        assert rc == 0, err
    build, fragment = BAD_INPUTS[name]
    out = tmp_path / "out"
    argv = build(tmp_path, seeds, out)
    before = sorted(os.listdir(tmp_path))
    rc, stdout, err = _run_cli(argv, capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("upcycle_bam.py: error: "), err
    assert fragment in lines[0], lines[0]
    assert stdout == ""
    assert sorted(os.listdir(tmp_path)) == before  # nothing written (and no temporary directory)
    if name != "output exists":
        assert not out.exists()


def test_force_replaces_only_a_complete_output(seeds, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bam"
    out.mkdir()
    (out / "old.txt").write_text("old")
    def broken_merge(self, final_dir, plan):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as m:
        m.setattr(PartWriter, "merge", broken_merge)
        with pytest.raises(OSError):
            upcycle_cli.main(["-o", str(out), "--force", "-q", seeds["a"], seeds["b"]])
    assert (out / "old.txt").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["bam"]  # the temporary directory is gone

    rc, _, err = _run_cli(["-o", out, "--force", "-q", seeds["a"], seeds["b"]], capsys)
    assert rc == 0, err
    assert sorted(os.listdir(out)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    assert sorted(os.listdir(tmp_path)) == ["bam"]


# ------------------------------------------------------------------------------ inspection


def test_inspect_checkpoint_shows_the_expert_layout(seeds, tmp_path, capsys):
    out = tmp_path / "bam"
    rc, _, err = _run_cli(["-o", out, "--attention-experts", "shared-kv", "-q", seeds["a"], seeds["b"], seeds["c"]], capsys)
    assert rc == 0, err
    assert inspect_cli.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "attention experts 3 (K,V shared)" in text and "FFN experts 3" in text
    assert "routers: attention, FFN" in text
    assert re.search(r"^\s+1\s+\|\s+3\s+\|\s+shared\s+\|\s+\[3, 64\]\s+\|\s+3\s+\|\s+\[3, 64\]", text, re.M), text
    assert re.search(r"^\s+2\s+\|", text, re.M)
    assert "decoder.layers.self_attention.linear_q.weight" in text and "[2, 3, 64, 64]" in text
    assert "bam_kv_sharing = True" in text and "iteration: 0" in text

    assert inspect_cli.main([str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    lay = info["expert_layout"]
    assert lay["attention"] == {"experts": 3, "kv": "shared", "router": True}
    assert lay["ffn"] == {"experts": 3, "router": True, "router_type": "linear", "shared_expert": False}
    assert lay["block"] == "parallel"
    assert len(lay["layers"]) == 2 and info["iteration"] == 0 and not info["has_optimizer_state"]

    assert inspect_cli.main([seeds["s"]]) == 0  # a dense training checkpoint
    text = capsys.readouterr().out
    assert "attention experts 1 (ordinary attention)" in text and "sequential blocks" in text
    assert "optimizer state: yes" in text


# ------------------------------------------------------------------------------ small pieces


def test_layer_blocks_follow_the_stored_chunks():
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata as C

    def chunk(layer0, layers, row0=0):
        return C(offsets=torch.Size([layer0, row0]), sizes=torch.Size([layers, 4]))

    per_layer = [chunk(i, 1, r) for i in range(4) for r in (0, 4)]  # megatron-core: per layer
    assert layer_blocks(4, [per_layer, per_layer]) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert layer_blocks(4, [per_layer, [chunk(0, 4)]]) == [(0, 4)]  # one seed stored whole
    assert layer_blocks(4, [[chunk(0, 2), chunk(2, 1), chunk(3, 1)], per_layer]) == [(0, 2), (2, 3), (3, 4)]




def test_streaming_reads_one_layer_of_one_seed_at_a_time(seeds, tmp_path, monkeypatch):
    """Every read of a decoder tensor is one layer of one seed (the seeds store layers as
    separate chunks); only the tensors outside the layer stack are read whole."""
    regions = []
    original = CheckpointReader.read

    def recording_read(self, reqs):
        regions.extend((self.ckpt_dir, key, tuple(sizes)) for key, _offsets, sizes in reqs)
        return original(self, reqs)

    monkeypatch.setattr(CheckpointReader, "read", recording_read)
    result = upcycle([seeds["a"], seeds["b"], seeds["c"]], str(tmp_path / "bam"),
                       UpcycleOptions(mode="shared-kv"), part_bytes=64 * 1024, sync=False)
    layered = [r for r in regions if r[1].startswith(LP)]
    assert layered and all(sizes[0] == 1 for _, _, sizes in layered)
    # at least seeds x layers x tensors reads (stacked tensors are read per stored chunk)
    assert len(layered) >= 3 * 2 * len(result.arch.layer_keys)
    assert {(d, k) for d, k, _ in layered} == {(resolve_checkpoint_dir(p, "s"), k) for p in (seeds["a"], seeds["b"], seeds["c"])
                                             for k in result.arch.layer_keys}
    assert {key for _, key, _ in regions if not key.startswith(LP)} == set(result.arch.global_keys)
    assert result.num_parts > 3 and result.params.total == sum(t.numel for t in result.plan.values())


def test_recorded_training_settings_reach_the_mix_run(seeds, tmp_path, capsys):
    """The output records the seeds' dropout and the user's MoE loss settings; README's mix
    command (no model or tokenizer flags) trains with them."""
    out = tmp_path / "bam"
    rc, _out, err = _run_cli(["-o", out, "--moe-aux-loss-coeff", "0.02", "--moe-z-loss-coeff", "0.003", "-q",
                              seeds["a"], seeds["b"]], capsys)
    assert rc == 0, err
    args = common_state(resolve_checkpoint_dir(str(out)))["args"]
    assert args["hidden_dropout"] == 0.0 and args["attention_dropout"] == 0.0  # the seeds'
    assert args["moe_aux_loss_coeff"] == 0.02 and args["moe_z_loss_coeff"] == 0.003
    assert args["tokenizer_type"] == "NullTokenizer" and args["vocab_size"] == 128
    summary = _pretrain(["--load", str(out), "--use-checkpoint-args", "--mock-data", "--train-iters", "2",
                         "--micro-batch-size", "2", "--eval-iters", "1"])
    assert summary["iteration"] == 2
    log = capsys.readouterr().out
    assert "[checkpoint-args] --moe-aux-loss-coeff 0.02" in log and "[checkpoint-args] --hidden-dropout 0.0" in log


def test_full_disk_during_upcycle_is_one_line_and_writes_nothing(seeds, tmp_path, capsys, monkeypatch):
    from bam_megatron.checkpoint import dcp_writer

    def full_disk(self, part_dir, tensors):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp_writer.PartWriter, "_save_part", full_disk)
    rc, _out, err = _run_cli(["-o", tmp_path / "bam", "-q", seeds["a"], seeds["b"]], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 1 and len(lines) == 1 and "no space left on device" in lines[0] and "nothing was written" in lines[0], err
    assert os.listdir(tmp_path) == []
