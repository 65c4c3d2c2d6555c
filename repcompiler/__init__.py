"""repcompiler: structural re-parameterization as a compiler pass.

Public API (see the README for a tour):

* :mod:`repcompiler.algebra` - the kernel algebra (expressions that fold to one conv).
* errors - :class:`RepCompilerError` and its subclasses.
"""

from __future__ import annotations

import logging

from . import algebra
from .errors import (
    IncompatibleError,
    InexactFoldError,
    RegistrationError,
    RepCompilerError,
    TraceError,
    UnsupportedError,
    VerificationError,
)

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "algebra",
    "RepCompilerError",
    "IncompatibleError",
    "UnsupportedError",
    "InexactFoldError",
    "TraceError",
    "VerificationError",
    "RegistrationError",
]
