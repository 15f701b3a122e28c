"""What a patch targets, checked when it is entered; replacements undone when it is left.

Every module of ``patches/`` names the releases it targets (``Release``) and has a ``check()``
that runs when the patch is entered (and in ``tests/unit/patches``): the installed version
first, then the *shape* the patch relies on — the names it replaces or calls, their parameters,
the lines of library code whose behaviour it changes. The first mismatch raises
``PatchTargetError``, one line naming the library, the installed release and the targeted one.

What "the release it targets" means differs by library:

- megatron-core is pinned (``requirements.txt``: ``>=0.16.1,<0.17``): a patch targets that line
  and refuses any other release, whatever its shape;
- torch is open above (``>=2.6``; GPU users bring their own CUDA build): a patch refuses a torch
  below 2.6 and states the releases it was checked on; a newer torch runs it when the shape
  check passes (every name, parameter and line it relies on is still there), and one that
  changed any of them fails at entry in one line instead of misbehaving later;
- CPython (``requires-python >= 3.10``): likewise, by shape.

``Shared`` is the bookkeeping of a nestable patch: the outermost entry checks and installs, the
exit of the outermost entry undoes every replacement (``Replacements``) in reverse order, so
the library is left as it was found. ``entered()`` names the patches entered right now.

Imports neither torch nor megatron-core at module level.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import inspect
import os
import platform
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Tuple

from bam_megatron.errors import PatchTargetError

_MISSING = object()
_ENTERED: "collections.Counter[str]" = collections.Counter()
_ENTERED_LOCK = threading.Lock()


def _installed(library: str) -> str:
    if library == "torch":
        import torch

        return str(torch.__version__)
    if library == "megatron-core":
        import megatron.core

        return str(megatron.core.__version__)
    if library == "Python":
        return platform.python_version()
    raise ValueError(f"unknown library {library!r}")


def version_tuple(text: str) -> Tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; ``"0.16.0rc1"`` -> ``(0, 16, 0)``."""
    match = re.match(r"\d+(?:\.\d+)*", text.strip())
    if match is None:
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(x) for x in match.group(0).split("."))


def _dotted(v: Tuple[int, ...]) -> str:
    return ".".join(str(x) for x in v)


@dataclass(frozen=True)
class Release:
    """The releases of one library a patch targets.

    ``minimum``: the lowest release it runs on; ``below``: the first release it refuses (None:
    newer releases run it when its shape check passes); ``checked``: the releases it was
    checked on (for messages)."""

    library: str
    minimum: Tuple[int, ...]
    below: Optional[Tuple[int, ...]]
    checked: str

    def installed(self) -> str:
        return _installed(self.library)

    def requirement(self) -> str:
        upper = f",<{_dotted(self.below)}" if self.below else ""
        return f"{self.library}>={_dotted(self.minimum)}{upper}"

    def describe(self) -> str:
        return f"{self.requirement()}, checked on {self.checked}"

    def fits(self, installed: str) -> bool:
        v = version_tuple(installed)
        return v >= self.minimum and (self.below is None or v < self.below)


def torch_release(checked: str) -> Release:
    """torch >= 2.6 (the project's floor), checked on ``checked``; newer releases by shape."""
    return Release("torch", (2, 6), None, checked)


MEGATRON_CORE = Release("megatron-core", (0, 16, 1), (0, 17), "0.16.1")
PYTHON = Release("Python", (3, 10), None, "3.11")


