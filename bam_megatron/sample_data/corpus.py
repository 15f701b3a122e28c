"""The sample corpus's documents: constants, chunking at natural boundaries, and the
deterministic train / validation split by held-out sources."""

from __future__ import annotations

import random
import re
import sys
from dataclasses import dataclass
from typing import Dict, Iterable, List, Sequence, Tuple

from bam_megatron.errors import BAMError

DOMAINS = ("code", "legal", "english", "math")
SPLITS = ("train", "valid")
EOD_TOKEN = "<|endoftext|>"

DEFAULT_TRAIN_BYTES = 1_100_000
DEFAULT_VALID_BYTES = 60_000
DEFAULT_CHUNK_CHARS = 4096
MIN_DOC_CHARS = 64
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_SEED = 1234


class BuildError(BAMError):
    """A problem fetching or reading a source; the message is one line."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # the unit held out as a whole: a module, a licence, a play, a problem set


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _normalize_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _paragraph_units(text: str) -> List[str]:
    """Paragraphs: pieces that start after a blank line (each keeps its trailing newlines)."""
    return [u for u in re.split(r"(?<=\n\n)(?=[^\n])", text) if u]


def _code_units(text: str) -> List[str]:
    """Top-level statements: pieces that start at column 0 after a blank line."""
    return [u for u in re.split(r"(?<=\n\n)(?=[^\s#])", text) if u]


def _split_long(unit: str, max_chars: int) -> List[str]:
    """Split a piece longer than ``max_chars`` at blank lines, then lines, then characters."""
    if len(unit) <= max_chars:
        return [unit]
    for splitter in (_paragraph_units, lambda s: s.splitlines(keepends=True)):
        parts = splitter(unit)
        if len(parts) > 1:
            return _pack(parts, max_chars)
    return [unit[i:i + max_chars] for i in range(0, len(unit), max_chars)]


def _pack(units: Sequence[str], max_chars: int) -> List[str]:
    """Greedily join consecutive units into chunks of at most ``max_chars`` characters."""
    chunks: List[str] = []
    current = ""
    for unit in units:
        for piece in _split_long(unit, max_chars):
            if current and len(current) + len(piece) > max_chars:
                chunks.append(current)
                current = ""
            current += piece
    if current:
        chunks.append(current)
    return chunks


def chunk_text(text: str, max_chars: int, kind: str = "prose") -> List[str]:
    """Split ``text`` into chunks of at most ``max_chars`` characters at natural boundaries.

    ``kind`` is ``"code"`` (top-level statements) or ``"prose"`` (paragraphs). Chunks keep
    their text verbatim except for surrounding blank lines; tiny chunks are dropped.
    """
    text = _normalize_newlines(text)
    units = _code_units(text) if kind == "code" else _paragraph_units(text)
    chunks = []
    for chunk in _pack(units, max_chars):
        chunk = chunk.strip("\n")
        if len(chunk.strip()) >= MIN_DOC_CHARS:
            chunks.append(chunk + "\n")
    return chunks


def _nbytes(doc: Document) -> int:
    return len(doc.text.encode("utf-8"))


def dedupe(docs: Iterable[Document]) -> List[Document]:
    """Drop exact duplicate texts (the first occurrence wins) and texts holding the eod token."""
    seen, out = set(), []
    for doc in docs:
        if doc.text in seen or EOD_TOKEN in doc.text:
            continue
        seen.add(doc.text)
        out.append(doc)
    return out


LONG_PARAGRAPH_CHARS = 120


def long_paragraphs(text: str) -> set:
    """The whitespace-normalised paragraphs of at least ``LONG_PARAGRAPH_CHARS`` characters."""
    out = set()
    for para in re.split(r"\n\s*\n", text):
        norm = " ".join(para.split())
        if len(norm) >= LONG_PARAGRAPH_CHARS:
            out.add(norm)
    return out


def split_documents(docs: Sequence[Document], seed: int, train_bytes: int,
                    valid_bytes: int) -> Tuple[List[Document], List[Document]]:
    """Held-out validation sources first, then a random train sample of the other sources.

    Sources are shuffled with ``seed``; the documents of the first sources go, in order, to
    validation until it holds ``valid_bytes``; every source that gave validation any document
    is left out of train, and so is every document that shares a long paragraph with
    validation (licences reuse whole clauses). Train takes a seeded random sample of the
    remaining documents up to ``train_bytes``. Both lists come back in the input order.
    """
    docs = dedupe(docs)
    rng = random.Random(seed)
    sources = sorted({d.source for d in docs})
    rng.shuffle(sources)
    by_source: Dict[str, List[int]] = {}
    for i, d in enumerate(docs):
        by_source.setdefault(d.source, []).append(i)

    valid_idx: List[int] = []
    held_out = set()
    total = 0
    for source in sources:
        if total >= valid_bytes:
            break
        held_out.add(source)
        for i in by_source[source]:
            if total >= valid_bytes:
                break
            valid_idx.append(i)
            total += _nbytes(docs[i])

    valid_paragraphs = set()
    for i in valid_idx:
        valid_paragraphs |= long_paragraphs(docs[i].text)
    candidates = [i for i, d in enumerate(docs) if d.source not in held_out
                  and not (long_paragraphs(d.text) & valid_paragraphs)]
    rng.shuffle(candidates)
    train_idx: List[int] = []
    total = 0
    for i in candidates:
        n = _nbytes(docs[i])
        if total + n <= train_bytes:
            train_idx.append(i)
            total += n
        if total >= train_bytes - 256:
            break
    return [docs[i] for i in sorted(train_idx)], [docs[i] for i in sorted(valid_idx)]
