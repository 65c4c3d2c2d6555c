"""Kernel-algebra expressions: the base class and the combinators.

An :class:`Expr` is an ``nn.Module`` describing a linear map on feature maps that can
be written as one convolution. It has two semantics that must agree:

* ``forward(x)`` runs the expression **unfolded** on a feature map (the reference);
* ``fold()`` evaluates it to one :class:`~repcompiler.algebra.kernel.Kernel`
  (``weight``, ``bias``, geometry), differentiably, so it can run inside training.

``exactness()`` says, structurally and before any tensor is touched, whether the two
agree for every input (borders included) and if not, why. ``fold()`` refuses an
inexact expression unless asked (``check=False``). The unchecked fold of an inexact
expression still agrees on the *interior*: every output whose folded window
``[s*q - l, s*q - l + e]`` lies inside the input, provided the branch outputs have a
common shape at all (the property tests check exactly this).

Combinators validate their operands when they are built: a channel or dims mismatch
raises :class:`~repcompiler.errors.IncompatibleError` where the composition is written,
naming both operands. Inexact (but well-formed) compositions are accepted and reported
by ``exactness()``. Unfolded, :class:`Sum` and :class:`Concat` refuse branch outputs of
different spatial sizes instead of letting ``+`` broadcast a size-1 map.

Cost: ``fold(check=False)`` (what online blocks call every training step) does the
structural planning without formatting any message; labels are built lazily, only
when a reason is reported.

Expressions compose with ``a >> b`` (``b`` after ``a``), ``a + b`` (parallel sum) and
:class:`Concat`. Leaves live in :mod:`repcompiler.algebra.leaves`.

Because expressions are modules, their parameters register, save, load, move between
devices and dtypes and deep-copy like any other module's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn

from ..errors import IncompatibleError, InexactFoldError, UnsupportedError
from .geometry import ConvSpec, parallel, sequence
from .kernel import Kernel, add, compose, concat

__all__ = ["Exactness", "Expr", "Seq", "Sum", "Concat"]


@dataclass(frozen=True)
class Exactness:
    """Whether a folded expression equals its unfolded form for every input."""

    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def exact(self) -> bool:
        return not self.reasons

    def __bool__(self) -> bool:
        return self.exact

    def __str__(self) -> str:
        return "exact" if self.exact else "not exact: " + "; ".join(self.reasons)


class Expr(nn.Module):
    """Base class of kernel-algebra expressions (see the module docstring)."""

    # -- to implement -------------------------------------------------------------
    def plan(self) -> tuple[ConvSpec | None, tuple[str, ...]]:
        """Structural evaluation: the folded geometry (``None`` if there is none) and
        the reasons the fold would be inexact."""
        raise NotImplementedError

    def fold(self, check: bool = True) -> Kernel:
        """Evaluate to one kernel (differentiable). Raises :class:`InexactFoldError`
        if ``check`` and the expression is not exact."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def label(self) -> str:
        """A short human-readable name used in reports and error messages."""
        try:
            spec = self.spec
        except InexactFoldError:
            return type(self).__name__
        return f"{type(self).__name__}[{spec.describe()}]"

    # -- derived ------------------------------------------------------------------
    @property
    def spec(self) -> ConvSpec:
        spec, reasons = self.plan()
        if spec is None:
            raise InexactFoldError(f"{type(self).__name__} has no folded form: " + "; ".join(reasons))
        return spec

    def exactness(self) -> Exactness:
        return Exactness(self.plan()[1])

    def to_conv(self) -> nn.Module:
        """A plain ``nn.Conv1d/2d/3d`` (detached copy) equal to this expression."""
        with torch.no_grad():
            return self.fold(check=True).to_module()

    def _check(self, check: bool) -> None:
        if check:
            reasons = self.plan()[1]
            if reasons:
                raise InexactFoldError(f"{self.label()} is not exact: " + "; ".join(reasons))

    def _ref_tensor(self) -> Tensor:
        """Any tensor of this expression (for dtype/device of generated kernels)."""
        for t in self.parameters():
            return t
        for t in self.buffers():
            return t
        return torch.empty(0)

    # -- operators ----------------------------------------------------------------
    def __rshift__(self, other: "Expr") -> "Seq":
        return Seq(self, other)

    def __add__(self, other: "Expr") -> "Sum":  # type: ignore[override]
        return Sum(self, other)

    def __repr__(self) -> str:  # compact, readable trees
        return super().__repr__()


