"""The library's exception types.

Every error repcompiler raises on bad input is one of these, so callers can catch
``RepCompilerError`` and messages always name the operand (module, expression or
graph node) and the reason.
"""

from __future__ import annotations

__all__ = [
    "RepCompilerError",
    "IncompatibleError",
    "UnsupportedError",
    "InexactFoldError",
    "TraceError",
    "VerificationError",
    "RegistrationError",
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
