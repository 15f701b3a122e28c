"""What the opener reads from a checkpoint: the model (one reader of this project's records and
Megatron-LM's), the tokenizer with absolute paths wherever the checkpoint was moved, and the
lines it owes the user."""

import argparse
import os

import pytest
from support.checkpoints import write_checkpoint

from bam_megatron.checkpoint.opener import carry_tokenizer, open_checkpoint
from bam_megatron.data.tokenizer_args import TokenizerArgs
from bam_megatron.errors import CheckpointError
from bam_megatron.model.model_args import ModelArgs


def test_megatron_lm_group_count_only_counts_with_gqa():
    recorded = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 1,
                "group_query_attention": False, "seq_length": 32}
    assert ModelArgs.from_recorded(recorded, megatron_lm=True).num_query_groups == 4
    assert ModelArgs.from_recorded({**recorded, "group_query_attention": True}, megatron_lm=True).num_query_groups == 1
    ours = ModelArgs.from_recorded({**recorded, "num_query_groups": 2})  # our records say what they mean
    assert ours.num_query_groups == 2
    derived = ModelArgs.from_recorded({"hidden_size": 64, "num_attention_heads": 4, "seq_length": 32, "swiglu": True})
    assert (derived.kv_channels, derived.max_position_embeddings, derived.ffn_hidden_size) == (16, 32, 128)


def test_tensors_fill_what_megatron_lm_does_not_record(tmp_path):
    import torch

    tensors = {"embedding.word_embeddings.weight": torch.zeros(256, 4),
               "decoder.layers.mlp.linear_fc1.layer_norm_weight": torch.ones(2, 4)}
    ckpt = write_checkpoint(str(tmp_path / "c"), {"args": argparse.Namespace(num_layers=2), "checkpoint_version": 3.0},
                            tensors=tensors)
    opened = open_checkpoint(ckpt)
    assert opened.model.bam_sequential_block is True and opened.model.padded_vocab_size == 256
    assert "bam_sequential_block" in opened.known_model_args


def _tokenizer_files(folder):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.json"), "w") as f:
        f.write('{"model": {"vocab": {"a": 0}}}')
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        f.write('{"eos_token": "a"}')


def test_a_moved_checkpoint_finds_its_tokenizer_from_any_directory(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    _tokenizer_files(str(root / "tokenizer"))
    write_checkpoint(str(root), {"args": {"tokenizer_type": "HuggingFaceTokenizer",
                                          "tokenizer_model": "tokenizer/tokenizer.json"}, "format_version": 1})
    os.rename(root, tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved" / "tokenizer")  # any working directory
    opened = open_checkpoint("../../moved")
    assert opened.tokenizer.tokenizer_model == str(tmp_path / "moved" / "tokenizer" / "tokenizer.json")
    assert not opened.notes and opened.tokenizer_problem is None


def test_an_older_cwd_relative_record_opens_where_it_did_with_one_warning(tmp_path, monkeypatch):
    _tokenizer_files(str(tmp_path / "data" / "tok"))
    write_checkpoint(str(tmp_path / "ckpt"), {"args": {"tokenizer_type": "HuggingFaceTokenizer",
                                                       "tokenizer_model": "data/tok/tokenizer.json"}})
    monkeypatch.chdir(tmp_path)
    opened = open_checkpoint("ckpt")
    assert opened.tokenizer.tokenizer_model == str(tmp_path / "data" / "tok" / "tokenizer.json")
    assert len(opened.notes) == 1 and "WARNING" in opened.notes[0] and "relative to the working directory" in opened.notes[0]
    monkeypatch.chdir(tmp_path / "data")
    elsewhere = open_checkpoint("../ckpt")
    assert "data/tok/tokenizer.json" in elsewhere.tokenizer_problem and "--tokenizer-model PATH" in elsewhere.tokenizer_problem
    with pytest.raises(CheckpointError, match="--tokenizer-model PATH"):
        elsewhere.require_tokenizer()
    assert elsewhere.require_tokenizer(tokenizer_model="x.json").tokenizer_model == "x.json"


def test_carrying_a_tokenizer_copies_its_files_once_and_refuses_another(tmp_path):
    _tokenizer_files(str(tmp_path / "src"))
    tok = TokenizerArgs("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "src" / "tokenizer.json"))
    save = tmp_path / "save"
    save.mkdir()
    recorded = carry_tokenizer(tok, str(save))
    assert recorded.tokenizer_model == "tokenizer/tokenizer.json"
    assert sorted(os.listdir(save / "tokenizer")) == ["tokenizer.json", "tokenizer_config.json"]
    assert carry_tokenizer(tok, str(save)) == recorded  # a resumed run: the same files, nothing to do
    with open(tmp_path / "src" / "tokenizer.json", "w") as f:
        f.write('{"model": {"vocab": {"b": 0}}}')
    with pytest.raises(CheckpointError, match="holds another tokenizer"):
        carry_tokenizer(tok, str(save))
    null = TokenizerArgs("NullTokenizer", vocab_size=128)
    assert carry_tokenizer(null, str(tmp_path / "other")) == null and not (tmp_path / "other").exists()


def test_damaged_index_files_are_refused_before_they_are_read(tmp_path):
    from bam_megatron.checkpoint import integrity

    ckpt = write_checkpoint(str(tmp_path / "c"), {"args": {"num_layers": 2}})
    integrity.write_manifest(ckpt, integrity.checksum_files(ckpt, integrity.checkpoint_files(ckpt)))
    with open(os.path.join(ckpt, "common.pt"), "r+b") as f:
        f.seek(40)
        f.write(b"\xff")
    with pytest.raises(CheckpointError, match="common.pt does not match its checksum"):
        open_checkpoint(ckpt)
    from bam_megatron.checkpoint.opener import OpenOptions

    unchecked = open_checkpoint(ckpt, options=OpenOptions(checksums=False))  # the one way past it
    assert unchecked.verification.summary() == "checksums not verified (--no-checkpoint-checksums)"
