"""The OREPA blocks (arXiv 2204.00826), declared with the public ``BlockConfig`` API.

``orepa`` (any kxk, k >= 2 in some dim; 1-d/2-d/3-d; grouped, depthwise, strided,
dilated, asymmetric, any padding) - six branches, each ending in a learnable scale
(online) or a BN (offline), summed:

=============  ==============================================  ==========
 branch         computes                                        scale init
=============  ==============================================  ==========
 ``origin``     kxk                                             0.25
 ``avg``        1x1 -> kxk average                              0.25
 ``prior``      1x1 -> fixed frequency prior (DCT-II, per ch.)  0.0
 ``pw_kxk``     1x1 (identity-initialised) -> kxk               0.5
 ``pointwise``  1x1 zero-padded to kxk (centre tap)             1.0
 ``dw_pw``      depthwise kxk (multiplier 8) -> pointwise 1x1   0.5
=============  ==============================================  ==========

The internal width of ``pw_kxk`` is ``in_channels`` (``identity + weight``, the weight
starting at zero, so weight decay acts on the delta) when ``groups <= 4``, else
``2 * in_channels`` (kaiming-initialised), as in the official code.

``orepa_1x1`` (1x1 convs): ``origin`` 1x1 (scale 1.0) + ``pw_pw``: 1x1
(identity-initialised) -> 1x1 (scale 0.5).

``orepa_large`` (the "linear deep stem", all kernel dims odd, some >= 5): stages
``stage0``, ``stage1``, ... - ``(k-1)/2`` stacked 3x3 OREPA blocks whose kernels compose
exactly (a true convolution of kernels): the first carries the padding, the last the
stride, the ones between have no padding, so the stack equals its folded kernel
everywhere, borders included.

Speed: the generic fold is the reference for deploy and checks. Online training uses
the accelerators attached to the declarations (:class:`OrepaAccelerator`,
:class:`Orepa1x1Accelerator`, :class:`StackAccelerator`), which find the branches by
name and check their shapes; :func:`~repcompiler.blocks.orepa_kernel.orepa_kernel` is
the kxk generator with a hand-written backward, proven equal to the fold by the tests.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from .. import algebra as A
from ..algebra import ConvSpec
from .accel import KernelAccelerator
from .branch import Branch
from .config import BlockConfig
from .named import BlockExpr, BranchExpr, ResidualConv, StackExpr
from .orepa_kernel import OrepaPatterns, orepa_kernel
from .parts import laid_out
from .prior import frequency_prior

__all__ = ["OrepaAccelerator", "Orepa1x1Accelerator", "StackAccelerator", "orepa_config", "orepa_1x1_config",
           "orepa_large_config", "build_orepa", "build_orepa_1x1", "build_orepa_large", "OREPA_SCALE_INIT",
           "EXPAND_RATIO", "OREPA_BRANCHES"]

OREPA_BRANCHES = ("origin", "avg", "prior", "pw_kxk", "pointwise", "dw_pw")
OREPA_SCALE_INIT = (0.25, 0.25, 0.0, 0.5, 1.0, 0.5)
ORIGIN_1X1_SCALE_INIT = (1.0, 0.5)
EXPAND_RATIO = 8


def _prior(g: ConvSpec) -> torch.Tensor:
    return frequency_prior(g.in_channels, g.kernel_size)


def orepa_config(*, expand_ratio: int = EXPAND_RATIO, internal_channels: int | None = None,
                 scale_init: tuple[float, ...] = OREPA_SCALE_INIT) -> BlockConfig:
    """The declaration of the six-branch OREPA kxk block (see the module docstring)."""
    s = tuple(scale_init)

    def width(g: ConvSpec) -> int:
        return internal_channels or (g.in_channels if g.groups <= 4 else 2 * g.in_channels)

    def init(g: ConvSpec) -> str:
        return "residual" if width(g) == g.in_channels else "random"

    return (
        BlockConfig("orepa")
        .describe("OREPA kxk: origin, 1x1->avg, 1x1->prior, 1x1->kxk, 1x1, depthwise->pointwise")
        .requires(lambda g: not g.is_pointwise_kernel, "needs a kernel larger than 1 in some dim; use orepa_1x1")
        .branch(Branch.conv(), name="origin", init=s[0])
        .branch(Branch.pointwise(lambda g: g.out_channels) >> Branch.avg(), name="avg", init=s[1])
        .branch(Branch.pointwise(lambda g: g.out_channels) >> Branch.fixed(_prior), name="prior", init=s[2])
        .branch(Branch.pointwise(width, init=init) >> Branch.conv(), name="pw_kxk", init=s[3])
        .branch(Branch.pointwise(), name="pointwise", init=s[4])
        .branch(Branch.depthwise(int(expand_ratio)) >> Branch.pointwise(), name="dw_pw", init=s[5])
        .accelerate(OrepaAccelerator())
    )


def orepa_1x1_config(*, scale_init: tuple[float, float] = ORIGIN_1X1_SCALE_INIT) -> BlockConfig:
    """OREPA's block for 1x1 convs (any stride/groups/dims)."""
    return (
        BlockConfig("orepa_1x1")
        .describe("OREPA 1x1: origin + identity-initialised 1x1 -> 1x1")
        .requires(lambda g: g.is_pointwise_kernel, "needs a 1x1 kernel")
        .branch(Branch.conv(), name="origin", init=scale_init[0])
        .branch(Branch.pointwise(init="residual") >> Branch.conv(), name="pw_pw", init=scale_init[1])
        .accelerate(Orepa1x1Accelerator())
    )


