"""Fixtures of the data tests: small text and NullTokenizer corpora, a GPT-2 BPE pair, indexed datasets."""


import pytest
from support.data import NULL_VOCAB, _text_docs, _write_jsonl, build_null_data

from bam_megatron.data.tokenizers import (  # noqa: E402
    build_tokenizer,
)

# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------










@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def text_corpus(work):
    path = work / "text.jsonl"
    docs = _text_docs()
    _write_jsonl(path, docs)
    return path, docs


@pytest.fixture(scope="module")
def bpe_files(work, text_corpus):
    """A small byte-level BPE trained here: tokenizer.json plus its vocab.json/merges.txt."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    _, docs = text_corpus
    texts = []
    for d in docs:
        texts.extend(d["text"] if isinstance(d["text"], list) else [d["text"]])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts * 3, trainer)
    folder = work / "bpe"
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    tok.model.save(str(folder))
    return {"dir": folder, "json": folder / "tokenizer.json", "vocab": folder / "vocab.json",
            "merges": folder / "merges.txt", "hf": tok}


@pytest.fixture(scope="module")
def null_data(work):
    """Two NullTokenizer domains, each with a train and a held-out validation file."""
    return build_null_data(work)


@pytest.fixture(scope="module")
def null_tok():
    return build_tokenizer("NullTokenizer", vocab_size=NULL_VOCAB)






# --------------------------------------------------------------------------------------------
# tokenizers
