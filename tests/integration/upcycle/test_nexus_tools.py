"""tools/domain_embeddings.py and tools/upcycle_bam.py --router nexus on real checkpoints: the
embeddings are the mean final hidden state of the sampled tokens; the Nexus mix puts seed 0's FFN
in the shared expert, the routed experts' domain embeddings in expert order and a fresh
projection in the router, and records what rebuilds the model."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch
from support.checkpoints import common_state

from bam_megatron.checkpoint.dcp_reader import is_model_entry
from bam_megatron.checkpoint.opener import resolve_checkpoint_dir
from bam_megatron.checkpoint.weights import read_global_tensors
from bam_megatron.upcycle import mapping as U
from bam_megatron.upcycle.nexus import load_domain_embeddings

de_cli = importlib.import_module("bam_megatron.cli.domain_embeddings")
upcycle_cli = importlib.import_module("bam_megatron.cli.upcycle")
inspect_cli = importlib.import_module("bam_megatron.cli.inspect_checkpoint")
LP = U.LAYER_PREFIX


def _run(cli, argv, capsys):
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _tensors(ckpt):
    return {k: v for k, v in read_global_tensors(resolve_checkpoint_dir(str(ckpt), "x")).items()
            if torch.is_tensor(v) and is_model_entry(k)}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Two NullTokenizer indexed datasets: "low" uses ids 0..49, "high" ids 50..99."""
    from bam_megatron.cli.preprocess import preprocess

    root = tmp_path_factory.mktemp("indexed")
    out = {}
    for name, (lo, hi) in {"low": (0, 50), "high": (50, 100)}.items():
        g = torch.Generator().manual_seed(lo)
        with open(root / f"{name}.jsonl", "w") as f:
            for _ in range(12):
                ids = torch.randint(lo, hi, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g)
                f.write(json.dumps({"text": " ".join(str(int(i)) for i in ids)}) + "\n")
        preprocess(["--input", str(root / f"{name}.jsonl"), "--output-prefix", str(root / name), "--tokenizer-type",
                    "NullTokenizer", "--vocab-size", "128", "--append-eod", "--workers", "1"])
        out[name] = str(root / f"{name}_text_document")
    return out


def _reference_mean(ckpt, sample):
    """The mean input of the output layer (= the final norm's output) over the sample's tokens,
    through a model built here from the test's own config."""
    import torch.nn.functional as F
    from support.models import tiny_config

    from bam_megatron.checkpoint.weights import load_model_weights
    from bam_megatron.model.build import build_bam_model
    from bam_megatron.model.config import BAMConfig
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    init_distributed(seed=1)
    try:
        cfg = tiny_config(ffn_hidden_size=128, num_query_groups=2, activation_func=F.silu, init_method_std=0.02)
        model = build_bam_model(cfg, BAMConfig(), vocab_size=256, max_sequence_length=32)
        load_model_weights(model, resolve_checkpoint_dir(ckpt))
        model.eval()
        seen = []
        model.output_layer.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0].double()))
        rows = [torch.as_tensor(sample.rows)] + ([torch.as_tensor(sample.tail)[None]] if sample.tail is not None else [])
        with torch.no_grad():
            for tokens in rows:
                model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), None)
        return torch.cat([h.reshape(-1, 64) for h in seen]).mean(dim=0)
    finally:
        destroy_distributed()


