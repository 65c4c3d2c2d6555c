"""The OREPA blocks (arXiv 2204.00826) as kernel-algebra expressions.

``orepa`` (any kxk, k >= 2 in some dim; 1-d/2-d/3-d; grouped, depthwise, strided,
dilated, asymmetric, any padding) - six branches, each ending in a learnable scale
(online) or a BN (offline), summed:

====  ==============================================  ==========
 #    branch                                           scale init
====  ==============================================  ==========
 0    origin kxk                                       0.25
 1    1x1 -> kxk average                               0.25
 2    1x1 x fixed frequency prior (DCT-II, per chan.)  0.0
 3    1x1 (identity-initialised) -> kxk                0.5
 4    1x1 zero-padded to kxk (centre tap)              1.0
 5    depthwise kxk (multiplier 8) -> pointwise 1x1    0.5
====  ==============================================  ==========

The internal width of branch 3 is ``in_channels`` (identity-initialised: a zero
delta plus the identity, so weight decay acts on the delta) when ``groups <= 4``, else
``2 * in_channels`` (kaiming-initialised), as in the official code.

``orepa_1x1`` (1x1 convs): origin 1x1 (scale 1.0) + 1x1 (identity-initialised) ->
1x1 (scale 0.5).

``orepa_large`` (the "linear deep stem", all kernel dims odd, some >= 5): the kernel is
the exact composition - a true convolution of kernels - of ``(k-1)/2`` stacked 3x3
OREPA blocks: the first carries the padding, the last the stride, the ones between
have no padding, so the stack equals its folded kernel everywhere, borders included.

Speed: ``fold()`` of these expressions (the generic algebra) is the source of truth
for deploy and checks. Online training instead calls :meth:`OrepaExpr.fast_fold`,
which gathers the branch parameters and runs
:func:`~repcompiler.blocks.orepa_kernel.orepa_kernel` (a specialised generator with a
hand-written backward, proven equal to ``fold()`` by the tests).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import algebra as A
from ..errors import UnsupportedError
from ._common import (
    average_pattern,
    branch_end,
    center_offsets,
    check_options,
    fixed_depthwise,
    fresh_weight,
    laid_out,
    placed_conv,
)
from .orepa_kernel import OrepaPatterns, orepa_kernel
from .prior import frequency_prior
from .registry import ConvGeometry

__all__ = ["OrepaExpr", "Orepa1x1Expr", "OrepaLargeExpr", "build_orepa", "build_orepa_1x1", "build_orepa_large",
           "OREPA_SCALE_INIT", "EXPAND_RATIO"]

OREPA_SCALE_INIT = (0.25, 0.25, 0.0, 0.5, 1.0, 0.5)
ORIGIN_1X1_SCALE_INIT = (1.0, 0.5)
EXPAND_RATIO = 8


def _scale_of(branch: A.Expr, out: int) -> Tensor | None:
    """The scale vector ``[out]`` at the end of an online branch (None: no scale)."""
    if isinstance(branch, A.Seq) and isinstance(branch.terms[-1], A.Affine):
        s = branch.terms[-1].scale
        if s is None:
            return None
        return s.expand(out) if s.dim() == 0 else s
    return None


def _core(branch: A.Expr) -> list[A.Expr]:
    """The terms of a branch without its trailing scale."""
    terms = list(branch.terms) if isinstance(branch, A.Seq) else [branch]
    if len(terms) > 1 and isinstance(terms[-1], A.Affine):
        terms = terms[:-1]
    return terms


def _mul(t: Tensor, s: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    return t if s is None else t * s.reshape(shape)


class OrepaExpr(A.Sum):
    """The OREPA kxk block: a :class:`~repcompiler.algebra.Sum` of its six branches
    (``terms``), plus :meth:`fast_fold` (online form only)."""

    def __init__(self, *branches: A.Expr, geom: ConvGeometry, internal: int, identity: bool,
                 mode: str) -> None:
        super().__init__(*branches)
        self.geom = geom
        self.internal = internal
        self.identity = identity
        self.mode = mode

    @property
    def has_fast_fold(self) -> bool:
        return self.mode == "online" and len(self.terms) == 6

    def fast_fold(self) -> A.Kernel:
        """The folded kernel, computed by :func:`~repcompiler.blocks.orepa_kernel.orepa_kernel`
        (equal to ``fold()``, with a hand-written backward)."""
        if not self.has_fast_fold:
            return self.fold(check=False)
        g = self.geom
        O, C, G = g.out_channels, g.in_channels, g.groups
        Cg, K = C // G, math.prod(g.kernel_size)
        t = self.terms
        w0 = _core(t[0])[0].weight
        raw = [_scale_of(branch, O) for branch in t]
        ones = torch.ones(O, dtype=w0.dtype, device=w0.device) if any(s is None for s in raw) else None
        scales = [ones if s is None else s for s in raw]
        first, w2 = _core(t[3])
        Mg = self.internal // G
        if self.identity:
            delta = first.terms[0].weight.reshape(G, Mg, Cg)
            w1 = delta + torch.eye(Cg, dtype=delta.dtype, device=delta.device)
        else:
            w1 = first.weight.reshape(G, Mg, Cg)
        dw, pw = (c.weight for c in _core(t[5]))
        Og, E = O // G, dw.shape[0] // C
        # the generator's layouts (views of the parameters as build_orepa lays them out)
        W = orepa_kernel(
            w0.reshape(O, Cg, K).transpose(1, 2),
            _core(t[1])[0].weight.reshape(O, Cg),
            _core(t[2])[0].weight.reshape(O, Cg),
            _core(t[4])[-1].weight.reshape(O, Cg),
            w1,
            w2.weight.reshape(O, Mg, K).transpose(1, 2),
            dw.reshape(C, E, K),
            pw.reshape(G, Og, Cg * E).transpose(1, 2).reshape(G * Cg, E, Og),
            scales,
            self._patterns(w0),
            G,
        )
        bias = _core(t[0])[0].bias
        if bias is not None and raw[0] is not None:
            bias = bias * raw[0]
        return A.Kernel(W.reshape(O, Cg, *g.kernel_size), bias, self.geom.spec if bias is not None else
                        _nobias(self.geom.spec))

    def _patterns(self, ref: Tensor) -> OrepaPatterns:
        """Average and prior patterns ``[O, K]`` and the centre tap (cached per dtype/device)."""
        key = (ref.dtype, ref.device)
        # never cache (or reuse) tensors seen while torch.compile/torch.export trace: they
        # are fake tensors, and caching them would poison the eager module
        plain = type(ref) in (torch.Tensor, torch.nn.Parameter)
        cache = getattr(self, "_pattern_cache", None)
        if plain and cache is not None and cache[0] == key:
            return cache[1]
        g = self.geom
        O, K = g.out_channels, math.prod(g.kernel_size)
        prior = _core(self.terms[2])[1].weight.reshape(O, K).to(ref)
        avg = _core(self.terms[1])[1].fold(check=False).weight.reshape(O, K).to(ref)
        centre = 0
        for k, off in zip(g.kernel_size, center_offsets(g.kernel_size, (1,) * g.dims)):
            centre = centre * k + off  # flat (row-major) index of the centre tap
        pats = OrepaPatterns.of(avg, prior, centre)
        if plain and type(pats.table) is torch.Tensor:
            object.__setattr__(self, "_pattern_cache", (key, pats))
        return pats

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_pattern_cache", None)
        return state


def _nobias(spec: A.ConvSpec) -> A.ConvSpec:
    from dataclasses import replace

    return replace(spec, has_bias=False)


def build_orepa(geom: ConvGeometry, *, mode: str = "online", scaling: str = "vector",
                expand_ratio: int = EXPAND_RATIO, internal_channels: int | None = None,
                scale_init: tuple[float, ...] = OREPA_SCALE_INIT) -> OrepaExpr:
    """The six-branch OREPA block for a kxk conv (see the module docstring)."""
    check_options("orepa", mode, scaling)
    if geom.is_pointwise_kernel:
        raise UnsupportedError(f"orepa needs a kernel larger than 1 in some dim ({geom.describe()}); use orepa_1x1")
    O, C, G, d = geom.out_channels, geom.in_channels, geom.groups, geom.dims
    Cg = C // G
    ks = geom.kernel_size
    one = (1,) * d
    sc = scale_init
    # online, the kernel generator reads the kxk weights channels-last ([O, k.., Cg]) and
    # the pointwise weight input-channel-major ([C*E, O], one group): parameters stored in
    # those layouts save it a transpose each in the forward and in the backward
    online = mode == "online"
    kc = (0, *range(2, 2 + d), 1)

    def kc_weight(*shape: int) -> torch.nn.Parameter:
        w = fresh_weight(*shape)
        return laid_out(w, kc) if online else w

    # 0 origin kxk
    origin = A.Conv(kc_weight(O, Cg, *ks), _bias(geom), stride=geom.stride, padding=geom.padding,
                    dilation=geom.dilation, groups=G)
    # 1 1x1 -> kxk average
    avg = A.Seq(A.Conv(fresh_weight(O, Cg, *one), groups=G), average_pattern(O, geom))
    # 2 1x1 x frequency prior
    prior = A.Seq(A.Conv(fresh_weight(O, Cg, *one), groups=G), fixed_depthwise(frequency_prior(O, ks), geom))
    # 3 1x1 (identity-init) -> kxk
    M = internal_channels or (C if G <= 4 else 2 * C)
    identity = M == C
    if identity:
        first: A.Expr = A.Sum(A.Conv(torch.nn.Parameter(torch.zeros(M, Cg, *one)), groups=G), A.Identity(C, d))
    else:
        first = A.Conv(fresh_weight(M, Cg, *one), groups=G)
    w2 = A.Conv(kc_weight(O, M // G, *ks), stride=geom.stride, padding=geom.padding, dilation=geom.dilation,
                groups=G)
    kxk = A.Seq(first, w2)
    # 4 1x1 zero-padded (centre tap)
    onebyone = placed_conv(fresh_weight(O, Cg, *one), geom, center_offsets(ks, one), G)
    # 5 depthwise kxk (x E) -> pointwise
    E = int(expand_ratio)
    dw = A.Conv(fresh_weight(E * C, 1, *ks), stride=geom.stride, padding=geom.padding, dilation=geom.dilation,
                groups=C)
    pw_weight = fresh_weight(O, E * C // G, *one)
    if online and G == 1:
        # input-channel-major; the size-1 kernel dims' strides are those autograd gives the
        # gradient (DDP's buckets want the gradient's strides to equal the parameter's)
        pw_weight = laid_out(pw_weight, (1, *range(2, 2 + d), 0))
    pw = A.Conv(pw_weight, groups=G)
    dws = A.Seq(dw, pw)
    branches = [origin, avg, prior, kxk, onebyone, dws]
    ends = [branch_end(b, O, d, init, mode, scaling) for b, init in zip(branches, sc)]
    return OrepaExpr(*ends, geom=geom, internal=M, identity=identity, mode=mode)


def _bias(geom: ConvGeometry) -> torch.nn.Parameter | None:
    return torch.nn.Parameter(torch.zeros(geom.out_channels)) if geom.bias else None


class Orepa1x1Expr(A.Sum):
    """OREPA for a 1x1 conv: origin + (identity-initialised 1x1 -> 1x1)."""

    def __init__(self, *branches: A.Expr, geom: ConvGeometry, mode: str) -> None:
        super().__init__(*branches)
        self.geom = geom
        self.mode = mode

    @property
    def has_fast_fold(self) -> bool:
        return self.mode == "online"

    def fast_fold(self) -> A.Kernel:
        if not self.has_fast_fold:
            return self.fold(check=False)
        g = self.geom
        O, C, G = g.out_channels, g.in_channels, g.groups
        Cg, Og = C // G, O // G
        t0, t1 = self.terms
        s0, s1 = _scale_of(t0, O), _scale_of(t1, O)
        c0, c1 = _core(t0), _core(t1)
        W = _mul(c0[0].weight.reshape(O, Cg), s0, (O, 1))
        delta = c1[0].terms[0].weight.reshape(G, Cg, Cg)
        w1 = delta + torch.eye(Cg, dtype=delta.dtype, device=delta.device)
        w2 = _mul(c1[1].weight.reshape(O, Cg), s1, (O, 1)).reshape(G, Og, Cg)
        W = W + torch.bmm(w2, w1).reshape(O, Cg)
        bias = c0[0].bias
        if bias is not None and s0 is not None:
            bias = bias * s0
        spec = g.spec if bias is not None else _nobias(g.spec)
        return A.Kernel(W.reshape(O, Cg, *g.kernel_size), bias, spec)


def build_orepa_1x1(geom: ConvGeometry, *, mode: str = "online", scaling: str = "vector",
                    scale_init: tuple[float, float] = ORIGIN_1X1_SCALE_INIT) -> Orepa1x1Expr:
    """OREPA's block for 1x1 convs (any stride/groups/dims)."""
    check_options("orepa_1x1", mode, scaling)
    if not geom.is_pointwise_kernel:
        raise UnsupportedError(f"orepa_1x1 needs a 1x1 kernel, got {geom.describe()}")
    O, C, G, d = geom.out_channels, geom.in_channels, geom.groups, geom.dims
    Cg = C // G
    one = (1,) * d
    origin = A.Conv(fresh_weight(O, Cg, *one), _bias(geom), stride=geom.stride, padding=geom.padding, groups=G)
    first = A.Sum(A.Conv(torch.nn.Parameter(torch.zeros(C, Cg, *one)), groups=G), A.Identity(C, d))
    second = A.Conv(fresh_weight(O, Cg, *one), stride=geom.stride, padding=geom.padding, groups=G)
    branches = [origin, A.Seq(first, second)]
    ends = [branch_end(b, O, d, init, mode, scaling) for b, init in zip(branches, scale_init)]
    return Orepa1x1Expr(*ends, geom=geom, mode=mode)


