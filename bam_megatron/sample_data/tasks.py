"""The bundled multiple-choice tasks: "which continuation is the real one?", per domain.

Built from the held-out documents (``data/<domain>_valid.jsonl``), so no model trained on the
bundled corpus has seen them. Each item cuts a document at a word boundary: the ``context`` is
about ``context_chars`` characters before the cut, the gold choice is the real text after it
(about ``continuation_chars`` characters, ending at a word boundary), and the other choices are
spans of similar length from other documents of the same domain, starting with the same
separator character (space or newline) as the real one. The position of the real choice is
drawn at random. Everything is seeded and every list sorted: the same corpus gives byte-identical
files.

One JSON object per line (the schema ``bam_megatron/evaluation/tasks.py`` reads)::

    {"id": "code-0", "context": "...", "choices": [" a", " b", " c", " d"], "gold": 2, "source": "..."}

A choice is appended to the context as it is (its leading whitespace is part of it).
"""

from __future__ import annotations

import json
import os
import random
from typing import Dict, List, Optional, Sequence

DOMAINS = ("code", "legal", "math", "english")
DEFAULT_ITEMS = 50
DEFAULT_CHOICES = 4
DEFAULT_CONTEXT_CHARS = 160
DEFAULT_CONTINUATION_CHARS = 48
DEFAULT_SEED = 1234


def _boundaries(text: str) -> List[int]:
    """Positions ``p`` where a word ends: ``text[p]`` is whitespace, ``text[p-1]`` is not."""
    return [p for p in range(1, len(text)) if text[p].isspace() and not text[p - 1].isspace()]


def _span(text: str, start: int, chars: int, ends: Sequence[int]) -> Optional[str]:
    """``text[start:end]`` with ``end`` the word end closest to ``start + chars`` (within ±25%),
    or None when there is none or the span is only whitespace."""
    lo, hi = start + int(chars * 0.75), start + int(chars * 1.25)
    candidates = [e for e in ends if lo <= e <= hi]
    if not candidates:
        return None
    end = min(candidates, key=lambda e: (abs(e - start - chars), e))
    span = text[start:end]
    return span if span.strip() else None


def _context(text: str, cut: int, chars: int) -> str:
    """About ``chars`` characters before ``cut``, starting after whitespace (a whole word)."""
    start = max(0, cut - chars)
    if start > 0:
        nxt = next((p + 1 for p in range(start, cut) if text[p].isspace()), start)
        start = nxt if nxt < cut else start
    return text[start:cut]


def _distractor(rng: random.Random, docs: List[dict], avoid: int, first: str, chars: int, taken: set) -> Optional[str]:
    """A span of another document that starts with ``first`` and is about ``chars`` long."""
    for _ in range(200):
        j = rng.randrange(len(docs))
        if j == avoid:
            continue
        text, ends = docs[j]["text"], docs[j]["ends"]
        starts = [p for p in ends if text[p] == first]
        if not starts:
            continue
        span = _span(text, rng.choice(starts), chars, ends)
        if span is not None and span not in taken:
            return span
    return None


def build_items(domain: str, documents: List[dict], *, items: int = DEFAULT_ITEMS, choices: int = DEFAULT_CHOICES,
                context_chars: int = DEFAULT_CONTEXT_CHARS, continuation_chars: int = DEFAULT_CONTINUATION_CHARS,
                seed: int = DEFAULT_SEED) -> List[dict]:
    """``items`` multiple-choice items from one domain's held-out ``documents``
    (``{"text", "source"}`` dicts, in file order)."""
    rng = random.Random(f"{seed}:{domain}")
    docs = [dict(d, ends=_boundaries(d["text"])) for d in documents if len(d["text"]) > context_chars + 2 * continuation_chars]
    if len(docs) < 2:
        raise ValueError(f"{domain}: need at least two held-out documents longer than {context_chars + 2 * continuation_chars} characters")
    out, used = [], set()
    while len(out) < items:
        i = rng.randrange(len(docs))
        text, ends = docs[i]["text"], docs[i]["ends"]
        cuts = [p for p in ends if context_chars // 2 <= p <= len(text) - continuation_chars]
        if not cuts:
            continue
        cut = rng.choice(cuts)
        gold = _span(text, cut, continuation_chars, ends)
        if gold is None or (i, cut) in used:
            continue
        taken = {gold}
        spans = [_distractor(rng, docs, i, gold[0], len(gold), taken) for _ in range(choices - 1)]
        if any(s is None for s in spans) or len(set(spans)) < len(spans):
            continue
        used.add((i, cut))
        position = rng.randrange(choices)
        spans.insert(position, gold)
        out.append({"id": f"{domain}-{len(out)}", "context": _context(text, cut, context_chars),
                    "choices": spans, "gold": position, "source": docs[i].get("source", "")})
    return out


def build_tasks(data_dir: str, out_dir: str, domains: Sequence[str] = DOMAINS, **options) -> Dict[str, str]:
    """Write ``<out_dir>/<domain>.jsonl`` for every domain from ``<data_dir>/<domain>_valid.jsonl``.
    Returns ``{domain: path}``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for domain in domains:
        with open(os.path.join(data_dir, f"{domain}_valid.jsonl"), encoding="utf-8") as f:
            documents = [json.loads(line) for line in f if line.strip()]
        path = os.path.join(out_dir, f"{domain}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for item in build_items(domain, documents, **options):
                f.write(json.dumps(item, ensure_ascii=False) + "\n")
        paths[domain] = path
    return paths
