"""The project's user-facing errors.

``BAMError`` is the one base class of every error a *user* can cause (a bad flag, a missing or
damaged file, a layout that does not fit, a full disk). Its message is one line that names the
problem and the fix; the programs print it as ``<program>: error: <message>`` and exit 1.
Every other exception is a bug (ours or a library's) and keeps its traceback.

The subclasses also derive from the built-in class that describes them (``ValueError`` for bad
settings, ``RuntimeError`` for conditions met while running), so callers may catch either.
"""

from __future__ import annotations


class BAMError(Exception):
    """A user error; the message is one line naming the problem and the fix."""


class ConfigError(BAMError, ValueError):
    """Settings that cannot work together (flags, model shape, parallel layout)."""


class BAMConfigError(ConfigError):
    """An invalid model / parallelism setting of a BAM model."""


class LayoutError(ConfigError):
    """Parallel sizes that do not tile the world size."""


class DataConfigError(ConfigError):
    """Bad data flags or missing / damaged data files."""


class TokenizerConfigError(ConfigError):
    """A tokenizer that cannot be built from the given flags / files."""


class CheckpointError(BAMError, RuntimeError):
    """A checkpoint that is missing, damaged, locked or does not fit the model."""


class UpcycleError(BAMError, ValueError):
    """Bad input for the Mix phase (or the other checkpoint tools)."""


class TrainingError(BAMError, RuntimeError):
    """A condition that stops training (bad input found up front, too many NaN steps)."""


class PreprocessError(BAMError):
    """A problem with the input or the flags of data preprocessing."""


class InferenceError(BAMError, ValueError):
    """A request the model cannot serve: a prompt longer than its context, a malformed prompt
    or task file, sampling settings out of range."""


def one_line(exc: BaseException) -> str:
    """``"<Type>: <first line of the message>"`` for quoting a library error in a user error."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


__all__ = [
    "BAMConfigError",
    "BAMError",
    "CheckpointError",
    "ConfigError",
    "DataConfigError",
    "InferenceError",
    "LayoutError",
    "PreprocessError",
    "TokenizerConfigError",
    "TrainingError",
    "UpcycleError",
    "one_line",
]
