"""TEMPORARY SHIM for :mod:`repcompiler.verify` (owned by the "engine" branch).

The lead replaces every ``from .verify_shim import`` / ``from ..verify_shim import``
by the same import from ``verify`` at merge and deletes this file. The signatures are
engine's (``compare_outputs(want, got, name, what, *, factor)``, ``relative_error``,
``tolerance_for``) plus two keywords this branch needs in ``compare_outputs``:

* ``rtol``/``atol``: a caller-given tolerance instead of ``factor * tolerance_for(dtype)``
  (export's ``--rtol/--atol``); an output passes when ``max|got - want| <= atol + rtol *
  max|want|``, i.e. relative error ``<= rtol + atol / max|want|``;
* the message states the relative figure first, then the absolute one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from .errors import VerificationError

__all__ = ["relative_error", "tolerance_for", "compare_outputs"]


def relative_error(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|`` (``max|a-b|`` when ``b`` is all zero), in float64."""
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().item() if b.numel() else 0.0
    err = (a - b).abs().max().item() if b.numel() else 0.0
    return err / scale if scale > 0 else err


def tolerance_for(dtype: torch.dtype) -> float:
    """Relative tolerance for a comparison computed in ``dtype``."""
    if dtype == torch.float64:
        return 1e-9
    if dtype in (torch.float16, torch.bfloat16):
        return 2e-2
    return 1e-4


def compare_outputs(
    want: Any,
    got: Any,
    name: str,
    what: str = "folded model",
    *,
    factor: float = 10.0,
    rtol: float | None = None,
    atol: float = 0.0,
) -> float:
    """Raise :class:`~repcompiler.errors.VerificationError` naming ``name`` unless ``got``
    (the ``what``'s output) equals ``want`` in structure, shapes and values: every
    floating tensor within ``factor * tolerance_for(dtype)`` relative error, or, with
    ``rtol``, within ``atol + rtol * max|want|``. Returns the largest relative error."""
    wl, ws = tree_flatten(want)
    gl, gs = tree_flatten(got)
    if ws != gs or len(wl) != len(gl):
        raise VerificationError(f"{name}: the {what}'s output structure differs from the original's")
    worst = 0.0
    for i, (w, g) in enumerate(zip(wl, gl)):
        if not (isinstance(w, Tensor) and w.is_floating_point()):
            continue
        if not isinstance(g, Tensor) or w.shape != g.shape:
            shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            raise VerificationError(f"{name}: output {i} of the {what} has shape {shape}, expected {tuple(w.shape)}")
        err = relative_error(g, w)
        scale = float(w.detach().double().abs().max()) if w.numel() else 0.0
        if rtol is None:
            tol = factor * tolerance_for(w.dtype)
        else:
            tol = rtol + atol / scale if scale > 0 else atol  # an all-zero output: err is absolute
        if not err <= tol:
            diff = err * scale if scale > 0 else err
            raise VerificationError(
                f"{name}: output {i} of the {what} differs from the original by relative {err:.3g} "
                f"(tolerance {tol:.3g}; max |diff| {diff:.3g}, max |output| {scale:.3g})"
            )
        worst = max(worst, err)
    return worst
