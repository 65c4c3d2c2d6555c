"""The one set of helpers every block is built from (built-in and user-declared alike):
option checks, fresh parameters and their memory layouts, a sub-kernel placed in the
conv's window, the fixed average and pattern kernels, branch ends (scale or BN), and the
weight-initialisation style fresh parameters get (:func:`weight_init_scope`)."""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from .. import algebra as A
from ..algebra import ConvSpec
from ..errors import UnsupportedError, check_choice

__all__ = [
    "Placement",
    "MODES",
    "SCALINGS",
    "check_options",
    "fresh_weight",
    "WEIGHT_INITS",
    "weight_init_scope",
    "stacked_identity",
    "per_dim",
    "placed_parts",
    "placed",
    "average_pattern",
    "fixed_depthwise",
    "identity_fits",
    "branch_end",
]

MODES = ("online", "offline")
#: branch scalings (online): learnable per channel, learnable per branch, **fixed** at the
#: declared init values (a buffer, not learnable: the paper's "w/o linear scaling" read
#: as "the scales stay where they start") or none at all (every branch weighted 1)
SCALINGS = ("vector", "scalar", "fixed", "none")
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def check_options(block: str, mode: str, scaling: str) -> None:
    """Raise :class:`~repcompiler.errors.UnsupportedError` for an unknown ``mode`` or
    ``scaling`` of ``block``."""
    check_choice("mode", mode, MODES, owner=f"block {block!r}")
    check_choice("scaling", scaling, SCALINGS, owner=f"block {block!r}")


#: weight-initialisation styles of fresh branch weights: ``"torch"`` as ``nn.Conv*d``
#: (``kaiming_uniform_(a=sqrt(5))``, bound ``1/sqrt(fan_in)``); ``"kaiming"`` as the
#: official OREPA kxk block (``kaiming_uniform_(a=0)``, bound ``sqrt(6/fan_in)``, sqrt(6)
#: larger); ``"kaiming_a1"`` as the official OREPA 1x1 and OREPA-VGG kxk blocks
#: (``kaiming_uniform_(a=1)``, bound ``sqrt(3/fan_in)``)
WEIGHT_INITS = ("torch", "kaiming", "kaiming_a1")
_BOUND_NUMERATOR = {"torch": 1.0, "kaiming": 6.0, "kaiming_a1": 3.0}
_WEIGHT_INIT: contextvars.ContextVar[str] = contextvars.ContextVar("repcompiler_weight_init", default="torch")


@contextlib.contextmanager
def weight_init_scope(kind: str | None) -> Iterator[None]:
    """Within the block, :func:`fresh_weight` initialises in style ``kind`` (one of
    :data:`WEIGHT_INITS`; ``None`` keeps the enclosing style)."""
    if kind is None:
        yield
        return
    check_choice("weight_init", kind, WEIGHT_INITS, owner="weight_init_scope")
    token = _WEIGHT_INIT.set(kind)
    try:
        yield
    finally:
        _WEIGHT_INIT.reset(token)


def fresh_weight(*shape: int) -> nn.Parameter:
    """A new parameter ``U(-bound, bound)`` with ``fan_in = prod(shape[1:])``: bound
    ``1/sqrt(fan_in)`` as ``nn.Conv*d`` initialises its weight, ``sqrt(6/fan_in)``
    (``kaiming_uniform_(a=0)``) inside ``weight_init_scope("kaiming")``, ``sqrt(3/fan_in)``
    (``kaiming_uniform_(a=1)``) inside ``weight_init_scope("kaiming_a1")``."""
    fan_in = max(math.prod(shape[1:]), 1)
    bound = math.sqrt(_BOUND_NUMERATOR[_WEIGHT_INIT.get()] / fan_in)
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


def stacked_identity(rows: int, cols: int, dims: int, dtype: torch.dtype | None = None,
                     device: torch.device | None = None) -> Tensor:
    """The fixed part of an identity-initialised 1x1 ``[rows, cols, 1, ...]`` (``cols`` =
    input channels per group): row ``i`` reads column ``i % cols``, as the official OREPA
    code's ``id_tensor``. ``rows == cols * groups`` gives the (grouped) identity,
    ``rows = 2 * in`` the identity stacked twice, ``rows < cols`` its first rows."""
    w = torch.zeros(rows, cols, *(1,) * dims, dtype=dtype, device=device)
    idx = torch.arange(rows, device=device)
    w[(idx, idx % cols) + (0,) * dims] = 1.0
    return w


def per_dim(value: Any, geom: ConvSpec, what: str) -> tuple[int, ...]:
    """An int, a per-dim tuple or a callable of the geometry -> a per-dim tuple."""
    if callable(value):
        value = value(geom)
    if isinstance(value, int):
        return (int(value),) * geom.dims
    out = tuple(int(v) for v in value)
    if len(out) != geom.dims:
        raise UnsupportedError(f"{what}={out} has {len(out)} entries but the conv is {geom.dims}-d ({geom.describe()})")
    if any(v < 1 for v in out):
        raise UnsupportedError(f"{what}={out} must be positive")
    return out


