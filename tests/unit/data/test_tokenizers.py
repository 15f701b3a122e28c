"""The tokenizers: megatron-core tokenizer objects for every type, one-line errors."""

import json
import re

import pytest
from megatron.core.tokenizers import MegatronTokenizerBase  # noqa: E402
from support.data import NULL_VOCAB

from bam_megatron.data.tokenizers import (  # noqa: E402
    GPT2BPETokenizer,
    TokenizerConfigError,
    build_tokenizer,
    padded_vocab_size,
)

# --------------------------------------------------------------------------------------------


def test_padded_vocab_size():
    assert padded_vocab_size(50257, 128, 1) == 50304
    assert padded_vocab_size(50257, 128, 8) == 51200
    assert padded_vocab_size(32000, 128, 2) == 32000
    assert padded_vocab_size(101, 8, 1) == 104
    with pytest.raises(ValueError, match="tp must be a positive int"):
        padded_vocab_size(100, 128, 0)


def test_null_tokenizer_is_megatron_core_and_eod_is_last(null_tok):
    assert isinstance(null_tok, MegatronTokenizerBase)
    assert null_tok.vocab_size == NULL_VOCAB + 1
    assert null_tok.eod == NULL_VOCAB == null_tok.vocab_size - 1
    assert null_tok.tokenize("3 14 15") == [3, 14, 15]
    assert null_tok.detokenize([3, 14, 15]) == "3 14 15"


@pytest.mark.parametrize(
    "ttype, kwargs, match",
    [
        ("GPT2BPETokenizer", {}, r"GPT2BPETokenizer needs --vocab-file"),
        ("GPT2BPETokenizer", {"vocab_file": "MISSING/v.json", "merge_file": "x"},
         r"--vocab-file not found: MISSING/v\.json"),
        ("GPT2BPETokenizer", {"vocab_file": "VOCAB", "merge_file": "MISSING/m.txt"},
         r"--merge-file not found: MISSING/m\.txt"),
        ("HuggingFaceTokenizer", {"tokenizer_model": "MISSING/tokenizer.json"},
         r"--tokenizer-model not found: MISSING/tokenizer\.json"),
        ("SentencePieceTokenizer", {"tokenizer_model": "MISSING/sp.model"},
         r"--tokenizer-model not found: MISSING/sp\.model"),
        ("NullTokenizer", {}, r"NullTokenizer needs --vocab-size"),
        ("BertWordPieceCase", {}, r"unknown --tokenizer-type 'BertWordPieceCase'"),
    ],
)
def test_tokenizer_errors_name_flag_and_path(ttype, kwargs, match, tmp_path):
    vocab = tmp_path / "vocab.json"
    vocab.write_text(json.dumps({"<|endoftext|>": 0}))
    kwargs = {k: str(v).replace("MISSING", str(tmp_path / "nope")).replace(
        "VOCAB", str(vocab)) for k, v in kwargs.items()}
    match = match.replace("MISSING", re.escape(str(tmp_path / "nope")))
    with pytest.raises(TokenizerConfigError, match=match) as info:
        build_tokenizer(ttype, **kwargs)
    assert "\n" not in str(info.value)


def test_gpt2_bpe_matches_hf_bytelevel(bpe_files, text_corpus):
    _, docs = text_corpus
    hf = bpe_files["hf"]
    fast = build_tokenizer("GPT2BPETokenizer", vocab_file=str(bpe_files["vocab"]),
                           merge_file=str(bpe_files["merges"]))
    direct = GPT2BPETokenizer(str(bpe_files["vocab"]), str(bpe_files["merges"]))
    assert fast.eod == hf.token_to_id("<|endoftext|>") == direct.eod
    assert fast.vocab_size == hf.get_vocab_size()
    texts = [d["text"] for d in docs if isinstance(d["text"], str) and d["text"]]
    texts.append("  leading spaces, 'quotes' we'll\n\n\r\nend\t ")
    for text in texts:
        ids = fast.tokenize(text)
        assert ids == direct.tokenize(text) == hf.encode(text, add_special_tokens=False).ids
        assert fast.detokenize(ids) == text == direct.detokenize(ids)
    # a literal end-of-text marker is the single eod id
    ids = fast.tokenize("a<|endoftext|>b")
    assert ids == direct.tokenize("a<|endoftext|>b")
    assert ids.count(fast.eod) == 1 and len(ids) == 3


def test_hf_tokenizer_from_local_tokenizer_json(bpe_files, tmp_path):
    hf = bpe_files["hf"]
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(bpe_files["dir"]))
    assert isinstance(tok, MegatronTokenizerBase)
    assert tok.eod == hf.token_to_id("<|endoftext|>")
    assert tok.pad == hf.token_to_id("<pad>")
    text = "What is 7 + 15? The answer is 22."
    assert tok.tokenize(text) == hf.encode(text, add_special_tokens=False).ids
    assert tok.detokenize(tok.tokenize(text)) == text
    # truncation stored in tokenizer.json must not cut documents
    from tokenizers import Tokenizer

    truncating = Tokenizer.from_file(str(bpe_files["json"]))
    truncating.enable_truncation(max_length=4)
    path = tmp_path / "tokenizer.json"
    truncating.save(str(path))
    tok2 = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
    assert len(truncating.encode(text).ids) == 4
    assert tok2.tokenize(text) == tok.tokenize(text) and len(tok2.tokenize(text)) > 4
    # eos from tokenizer_config.json wins over the built-in guesses
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<pad>"}))
    tok3 = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(path))
    assert tok3.eod == hf.token_to_id("<pad>")


def test_sentencepiece_tokenizer(work, text_corpus):
    import io

    import sentencepiece as spm

    _, docs = text_corpus
    lines = [d["text"] for d in docs if isinstance(d["text"], str) and d["text"]]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines * 4), model_writer=model,
                                   vocab_size=120, model_type="bpe", minloglevel=2,
                                   hard_vocab_limit=False)
    path = work / "sp.model"
    path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(path))
    assert tok.eod == sp.eos_id()
    assert tok.vocab_size == sp.get_piece_size()
    text = "What is 3 + 7? The answer is 10."
    assert tok.tokenize(text) == sp.encode(text)
    with pytest.raises(TokenizerConfigError, match="is not a SentencePiece model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(work / "text.jsonl"))


# --------------------------------------------------------------------------------------------
# tools/preprocess_data.py
