"""What every check shares: the failure type, the result record and the one tensor
comparison (through :func:`repcompiler.rewrite.verify.compare_outputs`' relative error).

Owns :class:`CheckFailure`, :class:`CheckResult`, :func:`assert_close` and
:func:`case_text` (how a falsifying case is described).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..blocks.registry import ConvGeometry
from ..errors import VerificationError
from ..rewrite.verify import relative_error

__all__ = ["CheckFailure", "CheckResult", "assert_close", "case_text"]


class CheckFailure(VerificationError, AssertionError):
    """A property of :func:`check_block` / :func:`check_rule` failed.

    Attributes: ``subject`` (``"block 'name'"`` or ``"rule for X"``), ``prop`` (the
    property's name), ``case`` (the falsifying geometry / input) and ``detail``.
    """

    def __init__(self, subject: str, prop: str, case: str, detail: str) -> None:
        self.subject, self.prop, self.case, self.detail = subject, prop, case, detail
        super().__init__(f"{subject}: property '{prop}' failed on {case}: {detail}")

    def __reduce__(self) -> tuple:
        return (type(self), (self.subject, self.prop, self.case, self.detail))


@dataclass
class CheckResult:
    """What a check ran: examples tried, examples accepted / rejected (the builder
    raised ``UnsupportedError`` in every mode, or the rule returned ``None``; a few
    reasons are kept), and the properties verified."""

    subject: str
    examples: int = 0
    accepted: int = 0
    rejected: int = 0
    reasons: list[str] = field(default_factory=list)
    properties: list[str] = field(default_factory=list)

    def reject(self, why: str) -> None:
        """Keep ``why`` (up to five distinct reasons) as an example of a rejected case."""
        if len(self.reasons) < 5 and why not in self.reasons:
            self.reasons.append(why)

    def record(self, name: str) -> None:
        """Record that property ``name`` held (once)."""
        if name not in self.properties:
            self.properties.append(name)

    def __str__(self) -> str:
        lines = [
            f"{self.subject}: {self.examples} examples, {self.accepted} accepted, {self.rejected} rejected; "
            f"all properties held",
            "  properties: " + ", ".join(self.properties),
        ]
        lines += [f"  rejected, e.g.: {r}" for r in self.reasons]
        return "\n".join(lines)




def assert_close(subject: str, prop: str, case: str, got: Tensor, want: Tensor, tol: float) -> None:
    """Raise :class:`CheckFailure` unless ``got`` has ``want``'s shape, is finite and is
    within relative error ``tol`` of it (:func:`~repcompiler.rewrite.verify.relative_error`)."""
    if got.shape != want.shape:
        raise CheckFailure(subject, prop, case, f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not bool(torch.isfinite(got).all()):
        raise CheckFailure(subject, prop, case, "non-finite values (NaN/inf)")
    err = relative_error(got, want)
    if not err <= tol:
        raise CheckFailure(subject, prop, case, f"max relative error {err:.3g} > {tol:g}")


def case_text(geom: ConvGeometry, mode: str | None = None, extra: str = "") -> str:
    """``"geometry conv(...), mode=online, input (2, 3, 5, 5)"``: a falsifying case."""
    parts = [f"geometry {geom.describe()}"]
    if mode:
        parts.append(f"mode={mode}")
    if extra:
        parts.append(extra)
    return ", ".join(parts)