def placed_parts(weight: Tensor, geom: ConvSpec, dilation: Sequence[int], groups: int,
                 bias: Tensor | None = None) -> list[tuple[str, A.Expr]]:
    """A conv with kernel ``weight`` and ``dilation``, its window centred on the window
    of the conv ``geom`` (same stride and output size for every input size), as named
    parts: ``[("", conv)]`` or, where the branch window is smaller than the conv's and
    the conv has too little padding for it (e.g. a 'valid' conv), ``[("place",
    one-hot depthwise conv), ("", conv)]``. Exact either way. A branch with the
    conv's dilation (or a 1x1) sits on the conv's tap grid, the extra tap of an even
    difference to the right (as torch's ``padding="same"``); others are centred by pixels."""
    ks = tuple(weight.shape[2:])
    pads, place_dims = [], []
    for i, ((l, r), e, k, d) in enumerate(zip(geom.padding, geom.extent, ks, dilation)):
        delta = e - d * (k - 1)
        kc, dc = geom.kernel_size[i], geom.dilation[i]
        # on the conv's own tap grid where the branch shares its dilation (the kernel then
        # does not grow), else centred by pixels
        off = dc * ((kc - k) // 2) if (d == dc or k == 1) and kc >= k else delta // 2
        nl, nr = l - off, r - (delta - off)
        if nl >= 0 and nr >= 0:
            pads.append((nl, nr))
        else:  # only possible when delta > 0: shift/crop with a one-hot conv first
            pads.append((0, 0))
            place_dims.append((i, off, delta))
    conv = A.Conv(weight, bias, stride=geom.stride, padding=tuple(pads), dilation=tuple(dilation), groups=groups)
    if not place_dims:
        return [("", conv)]
    c = geom.in_channels
    pk, ppad, idx, pdil = [1] * geom.dims, [(0, 0)] * geom.dims, [0] * geom.dims, [1] * geom.dims
    for i, off, delta in place_dims:
        u = geom.dilation[i] if off % geom.dilation[i] == 0 == delta % geom.dilation[i] else 1  # the conv's grid
        pk[i], ppad[i], idx[i], pdil[i] = delta // u + 1, geom.padding[i], off // u, u
    return [("place", Placement(c, pk, idx, padding=ppad, dilation=pdil)), ("", conv)]


class Placement(A.Conv):
    """The fixed one-hot depthwise conv of :func:`placed_parts` (shifts/crops the input so
    a small branch window sits on its tap of a larger conv's window). ``tap`` is the hot
    index, fixed by the geometry and kept as Python ints, so code that needs it while
    ``torch.compile`` traces (the OREPA accelerator's structure check) need not read the
    buffer: a ``nonzero()`` of it was a data-dependent graph break on every forward."""

    def __init__(self, channels: int, kernel_size: Sequence[int], tap: Sequence[int], *,
                 padding: Sequence[tuple[int, int]], dilation: Sequence[int]) -> None:
        onehot = torch.zeros(channels, 1, *kernel_size)
        onehot[(slice(None), 0) + tuple(tap)] = 1.0
        super().__init__(onehot, padding=tuple(padding), dilation=tuple(dilation), groups=channels)
        self.tap = tuple(int(i) for i in tap)


def placed(weight: Tensor, geom: ConvSpec, dilation: Sequence[int], groups: int,
           bias: Tensor | None = None) -> A.Expr:
    """:func:`placed_parts` as one expression (a conv, or the placement then the conv)."""
    parts = [p for _, p in placed_parts(weight, geom, dilation, groups, bias)]
    return parts[0] if len(parts) == 1 else A.Seq(*parts)


def fixed_depthwise(pattern: Tensor, geom: ConvSpec) -> A.Conv:
    """A fixed (buffer) depthwise conv on ``pattern.shape[0]`` channels with kernel
    ``pattern[c]`` and ``geom``'s stride, padding and dilation."""
    c = pattern.shape[0]
    return A.Conv(pattern.reshape(c, 1, *pattern.shape[1:]).clone(), stride=geom.stride, padding=geom.padding,
                  dilation=geom.dilation, groups=c)


def average_pattern(channels: int, geom: ConvSpec) -> A.Expr:
    """``kxk`` average over ``channels`` channels in ``geom``'s frame: an
    :class:`~repcompiler.algebra.AvgPool` where pooling can express it (no dilation,
    symmetric padding of at most half the kernel), else a fixed depthwise conv."""
    ks = geom.kernel_size
    sym = all(l == r and l <= k // 2 for (l, r), k in zip(geom.padding, ks))
    if sym and all(d == 1 or k == 1 for d, k in zip(geom.dilation, ks)):
        return A.AvgPool(channels, geom.dims, ks, geom.stride, tuple(l for l, _ in geom.padding), False, True)
    return fixed_depthwise(torch.full((channels, *ks), 1.0 / math.prod(ks)), geom)


def identity_fits(geom: ConvSpec) -> bool:
    """Whether the identity has ``geom``'s geometry: ``in == out``, stride 1 and the
    window centred on each output pixel (symmetric 'same' padding)."""
    centred = all(l == r and 2 * l == e for (l, r), e in zip(geom.padding, geom.extent))
    return geom.in_channels == geom.out_channels and all(s == 1 for s in geom.stride) and centred


def branch_end(channels: int, dims: int, init: float, mode: str, scaling: str) -> dict[str, Any]:
    """The end of a branch as :class:`~repcompiler.blocks.named.BranchExpr` keywords: a
    learnable ``scale`` initialised to ``init`` (online; ``scaling`` ``"vector"``:
    ``[C]``, ``"scalar"``: one number), a fixed ``[C]`` buffer equal to ``init``
    (``"fixed"``), nothing (``"none"``: the branch is weighted 1, ``init`` does not
    apply) or a fresh BatchNorm ``bn`` with gamma ``init`` (offline, as DBB/RepVGG train)."""
    if mode == "offline":
        bn = _BN[dims](channels)
        with torch.no_grad():
            bn.weight.fill_(float(init))
        return {"bn": bn}
    if scaling == "none":  # the paper's ablation: no branch scale (init does not apply)
        return {}
    if scaling == "fixed":  # a buffer: the branch keeps its init weight, nothing learns it
        return {"scale": torch.full((channels,), float(init))}
    shape = (channels,) if scaling == "vector" else ()
    return {"scale": nn.Parameter(torch.full(shape, float(init)))}