class OrepaLargeExpr(A.Seq):
    """The linear deep stem: stacked OREPA blocks whose folded kernels compose."""

    def __init__(self, *blocks: A.Expr, geom: ConvGeometry) -> None:
        super().__init__(*blocks)
        self.geom = geom

    @property
    def has_fast_fold(self) -> bool:
        return all(getattr(t, "has_fast_fold", False) for t in self.terms)

    def fast_fold(self) -> A.Kernel:
        if not self.has_fast_fold:
            return self.fold(check=False)
        kernel = self.terms[0].fast_fold()
        for t in list(self.terms)[1:]:
            kernel = A.compose(kernel, t.fast_fold(), check=False)
        return kernel


def build_orepa_large(geom: ConvGeometry, *, mode: str = "online", scaling: str = "vector",
                      internal_channels: int | None = None, **orepa_options: Any) -> OrepaLargeExpr:
    """The linear deep stem for a large odd kernel (e.g. a 7x7 stem conv):
    ``(k-1)/2`` stacked 3x3 OREPA blocks (per dim: 3 while that dim still grows, else
    1), padding in the first, stride in the last."""
    check_options("orepa_large", mode, scaling)
    ks = geom.kernel_size
    if any(k % 2 == 0 for k in ks) or max(ks) < 5:
        raise UnsupportedError(f"orepa_large needs odd kernel sizes with some k >= 5, got {geom.describe()}")
    n = (max(ks) - 1) // 2
    M = internal_channels or geom.out_channels
    if M % geom.groups:
        raise UnsupportedError(f"orepa_large: internal channels {M} not divisible by groups {geom.groups}")
    d = geom.dims
    blocks = []
    for i in range(n):
        sub = tuple(3 if i < (k - 1) // 2 else 1 for k in ks)
        first, last = i == 0, i == n - 1
        sg = ConvGeometry(
            in_channels=geom.in_channels if first else M,
            out_channels=geom.out_channels if last else M,
            kernel_size=sub,
            stride=geom.stride if last else (1,) * d,
            padding=geom.padding if first else ((0, 0),) * d,
            dilation=geom.dilation,
            groups=geom.groups,
            dims=d,
            bias=geom.bias and last,
        )
        if all(k == 1 for k in sub):
            blocks.append(build_orepa_1x1(sg, mode=mode, scaling=scaling))
        else:
            blocks.append(build_orepa(sg, mode=mode, scaling=scaling, **orepa_options))
    return OrepaLargeExpr(*blocks, geom=geom)
