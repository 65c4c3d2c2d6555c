"""Lowering rules for layers and ops real re-parameterizable models use.

:func:`register_layer_rules` registers the rules below into a registry:

* ``nn.SyncBatchNorm`` (RepLKNet's default BN): in eval mode it computes
  ``F.batch_norm`` with its running statistics, i.e. the same per-channel affine as
  ``nn.BatchNorm2d``; lowered as :class:`~repcompiler.algebra.BatchNorm` on the
  region's dims. A subclass with its own ``forward`` is not described by this and
  stays opaque.
* slicing that crops the spatial input (``x[:, :, a:-b, :]``, ``x[..., a:]``;
  ACNet's block with ``padding < k // 2``): a :class:`~repcompiler.algebra.crop.Crop`
  (a negative zero pad). Only slices whose kept window does not depend on the input
  size are crops: start ``>= 0`` (or none), stop ``< 0`` (or none), step 1, batch and
  channel dims whole. Any other indexing (tuple outputs, channel slices, strides)
  stays opaque.
* ``F.pad`` with negative amounts (cropping, alone or with padding on the other
  side): a :class:`~repcompiler.algebra.crop.Crop`; non-negative pads keep the
  built-in rule (:func:`repcompiler.rules.functions.lower_fpad`, which this rule
  delegates to).

What is *not* here, and why: ``nn.Linear`` and ``nn.BatchNorm1d`` on ``(N, C)``
inputs. A Linear is a conv with no spatial dimension, but the algebra's geometry is
1-, 2- or 3-d only (:class:`~repcompiler.algebra.ConvSpec` rejects ``dims=0``), so
these pairs are folded by the dedicated pass :mod:`repcompiler.passes.fold_linear_bn`.
A conv with a computed weight (``F.conv2d(x, W)``, ``W`` from parameters/buffers
only: the official OREPA block, DBB's ``IdentityBasedConv1x1``) needs no new rule:
the built-in ``F.conv*`` rule receives the evaluated weight as a constant operand
(the region finder evaluates parameter-only subgraphs), so capturing the module
(:mod:`repcompiler.capture.python`) is enough.
"""

from __future__ import annotations

import operator
from typing import Any

import torch.nn.functional as F
from torch import nn

from .. import algebra as A
from ..algebra.crop import Crop
from .base import INPUT, FunctionCall, LowerInfo
from .functions import lower_fpad
from .registry import RuleRegistry

__all__ = ["lower_sync_batch_norm", "lower_crop_slice", "lower_signed_pad", "crop_of_index", "register_layer_rules"]


def lower_sync_batch_norm(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    """``nn.SyncBatchNorm`` as a BatchNorm leaf (eval-mode running statistics)."""
    if m.running_mean is None or m.running_var is None:
        return None
    if type(m).forward is not nn.SyncBatchNorm.forward:
        return None
    return A.BatchNorm(m, dims=info.dims, name=info.name or type(m).__name__)


def crop_of_index(key: Any, dims: int) -> tuple[tuple[int, int], ...] | None:
    """Per spatial dim ``(-left, -right)`` signed pads of ``x[key]`` if ``key`` is a
    fixed crop of the spatial dims of an ``[N, C, *spatial]`` tensor (see the module
    docstring), else ``None``."""
    items = list(key) if isinstance(key, tuple) else [key]
    if sum(1 for k in items if k is Ellipsis) > 1:
        return None
    if Ellipsis in items:
        i = items.index(Ellipsis)
        fill = 2 + dims - (len(items) - 1)
        if fill < 0:
            return None
        items = items[:i] + [slice(None)] * fill + items[i + 1:]
    if len(items) > 2 + dims or not all(isinstance(k, slice) for k in items):
        return None
    items += [slice(None)] * (2 + dims - len(items))
    if any(k != slice(None) for k in items[:2]):
        return None
    pads = []
    for k in items[2:]:
        start, stop, step = k.start, k.stop, k.step
        if step not in (None, 1):
            return None
        if start is not None and (not isinstance(start, int) or isinstance(start, bool) or start < 0):
            return None
        if stop is not None and (not isinstance(stop, int) or isinstance(stop, bool) or stop >= 0):
            return None
        pads.append((-(start or 0), stop or 0))
    return tuple(pads)


def lower_crop_slice(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
    """``x[key]`` (``operator.getitem``) when ``key`` is a fixed spatial crop."""
    if len(call.args) != 2 or call.args[0] is not INPUT or call.kwargs:
        return None
    pads = crop_of_index(call.args[1], info.dims)
    if pads is None:
        return None
    if all(p == (0, 0) for p in pads):
        return A.Identity(info.in_channels, info.dims)
    return Crop(info.in_channels, info.dims, pads)


def lower_signed_pad(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
    """``F.pad`` with negative amounts as a :class:`Crop`; otherwise the built-in rule."""
    pad = call.arg(1, "pad")
    signed = isinstance(pad, (tuple, list)) and all(isinstance(p, int) for p in pad) and any(p < 0 for p in pad)
    if not signed:
        return lower_fpad(call, info)
    if call.arg(0, "input") is not INPUT or call.arg(2, "mode", "constant") != "constant":
        return None
    value = call.arg(3, "value", None)
    if value is not None and float(value) != 0.0:
        return None
    if len(pad) // 2 > info.dims:
        return None
    return Crop.from_fpad(info.in_channels, info.dims, pad)


def register_layer_rules(registry: RuleRegistry) -> None:
    """Register the rules of this module into ``registry`` (replacing the plain ``F.pad``
    rule of :func:`repcompiler.rules.functions.register_function_rules`)."""
    registry.register(nn.SyncBatchNorm, lower_sync_batch_norm, override=True)
    registry.register(operator.getitem, lower_crop_slice, override=True)
    registry.register(F.pad, lower_signed_pad, override=True)