def orepa_large_config(*, internal_channels: int | None = None, **orepa_options: Any) -> BlockConfig:
    """The linear deep stem for a large odd kernel (e.g. a 7x7 stem conv):
    ``(k-1)/2`` stacked 3x3 OREPA blocks (per dim: 3 while that dim still grows, else
    1), padding in the first, stride in the last."""
    kxk, one = orepa_config(**orepa_options), orepa_1x1_config()

    def stages(geom: ConvSpec) -> list[tuple[ConvSpec, BlockConfig]]:
        ks, d = geom.kernel_size, geom.dims
        n, m = (max(ks) - 1) // 2, internal_channels or geom.out_channels
        out = []
        for i in range(n):
            sub = tuple(3 if i < (k - 1) // 2 else 1 for k in ks)
            first, last = i == 0, i == n - 1
            sg = ConvSpec(d, geom.in_channels if first else m, geom.out_channels if last else m, sub,
                          geom.stride if last else (1,) * d, geom.padding if first else ((0, 0),) * d,
                          geom.dilation, geom.groups, geom.bias and last)
            out.append((sg, one if all(k == 1 for k in sub) else kxk))
        return out

    return (
        BlockConfig("orepa_large")
        .describe("OREPA linear deep stem: stacked 3x3 OREPA blocks composed into one large kernel")
        .requires(lambda g: all(k % 2 for k in g.kernel_size) and max(g.kernel_size) >= 5,
                  "needs odd kernel sizes with some k >= 5")
        .requires(lambda g: (internal_channels or g.out_channels) % g.groups == 0,
                  "the internal channels must be divisible by groups")
        .stacked(stages)
        .accelerate(StackAccelerator())
    )


def build_orepa(geom: ConvSpec, *, mode: str = "online", scaling: str = "vector", expand_ratio: int = EXPAND_RATIO,
                internal_channels: int | None = None, scale_init: tuple[float, ...] = OREPA_SCALE_INIT) -> A.Expr:
    """The six-branch OREPA block for a kxk conv (the registered ``orepa`` builder)."""
    cfg = orepa_config(expand_ratio=expand_ratio, internal_channels=internal_channels, scale_init=scale_init)
    return cfg.build(geom, mode=mode, scaling=scaling)


def build_orepa_1x1(geom: ConvSpec, *, mode: str = "online", scaling: str = "vector",
                    scale_init: tuple[float, float] = ORIGIN_1X1_SCALE_INIT) -> A.Expr:
    """The registered ``orepa_1x1`` builder."""
    return orepa_1x1_config(scale_init=scale_init).build(geom, mode=mode, scaling=scaling)


def build_orepa_large(geom: ConvSpec, *, mode: str = "online", scaling: str = "vector",
                      internal_channels: int | None = None, **orepa_options: Any) -> A.Expr:
    """The registered ``orepa_large`` builder."""
    cfg = orepa_large_config(internal_channels=internal_channels, **orepa_options)
    return cfg.build(geom, mode=mode, scaling=scaling)


# -- accelerators -----------------------------------------------------------------------


def _is_conv(e: Any, shape: tuple[int, ...], groups: int) -> bool:
    return isinstance(e, A.Conv) and e.bias is None and tuple(e.weight.shape) == shape and e.groups == groups


def _tap(parts: dict[str, A.Expr], frame: ConvSpec) -> tuple[int, ...] | None:
    """The frame tap a 1x1 branch (optionally behind a one-hot placement) sits on."""
    spec = parts["conv"].spec
    idx = (0,) * frame.dims
    if "place" in parts:
        place = parts["place"]
        spec = A.sequence(place.spec, spec).spec
        hot = place.weight[0, 0].nonzero()
        if hot.shape[0] != 1:
            return None
        idx = tuple(int(i) for i in hot[0])
    plan = A.parallel([frame, replace(spec, has_bias=False)])
    if plan.spec is None or plan.spec.kernel_size != frame.kernel_size or plan.spec.dilation != frame.dilation:
        return None
    ratio = [b // f for b, f in zip(spec.dilation, frame.dilation)]  # composed-kernel taps in frame taps
    return tuple(o + i * r for o, i, r in zip(plan.offsets[1], idx, ratio))


def _parts(b: Any, names: tuple[str, ...]) -> dict[str, A.Expr] | None:
    if not isinstance(b, BranchExpr) or b.end == "bn" or tuple(b.parts) != names:
        return None
    return b.parts


def _scales(expr: BlockExpr, names: tuple[str, ...], out: int, ref: torch.Tensor) -> list[torch.Tensor]:
    raw = [expr.branches[n].scale for n in names]
    ones = torch.ones(out, dtype=ref.dtype, device=ref.device) if any(s is None for s in raw) else None
    return [ones if s is None else (s.expand(out) if s.dim() == 0 else s) for s in raw]  # type: ignore[misc]


class OrepaAccelerator(KernelAccelerator):
    """:func:`~repcompiler.blocks.orepa_kernel.orepa_kernel` for a block with OREPA's
    six branches, found by name and checked by shape (any declaration order)."""

    def structure(self, expr: A.Expr) -> tuple[ConvSpec, int, int] | None:
        """``(frame, internal width, depthwise multiplier)`` if ``expr`` has OREPA's
        structure (branches by name, parts by kind and shape), else ``None``."""
        if not isinstance(expr, BlockExpr) or set(expr.branches) != set(OREPA_BRANCHES):
            return None
        b = expr.branches
        origin = _parts(b["origin"], ("conv",))
        if origin is None:
            return None
        frame = replace(origin["conv"].spec, has_bias=False)
        O, C, G, ks = frame.out_channels, frame.in_channels, frame.groups, frame.kernel_size
        one, Cg = (1,) * frame.dims, C // G
        if origin["conv"].bias is not None or expr.spec.kernel_size != ks or expr.spec.padding != frame.padding:
            return None
        avg, prior = _parts(b["avg"], ("pointwise", "average")), _parts(b["prior"], ("pointwise", "pattern"))
        pw = _parts(b["pointwise"], ("conv",)) or _parts(b["pointwise"], ("place", "conv"))
        kxk, dws = _parts(b["pw_kxk"], ("pointwise", "conv")), _parts(b["dw_pw"], ("depthwise", "pointwise"))
        if None in (avg, prior, pw, kxk, dws):
            return None
        mixer = kxk["pointwise"]  # type: ignore[index]
        M = mixer.weight.shape[0]
        E = dws["depthwise"].weight.shape[0] // C  # type: ignore[index]
        ok = (
            _is_conv(avg["pointwise"], (O, Cg, *one), G) and _is_conv(prior["pointwise"], (O, Cg, *one), G)  # type: ignore
            and isinstance(prior["pattern"], A.Conv) and prior["pattern"].weight.shape == (O, 1, *ks)  # type: ignore
            and not isinstance(prior["pattern"].weight, torch.nn.Parameter)  # type: ignore[index]
            and _is_conv(pw["conv"], (O, Cg, *one), G)  # type: ignore[index]
            and _tap(pw, frame) == tuple((k - 1) // 2 for k in ks)  # type: ignore[arg-type]
            and (isinstance(mixer, ResidualConv) or _is_conv(mixer, (M, Cg, *one), G)) and mixer.groups == G
            and M % G == 0 and _is_conv(kxk["conv"], (O, M // G, *ks), G)  # type: ignore[index]
            and replace(kxk["conv"].spec, in_channels=C, has_bias=False) == frame  # type: ignore[index]
            and E >= 1 and _is_conv(dws["depthwise"], (E * C, 1, *ks), C)  # type: ignore[index]
            and replace(dws["depthwise"].spec, out_channels=O, groups=G) == frame  # type: ignore[index]
            and _is_conv(dws["pointwise"], (O, E * C // G, *one), G)  # type: ignore[index]
        )
        return (frame, M, E) if ok else None

    def matches(self, expr: A.Expr) -> bool:
        return self.structure(expr) is not None

    def prepare(self, expr: A.Expr) -> None:
        """Lay the kxk weights out channels-last and the pointwise weight input-channel-major
        (one group): the generator reads them so, saving a transpose each way."""
        b = expr.branches  # type: ignore[attr-defined]
        d = b["origin"].weight.dim() - 2
        kc = (0, *range(2, 2 + d), 1)
        b["origin"].weight = laid_out(b["origin"].weight, kc)
        b["pw_kxk"].weight = laid_out(b["pw_kxk"].weight, kc)
        pw = b["dw_pw"].pointwise
        if pw.groups == 1:  # the size-1 dims' strides are those autograd gives the gradient (DDP)
            pw.weight = laid_out(pw.weight, (1, *range(2, 2 + d), 0))

    def generate(self, expr: A.Expr) -> A.Kernel:
        assert isinstance(expr, BlockExpr)
        cache = expr.accel_cache
        b = expr.branches
        w0 = b["origin"].weight
        if cache is None or cache[0] != (w0.dtype, w0.device) or type(w0) not in (torch.Tensor, torch.nn.Parameter):
            frame, M, E = self.structure(expr)  # type: ignore[misc]
            cache = ((w0.dtype, w0.device), frame, M, self.patterns(expr, frame, w0))
            # never keep tensors seen while torch.compile/torch.export trace (fake tensors)
            if type(w0) in (torch.Tensor, torch.nn.Parameter) and type(cache[3].table) is torch.Tensor:
                expr.accel_cache = cache
        _, frame, M, pats = cache
        O, C, G, ks = frame.out_channels, frame.in_channels, frame.groups, frame.kernel_size
        Cg, K, Mg = C // G, math.prod(ks), M // G
        mixer = b["pw_kxk"].pointwise
        if isinstance(mixer, ResidualConv):
            delta = mixer.weight.reshape(G, Mg, Cg)
            w1 = delta + torch.eye(Cg, dtype=delta.dtype, device=delta.device)
        else:
            w1 = mixer.weight.reshape(G, Mg, Cg)
        dw, pw = b["dw_pw"].depthwise.weight, b["dw_pw"].pointwise.weight
        Og, E = O // G, dw.shape[0] // C
        W = orepa_kernel(
            w0.reshape(O, Cg, K).transpose(1, 2),
            b["avg"].pointwise.weight.reshape(O, Cg),
            b["prior"].pointwise.weight.reshape(O, Cg),
            b["pointwise"].weight.reshape(O, Cg),
            w1,
            b["pw_kxk"].weight.reshape(O, Mg, K).transpose(1, 2),
            dw.reshape(C, E, K),
            pw.reshape(G, Og, Cg * E).transpose(1, 2).reshape(G * Cg, E, Og),
            _scales(expr, OREPA_BRANCHES, O, w0),
            pats,
            G,
        )
        return expr.with_bias(A.Kernel(W.reshape(O, Cg, *ks), None, frame))

    @staticmethod
    def patterns(expr: BlockExpr, frame: ConvSpec, ref: torch.Tensor) -> OrepaPatterns:
        """Average and prior patterns ``[O, K]`` and the centre tap."""
        b, O, K = expr.branches, frame.out_channels, math.prod(frame.kernel_size)
        prior = b["prior"].pattern.weight.reshape(O, K).to(ref)
        avg = b["avg"].average.fold(check=False).weight.reshape(O, K).to(ref)
        centre = 0
        for k in frame.kernel_size:
            centre = centre * k + (k - 1) // 2  # flat (row-major) index of the centre tap
        return OrepaPatterns.of(avg, prior, centre)


class Orepa1x1Accelerator(KernelAccelerator):
    """``origin + pw_pw`` of ``orepa_1x1`` as one batched product (by name and shape)."""

    def matches(self, expr: A.Expr) -> bool:
        if not isinstance(expr, BlockExpr) or set(expr.branches) != {"origin", "pw_pw"}:
            return False
        origin, pp = _parts(expr.branches["origin"], ("conv",)), _parts(expr.branches["pw_pw"], ("pointwise", "conv"))
        if origin is None or pp is None or origin["conv"].bias is not None:
            return False
        spec = origin["conv"].spec
        O, C, G, one = spec.out_channels, spec.in_channels, spec.groups, spec.kernel_size
        return all(k == 1 for k in one) and isinstance(pp["pointwise"], ResidualConv) \
            and pp["pointwise"].groups == G and tuple(pp["pointwise"].weight.shape) == (C, C // G, *one) \
            and _is_conv(pp["conv"], (O, C // G, *one), G) and pp["conv"].spec == spec

    def generate(self, expr: A.Expr) -> A.Kernel:
        assert isinstance(expr, BlockExpr)
        b = expr.branches
        origin, pp = b["origin"], b["pw_pw"]
        O, Cg = origin.weight.shape[:2]
        G = pp.pointwise.groups
        s0, s1 = _scales(expr, ("origin", "pw_pw"), O, origin.weight)
        W = origin.weight.reshape(O, Cg) * s0.reshape(O, 1)
        delta = pp.pointwise.weight.reshape(G, Cg, Cg)
        w1 = delta + torch.eye(Cg, dtype=delta.dtype, device=delta.device)
        w2 = (pp.weight.reshape(O, Cg) * s1.reshape(O, 1)).reshape(G, O // G, Cg)
        W = W + torch.bmm(w2, w1).reshape(O, Cg)
        spec = replace(expr.branches["origin"].plan()[0], has_bias=False)  # type: ignore[arg-type]
        return expr.with_bias(A.Kernel(W.reshape(origin.weight.shape), None, spec))


class StackAccelerator(KernelAccelerator):
    """A stack of accelerated stages: each stage's kernel from its own accelerator,
    composed (a true convolution of kernels)."""

    def matches(self, expr: A.Expr) -> bool:
        return isinstance(expr, StackExpr) and all(
            isinstance(t, BlockExpr) and t.accelerator is not None and t.accelerator.matches(t) for t in expr.terms)

    def generate(self, expr: A.Expr) -> A.Kernel:
        terms = expr.terms  # type: ignore[attr-defined]
        kernel = terms[0].accelerator.generate(terms[0])
        for t in terms[1:]:
            kernel = A.compose(kernel, t.accelerator.generate(t), check=False)
        return kernel
