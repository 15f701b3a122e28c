"""--use-checkpoint-args on recorded arguments: this project's dict and Megatron-LM's pickled
Namespace; the model and tokenizer restored, replaced command-line values named, a tokenizer
copied beside the checkpoint found there, training settings taken unless given."""

import argparse
import os

import pytest
from megatron.core.transformer.enums import AttnBackend
from support.checkpoints import write_checkpoint

from bam_megatron.checkpoint.opener import open_checkpoint
from bam_megatron.errors import CheckpointError
from bam_megatron.training.arguments import build_parser
from bam_megatron.training.checkpoint_args import merge_checkpoint_args


def _checkpoint(root, args) -> str:
    return write_checkpoint(root, {"args": args, "iteration": 10})


def _merge(argv, ckpt):
    parser = build_parser()
    args = parser.parse_args(argv)
    log = []
    merge_checkpoint_args(args, open_checkpoint(ckpt), parser.get_default, log=log.append)
    return args, log


def test_own_checkpoint_restores_model_tokenizer_and_training_settings(tmp_path):
    root = str(tmp_path / "ckpt")
    os.makedirs(os.path.join(root, "tokenizer"))
    open(os.path.join(root, "tokenizer", "tokenizer.json"), "w").write("{}")
    ckpt = _checkpoint(root, {
        "num_layers": 3, "hidden_size": 96, "num_attention_heads": 6, "seq_length": 64, "swiglu": True,
        "tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "tokenizer/tokenizer.json",
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "moe_aux_loss_coeff": 0.02, "bam_attn_experts": 4,
    })
    args, log = _merge(["--hidden-size", "64", "--attention-dropout", "0.3"], ckpt)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.bam_attn_experts) == (3, 96, 6, 4)
    assert args.tokenizer_type == "HuggingFaceTokenizer"
    assert args.tokenizer_model == os.path.join(root, "tokenizer", "tokenizer.json")  # found beside it
    assert args.hidden_dropout == 0.0 and args.moe_aux_loss_coeff == 0.02
    assert args.attention_dropout == 0.3  # given on the command line: kept
    assert any("--hidden-size 96" in line and "replaces 64" in line for line in log), log
    assert any("--moe-aux-loss-coeff 0.02" in line for line in log), log
    assert not any("--num-layers" in line for line in log)  # not given: nothing replaced


def test_megatron_lm_namespace_with_enums(tmp_path):
    root = tmp_path / "mlm"
    root.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (root / name).write_text("{}" if name.endswith("json") else "#version: 0.2\n")
    ns = argparse.Namespace(
        num_layers=2, hidden_size=64, num_attention_heads=4, group_query_attention=False, num_query_groups=1,
        kv_channels=None, seq_length=32, tokenizer_type="GPT2BPETokenizer", vocab_file="vocab.json",
        merge_file="merges.txt", normalization="RMSNorm", attention_backend=AttnBackend.auto,
    )
    args, _log = _merge([], _checkpoint(str(root), ns))
    assert (args.num_layers, args.hidden_size, args.num_attention_heads) == (2, 64, 4)
    assert args.num_query_groups == 4  # Megatron-LM's 1 only counts with --group-query-attention
    assert args.kv_channels is None  # unset in Megatron-LM: derived by finalize_args, as Megatron-LM does
    assert args.tokenizer_type == "GPT2BPETokenizer"
    assert args.vocab_file == str(root / "vocab.json") and args.merge_file == str(root / "merges.txt")
    assert args.normalization == "RMSNorm"


def test_missing_tokenizer_file_is_one_line_naming_the_flag(tmp_path):
    ckpt = _checkpoint(str(tmp_path / "c"), {"num_layers": 2, "tokenizer_type": "HuggingFaceTokenizer",
                                             "tokenizer_model": "tokenizer/tokenizer.json"})
    with pytest.raises(CheckpointError, match="--tokenizer-model PATH"):
        _merge([], ckpt)


def test_explicit_tokenizer_path_on_the_command_line_wins(tmp_path):
    ckpt = _checkpoint(str(tmp_path / "c"), {"num_layers": 2, "tokenizer_type": "HuggingFaceTokenizer",
                                             "tokenizer_model": "/nowhere/tokenizer.json"})
    args, _log = _merge(["--tokenizer-model", "mine.json"], ckpt)
    assert args.tokenizer_model == "mine.json" and args.tokenizer_type == "HuggingFaceTokenizer"