class _Combinator(Expr):
    def __init__(self, *children: Expr) -> None:
        super().__init__()
        if not children:
            raise IncompatibleError(f"{type(self).__name__} needs at least one operand")
        flat: list[Expr] = []
        for c in children:
            if not isinstance(c, Expr):
                raise UnsupportedError(
                    f"{type(self).__name__} operand {len(flat)} is a {type(c).__name__}, not an Expr "
                    "(wrap modules with a leaf, e.g. Conv.from_module)"
                )
            # flatten nested combinators of the same kind: (a >> b) >> c == a >> b >> c
            if type(c) is type(self):
                flat.extend(c.terms)  # type: ignore[attr-defined]
            else:
                flat.append(c)
        self.terms = nn.ModuleList(flat)
        # Validate structure now so that an invalid composition (channel or dims
        # mismatch) fails where it is written, naming the operands. Inexact but valid
        # compositions are accepted (see ``exactness()``).
        self.plan()

    def __iter__(self) -> Iterator[Expr]:
        return iter(self.terms)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.terms)


def _prefix_label(terms: list[Expr], i: int):
    """Lazy label of ``terms[:i]`` (what the ``i``-th term is applied to)."""
    if i == 1:
        return terms[0].label
    return lambda: f"(... >> {terms[i - 1].label()})"


class Seq(_Combinator):
    """Sequential composition: ``Seq(a, b, c)(x) == c(b(a(x)))``."""

    def plan(self) -> tuple[ConvSpec | None, tuple[str, ...]]:
        terms = list(self.terms)
        spec, reasons0 = terms[0].plan()
        reasons = list(reasons0)
        for i, term in enumerate(terms[1:], 1):
            tspec, treasons = term.plan()
            reasons += treasons
            if spec is None or tspec is None:
                return None, tuple(reasons)
            p = sequence(spec, tspec, _prefix_label(terms, i), term.label)
            reasons += p.reasons
            spec = p.spec
        return spec, tuple(reasons)

    def fold(self, check: bool = True) -> Kernel:
        self._check(check)
        kernel = self.terms[0].fold(check=False)
        for term in list(self.terms)[1:]:
            kernel = compose(kernel, term.fold(check=False), check=False)
        return kernel

    def forward(self, x: Tensor) -> Tensor:
        for term in self.terms:
            x = term(x)
        return x

    def __rshift__(self, other: Expr) -> "Seq":
        return Seq(*self.terms, other)


def _same_shapes(expr: "Sum", outs: list[Tensor]) -> None:
    """Branch outputs must have equal spatial sizes (no silent broadcasting)."""
    first = outs[0].shape[2:]
    for i, o in enumerate(outs[1:], 1):
        if o.shape[2:] != first:
            raise IncompatibleError(
                f"{type(expr).__name__}: branch 0 ({expr.terms[0].label()}) and branch {i} "
                f"({expr.terms[i].label()}) produce spatial sizes {tuple(first)} vs {tuple(o.shape[2:])} "
                "on this input (branch windows do not align)"
            )


class Sum(_Combinator):
    """Parallel sum of branches on the same input: ``Sum(a, b)(x) == a(x) + b(x)``."""

    _concat = False

    def plan(self) -> tuple[ConvSpec | None, tuple[str, ...]]:
        plans = [t.plan() for t in self.terms]
        reasons = [r for _, rs in plans for r in rs]
        specs = [s for s, _ in plans]
        if any(s is None for s in specs):
            return None, tuple(reasons)
        terms = list(self.terms)
        p = parallel(specs, concat=self._concat, names=lambda: [t.label() for t in terms])  # type: ignore[arg-type]
        return p.spec, tuple(reasons) + p.reasons

    def fold(self, check: bool = True) -> Kernel:
        self._check(check)
        kernels = [t.fold(check=False) for t in self.terms]
        return (concat if self._concat else add)(kernels, check=False)

    def forward(self, x: Tensor) -> Tensor:
        outs = [t(x) for t in self.terms]
        _same_shapes(self, outs)
        out = outs[0]
        for o in outs[1:]:
            out = out + o
        return out

    def __add__(self, other: Expr) -> "Sum":  # type: ignore[override]
        return Sum(*self.terms, other)


class Concat(Sum):
    """Channel concat of branches on the same input: ``cat([a(x), b(x)], dim=1)``."""

    _concat = True

    def forward(self, x: Tensor) -> Tensor:
        outs = [t(x) for t in self.terms]
        _same_shapes(self, outs)
        return torch.cat(outs, dim=1)

    def __add__(self, other: Expr) -> Sum:  # type: ignore[override]
        return Sum(self, other)
