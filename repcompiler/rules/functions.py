"""The built-in **function rules**: how ``F.conv2d``, ``F.batch_norm``, ``F.pad``,
average pooling, and ``*`` / ``/`` / ``+`` / ``-`` by a constant lower into the kernel
algebra (the call types they receive: :mod:`repcompiler.rules.base`).
:func:`register_function_rules` registers them into a registry.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F

from .. import algebra as A
from .base import INPUT, FunctionCall, FunctionRule, LowerInfo
from .registry import RuleRegistry

__all__ = ["lower_fpad", "register_function_rules"]


def _is_input(value: Any) -> bool:
    return value is INPUT


def _lower_fconv(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
    if not _is_input(call.arg(0, "input")):
        return None
    weight, bias = call.arg(1, "weight"), call.arg(2, "bias")
    if not isinstance(weight, torch.Tensor) or (bias is not None and not isinstance(bias, torch.Tensor)):
        return None
    return A.Conv(
        weight,
        bias,
        stride=call.arg(3, "stride", 1),
        padding=call.arg(4, "padding", 0),
        dilation=call.arg(5, "dilation", 1),
        groups=call.arg(6, "groups", 1),
        name=info.name,
    )


def _lower_fbatch_norm(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
    if not _is_input(call.arg(0, "input")) or call.arg(5, "training", False):
        return None
    mean, var = call.arg(1, "running_mean"), call.arg(2, "running_var")
    weight, bias = call.arg(3, "weight"), call.arg(4, "bias")
    eps = float(call.arg(7, "eps", 1e-5))
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return None
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = weight * scale
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return A.Affine(mean.shape[0], info.dims, scale=scale.detach(), shift=shift.detach(), name=info.name or "batch_norm")


def lower_fpad(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
    """``F.pad`` with non-negative constant-zero amounts as a zero pad; else ``None``."""
    if not _is_input(call.arg(0, "input")):
        return None
    mode = call.arg(2, "mode", "constant")
    value = call.arg(3, "value", None)
    if mode != "constant" or (value is not None and float(value) != 0.0):
        return None
    pad = call.arg(1, "pad")
    if not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
        return None
    if any(p < 0 for p in pad) or len(pad) // 2 > info.dims:
        return None
    return A.ZeroPad.from_fpad(info.in_channels, info.dims, pad)


def _lower_favgpool(dims: int) -> FunctionRule:
    def lower(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
        if not _is_input(call.arg(0, "input")) or info.dims != dims:
            return None
        ks = call.arg(1, "kernel_size")
        stride = call.arg(2, "stride", None)
        padding = call.arg(3, "padding", 0)
        kwargs = dict(
            ceil_mode=bool(call.arg(4, "ceil_mode", False)),
            count_include_pad=bool(call.arg(5, "count_include_pad", True)),
        )
        if dims > 1:
            kwargs["divisor_override"] = call.arg(6, "divisor_override", None)
        return A.AvgPool(info.in_channels, dims, ks, stride, padding, **kwargs)

    return lower


def _per_channel(value: Any, info: LowerInfo) -> Any:
    """A scalar (python number or 0-d/1-element tensor) or a per-channel tensor of shape
    ``[C]+[1]*dims`` / ``[1, C]+[1]*dims``, as a float or a ``[C]`` tensor; else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, torch.Tensor) or value.is_complex() or not value.is_floating_point():
        return None
    if value.numel() == 1 and value.dim() <= info.dims + 2:
        return value.reshape(()).detach()
    shape = tuple(value.shape)
    c = info.in_channels
    ok = shape in ((c,) + (1,) * info.dims, (1, c) + (1,) * info.dims)
    return value.reshape(c).detach() if ok else None


def _lower_mul(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
    if len(call.args) != 2 or call.kwargs:
        return None
    other = call.args[1] if call.args[0] is INPUT else call.args[0]
    v = _per_channel(other, info)
    if v is None:
        return None
    if isinstance(v, float):
        return A.Constant(info.in_channels, info.dims, v, name=info.name or f"x{v:g}")
    return A.Affine(info.in_channels, info.dims, scale=v.clone() if v.dim() else v.clone(),
                    name=info.name or "mul")


def _lower_div(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
    if len(call.args) != 2 or call.kwargs or call.args[0] is not INPUT:
        return None
    v = _per_channel(call.args[1], info)
    if v is None:
        return None
    if isinstance(v, float):
        return None if v == 0.0 else A.Constant(info.in_channels, info.dims, 1.0 / v, name=info.name or f"/{v:g}")
    return A.Affine(info.in_channels, info.dims, scale=1.0 / v, name=info.name or "div")


def _lower_add(sign: float) -> FunctionRule:
    """``a + sign*alpha*b`` with one of ``a``/``b`` the input and the other a constant."""

    def lower(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
        alpha = call.kwargs.get("alpha", 1)
        if len(call.args) != 2 or set(call.kwargs) - {"alpha"} or not isinstance(alpha, (int, float)):
            return None
        first_is_input = call.args[0] is INPUT
        v = _per_channel(call.args[1] if first_is_input else call.args[0], info)
        if v is None:
            return None
        c = info.in_channels
        if isinstance(v, float):
            shift = torch.full((c,), v)
        elif v.dim() == 0:
            shift = v.expand(c).clone()
        else:
            shift = v.clone()
        if first_is_input:  # x + sign*alpha*v
            scale, shift = None, shift * (sign * alpha)
        else:  # v + sign*alpha*x
            scale = None if sign * alpha == 1 else float(sign * alpha)
        return A.Affine(c, info.dims, scale=scale, shift=shift.detach(), name=info.name or "add")

    return lower


def register_function_rules(reg: RuleRegistry) -> None:
    """Register the built-in function rules into ``reg``."""
    for f in (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d):
        reg.register(f, _lower_fconv, override=True)
    reg.register(F.batch_norm, _lower_fbatch_norm, override=True)
    reg.register(F.pad, lower_fpad, override=True)
    for d, f in ((1, F.avg_pool1d), (2, F.avg_pool2d), (3, F.avg_pool3d)):
        reg.register(f, _lower_favgpool(d), override=True)
    for f in (operator.mul, torch.mul, operator.imul):
        reg.register(f, _lower_mul, override=True)
    for f in (operator.truediv, torch.div, operator.itruediv):
        reg.register(f, _lower_div, override=True)
    for f in (operator.add, torch.add, operator.iadd):
        reg.register(f, _lower_add(1.0), override=True)
    for f in (operator.sub, torch.sub, operator.isub):
        reg.register(f, _lower_add(-1.0), override=True)
