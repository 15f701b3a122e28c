"""tools/add_expert.py on real checkpoints: the new expert's tensors are the dense model's, bit for
bit; the old experts are unchanged; the merged tensors are the λ-weighted mean; the router entry
follows the Nexus projection or the linear routers' rule; the output fine-tunes at an
expert-parallel size that divides only the new expert count; bad input is one line and writes
nothing."""

from __future__ import annotations

import importlib
import os
import shutil

import pytest
import torch
from support.checkpoints import common_state
from support.training import torchrun, train_log

from bam_megatron.checkpoint.dcp_reader import is_model_entry
from bam_megatron.checkpoint.opener import resolve_checkpoint_dir
from bam_megatron.checkpoint.weights import read_global_tensors, save_global_tensors
from bam_megatron.upcycle import mapping as U
from bam_megatron.upcycle.mapping import AttentionShape, average, split_qkv
from bam_megatron.upcycle.nexus import DomainEmbeddings, load_domain_embeddings, save_domain_embeddings

add_cli = importlib.import_module("bam_megatron.cli.add_expert")
upcycle_cli = importlib.import_module("bam_megatron.cli.upcycle")
LP = U.LAYER_PREFIX
ATTN = AttentionShape(4, 2, 16)
MERGED = ["embedding.word_embeddings.weight", "output_layer.weight", "decoder.final_layernorm.weight", LP + "input_layernorm.weight"]


def _tensors(ckpt):
    return {k: v for k, v in read_global_tensors(resolve_checkpoint_dir(str(ckpt), "x")).items()
            if torch.is_tensor(v) and is_model_entry(k)}


def _run(cli, argv, capsys):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _upcycle(capsys, out, seeds, *flags):
    rc, _, err = _run(upcycle_cli, ["-o", out, "-q", *flags, *seeds], capsys)
    assert rc == 0, err
    return out


def _check_merged(out_t, moe_t, dense_t, lam, keys):
    for key in keys:
        assert torch.equal(out_t[key], average([moe_t[key], dense_t[key]], [1 - lam, lam])), key
        manual = (1 - lam) * moe_t[key].double() + lam * dense_t[key].double()
        torch.testing.assert_close(out_t[key].double(), manual, atol=1e-6, rtol=0)


def test_nexus_bam_gets_the_dense_expert_and_its_projected_router_entry(dense_models, domain_file, tmp_path, capsys):
    m = dense_models
    moe = _upcycle(capsys, tmp_path / "moe", [m["seed"], m["b"], m["c"]], "--router", "nexus",
                   "--domain-embeddings", domain_file, "--domains", "b,c")
    out = tmp_path / "moe_plus_d"
    rc, stdout, err = _run(add_cli, [moe, m["d"], "--domain-embedding", domain_file, "--domain", "d", "-o", out,
                                     "--part-size-mb", "0.05"], capsys)
    assert rc == 0, err
    assert "[add-expert]" in err and "FFN experts per layer: 2 -> 3" in stdout and "attention experts per layer: 3 -> 4" in stdout
    assert "λ = 0.25" in stdout  # n = 2 routed + 1 shared dense models
    moe_t, dense_t, out_t = _tensors(moe), _tensors(m["d"]), _tensors(out)
    assert set(out_t) == set(moe_t)

    fc = [("mlp.experts.experts.linear_fc1.weight", "mlp.linear_fc1.weight"), ("mlp.experts.experts.linear_fc2.weight", "mlp.linear_fc2.weight"),
          ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.weight"),
          ("self_attention.linear_proj.weight", "self_attention.linear_proj.weight")]
    for moe_key, dense_key in fc:
        new, old = out_t[LP + moe_key], moe_t[LP + moe_key]
        assert new.shape[1] == old.shape[1] + 1
        assert torch.equal(new[:, -1], dense_t[LP + dense_key]), moe_key  # the dense model's, bit for bit
        assert torch.equal(new[:, :-1], old), moe_key  # old experts unchanged
    for key in (U.SHARED_FC1_KEY, LP + "mlp.shared_experts.linear_fc2.weight", U.NEXUS_FC1_KEY, U.NEXUS_FC2_KEY):
        assert torch.equal(out_t[key], moe_t[key]), key
    d_new = load_domain_embeddings(domain_file).select(["d"]).embeddings[0]
    assert torch.equal(out_t[U.NEXUS_DOMAIN_KEY][:, :2], moe_t[U.NEXUS_DOMAIN_KEY])
    assert torch.equal(out_t[U.NEXUS_DOMAIN_KEY][:, 2], d_new.expand(2, 64))
    router = out_t[U.ATTN_ROUTER_KEY]
    assert torch.equal(router[:, :3], moe_t[U.ATTN_ROUTER_KEY])
    torch.testing.assert_close(router[:, 3], moe_t[U.ATTN_ROUTER_KEY].mean(dim=1))
    _check_merged(out_t, moe_t, dense_t, 0.25, MERGED)

    common = common_state(resolve_checkpoint_dir(str(out)))
    args = common["args"]
    assert args["num_experts"] == 3 and args["bam_attn_experts"] == 4 and args["moe_router_type"] == "nexus"
    from bam_megatron.training.arguments import MODEL_ARGS

    assert set(MODEL_ARGS) <= set(args) and "save" not in args
    assert common["iteration"] == 0 and common["upcycling"]["added_experts"][0]["merge_weight"] == 0.25
    assert sorted(os.listdir(out)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]

    from bam_megatron.training import pretrain  # the output fine-tunes (one process)

    summary = pretrain(["--pretrained-checkpoint", str(out), "--load", str(tmp_path / "ft"), "--use-checkpoint-args",
                        "--mock-data", "--train-iters", "2", "--micro-batch-size", "2", "--eval-iters", "1"])
    assert summary["iteration"] == 2 and all(torch.isfinite(torch.tensor(summary["train_losses"])))


