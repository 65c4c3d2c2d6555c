"""Shared pieces of the built-in block builders (fresh parameters, branch ends,
sub-kernels placed inside a larger kernel frame, fixed pattern kernels)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import algebra as A
from ..errors import check_choice
from .registry import ConvGeometry

__all__ = [
    "MODES",
    "SCALINGS",
    "check_options",
    "fresh_weight",
    "laid_out",
    "fresh_bn",
    "branch_end",
    "center_offsets",
    "placed_conv",
    "fixed_depthwise",
    "average_pattern",
]

MODES = ("online", "offline")
SCALINGS = ("vector", "scalar", "none")
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def check_options(block: str, mode: str, scaling: str) -> None:
    """Raise :class:`~repcompiler.errors.UnsupportedError` for an unknown ``mode`` or
    ``scaling`` of ``block``."""
    check_choice("mode", mode, MODES, owner=f"block {block!r}")
    check_choice("scaling", scaling, SCALINGS, owner=f"block {block!r}")


def fresh_weight(*shape: int, fan_in: int | None = None) -> nn.Parameter:
    """A new parameter initialised as ``nn.Conv*d`` initialises its weight
    (kaiming-uniform with ``a=sqrt(5)``, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)))."""
    fan = fan_in if fan_in is not None else math.prod(shape[1:])
    bound = 1.0 / math.sqrt(max(fan, 1))
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


def laid_out(p: nn.Parameter, order: Sequence[int]) -> nn.Parameter:
    """``p`` (same shape and values) with its memory laid out in dimension order ``order``,
    outermost first: e.g. ``(0, 2, 3, 1)`` is channels-last for a 2-d conv weight."""
    inverse = sorted(range(len(order)), key=lambda i: order[i])
    t = torch.empty([p.shape[i] for i in order], dtype=p.dtype, device=p.device).permute(inverse)
    return nn.Parameter(t.copy_(p.detach()), requires_grad=p.requires_grad)


def fresh_bn(channels: int, dims: int) -> A.BatchNorm:
    return A.BatchNorm(_BN[dims](channels), dims=dims)


def branch_end(expr: A.Expr, channels: int, dims: int, init: float, mode: str, scaling: str) -> A.Expr:
    """End a branch: a learnable scale (online; ``scaling`` vector/scalar/none) or a
    fresh BatchNorm (offline), initialised so that the branch starts scaled by
    ``init`` (a BN's gamma gets ``init``)."""
    if mode == "offline":
        bn = fresh_bn(channels, dims)
        with torch.no_grad():
            bn.bn.weight.fill_(init)
        return A.Seq(expr, bn)
    if scaling == "none":
        return expr
    return A.Seq(expr, A.Scale(channels, dims, init=init, kind=scaling))


def center_offsets(kernel_size: Sequence[int], sub: Sequence[int]) -> tuple[int, ...]:
    """Tap offset that centres a ``sub`` kernel in a ``kernel_size`` frame
    (the lower-middle tap for even differences, as torch's 'same' padding)."""
    return tuple((k - s) // 2 for k, s in zip(kernel_size, sub))


def placed_conv(
    weight: Tensor,
    geom: ConvGeometry,
    offsets: Sequence[int],
    groups: int,
    bias: Tensor | None = None,
) -> A.Expr:
    """A conv with the (smaller) kernel ``weight`` placed at tap ``offsets`` of the
    frame of ``geom`` (same stride, dilation, output size and window).

    Where ``geom``'s padding allows, this is one conv with reduced padding; otherwise
    (e.g. a 'valid' conv) a fixed one-hot depthwise placement conv on the input,
    followed by the sub-kernel conv without padding - exact either way.
    """
    sub = tuple(weight.shape[2:])
    pads = []
    ok = True
    for (l, r), d, k, s, o in zip(geom.padding, geom.dilation, geom.kernel_size, sub, offsets):
        nl, nr = l - d * o, r - d * (k - s - o)
        ok = ok and nl >= 0 and nr >= 0
        pads.append((nl, nr))
    if ok:
        return A.Conv(weight, bias, stride=geom.stride, padding=tuple(pads), dilation=geom.dilation, groups=groups)
    c = geom.in_channels
    pk = tuple(k - s + 1 for k, s in zip(geom.kernel_size, sub))
    onehot = torch.zeros(c, 1, *pk)
    onehot[(slice(None), 0) + tuple(offsets)] = 1.0
    place = A.Conv(onehot, stride=1, padding=geom.padding, dilation=geom.dilation, groups=c)
    conv = A.Conv(weight, bias, stride=geom.stride, padding=0, dilation=geom.dilation, groups=groups)
    return A.Seq(place, conv)


def fixed_depthwise(pattern: Tensor, geom: ConvGeometry) -> A.Conv:
    """A fixed (buffer) depthwise conv on ``pattern.shape[0]`` channels with kernel
    ``pattern[c]`` and ``geom``'s stride, padding and dilation."""
    c = pattern.shape[0]
    return A.Conv(pattern.reshape(c, 1, *pattern.shape[1:]).clone(), stride=geom.stride, padding=geom.padding,
                  dilation=geom.dilation, groups=c)


def average_pattern(channels: int, geom: ConvGeometry) -> A.Expr:
    """``kxk`` average over ``channels`` channels in ``geom``'s frame: an
    :class:`~repcompiler.algebra.AvgPool` where pooling can express it (no dilation,
    symmetric padding of at most half the kernel), else a fixed depthwise conv."""
    ks = geom.kernel_size
    sym = all(l == r and l <= k // 2 for (l, r), k in zip(geom.padding, ks))
    if sym and all(d == 1 or k == 1 for d, k in zip(geom.dilation, ks)):
        return A.AvgPool(channels, geom.dims, ks, geom.stride, tuple(l for l, _ in geom.padding), False, True)
    return fixed_depthwise(torch.full((channels, *ks), 1.0 / math.prod(ks)), geom)
