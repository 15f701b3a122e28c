"""Tokenizers for training and data preprocessing, with Megatron-LM's type names.

Every tokenizer returned by :func:`build_tokenizer` is a megatron-core text tokenizer
(``megatron.core.tokenizers.text.text_tokenizer.MegatronTokenizerText``, a
``MegatronTokenizerBase``), so it can be handed to ``GPTDatasetConfig(tokenizer=...)`` and
offers ``tokenize``, ``detokenize``, ``vocab_size``, ``eod``, ``pad``, ``bos``, ``eos`` and
``unique_identifiers``.

Types (``--tokenizer-type``), all working offline:

* ``GPT2BPETokenizer``: ``--vocab-file`` (vocab.json / encoder.json) + ``--merge-file``
  (merges.txt / vocab.bpe). GPT-2 byte-level BPE, encoded with the ``tokenizers`` package;
  ``eod`` is ``<|endoftext|>``. A literal ``<|endoftext|>`` in the text becomes the single eod
  id, as with megatron-core's own GPT2BPETokenizer path.
* ``HuggingFaceTokenizer``: ``--tokenizer-model`` = a local ``tokenizer.json`` (or a folder
  holding one), loaded with the ``tokenizers`` package (no ``transformers``, no hub).
  Special tokens come from a ``tokenizer_config.json`` beside it when present. Text is encoded
  without the post-processor's special tokens (megatron-core's default).
* ``SentencePieceTokenizer`` / ``GPTSentencePieceTokenizer`` / ``Llama2Tokenizer``:
  ``--tokenizer-model`` = a ``.model`` file; megatron-core's SentencePiece wrapper
  (``eod`` = the model's eos id). Needs the ``sentencepiece`` package.
* ``NullTokenizer``: ``--vocab-size V``; text is space-separated integers; megatron-core's
  class: ids ``0..V-1`` plus ``eod = V``, so ``tokenizer.vocab_size == V + 1`` and
  ``eod == tokenizer.vocab_size - 1`` (as in Megatron-LM). Text that is not ids ``0..V-1`` is
  refused in one line (``CheckedNullModel``).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Tuple

from megatron.core.tokenizers import MegatronTokenizer
from megatron.core.tokenizers.text.libraries.abstract_tokenizer import (
    MegatronTokenizerTextAbstract,
)
from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer as MegatronNullModel
from megatron.core.tokenizers.text.text_tokenizer import MegatronTokenizerText

from bam_megatron.data.tokenizer_args import SENTENCEPIECE_TYPES, TOKENIZER_TYPES
from bam_megatron.errors import TokenizerConfigError

__all__ = [
    "TOKENIZER_TYPES",
    "TokenizerConfigError",
    "GPT2BPETokenizer",
    "HFTokenizersTokenizer",
    "build_tokenizer",
    "build_tokenizer_from_args",
    "padded_vocab_size",
]

GPT2_EOD_TOKEN = "<|endoftext|>"
_NO_TOKEN = -1  # id reported for a special token the vocabulary does not have




# --------------------------------------------------------------------------------------------
# Vocabulary padding (Megatron-LM's --make-vocab-size-divisible-by rule)
# --------------------------------------------------------------------------------------------


def padded_vocab_size(orig: int, divisible_by: int = 128, tp: int = 1) -> int:
    """Smallest size >= ``orig`` that is a multiple of ``divisible_by * tp``.

    This is Megatron-LM's ``_vocab_size_with_padding``: the embedding and output layers are
    built with this many rows so that every tensor-parallel shard is equal and GPU friendly.
    """
    for name, value in (("orig", orig), ("divisible_by", divisible_by), ("tp", tp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"padded_vocab_size: {name} must be a positive int, got {value!r}")
    multiple = divisible_by * tp
    return ((orig + multiple - 1) // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _require_file(flag: str, path: Optional[str], tokenizer_type: str, what: str) -> str:
    if path is None or str(path) == "":
        raise TokenizerConfigError(f"{tokenizer_type} needs {flag} ({what})")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise TokenizerConfigError(f"{flag} not found: {path}")
    return path


def _read_bpe_merges(merge_file: str) -> List[Tuple[str, str]]:
    """Read a GPT-2 merges file: an optional ``#version`` header, then one pair per line."""
    merges: List[Tuple[str, str]] = []
    with open(merge_file, "r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.rstrip("\n").rstrip("\r")
            if lineno == 1 and line.startswith("#version"):
                continue
            if not line.strip():
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not parts[0] or not parts[1]:
                raise TokenizerConfigError(
                    f"--merge-file {merge_file}:{lineno}: expected two space-separated tokens, "
                    f"got {line[:60]!r}"
                )
            merges.append((parts[0], parts[1]))
    return merges


def _special_token_content(value) -> Optional[str]:
    """A special token from tokenizer_config.json: a string or an AddedToken-like dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


# --------------------------------------------------------------------------------------------
# GPT-2 byte-level BPE
# --------------------------------------------------------------------------------------------


class _NoExtraSpecialTokens:
    """The special tokens megatron-core's tokenizer interface asks for that our libraries do not
    have (``-1`` = absent); subclasses override the ones they have."""

    @property
    def pad_id(self) -> int:
        return _NO_TOKEN

    @property
    def unk_id(self) -> int:
        return _NO_TOKEN

    @property
    def cls_id(self) -> int:
        return _NO_TOKEN

    @property
    def sep_id(self) -> int:
        return _NO_TOKEN

    @property
    def mask_id(self) -> int:
        return _NO_TOKEN

    @property
    def additional_special_tokens_ids(self) -> list:
        return []


class GPT2BPEModel(_NoExtraSpecialTokens, MegatronTokenizerTextAbstract):
    """GPT-2 byte-level BPE from a vocab.json + merges.txt pair.

    Encoding and decoding run in the ``tokenizers`` package (a ``BPE`` model with GPT-2's
    byte-level pre-tokenizer and decoder).
    """

    def __init__(self, vocab_file: str, merges_file: str) -> None:
        try:
            with open(vocab_file, "r", encoding="utf-8") as f:
                encoder = json.load(f)
        except json.JSONDecodeError as e:
            raise TokenizerConfigError(
                f"--vocab-file {vocab_file} is not valid JSON (line {e.lineno}: {e.msg})"
            ) from None
        if not isinstance(encoder, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in encoder.items()
        ):
            raise TokenizerConfigError(
                f"--vocab-file {vocab_file} must be a JSON object mapping tokens to int ids"
            )
        if GPT2_EOD_TOKEN not in encoder:
            raise TokenizerConfigError(
                f"--vocab-file {vocab_file} has no {GPT2_EOD_TOKEN!r} entry "
                "(needed as the end-of-document token)"
            )
        self.encoder: Dict[str, int] = encoder
        self.decoder: Dict[int, str] = {v: k for k, v in encoder.items()}
        merges = _read_bpe_merges(merges_file)
        self.bpe_ranks: Dict[Tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.eod_id = encoder[GPT2_EOD_TOKEN]
        self._vocab_size = max(encoder.values()) + 1
        self._fast = self._build_fast(merges)

    def _build_fast(self, merges: List[Tuple[str, str]]):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.BPE(vocab=dict(self.encoder), merges=list(merges)))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(GPT2_EOD_TOKEN, special=True, normalized=False)])
        return tok

    # -- MegatronTokenizerTextAbstract --------------------------------------------------------

    def text_to_tokens(self, text: str) -> List[str]:
        return self._fast.encode(text, add_special_tokens=False).tokens

    def tokens_to_ids(self, tokens: List[str]) -> List[int]:
        try:
            return [self.encoder[t] for t in tokens]
        except KeyError as e:
            raise ValueError(f"token {e.args[0]!r} is not in the GPT-2 vocabulary") from None

    def text_to_ids(self, text: str) -> List[int]:
        return self._fast.encode(text, add_special_tokens=False).ids

    def ids_to_tokens(self, ids: List[int]) -> List[str]:
        return [self.decoder[int(i)] for i in ids]

    def tokens_to_text(self, tokens: List[str]) -> str:
        return self._fast.decoder.decode(list(tokens))

    def ids_to_text(self, ids: List[int]) -> str:
        return self.tokens_to_text(self.ids_to_tokens(_as_list(ids)))

    def add_special_tokens(self, special_tokens) -> None:
        raise NotImplementedError("GPT2BPETokenizer has a fixed vocabulary")

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> Dict[str, int]:
        return self.encoder

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return self.decoder

    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def eos_id(self) -> int:
        return self.eod_id

    @property
    def bos_id(self) -> int:
        return self.eod_id


# --------------------------------------------------------------------------------------------
# HuggingFace `tokenizers` (tokenizer.json)
# --------------------------------------------------------------------------------------------

_EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")
_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<|startoftext|>", "<bos>", "[BOS]")
_UNK_CANDIDATES = ("<unk>", "[UNK]", "<|unk|>")


class HFTokenizersModel(_NoExtraSpecialTokens, MegatronTokenizerTextAbstract):
    """A local ``tokenizer.json`` loaded with the ``tokenizers`` package."""

    def __init__(self, tokenizer_file: str, eod_token: Optional[str] = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(
                "HuggingFaceTokenizer needs the 'tokenizers' package: pip install tokenizers"
            ) from None
        try:
            self.tokenizer = Tokenizer.from_file(tokenizer_file)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerConfigError(
                f"--tokenizer-model {tokenizer_file} is not a tokenizers JSON file: {first}"
            ) from None
        # Whole documents are tokenized: never truncate or pad.
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()

        config: dict = {}
        folder = os.path.dirname(os.path.abspath(tokenizer_file))
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                try:
                    with open(path, "r", encoding="utf-8") as f:
                        loaded = json.load(f)
                except (OSError, json.JSONDecodeError):
                    continue
                if isinstance(loaded, dict):
                    config.update(loaded)
        template = config.get("chat_template")
        self.chat_template = template if isinstance(template, str) else None

        self.eos_token = self._find("eos_token", config, _EOD_CANDIDATES, eod_token)
        if self.eos_token is None:
            raise TokenizerConfigError(
                f"--tokenizer-model {tokenizer_file}: no end-of-document token found "
                f"(no eos_token in tokenizer_config.json and none of {list(_EOD_CANDIDATES)} "
                "in the vocabulary)"
            )
        self.pad_token = self._find("pad_token", config, _PAD_CANDIDATES)
        self.bos_token = self._find("bos_token", config, _BOS_CANDIDATES)
        self.unk_token = self._find("unk_token", config, _UNK_CANDIDATES)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0

    def _find(self, key, config, candidates, explicit=None) -> Optional[str]:
        if explicit is not None:
            if self.tokenizer.token_to_id(explicit) is None:
                raise TokenizerConfigError(f"eod token {explicit!r} is not in the vocabulary")
            return explicit
        configured = _special_token_content(config.get(key))
        if configured is not None and self.tokenizer.token_to_id(configured) is not None:
            return configured
        for token in candidates:
            if self.tokenizer.token_to_id(token) is not None:
                return token
        return None

    def _id(self, token: Optional[str]) -> int:
        if token is None:
            return _NO_TOKEN
        return self.tokenizer.token_to_id(token)

    def text_to_tokens(self, text: str) -> List[str]:
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def tokens_to_ids(self, tokens: List[str]) -> List[int]:
        ids = []
        for t in tokens:
            i = self.tokenizer.token_to_id(t)
            if i is None:
                raise ValueError(f"token {t!r} is not in the vocabulary")
            ids.append(i)
        return ids

    def text_to_ids(self, text: str) -> List[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def ids_to_tokens(self, ids: List[int]) -> List[str]:
        return [self.tokenizer.id_to_token(int(i)) for i in ids]

    def tokens_to_text(self, tokens: List[str]) -> str:
        return self.ids_to_text(self.tokens_to_ids(tokens))

    def ids_to_text(self, ids: List[int]) -> str:
        return self.tokenizer.decode(_as_list(ids), skip_special_tokens=False)

    def add_special_tokens(self, special_tokens) -> None:
        tokens = list(special_tokens.values()) if isinstance(special_tokens, dict) else list(
            special_tokens
        )
        self.tokenizer.add_special_tokens(tokens)
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def vocab(self) -> Dict[str, int]:
        return self.tokenizer.get_vocab(with_added_tokens=True)

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: t for t, i in self.vocab.items()}

    @property
    def eod(self) -> int:
        return self._id(self.eos_token)

    @property
    def eos_id(self) -> int:
        return self._id(self.eos_token)

    @property
    def bos_id(self) -> int:
        return self._id(self.bos_token)

    @property
    def pad_id(self) -> int:
        return self._id(self.pad_token)

    @property
    def unk_id(self) -> int:
        return self._id(self.unk_token)


def _as_list(ids) -> List[int]:
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    return [int(i) for i in ids]


class CheckedNullModel(MegatronNullModel):
    """megatron-core's ``NullTokenizer`` library (text is space-separated token ids; ``eod`` is
    ``V``) that refuses text which is not ids of its vocabulary ``0..V-1``: megatron-core's own
    ends in ``ValueError: invalid literal for int()`` on words and passes ids past
    ``--vocab-size`` through (to be found, or not, much later)."""

    def text_to_ids(self, text: str) -> List[int]:
        size = self._vocab_size_without_eod
        ids = []
        for piece in text.split():
            try:
                value = int(piece)
            except ValueError:
                raise TokenizerConfigError(
                    f"the NullTokenizer reads text as space-separated token ids 0..{size - 1}, and "
                    f"{piece[:40]!r} is not a number"
                ) from None
            if not 0 <= value < size:
                raise TokenizerConfigError(
                    f"token id {value} is outside the NullTokenizer's vocabulary 0..{size - 1} "
                    f"(--vocab-size {size})"
                )
            ids.append(value)
        return ids


# --------------------------------------------------------------------------------------------
# megatron-core tokenizer objects around our libraries
# --------------------------------------------------------------------------------------------


class _OfflineTextTokenizer(MegatronTokenizerText):
    """``MegatronTokenizerText`` whose library object is one of ours (not in megatron-core's
    fixed library table). Subclasses set ``_library_name`` and implement ``_make_library``."""

    _library_name = "offline"

    def __init__(self, path: str, **kwargs) -> None:
        config = {
            "library": self._library_name,
            "class_name": type(self).__name__,
            "class_path": type(self).__module__,
            "model_type": "gpt",
            "chat_template": None,
        }
        # kwargs end up in unique_identifiers (dataset cache hashes): plain values only.
        super().__init__(path, config, **kwargs)

    def _restore_model(self, **kwargs) -> MegatronTokenizerTextAbstract:
        return self._make_library(**kwargs)

    def _make_library(self, **kwargs) -> MegatronTokenizerTextAbstract:
        raise NotImplementedError


class GPT2BPETokenizer(_OfflineTextTokenizer):
    """GPT-2 BPE (Megatron-LM's ``GPT2BPETokenizer``) as a megatron-core tokenizer."""

    _library_name = "gpt2-bpe"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        super().__init__(vocab_file, vocab_file=vocab_file, merges_file=merge_file)

    def _make_library(self, vocab_file: str, merges_file: str, **_) -> GPT2BPEModel:
        return GPT2BPEModel(vocab_file, merges_file)


class HFTokenizersTokenizer(_OfflineTextTokenizer):
    """A local tokenizer.json (Megatron-LM's ``HuggingFaceTokenizer``) without transformers."""

    _library_name = "hf-tokenizers"

    def __init__(self, tokenizer_file: str, eod_token: Optional[str] = None) -> None:
        kwargs = {} if eod_token is None else {"eod_token": eod_token}
        super().__init__(tokenizer_file, **kwargs)

    def _make_library(self, eod_token: Optional[str] = None, **_) -> HFTokenizersModel:
        return HFTokenizersModel(self.path, eod_token=eod_token)


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def build_tokenizer(
    tokenizer_type: str,
    *,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    tokenizer_model: Optional[str] = None,
    vocab_size: Optional[int] = None,
    eod_token: Optional[str] = None,
) -> MegatronTokenizerText:
    """Build a megatron-core tokenizer from Megatron-LM style settings.

    Raises :class:`TokenizerConfigError` (one line, naming the flag and path) when a required
    flag is missing or a file does not exist.
    """
    if tokenizer_type == "GPT2BPETokenizer":
        vocab_file = _require_file("--vocab-file", vocab_file, tokenizer_type, "vocab.json")
        merge_file = _require_file("--merge-file", merge_file, tokenizer_type, "merges.txt")
        return GPT2BPETokenizer(vocab_file, merge_file)

    if tokenizer_type == "HuggingFaceTokenizer":
        path = _require_file(
            "--tokenizer-model", tokenizer_model, tokenizer_type, "a tokenizer.json file"
        )
        if os.path.isdir(path):
            inner = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(inner):
                raise TokenizerConfigError(f"--tokenizer-model not found: {inner}")
            path = inner
        return HFTokenizersTokenizer(path, eod_token=eod_token)

    if tokenizer_type in SENTENCEPIECE_TYPES:
        path = _require_file(
            "--tokenizer-model", tokenizer_model, tokenizer_type, "a SentencePiece .model file"
        )
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            raise ImportError(
                f"{tokenizer_type} needs the 'sentencepiece' package: pip install sentencepiece"
            ) from None
        if os.path.isdir(path):
            raise TokenizerConfigError(
                f"--tokenizer-model must be a SentencePiece .model file, got a folder: {path}"
            )
        try:
            return MegatronTokenizer.from_pretrained(
                tokenizer_path=path, metadata_path={"library": "sentencepiece"}
            )
        except (OSError, RuntimeError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerConfigError(
                f"--tokenizer-model {path} is not a SentencePiece model: {first}"
            ) from None

    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise TokenizerConfigError("NullTokenizer needs --vocab-size")
        if isinstance(vocab_size, bool) or int(vocab_size) != vocab_size or vocab_size < 1:
            raise TokenizerConfigError(f"--vocab-size must be a positive int, got {vocab_size!r}")
        tokenizer = MegatronTokenizer.from_pretrained(
            metadata_path={"library": "null"}, vocab_size=int(vocab_size)
        )
        # megatron-core's object (its class names the dataset caches) around a checked library
        tokenizer._tokenizer = CheckedNullModel(int(vocab_size))
        return tokenizer

    raise TokenizerConfigError(
        f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}"
    )


def build_tokenizer_from_args(args: argparse.Namespace) -> MegatronTokenizerText:
    """:func:`build_tokenizer` from an argparse namespace made with ``tokenizer_args.add_tokenizer_args``."""
    return build_tokenizer(
        args.tokenizer_type,
        vocab_file=getattr(args, "vocab_file", None),
        merge_file=getattr(args, "merge_file", None),
        tokenizer_model=getattr(args, "tokenizer_model", None),
        vocab_size=getattr(args, "vocab_size", None),
    )