def test_linear_shared_kv_bam_follows_the_mean_row_rule(dense_models, domain_file, tmp_path, capsys):
    m = dense_models
    moe = _upcycle(capsys, tmp_path / "moe", [m["seed"], m["b"], m["c"]], "--attention-experts", "shared-kv")
    out = tmp_path / "plus"
    rc, stdout, err = _run(add_cli, [moe, m["d"], "-o", out, "-q", "--domain-embedding", domain_file], capsys)
    assert rc == 0, err
    assert "the new row is the mean of the existing rows" in stdout and "is not used" in stdout
    moe_t, dense_t, out_t = _tensors(moe), _tensors(m["d"]), _tensors(out)
    q, kv = split_qkv(dense_t[LP + "self_attention.linear_qkv.weight"], ATTN)
    assert torch.equal(out_t[LP + "self_attention.linear_q.weight"][:, 3], q)
    assert torch.equal(out_t[LP + "self_attention.linear_q.weight"][:, :3], moe_t[LP + "self_attention.linear_q.weight"])
    assert torch.equal(out_t[LP + "self_attention.linear_kv.weight"],
                       average([moe_t[LP + "self_attention.linear_kv.weight"], kv], [0.75, 0.25]))
    assert torch.equal(out_t[LP + "mlp.experts.experts.linear_fc1.weight"][:, 3], dense_t[LP + "mlp.linear_fc1.weight"])
    for key in (U.ATTN_ROUTER_KEY, U.FFN_ROUTER_KEY):
        assert out_t[key].shape == (2, 4, 64)
        assert torch.equal(out_t[key][:, :3], moe_t[key])
        torch.testing.assert_close(out_t[key][:, 3], moe_t[key].mean(dim=1))
    _check_merged(out_t, moe_t, dense_t, 0.25, MERGED)


