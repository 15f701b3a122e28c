"""A Megatron-LM checkpoint (recorded ``args`` as a pickled ``Namespace`` with megatron-core
enums and a torch dtype, no grouped-query attention — ``num_query_groups`` 1, which only counts
with ``--group-query-attention`` —, Transformer Engine names of the fused norms) opens in every
program with its real head layout: each program gives the same result on it as on the
checkpoint of ours it was made from."""

import argparse
import json
import os

import pytest
import torch
from megatron.core.transformer.enums import AttnBackend
from support.checkpoints import common_state
from support.training import MOCK, NO_DROPOUT, TINY

from bam_megatron import training
from bam_megatron.checkpoint.keys import LAYER_PREFIX, is_model_entry
from bam_megatron.checkpoint.layout import TRACKER
from bam_megatron.checkpoint.opener import open_checkpoint, resolve_checkpoint_dir
from bam_megatron.checkpoint.weights import read_global_tensors, save_global_tensors
from bam_megatron.cli import domain_embeddings, evaluate, generate, hf_export, inspect_checkpoint, upcycle

SEED = TINY + NO_DROPOUT + MOCK + ["--bam-sequential-block"]
TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _as_megatron_lm(ours: str, root: str) -> None:
    """``ours`` rewritten as Megatron-LM writes it (see the module docstring)."""
    from bam_megatron.parallel.distributed import destroy_distributed, init_distributed

    tensors = {}
    for key, t in read_global_tensors(ours).items():
        if torch.is_tensor(t) and is_model_entry(key):
            name = key[len(LAYER_PREFIX):] if key.startswith(LAYER_PREFIX) else None
            tensors[LAYER_PREFIX + TE_NAMES[name] if name in TE_NAMES else key] = t
    ckpt = os.path.join(root, "iter_0000002")
    init_distributed(seed=1)
    try:
        save_global_tensors(tensors, ckpt)
    finally:
        destroy_distributed()
    recorded = common_state(ours)["args"]
    names = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings",
             "swiglu", "normalization", "norm_epsilon", "position_embedding_type", "rotary_base", "rotary_percent",
             "untie_embeddings_and_output_weights", "add_bias_linear", "padded_vocab_size", "init_method_std",
             "make_vocab_size_divisible_by", "tokenizer_type", "vocab_size", "hidden_dropout", "attention_dropout")
    ns = argparse.Namespace(**{k: recorded[k] for k in names}, group_query_attention=False, num_query_groups=1,
                            kv_channels=16, params_dtype=torch.float32, attention_backend=AttnBackend.auto,
                            transformer_impl="transformer_engine", ckpt_format="torch_dist")
    torch.save({"args": ns, "iteration": 2, "checkpoint_version": 3.0}, os.path.join(ckpt, "common.pt"))
    with open(os.path.join(root, TRACKER), "w") as f:
        f.write("2")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlm")
    ours = str(d / "ours")
    training.pretrain(SEED + ["--train-iters", "2", "--lr-warmup-iters", "1", "--save", ours])
    mlm = str(d / "mlm")
    _as_megatron_lm(resolve_checkpoint_dir(ours), mlm)
    return {"ours": ours, "mlm": mlm, "dir": d}


def _run(main, argv, capsys):
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_the_opener_reads_the_real_head_layout(pair):
    ckpt = open_checkpoint(pair["mlm"])
    assert ckpt.model.num_query_groups == 4 and ckpt.model.num_attention_heads == 4
    assert ckpt.model.bam_sequential_block is True  # from the Transformer Engine norm names
    assert ckpt.verification.summary() == "no checksums recorded (structure checked only)"


def test_every_program_gives_the_same_result_as_on_ours(pair, tmp_path, capsys):
    d = pair["dir"]
    info = json.loads(_run(inspect_checkpoint.main, [pair["mlm"], "--json"], capsys))
    assert info["model"]["num_query_groups"] == 4

    _run(upcycle.main, ["-q", "-o", str(tmp_path / "moe"), pair["mlm"], pair["mlm"]], capsys)
    assert common_state(str(tmp_path / "moe"))["args"]["num_query_groups"] == 4

    for name in ("ours", "mlm"):
        _run(hf_export.main, ["-q", pair[name], "-o", str(tmp_path / f"hf_{name}")], capsys)
    configs = [json.load(open(tmp_path / f"hf_{n}" / "config.json")) for n in ("ours", "mlm")]
    assert configs[1]["num_key_value_heads"] == 4 and configs[0] == configs[1]

    gen = {name: _run(generate.main, ["-q", "--load", pair[name], "--prompt-token-ids", "5,6,7,8", "--greedy",
                                       "--output-format", "json", "--max-new-tokens", "4"], capsys) for name in ("ours", "mlm")}
    assert gen["ours"] == gen["mlm"] and json.loads(gen["mlm"])["generated_ids"]

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"context": f"{i} {i + 1}", "choices": [f" {i + 2}", " 90"], "gold": 0}) + "\n"
                             for i in range(6)))
    for name in ("ours", "mlm"):
        _run(evaluate.main, ["--model", f"m={pair[name]}", "--tasks", f"t={tasks}", "--out-dir", str(tmp_path / f"eval_{name}")],
             capsys)
    csv = [(tmp_path / f"eval_{n}" / "results.csv").read_text() for n in ("ours", "mlm")]
    assert csv[0] == csv[1]

    prefix = _dataset(d)
    for name in ("ours", "mlm"):
        _run(domain_embeddings.main, ["-q", "--load", pair[name], "--domain", f"a:{prefix}", "-o",
                                      str(tmp_path / f"de_{name}.pt"), "--tokens", "64"], capsys)
    emb = [torch.load(tmp_path / f"de_{n}.pt")["embeddings"] for n in ("ours", "mlm")]
    assert torch.equal(emb[0], emb[1])

    losses = {}
    for name in ("ours", "mlm"):
        save = str(tmp_path / f"ft_{name}")
        summary = training.pretrain(["--pretrained-checkpoint", pair[name], "--use-checkpoint-args", "--mock-data",
                                     "--load", save, "--save", save, "--train-iters", "2", "--micro-batch-size", "4",
                                     "--global-batch-size", "8", "--lr", "1e-3", "--eval-iters", "1", "--log-interval", "1"])
        losses[name] = summary["train_losses"]
    assert losses["ours"] == losses["mlm"]


def _dataset(d) -> str:
    from bam_megatron.cli.preprocess import preprocess

    with open(d / "docs.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"text": " ".join(str((i + k) % 100) for k in range(40))}) + "\n")
    preprocess(["--input", str(d / "docs.jsonl"), "--output-prefix", str(d / "docs"), "--tokenizer-type", "NullTokenizer",
                "--vocab-size", "128", "--append-eod", "--workers", "1"])
    return str(d / "docs_text_document")
