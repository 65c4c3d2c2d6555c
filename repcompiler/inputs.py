"""Checks of what a caller hands an entry point, before any work: example inputs,
tolerances and the model's weights. Each raises one of the library's exceptions
naming the argument (or the module/tensor) and the reason.

Owns :func:`as_inputs` (the positional-input tuple every entry point uses),
:func:`run_example` (run a model on its example inputs, errors named),
:func:`check_tolerances` and :func:`check_weights` (meta tensors, NaN/inf).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .errors import IncompatibleError, UnsupportedError

__all__ = ["as_inputs", "run_example", "check_tolerances", "check_weights"]


def as_inputs(example_inputs: Any, title: str, *, required: bool = False) -> tuple[Any, ...] | None:
    """``example_inputs`` as a tuple of positional ``forward`` arguments (``None`` stays
    ``None`` unless ``required``).

    A tensor is one input; a tuple or list is several. A dict (keyword inputs) is
    refused: the entry points call ``model(*inputs)``.
    """
    if example_inputs is None:
        if required:
            raise UnsupportedError(f"{title}: example_inputs is required (a tensor or a tuple of tensors), got None")
        return None
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Mapping):
        raise UnsupportedError(
            f"{title}: example_inputs is a dict ({', '.join(map(str, list(example_inputs)[:3]))}); keyword inputs "
            "are not supported, pass the positional inputs as a tensor or a tuple"
        )
    if isinstance(example_inputs, (tuple, list)):
        if required and not example_inputs:
            raise UnsupportedError(f"{title}: example_inputs is empty; pass at least one input tensor")
        return tuple(example_inputs)
    raise UnsupportedError(
        f"{title}: example_inputs must be a tensor or a tuple of positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


def _shapes(inputs: tuple[Any, ...]) -> str:
    return ", ".join(str(tuple(a.shape)) if isinstance(a, Tensor) else type(a).__name__ for a in inputs)


def run_example(model: nn.Module, inputs: tuple[Any, ...], title: str) -> Any:
    """``model(*inputs)`` under ``no_grad``; a model that fails on them raises
    :class:`IncompatibleError` naming the model, the input shapes and torch's reason."""
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise IncompatibleError(
            f"{title}: {type(model).__name__} does not run on example_inputs of shape {_shapes(inputs)}: "
            f"{type(exc).__name__}: {reason}"
        ) from exc


def check_tolerances(title: str, **tolerances: float | None) -> None:
    """Raise :class:`UnsupportedError` for a tolerance (``rtol=...``, ``atol=...``) that
    is negative or NaN; ``None`` means "the default" and passes."""
    for name, value in tolerances.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UnsupportedError(f"{title}: {name} must be a number >= 0, got {type(value).__name__}")
        if math.isnan(value) or value < 0:
            raise UnsupportedError(f"{title}: {name} must be >= 0, got {value}")


def check_weights(model: nn.Module, title: str, *, allow_meta: bool = False) -> None:
    """Refuse a model whose weights cannot be folded and verified: parameters or buffers
    on the ``meta`` device (no data; unless ``allow_meta``, e.g. for ``orepa_transform``,
    which builds new weights and can work on a meta model), or floating parameters/buffers
    holding NaN or inf (every check of a rewrite would fail on them and blame the rewrite).

    The message names up to three tensors by their qualified name.
    """
    tensors = [(n, t) for n, t in (*model.named_parameters(), *model.named_buffers())]
    meta = [n for n, t in tensors if t.is_meta]
    if allow_meta:
        tensors = [(n, t) for n, t in tensors if not t.is_meta]
    elif meta:
        raise UnsupportedError(
            f"{title}: {type(model).__name__} has {len(meta)} tensor(s) on the meta device (no data), e.g. "
            f"{', '.join(meta[:3])}; folding computes new weights from the old ones - materialize the model "
            "first (model.to_empty(device='cpu') and load its state dict)"
        )
    bad = []
    for n, t in tensors:
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            nans, infs = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            bad.append(f"{n} ({nans} NaN, {infs} inf)")
    if bad:
        raise UnsupportedError(
            f"{title}: {type(model).__name__} has non-finite weights in {len(bad)} tensor(s): {', '.join(bad[:3])}"
            f"{' ...' if len(bad) > 3 else ''}; no rewrite can be verified on them (was training diverging?)"
        )