def test_output_fine_tunes_at_an_ep_size_dividing_only_the_new_count(dense_models, domain_file, tmp_path, capsys):
    """Nexus BTX (averaged attention): 3 routed experts + the shared one, then e: 4 routed. EP2
    did not divide 3; the extended model trains at EP2 with the loss of one process."""
    m = dense_models
    moe = _upcycle(capsys, tmp_path / "moe", [m["seed"], m["b"], m["c"], m["d"]], "--attention-experts", "merged",
                   "--router", "nexus", "--domain-embeddings", domain_file, "--domains", "b,c,d")
    assert common_state(resolve_checkpoint_dir(str(moe)))["args"]["num_experts"] == 3
    out = tmp_path / "plus_e"
    rc, stdout, err = _run(add_cli, [moe, m["e"], "--domain-embedding", domain_file, "--domain", "e", "-o", out], capsys)
    assert rc == 0, err
    assert "attention: merged" in stdout and "λ = 0.2 " in stdout
    out_t, moe_t, dense_t = _tensors(out), _tensors(moe), _tensors(m["e"])
    _check_merged(out_t, moe_t, dense_t, 0.2, MERGED + [LP + "self_attention.linear_qkv.weight"])
    argv = ["--pretrained-checkpoint", str(out), "--use-checkpoint-args", "--mock-data", "--train-iters", "2",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--eval-iters", "1", "--log-interval", "1"]
    one = train_log(torchrun(argv + ["--load", str(tmp_path / "ft1")], nproc=1))
    ep2 = train_log(torchrun(argv + ["--load", str(tmp_path / "ft2"), "--expert-model-parallel-size", "2"], nproc=2))
    assert sorted(ep2) == [1, 2]
    assert ep2[1] == pytest.approx(one[1], abs=1e-5) and ep2[2] == pytest.approx(one[2], abs=1e-4)


# ------------------------------------------------------------------------------ bad input


def _variant(tmp_path, dense, name, change):
    """A copy of the dense checkpoint ``dense`` with its tensors changed by ``change``."""
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    t = _tensors(dense)
    change(t)
    d = tmp_path / name / "iter_0000002"
    init_distributed(seed=1)
    try:
        save_global_tensors(t, str(d))
    finally:
        destroy_distributed()
    shutil.copy(os.path.join(resolve_checkpoint_dir(dense), "common.pt"), d / "common.pt")
    (tmp_path / name / "latest_checkpointed_iteration.txt").write_text("2")
    return tmp_path / name


def _narrow_ffn(t):
    t[LP + "mlp.linear_fc1.weight"] = t[LP + "mlp.linear_fc1.weight"][:, :192].contiguous()
    t[LP + "mlp.linear_fc2.weight"] = t[LP + "mlp.linear_fc2.weight"][..., :96].contiguous()


def _wide_vocab(t):
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        t[key] = torch.cat([t[key], t[key]])


def _one_domain_file(tmp_path, dim):
    path = tmp_path / "one.pt"
    save_domain_embeddings(DomainEmbeddings(["x"], torch.ones(1, dim)), str(path))
    return path


BAD = {
    # name: (argv builder(tmp_path, dense models, nexus moe, domain file, out), expected fragment)
    "other FFN size": (lambda tp, m, moe, f, o: [moe, _variant(tp, m["d"], "narrow", _narrow_ffn), "--domain-embedding", f, "--domain", "d", "-o", o],
                       "tensor decoder.layers.mlp.linear_fc1.weight has shape [2, 192, 64] there, the MoE's decoder.layers.mlp.experts.experts.linear_fc1.weight needs [2, 256, 64]"),
    "other vocabulary": (lambda tp, m, moe, f, o: [moe, _variant(tp, m["d"], "vocab", _wide_vocab), "--domain-embedding", f, "--domain", "d", "-o", o],
                         "has a vocabulary of 512 (padded) and MOE_CKPT"),
    "output exists": (lambda tp, m, moe, f, o: (os.makedirs(o), [moe, m["d"], "--domain-embedding", f, "--domain", "d", "-o", o])[1],
                      "exists; pass --force"),
    "dense as MoE": (lambda tp, m, moe, f, o: [m["b"], m["d"], "-o", o], "is not a mixture of experts"),
    "MoE as dense": (lambda tp, m, moe, f, o: [moe, moe, "-o", o, "--domain-embedding", f, "--domain", "d"], "is not a dense model"),
    "no domain embedding": (lambda tp, m, moe, f, o: [moe, m["d"], "-o", o], "has a Nexus router: give the new expert's --domain-embedding"),
    "several domains": (lambda tp, m, moe, f, o: [moe, m["d"], "-o", o, "--domain-embedding", f], "holds 4 domains (b, c, d, e); choose one with --domain"),
    "embedding size": (lambda tp, m, moe, f, o: [moe, m["d"], "-o", o, "--domain-embedding", _one_domain_file(tp, 32)],
                       "the domain embedding has 32 values, the MoE's Nexus router takes 64"),
    "merge weight": (lambda tp, m, moe, f, o: [moe, m["d"], "-o", o, "--domain-embedding", f, "--domain", "d", "--merge-weight", "1.5"],
                     "--merge-weight must be between 0 and 1"),
}


@pytest.fixture(scope="module")
def nexus_moe(dense_models, domain_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("nexus_moe") / "moe"
    rc = upcycle_cli.main(["-o", str(out), "-q", "--router", "nexus", "--domain-embeddings", domain_file, "--domains", "b,c",
                           dense_models["seed"], dense_models["b"], dense_models["c"]])
    assert rc == 0
    return str(out)


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_one_line_and_writes_nothing(dense_models, domain_file, nexus_moe, tmp_path, capsys, name):
    build, fragment = BAD[name]
    out = tmp_path / "out"
    argv = build(tmp_path, dense_models, nexus_moe, domain_file, out)
    before = sorted(os.listdir(tmp_path))
    rc, stdout, err = _run(add_cli, argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("add_expert.py: error: "), err
    assert fragment in lines[0], lines[0]
    assert stdout == "" and sorted(os.listdir(tmp_path)) == before
    if name != "output exists":
        assert not out.exists()


def test_a_failed_write_leaves_nothing(dense_models, domain_file, nexus_moe, tmp_path, capsys, monkeypatch):
    from bam_megatron.checkpoint import dcp_writer

    def full_disk(self, part_dir, tensors):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp_writer.PartWriter, "_save_part", full_disk)
    rc, _, err = _run(add_cli, [nexus_moe, dense_models["d"], "--domain-embedding", domain_file, "--domain", "d",
                                "-o", tmp_path / "out", "-q"], capsys)
    assert rc == 1 and "no space left on device" in err and "nothing was written" in err
    assert os.listdir(tmp_path) == []