def test_domain_embeddings_are_the_mean_final_hidden_state(dense_models, datasets, tmp_path, capsys):
    from bam_megatron.training.domain_embeddings import sample_domain

    out = tmp_path / "domains.pt"
    argv = ["--load", dense_models["seed"], "--domain", f"low:{datasets['low']}", f"high:{datasets['high']}",
            "--tokens", "100", "--seq-length", "16", "--micro-batch-size", "3", "--seed", "7", "-o", out]
    rc, stdout, err = _run(de_cli, argv, capsys)
    assert rc == 0, err
    assert "[domain-embeddings] low: 100 tokens" in err and "domain embeddings [2, 64] of low, high" in stdout
    de = load_domain_embeddings(str(out))
    assert de.names == ["low", "high"] and de.embeddings.shape == (2, 64)
    assert de.provenance["tokens"] == {"low": 100, "high": 100} and de.provenance["seq_length"] == 16
    assert de.provenance["checkpoint"] == os.path.abspath(resolve_checkpoint_dir(dense_models["seed"]))
    assert "final hidden states" in de.provenance["representation"]
    for i, name in enumerate(de.names):
        sample = sample_domain(name, datasets[name], 100, 16, 7)
        assert sample.rows.shape == (6, 16) and sample.tail.size == 4  # 100 = 6 x 16 + 4
        ref = _reference_mean(dense_models["seed"], sample)
        torch.testing.assert_close(de.embeddings[i].double(), ref, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(de.embeddings[0], de.embeddings[1], atol=1e-3)

    for domain, output, fragment in ((["nocolon"], tmp_path / "x.pt", "is not NAME:PREFIX"),
                                     ([f"x:{tmp_path / 'none'}"], tmp_path / "x.pt", "give the prefix of an indexed dataset"),
                                     ([f"low:{datasets['low']}"], out, "exists; pass --force")):
        rc, stdout, err = _run(de_cli, ["--load", dense_models["seed"], "--domain", *domain, "-o", output], capsys)
        lines = err.strip().splitlines()
        assert rc == 1 and len(lines) == 1 and fragment in lines[0], err
    assert sorted(os.listdir(tmp_path)) == ["domains.pt"]


def test_nexus_mix_tensors_and_recorded_arguments(dense_models, domain_file, tmp_path, capsys):
    m = dense_models
    out = tmp_path / "nexus"
    rc, stdout, err = _run(upcycle_cli, ["-o", out, "--router", "nexus", "--domain-embeddings", domain_file, "--domains", "c,b",
                                         "--nexus-projection-size", "48", "--moe-aux-loss-coeff", "0.01", m["seed"], m["c"], m["b"]], capsys)
    assert rc == 0, err
    assert "FFN experts per layer: 2 + 1 shared" in stdout and "Nexus router: domain embeddings of c, b" in stdout
    seeds = [_tensors(m[n]) for n in ("seed", "c", "b")]
    out_t = _tensors(out)
    assert U.FFN_ROUTER_KEY not in out_t
    assert torch.equal(out_t[U.SHARED_FC1_KEY], seeds[0][LP + "mlp.linear_fc1.weight"])
    assert torch.equal(out_t[LP + "mlp.shared_experts.linear_fc2.weight"], seeds[0][LP + "mlp.linear_fc2.weight"])
    for e in range(2):
        assert torch.equal(out_t[LP + "mlp.experts.experts.linear_fc1.weight"][:, e], seeds[e + 1][LP + "mlp.linear_fc1.weight"])
    for e in range(3):  # attention experts: every seed, the seed's included
        assert torch.equal(out_t[LP + "self_attention.linear_qkv.weight"][:, e], seeds[e][LP + "self_attention.linear_qkv.weight"])
    file = load_domain_embeddings(domain_file)
    assert torch.equal(out_t[U.NEXUS_DOMAIN_KEY], file.select(["c", "b"]).embeddings.expand(2, 2, 64))
    assert out_t[U.NEXUS_FC1_KEY].shape == (2, 96, 64) and out_t[U.NEXUS_FC2_KEY].shape == (2, 64, 48)

    common = common_state(resolve_checkpoint_dir(str(out)))
    args, up = common["args"], common["upcycling"]
    assert args["moe_router_type"] == "nexus" and args["num_experts"] == 2 and args["bam_attn_experts"] == 3
    assert (args["nexus_domain_size"], args["nexus_projection_size"], args["moe_shared_expert_intermediate_size"]) == (64, 48, 128)
    assert up["router"] == "nexus" and up["shared_expert"] and up["domain_embeddings"]["names"] == ["c", "b"]

    assert inspect_cli.main([str(out), "--no-args"]) == 0
    assert "FFN experts 2 + 1 shared; routers: attention, FFN (Nexus)" in capsys.readouterr().out
    from bam_megatron.training import pretrain

    summary = pretrain(["--skip-train", "--load", str(out), "--use-checkpoint-args", "--mock-data", "--eval-iters", "1",
                        "--micro-batch-size", "2"])
    assert 0 < summary["valid"]["valid"] < 20


def test_linear_router_with_a_shared_expert(dense_models, tmp_path, capsys):
    m = dense_models
    out = tmp_path / "linear"
    rc, stdout, err = _run(upcycle_cli, ["-o", out, "-q", "--shared-expert", "--attention-experts", "merged", m["seed"], m["b"], m["c"]], capsys)
    assert rc == 0, err
    out_t = _tensors(out)
    assert out_t[U.FFN_ROUTER_KEY].shape == (2, 2, 64) and U.SHARED_FC1_KEY in out_t and U.NEXUS_DOMAIN_KEY not in out_t
    args = common_state(resolve_checkpoint_dir(str(out)))["args"]
    assert args["moe_router_type"] == "linear" and args["moe_shared_expert_intermediate_size"] == 128 and args["num_experts"] == 2


@pytest.mark.parametrize("flags,fragment", [
    (["--router", "nexus"], "--router nexus needs --domain-embeddings FILE"),
    (["--router", "nexus", "--domain-embeddings", "{file}"], "gives 4 domain embeddings (b, c, d, e) for 2 routed FFN experts"),
    (["--router", "nexus", "--domain-embeddings", "{file}", "--domains", "b,x"], "has no domain 'x'; it holds b, c, d, e"),
    (["--domains", "b,c"], "are for --router nexus"),
    (["--router", "nexus", "--domain-embeddings", "{file}", "--domains", "b,c", "--moe-router-topk", "3"], "routed FFN experts (2"),
], ids=["no-file", "count", "unknown-domain", "linear-with-domains", "topk"])
def test_nexus_mix_bad_input_is_one_line(dense_models, domain_file, tmp_path, capsys, flags, fragment):
    m = dense_models
    argv = ["-o", tmp_path / "out", m["seed"], m["b"], m["c"]] + [f.format(file=domain_file) for f in flags]
    rc, stdout, err = _run(upcycle_cli, argv, capsys)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and fragment in lines[0], err
    assert os.listdir(tmp_path) == []