def _resolve(path: str) -> Any:
    """The object named by a dotted path (``torch.cuda.Stream``, ``pkg.mod.Class.method``)."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module == exc.name or module.startswith(exc.name + ".")):
                raise  # a module that exists but fails to import: not a question of shape
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(path)


class Check:
    """One patch's run-time check: the versions at construction, then the shape, one call per
    thing relied on. ``patch`` is the patch's module name in ``bam_megatron/patches``."""

    def __init__(self, patch: str, *releases: Release):
        self.patch = patch
        here = os.path.dirname(os.path.abspath(__file__))
        self.path = f"bam_megatron/patches/{patch}" + ("/" if os.path.isdir(os.path.join(here, patch)) else ".py")
        self.releases = {r.library: r for r in releases}
        for r in releases:
            installed = r.installed()
            if not r.fits(installed):
                raise PatchTargetError(
                    f"patch {patch} targets {r.describe()}, but {r.library} {installed} is installed: "
                    f"install {r.requirement()}"
                )

    def fail(self, library: str, problem: str) -> None:
        r = self.releases[library]
        raise PatchTargetError(
            f"patch {self.patch}: {library} {r.installed()} {problem} (the patch targets {r.describe()}); "
            f"use a release it was checked on, or revisit {self.path}"
        )

    def get(self, library: str, path: str) -> Any:
        """The object at ``path``; fails when the library has no such name."""
        try:
            return _resolve(path)
        except (ImportError, AttributeError):
            self.fail(library, f"has no {path}")

    def has(self, library: str, *paths: str) -> None:
        for path in paths:
            self.get(library, path)

    def fields(self, library: str, path: str, *names: str) -> None:
        """The dataclass at ``path`` has the fields ``names``."""
        have = set(getattr(self.get(library, path), "__dataclass_fields__", {}))
        if not set(names) <= have:
            self.fail(library, f"changed the fields of {path} (has {', '.join(sorted(have))}; expected {', '.join(names)})")

    def _parameters(self, library: str, path: str) -> List[inspect.Parameter]:
        try:
            return list(inspect.signature(inspect.unwrap(self.get(library, path))).parameters.values())
        except (TypeError, ValueError):
            self.fail(library, f"gives no signature for {path}")

    def params(self, library: str, path: str, *names: str, leading: bool = False) -> None:
        """``path`` takes the parameters ``names`` (``leading``: as its first ones, in order)."""
        have = [p.name for p in self._parameters(library, path)]
        ok = have[: len(names)] == list(names) if leading else set(names) <= set(have)
        if not ok:
            self.fail(library, f"changed the parameters of {path} (has {', '.join(have)}; expected {', '.join(names)})")

    def accepts(self, library: str, path: str, replacement: Callable) -> None:
        """``replacement`` takes every parameter that ``path`` takes (so that callers of the
        original can call the replacement)."""
        ours = inspect.signature(replacement).parameters.values()
        names = {p.name for p in ours if p.kind is not p.VAR_KEYWORD}
        open_keywords = any(p.kind is p.VAR_KEYWORD for p in ours)
        for p in self._parameters(library, path):
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in ("self", "cls"):
                continue
            if p.name not in names and not open_keywords:
                self.fail(library, f"gave {path} a parameter {p.name!r} its replacement does not take")

    def source(self, library: str, path: str, *texts: str) -> None:
        """The source of ``path`` still contains each of ``texts`` (the lines a patch changes)."""
        try:
            code = inspect.getsource(self.get(library, path))
        except (OSError, TypeError):
            self.fail(library, f"has no readable source for {path}")
        for text in texts:
            if text not in code:
                self.fail(library, f"changed {path} (no {text!r} in it)")


class Replacements:
    """Attribute replacements on modules and classes, undone in reverse order. A class attribute
    is saved as the class holds it (a ``staticmethod`` stays one), an absent one is deleted."""

    def __init__(self) -> None:
        self._saved: List[Tuple[Any, str, Any]] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        self._saved.append((owner, name, vars(owner).get(name, _MISSING)))
        setattr(owner, name, value)

    def undo(self) -> None:
        while self._saved:
            owner, name, old = self._saved.pop()
            if old is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, old)


@contextlib.contextmanager
def tracked(name: str) -> Iterator[None]:
    """Count ``name`` as entered for the duration of the block (see ``entered``)."""
    with _ENTERED_LOCK:
        _ENTERED[name] += 1
    try:
        yield
    finally:
        with _ENTERED_LOCK:
            _ENTERED[name] -= 1
            if not _ENTERED[name]:
                del _ENTERED[name]


def entered() -> List[str]:
    """The patches entered right now in this process, by name."""
    with _ENTERED_LOCK:
        return sorted(_ENTERED)


class Shared:
    """A nestable patch: ``install(replacements)`` runs at the outermost entry (after
    ``check()``) and may return a clean-up callable; the exit of the outermost entry calls it
    and undoes the replacements."""

    def __init__(self, name: str, check: Callable[[], None], install: Callable[[Replacements], Optional[Callable[[], None]]]):
        self.name = name
        self._check = check
        self._install = install
        self._lock = threading.RLock()
        self._depth = 0
        self._cleanup: Optional[Callable[[], None]] = None
        self.replacements = Replacements()

    @property
    def active(self) -> bool:
        return self._depth > 0

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._check()
                try:
                    self._cleanup = self._install(self.replacements)
                except BaseException:
                    self.replacements.undo()
                    raise
            self._depth += 1
        try:
            with tracked(self.name):
                yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    cleanup, self._cleanup = self._cleanup, None
                    try:
                        if cleanup is not None:
                            cleanup()
                    finally:
                        self.replacements.undo()
