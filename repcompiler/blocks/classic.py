"""RepVGG, DBB and ACNet blocks, linearized (online) or as their papers train them
(offline: a BN at the end of every branch, DBB's inner BNs included).

Eligibility (a builder raises :class:`~repcompiler.errors.UnsupportedError` otherwise):

* ``repvgg`` (RepVGG, Ding et al. 2021): a kernel larger than 1 in some dim. Branches:
  kxk, 1x1 (centre tap), and the identity when ``in == out``, stride 1 and the conv
  is symmetric "same" (``left == right == dilation*(k-1)/2`` in every dim).
* ``dbb`` (Diverse Branch Block, Ding et al. 2021): a kernel larger than 1 in some
  dim. Branches: kxk; 1x1 (if ``groups < out``); 1x1 -> kxk average (just the average
  when ``groups == out``, which needs ``in == out``); 1x1 (identity-initialised, width
  ``in`` if ``groups < out`` else ``2*in``) -> kxk. Offline, the inner BNs pad with
  their bias as DBB's ``BNAndPadLayer`` does (``ZeroPad -> BN -> kxk without padding``),
  so the offline block also folds exactly.
* ``acnet`` (ACNet, Ding et al. 2019): 2-d or 3-d convs with every kernel dim > 1.
  Branches: the kxk kernel and, per spatial dim, a centred "line" kernel spanning that
  dim only (1xk and kx1 in 2-d).

Every branch ends with a scale initialised to 1 (online) or a BN (offline).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import algebra as A
from ..errors import UnsupportedError
from ._common import average_pattern, branch_end, center_offsets, check_options, fresh_bn, fresh_weight, placed_conv
from .registry import ConvGeometry

__all__ = ["build_repvgg", "build_dbb", "build_acnet"]


def _bias(geom: ConvGeometry) -> torch.nn.Parameter | None:
    return torch.nn.Parameter(torch.zeros(geom.out_channels)) if geom.bias else None


def _origin(geom: ConvGeometry) -> A.Conv:
    return A.Conv(fresh_weight(geom.out_channels, geom.in_channels // geom.groups, *geom.kernel_size), _bias(geom),
                  stride=geom.stride, padding=geom.padding, dilation=geom.dilation, groups=geom.groups)


def _need_kxk(name: str, geom: ConvGeometry) -> None:
    if geom.is_pointwise_kernel:
        raise UnsupportedError(f"{name} needs a kernel larger than 1 in some dim, got {geom.describe()}")


def _sum(branches: list[A.Expr]) -> A.Expr:
    return A.Sum(*branches) if len(branches) > 1 else branches[0]


def build_repvgg(geom: ConvGeometry, *, mode: str = "online", scaling: str = "vector") -> A.Expr:
    """RepVGG: kxk + 1x1 (+ identity)."""
    check_options("repvgg", mode, scaling)
    _need_kxk("repvgg", geom)
    O, C, G, d = geom.out_channels, geom.in_channels, geom.groups, geom.dims
    one = (1,) * d
    branches = [
        _origin(geom),
        placed_conv(fresh_weight(O, C // G, *one), geom, center_offsets(geom.kernel_size, one), G),
    ]
    same = all(l == r and 2 * l == dd * (k - 1) for (l, r), dd, k in zip(geom.padding, geom.dilation, geom.kernel_size))
    if C == O and all(s == 1 for s in geom.stride) and same:
        branches.append(A.Identity(C, d))
    return _sum([branch_end(b, O, d, 1.0, mode, scaling) for b in branches])


def build_dbb(geom: ConvGeometry, *, mode: str = "online", scaling: str = "vector") -> A.Expr:
    """DBB: kxk, 1x1, 1x1 -> avg, 1x1 -> kxk."""
    check_options("dbb", mode, scaling)
    _need_kxk("dbb", geom)
    O, C, G, d = geom.out_channels, geom.in_channels, geom.groups, geom.dims
    one = (1,) * d
    offline = mode == "offline"
    nopad = replace(geom, padding=((0, 0),) * d, has_bias=False)
    branches: list[A.Expr] = [_origin(geom)]
    if G < O:
        branches.append(placed_conv(fresh_weight(O, C // G, *one), geom, center_offsets(geom.kernel_size, one), G))
    # 1x1 -> avg
    if G < O:
        pre: list[A.Expr] = [A.Conv(fresh_weight(O, C // G, *one), groups=G)]
    elif C == O:
        pre = []
    else:
        raise UnsupportedError(f"dbb: groups == out_channels needs in == out for the average branch, got {geom.describe()}")
    if offline and pre:
        avg = A.Seq(*pre, A.ZeroPad(O, d, geom.padding), fresh_bn(O, d), average_pattern(O, nopad))
    else:
        avg = A.Seq(*pre, average_pattern(O, geom)) if pre else average_pattern(O, geom)
    branches.append(avg)
    # 1x1 (identity-init) -> kxk
    M = C if G < O else 2 * C
    if M == C:
        first: A.Expr = A.Sum(A.Conv(torch.nn.Parameter(torch.zeros(M, C // G, *one)), groups=G), A.Identity(C, d))
    else:
        first = A.Conv(fresh_weight(M, C // G, *one), groups=G)
    if offline:
        second = A.Conv(fresh_weight(O, M // G, *geom.kernel_size), stride=geom.stride, dilation=geom.dilation, groups=G)
        branches.append(A.Seq(first, A.ZeroPad(M, d, geom.padding), fresh_bn(M, d), second))
    else:
        second = A.Conv(fresh_weight(O, M // G, *geom.kernel_size), stride=geom.stride, padding=geom.padding,
                        dilation=geom.dilation, groups=G)
        branches.append(A.Seq(first, second))
    return _sum([branch_end(b, O, d, 1.0, mode, scaling) for b in branches])


def build_acnet(geom: ConvGeometry, *, mode: str = "online", scaling: str = "vector") -> A.Expr:
    """ACNet: kxk + one centred line kernel per spatial dim."""
    check_options("acnet", mode, scaling)
    if geom.dims < 2 or any(k < 2 for k in geom.kernel_size):
        raise UnsupportedError(f"acnet needs a 2-d/3-d conv with every kernel dim > 1, got {geom.describe()}")
    O, C, G, d = geom.out_channels, geom.in_channels, geom.groups, geom.dims
    branches: list[A.Expr] = [_origin(geom)]
    for i in range(d):
        sub = tuple(k if j == i else 1 for j, k in enumerate(geom.kernel_size))
        branches.append(placed_conv(fresh_weight(O, C // G, *sub), geom, center_offsets(geom.kernel_size, sub), G))
    return _sum([branch_end(b, O, d, 1.0, mode, scaling) for b in branches])
