"""Verify: the one output-comparison helper of the pipeline.

Every entry point compares a transformed model (or part of it) with the original the
same way: same output structure (pytree), same shapes, and a **relative** error
``max|got - want| / max|want|`` within a tolerance scaled to the dtype
(:func:`tolerance_for`). One message format names what differs::

    <name>: output <i> of the <what> differs from the original by relative <X> (tolerance <T>; max |diff| <D>, max |output| <M>)

This module owns :func:`relative_error`, :func:`tolerance_for`, :func:`compare_outputs`
and :func:`eval_mode` (run modules in eval mode, their flags restored). ``fold``,
``deploy`` and ``linearize`` use it; the per-region check of
:mod:`repcompiler.passes.squeeze` uses its tolerance.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..errors import VerificationError

__all__ = ["relative_error", "tolerance_for", "compare_outputs", "eval_mode"]


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


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put every module under ``modules`` in eval mode; restore each flag on exit."""
    mods = [m for root in modules for m in root.modules()]
    flags = [m.training for m in mods]
    for m in mods:
        m.training = False
    try:
        yield
    finally:
        for m, f in zip(mods, flags):
            m.training = f
