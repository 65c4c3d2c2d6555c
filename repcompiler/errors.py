"""The library's exception types.

Every error repcompiler raises on bad input is one of these, so callers can catch
``RepCompilerError`` and messages always name the operand (module, expression or
graph node) and the reason. :func:`check_choice` raises one for an option that is
not among its allowed values; :func:`first_line` is how a foreign exception is quoted
inside one of these messages.
"""

from __future__ import annotations

from typing import Collection

__all__ = [
    "RepCompilerError",
    "IncompatibleError",
    "UnsupportedError",
    "InexactFoldError",
    "TraceError",
    "VerificationError",
    "RegistrationError",
    "RuleError",
    "check_choice",
    "first_line",
]


class RepCompilerError(Exception):
    """Base class of every error raised by repcompiler."""


class IncompatibleError(RepCompilerError, ValueError):
    """Operands cannot be combined at all (channel or dimensionality mismatch)."""


class UnsupportedError(RepCompilerError, ValueError):
    """A module or option the algebra cannot express (e.g. ``padding_mode='reflect'``)."""


class InexactFoldError(RepCompilerError):
    """A fold was requested that would not equal the unfolded expression for every input."""


class TraceError(RepCompilerError):
    """A model (or part of it) could not be traced with ``torch.fx``."""


class VerificationError(RepCompilerError):
    """A rewritten model or region did not reproduce the original outputs."""


class RegistrationError(RepCompilerError):
    """A rule or block registration is invalid (e.g. a duplicate name without ``override``)."""


class RuleError(RepCompilerError):
    """A lowering rule raised an error that is not one of these types (a bug in the rule):
    the message names the rule, the module or function it was lowering, and the error."""


def check_choice(
    name: str,
    value: object,
    choices: Collection[object],
    *,
    owner: str | None = None,
    allow_none: bool = False,
    error: type[RepCompilerError] = UnsupportedError,
) -> None:
    """Raise ``error`` unless ``value`` is one of ``choices`` (or ``None``, if ``allow_none``).

    The message names the option, the allowed values and the bad value, after
    ``owner`` when given: ``check_choice("mode", "x", ("online", "offline"),
    owner="block 'orepa'")`` raises ``UnsupportedError("block 'orepa': mode must be
    one of ('online', 'offline'), got 'x'")``; with ``allow_none`` the allowed values
    read ``... ('online', 'offline') or None``.
    """
    if (allow_none and value is None) or value in choices:
        return
    where = f"{owner}: " if owner else ""
    or_none = " or None" if allow_none else ""
    raise error(f"{where}{name} must be one of {tuple(choices)}{or_none}, got {value!r}")


def first_line(exc: BaseException, limit: int = 500) -> str:
    """The first line of ``exc``'s message (its type name if it has none), at most
    ``limit`` characters: how a torch/third-party error is quoted in our messages."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
