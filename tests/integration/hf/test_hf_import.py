"""tools/hf_import.py: every supported architecture imports exactly.

The imported checkpoint is loaded into this project's model through the recorded arguments
(``--use-checkpoint-args``), and its logits are compared with transformers' own model on the
same tokens (fp32).
"""

import json
import os

import pytest
import torch
from support.checkpoints import common_state
from support.hf import VOCAB, hf_logits, load_ours, make_hf_model, our_logits, tokens
from support.hf_cases import IMPORT_CASES

from bam_megatron.checkpoint.opener import resolve_checkpoint_dir
from bam_megatron.cli import hf_import as cli
from bam_megatron.hf.importer import ImportOptions, hf_import

TOL = 1e-4


@pytest.mark.parametrize("name", list(IMPORT_CASES))
def test_import_gives_transformers_logits(single_process, hf_models, tmp_path, name):
    folder, model = hf_models[name]
    hf_import(folder, str(tmp_path / "ckpt"), ImportOptions())
    ours = load_ours(str(tmp_path / "ckpt"))
    ids = tokens()
    expected, got = hf_logits(model, ids), our_logits(ours, ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOL
    assert expected.std() > 0.2  # the redrawn weights make distinct logits (not 0.02-init flat ones)


def test_cli_records_model_and_tokenizer(hf_models, tmp_path, capsys):
    folder, _ = hf_models["cohere"]
    out = tmp_path / "cohere"
    assert cli.main([folder, "--output", str(out), "--seq-length", "64"]) == 0
    captured = capsys.readouterr()
    assert "imported CohereForCausalLM" in captured.out and "[hf_import]" in captured.err
    # the closing hint trains into a folder of its own, never into the import
    trained = f"{out}_trained"
    assert f"--pretrained-checkpoint {out} --use-checkpoint-args --load {trained} --save {trained}" in captured.out
    assert f"--load {out} " not in captured.out
    args = common_state(resolve_checkpoint_dir(str(out)))["args"]
    assert args["tokenizer_type"] == "HuggingFaceTokenizer" and args["tokenizer_model"] == "tokenizer/tokenizer.json"
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "tokenizer" / "tokenizer_config.json").is_file()
    assert args["rotary_interleaved"] and not args["bam_sequential_block"] and args["normalization"] == "LayerNorm"
    assert args["seq_length"] == 64 and args["untie_embeddings_and_output_weights"] and args["padded_vocab_size"] == VOCAB
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_sharded_bf16_input_and_padded_vocabulary(single_process, tmp_path):
    """A sharded bf16 folder whose vocabulary (200) is not a multiple of 128: the embedding is
    padded with zero rows and the logits of the real tokens are transformers'."""
    model = make_hf_model(str(tmp_path / "fp32"), "Qwen2Config", seed=5, vocab_size=200, tokenizer=False)
    folder = str(tmp_path / "hf")
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="40KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    result = hf_import(folder, str(tmp_path / "ckpt"), ImportOptions(dtype=torch.float32))
    assert result.spec.vocab_size == 256 and result.tokenizer is None
    ours = load_ours(str(tmp_path / "ckpt"))
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tokens(vocab=200)
    expected = hf_logits(reloaded, ids)
    got = our_logits(ours, ids)
    assert (got[..., :200] - expected).abs().max().item() <= TOL


def test_tokenizer_smaller_than_the_vocabulary_records_the_padding_to_train_with(tmp_path):
    folder = str(tmp_path / "hf")
    make_hf_model(folder, "LlamaConfig", vocab_size=384, tokenizer=False)
    from support.hf import write_tokenizer

    write_tokenizer(folder, 250)  # pads to 256 with the default 128, not to the model's 384
    result = hf_import(folder, str(tmp_path / "ckpt"), ImportOptions())
    multiple = result.args["make_vocab_size_divisible_by"]
    assert -(-250 // multiple) * multiple == 384
    assert any("--make-vocab-size-divisible-by" in n for n in result.notes)
    with open(tmp_path / "ckpt" / "tokenizer" / "tokenizer_config.json") as f:
        assert json.load(f)["eos_token"] == "<eos>"
