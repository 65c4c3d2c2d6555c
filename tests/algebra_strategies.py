"""Hypothesis strategies for the kernel-algebra tests: random leaves, geometries and
expression trees (depth >= 3) mixing every leaf and combinator.

Weights come from a torch generator seeded by one drawn integer (hypothesis draws the
structure, not every weight). Everything is built in float64 and in eval mode.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

import repcompiler.algebra as A
from repcompiler.errors import IncompatibleError
from helpers import randomize_bn

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class TreeGen:
    """Draws a random expression tree. ``strides`` bounds how many strided leaves a tree
    may contain (keeps the needed input size small)."""

    def __init__(self, draw, dims: int, seed: int, strides: int = 2, lean: bool = False,
                 align: bool | None = None) -> None:
        self.draw = draw
        self.align_always = lean if align is None else align
        self.lean = lean  # lean toward exact trees: padding, biases and pool quirks rarer
        self.dims = dims
        self.g = torch.Generator().manual_seed(seed)
        self.strides_left = strides
        self.bn_seed = seed
        self.kmax = {1: 4, 2: 3, 3: 2}[dims]

    # -- helpers -------------------------------------------------------------------
    def randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.g, dtype=torch.float64) * scale

    def per_dim(self, strat) -> tuple[int, ...]:
        return tuple(self.draw(strat) for _ in range(self.dims))

    def stride(self, allow: bool) -> tuple[int, ...]:
        if not allow or self.strides_left <= 0 or not self.draw(st.booleans()):
            return (1,) * self.dims
        self.strides_left -= 1
        s = self.per_dim(st.integers(1, 2))
        return s if any(v > 1 for v in s) else (2,) + s[1:]

    def padding(self, pad: bool = True):
        modes = ["none"] * (6 if self.lean else 2) + ["sym", "pairs"]
        mode = self.draw(st.sampled_from(modes)) if pad else "none"
        if mode == "none":
            return 0
        if mode == "sym":
            return self.per_dim(st.integers(0, 2))
        return tuple((self.draw(st.integers(0, 2)), self.draw(st.integers(0, 2))) for _ in range(self.dims))

    # -- leaves --------------------------------------------------------------------
    def conv(self, cin: int, cout: int | None = None, allow_stride: bool = True, pad: bool = True):
        cout = cout or self.draw(st.integers(1, 4))
        groups = self.draw(st.sampled_from(divisors(math.gcd(cin, cout))))
        ks = self.per_dim(st.integers(1, self.kmax))
        dil = self.per_dim(st.integers(1, 2)) if self.draw(st.integers(0, 3)) == 0 else 1
        fan_in = cin // groups * math.prod(ks)
        w = nn.Parameter(self.randn(cout, cin // groups, *ks, scale=1 / math.sqrt(fan_in)))
        b = nn.Parameter(self.randn(cout, scale=0.5)) if self.draw(st.integers(0, 3 if self.lean else 1)) == 0 else None
        return A.Conv(w, b, stride=self.stride(allow_stride), padding=self.padding(pad), dilation=dil,
                      groups=groups), cout

    def affine(self, c: int):
        kind = self.draw(st.sampled_from(["affine", "scale_v", "scale_s", "bias", "const"]))
        d = self.dims
        if kind == "affine":
            scale = self.draw(st.sampled_from(["vec", "scalar", "none"]))
            sc = {"vec": nn.Parameter(1 + 0.5 * self.randn(c)), "scalar": nn.Parameter(1 + 0.5 * self.randn()),
                  "none": None}[scale]
            shift = nn.Parameter(0.5 * self.randn(c)) if (scale == "none" or self.draw(st.booleans())) else None
            return A.Affine(c, d, scale=sc, shift=shift)
        if kind in ("scale_v", "scale_s"):
            e = A.Scale(c, d, init=1.0, kind="vector" if kind == "scale_v" else "scalar").double()
            with torch.no_grad():
                e.scale.copy_(1 + 0.5 * self.randn(*e.scale.shape))
            return e
        if kind == "bias":
            e = A.Bias(c, d).double()
            with torch.no_grad():
                e.shift.copy_(0.5 * self.randn(c))
            return e
        value = self.draw(st.sampled_from([-1.5, -0.5, 0.25, 0.7, 2.0]))
        return A.Constant(c, d, value=value).double()

    def bn(self, c: int):
        affine = self.draw(st.integers(0, 4)) > 0
        self.bn_seed += 1
        bn = randomize_bn(_BN[self.dims](c, affine=affine).double(), self.bn_seed).eval()
        return A.BatchNorm(bn)

    def avgpool(self, c: int, allow_stride: bool = True):
        ks = self.per_dim(st.integers(1, 3))
        stride = self.stride(allow_stride)
        pad = tuple(self.draw(st.integers(0, k // 2)) for k in ks) if self.draw(st.booleans()) else 0
        return A.AvgPool(c, self.dims, ks, stride, pad, ceil_mode=self.draw(st.integers(0, 3)) == 0,
                         count_include_pad=self.draw(st.integers(0, 2)) > 0).double()

    def zeropad(self, c: int):
        return A.ZeroPad(c, self.dims, tuple((self.draw(st.integers(0, 2)), self.draw(st.integers(0, 2)))
                                             for _ in range(self.dims))).double()

    def leaf(self, cin: int, cout: int | None = None, allow_stride: bool = True):
        if cout is not None and cout != cin:
            return self.conv(cin, cout, allow_stride)
        kinds = ["conv", "conv", "affine", "bn", "identity", "avgpool"] + ([] if self.lean else ["zeropad"])
        kind = self.draw(st.sampled_from(kinds))
        if kind == "conv":
            return self.conv(cin, cout, allow_stride)
        if kind == "affine":
            return self.affine(cin), cin
        if kind == "bn":
            return self.bn(cin), cin
        if kind == "identity":
            return A.Identity(cin, self.dims).double(), cin
        if kind == "avgpool":
            return self.avgpool(cin, allow_stride), cin
        return self.zeropad(cin), cin

    # -- trees ---------------------------------------------------------------------
    def tree(self, depth: int, cin: int, cout: int | None = None, allow_stride: bool = True):
        if depth <= 0:
            return self.leaf(cin, cout, allow_stride)
        kind = self.draw(st.sampled_from(["seq", "seq", "sum", "sum", "concat"]))
        if kind == "seq":
            n = self.draw(st.integers(2, 3))
            terms, c = [], cin
            for i in range(n):
                target = cout if i == n - 1 else None
                e, c = self.tree(depth - 1 if i == 0 else self.draw(st.integers(0, depth - 1)), c, target,
                                 allow_stride)
                terms.append(e)
            return A.Seq(*terms), c
        n = self.draw(st.integers(2, 3))
        if kind == "sum":
            cout_b = cout or self.draw(st.integers(1, 4))
            branches = [self.tree(depth - 1 if i == 0 else self.draw(st.integers(0, depth - 1)), cin, cout_b,
                                  False)[0] for i in range(n)]
        else:
            branches = [self.tree(depth - 1 if i == 0 else self.draw(st.integers(0, depth - 1)), cin, None,
                                  False)[0] for i in range(n)]
        # a common stride: every branch starts with its own strided leaf
        s = self.stride(allow_stride)
        if any(v > 1 for v in s):
            new = []
            for b in branches:
                if self.draw(st.booleans()):
                    ks = self.per_dim(st.integers(1, self.kmax))
                    w = nn.Parameter(self.randn(cin, 1, *ks, scale=1 / math.sqrt(math.prod(ks))))
                    head = A.Conv(w, stride=s, padding=self.padding(), groups=cin)
                else:
                    ks = self.per_dim(st.integers(1, 3))
                    head = A.AvgPool(cin, self.dims, ks, s, 0).double()
                new.append(A.Seq(head, b))
            branches = new
        # usually align the branch windows with leading zero padding (exactly, see geometry)
        if self.align_always or self.draw(st.integers(0, 5)) > 0:
            branches = self.align(branches, cin)
        if kind == "sum":
            return A.Sum(*branches), cout_b
        e = A.Concat(*branches)
        c = e.spec.out_channels if e.plan()[0] is not None else sum(_out_channels(b) for b in branches)
        if cout is not None and cout != c:
            conv, _ = self.conv(c, cout, False, pad=False)
            return A.Seq(e, conv), cout
        return e, c

    def align(self, branches, cin: int):
        specs = [b.plan()[0] for b in branches]
        if any(s is None for s in specs) or len({s.stride for s in specs}) > 1:
            return branches
        consts = [[s.padding[i][0] + s.padding[i][1] - s.extent[i] for i in range(self.dims)] for s in specs]
        top = [max(c[i] for c in consts) for i in range(self.dims)]
        out = []
        for b, c in zip(branches, consts):
            deltas = [top[i] - c[i] for i in range(self.dims)]
            if not any(deltas):
                out.append(b)
                continue
            pairs = []
            for dlt in deltas:
                left = self.draw(st.integers(0, dlt))
                pairs.append((left, dlt - left))
            out.append(A.Seq(A.ZeroPad(cin, self.dims, tuple(pairs)).double(), b))
        return out


def _out_channels(e) -> int:
    spec = e.plan()[0]
    if spec is not None:
        return spec.out_channels
    if isinstance(e, A.Seq):
        return _out_channels(e.terms[-1])
    if isinstance(e, A.Concat):
        return sum(_out_channels(t) for t in e.terms)
    if isinstance(e, A.Sum):
        return _out_channels(e.terms[0])
    raise AssertionError(type(e))


@dataclass
class Case:
    expr: A.Expr
    dims: int
    cin: int
    seed: int

    def input(self, size: tuple[int, ...], dtype=torch.float64, batch: int = 2) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed + 7)
        return torch.randn(batch, self.cin, *size, generator=g, dtype=torch.float64).to(dtype)


@st.composite
def trees(draw, min_depth: int = 3, max_depth: int = 3, dims=None, lean: bool = False, align: bool | None = None):
    """A random expression tree (``Case``) of depth in ``[min_depth, max_depth]``."""
    d = draw(st.sampled_from([1, 2, 3])) if dims is None else dims
    seed = draw(st.integers(0, 2**31 - 1))
    gen = TreeGen(draw, d, seed, lean=lean, align=align)
    cin = draw(st.integers(1, 4))
    depth = draw(st.integers(min_depth, max_depth))
    expr, _ = gen.tree(depth, cin)
    return Case(expr.eval(), d, cin, seed)


def working_size(expr: A.Expr, dims: int, cin: int, extra: tuple[int, ...], limit: int | None = None,
                 interior: bool = False):
    """The smallest spatial size (plus ``extra``) on which the unfolded expression runs,
    or ``None`` (too large, or branch outputs that never align). With ``interior`` the
    size also leaves at least one output whose folded window lies inside the input."""
    limit = limit or {1: 64, 2: 32, 3: 16}[dims]
    spec = expr.plan()[0]
    if spec is not None and interior:
        base = [e + s for e, s in zip(spec.extent, spec.stride)]
    elif spec is not None:
        base = [max(1, e - l - r + 1) for e, (l, r) in zip(spec.extent, spec.padding)]
    else:
        base = [1] * dims
    size = [b + x for b, x in zip(base, extra)]
    while max(size) <= limit:
        x = torch.zeros(1, cin, *size, dtype=torch.float64)
        try:
            with torch.no_grad():
                expr(x)
            return tuple(size)
        except IncompatibleError:
            return None
        except RuntimeError:  # an intermediate map became empty: grow the input
            size = [s + 1 for s in size]
    return None


def float_copy(expr: A.Expr) -> A.Expr:
    return copy.deepcopy(expr).float()
