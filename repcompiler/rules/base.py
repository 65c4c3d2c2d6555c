"""The types a lowering rule receives: :class:`LowerInfo`, :class:`FunctionCall` and the
:data:`INPUT` sentinel.

A **module rule** is ``lower(module, info: LowerInfo) -> Expr | None``; a **function
rule** is ``lower(call: FunctionCall, info: LowerInfo) -> Expr | None``
(:data:`FunctionRule`). The region finder (:mod:`repcompiler.passes.find_regions`) calls a
function rule for a ``call_function`` (or ``call_method``, mapped to the torch function
of the same name: ``x.add(..)`` -> ``torch.add``) node that has exactly **one** data
input. In ``call.args`` / ``call.kwargs`` that data input is the :data:`INPUT` sentinel,
constant operands (parameters, buffers and anything computed from them only) are their
tensor values, and every other argument is passed as written in the graph. The rule
returns the expression of the unary linear map ``INPUT -> result`` or ``None`` (opaque).
Sums and channel concats of several data inputs (``+``, ``torch.add``, ``torch.cat``)
are handled structurally by the region finder and never reach a rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from .. import algebra as A

__all__ = ["INPUT", "FunctionCall", "FunctionRule", "LowerInfo"]


@dataclass(frozen=True)
class LowerInfo:
    """What the graph knows about a module's (or a call's) data input when lowering it:
    its channel count, its number of spatial dims, and the node's name."""

    in_channels: int
    dims: int
    name: str = ""


class _InputSentinel:
    """Marks the data input in a :class:`FunctionCall`'s arguments."""

    _instance: "_InputSentinel | None" = None

    def __new__(cls) -> "_InputSentinel":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INPUT"


INPUT = _InputSentinel()


@dataclass(frozen=True)
class FunctionCall:
    """A call of a function on one data input (the :data:`INPUT` sentinel)."""

    target: Any
    args: tuple
    kwargs: dict

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument ``index`` / ``name``."""
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default)

    @property
    def input_index(self) -> int | str | None:
        """Where the data input is (a position, a keyword, or ``None``)."""
        for i, a in enumerate(self.args):
            if a is INPUT:
                return i
        for k, v in self.kwargs.items():
            if v is INPUT:
                return k
        return None


FunctionRule = Callable[[FunctionCall, LowerInfo], Optional[A.Expr]]
