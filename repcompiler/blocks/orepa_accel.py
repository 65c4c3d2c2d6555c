"""The OREPA blocks' kernel accelerators (:class:`~repcompiler.blocks.accel.KernelAccelerator`):
the fast online kernel of ``orepa`` (:class:`OrepaAccelerator`, through
:func:`~repcompiler.blocks.orepa_kernel.orepa_kernel`), ``orepa_1x1``
(:class:`Orepa1x1Accelerator`), stacks (:class:`StackAccelerator`, the linear deep stem)
and blocks with a nested accelerated block as a branch (:class:`NestedAccelerator`,
OREPA-VGG). Each finds branches by name and checks shapes; anything else falls back to
the generic fold. ``orepa`` blocks without ``prior``, ``pw_kxk``, ``pointwise`` or
``dw_pw`` (the switches; OREPA-VGG's kxk has no ``pointwise``) keep the accelerator, the missing branch entering as zeros. The tests compare each with the generic fold in float64.

Caching: an ``orepa`` block's structure and fixed inputs (:meth:`OrepaAccelerator.fixed`:
the average/prior pattern table, the mixer's identity, zeros for missing branches) are
kept on the expression (``accel_cache``) by :func:`~repcompiler.blocks.accel.cached`,
watching the block's buffers and the parameters' dtype and device: ``load_state_dict``
(an in-place copy into the prior buffer) or any other edit of a fixed pattern is seen by
the next forward, the structure re-checked then, and an edit that leaves OREPA's
structure (e.g. a placement kernel no longer one-hot) makes that block use the generic
fold. Parameter values are never kept here: the kernel itself is the online block's
cache's (:mod:`repcompiler.online.cache`). This cache lives on the expression, not in
the online block, because an accelerator also runs without one (``expr.fold`` callers,
a block's ``generate()``) and the block library does not depend on the online runtime.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, NamedTuple

import torch

from .. import algebra as A
from ..algebra import ConvSpec
from .accel import KernelAccelerator, cached, plain_ops_required
from .named import BlockExpr, BranchExpr, ResidualConv, StackExpr
from .orepa_kernel import OrepaPatterns, orepa_kernel
from .parts import Placement

__all__ = ["OrepaAccelerator", "Orepa1x1Accelerator", "StackAccelerator", "NestedAccelerator"]

OREPA_BRANCHES = ("origin", "avg", "prior", "pw_kxk", "pointwise", "dw_pw")



def _is_conv(e: Any, shape: tuple[int, ...], groups: int) -> bool:
    return isinstance(e, A.Conv) and e.bias is None and tuple(e.weight.shape) == shape and e.groups == groups


def _tap(parts: dict[str, A.Expr], frame: ConvSpec) -> tuple[int, ...] | None:
    """The frame tap a 1x1 branch (optionally behind a one-hot placement) sits on."""
    spec = parts["conv"].spec
    idx = (0,) * frame.dims
    if "place" in parts:
        place = parts["place"]
        spec = A.sequence(place.spec, spec).spec
        if isinstance(place, Placement) and plain_ops_required():
            # while torch.compile traces: the tap as built, without a data-dependent read of
            # the buffer (eager calls read it, so an edited buffer falls back to the generic fold)
            idx = place.tap
        else:
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
    """Each branch's scale as ``[out]``: ones for a branch without one, zeros for a
    missing branch (a Tab. 2 switch)."""
    b = expr.branches
    ones = torch.ones(out, dtype=ref.dtype, device=ref.device)
    raw = [b[n].scale if n in b else ones.new_zeros(out) for n in names]
    return [ones if s is None else (s.expand(out) if s.dim() == 0 else s) for s in raw]


_REQUIRED = {"origin", "avg"}


class _Fixed(NamedTuple):
    """The parameter-free inputs of an OREPA block's kernel (see :meth:`OrepaAccelerator.fixed`)."""

    frame: ConvSpec
    internal: int  # the 1x1 -> kxk branch's internal width M
    patterns: OrepaPatterns
    ident: torch.Tensor | None  # the identity-initialised mixer's identity, [G, M/G, C/G]
    zeros: dict[str, torch.Tensor]  # stand-ins for the inputs of missing optional branches


def _zeros(b: dict[str, A.Expr], frame: ConvSpec, E: int, ref: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zero stand-ins (no gradient) for the inputs of missing optional branches."""
    O, C, G, K = frame.out_channels, frame.in_channels, frame.groups, math.prod(frame.kernel_size)
    Cg, z = C // G, {}
    if "prior" not in b:
        z["p"] = ref.new_zeros(O, Cg)
    if "pointwise" not in b:
        z["q"] = ref.new_zeros(O, Cg)
    if "pw_kxk" not in b:
        z["w1"], z["w2"] = ref.new_zeros(G, 1, Cg), ref.new_zeros(O, K, 1)
    if "dw_pw" not in b:
        z["dw"], z["pw"] = ref.new_zeros(C, 1, K), ref.new_zeros(G * Cg, 1, O // G)
    return {k: v.detach() for k, v in z.items()}


class OrepaAccelerator(KernelAccelerator):
    """:func:`~repcompiler.blocks.orepa_kernel.orepa_kernel` for a block with OREPA's
    six branches, found by name and checked by shape (any declaration order)."""

    def structure(self, expr: A.Expr) -> tuple[ConvSpec, int, int] | None:
        """``(frame, internal width, depthwise multiplier)`` if ``expr`` has OREPA's
        structure (branches by name, parts by kind and shape; ``prior``, ``pw_kxk``,
        ``pointwise`` and ``dw_pw`` may be missing - the switches, OREPA-VGG's five-branch
        kxk - and count as zero), else ``None``."""
        if not isinstance(expr, BlockExpr) or not _REQUIRED <= set(expr.branches) <= set(OREPA_BRANCHES):
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
        avg = _parts(b["avg"], ("pointwise", "average"))
        if avg is None or not _is_conv(avg["pointwise"], (O, Cg, *one), G):
            return None
        if "pointwise" in b:
            pw = _parts(b["pointwise"], ("conv",)) or _parts(b["pointwise"], ("place", "conv"))
            if pw is None or not (_is_conv(pw["conv"], (O, Cg, *one), G)
                                  and _tap(pw, frame) == tuple((k - 1) // 2 for k in ks)):
                return None
        M = E = 1
        if "prior" in b:
            prior = _parts(b["prior"], ("pointwise", "pattern"))
            if prior is None or not (
                    _is_conv(prior["pointwise"], (O, Cg, *one), G) and isinstance(prior["pattern"], A.Conv)
                    and prior["pattern"].weight.shape == (O, 1, *ks)
                    and not isinstance(prior["pattern"].weight, torch.nn.Parameter)):
                return None
        if "pw_kxk" in b:
            kxk = _parts(b["pw_kxk"], ("pointwise", "conv"))
            if kxk is None:
                return None
            mixer = kxk["pointwise"]
            M = mixer.weight.shape[0]
            if not ((isinstance(mixer, ResidualConv) and tuple(mixer.weight.shape) == (M, Cg, *one)
                     or _is_conv(mixer, (M, Cg, *one), G)) and mixer.groups == G
                    and M % G == 0 and _is_conv(kxk["conv"], (O, M // G, *ks), G)
                    and replace(kxk["conv"].spec, in_channels=C, has_bias=False) == frame):
                return None
        if "dw_pw" in b:
            dws = _parts(b["dw_pw"], ("depthwise", "pointwise"))
            if dws is None:
                return None
            E = dws["depthwise"].weight.shape[0] // C
            if not (E >= 1 and _is_conv(dws["depthwise"], (E * C, 1, *ks), C)
                    and replace(dws["depthwise"].spec, out_channels=O, groups=G) == frame
                    and _is_conv(dws["pointwise"], (O, E * C // G, *one), G)):
                return None
        return frame, M, E

    def matches(self, expr: A.Expr) -> bool:
        return self.structure(expr) is not None

    def fixed(self, expr: BlockExpr) -> _Fixed | None:
        """What :meth:`generate` needs besides the parameters: the structure, the fixed
        patterns, the mixer's identity and zero stand-ins for missing branches (all from
        the block's shapes and buffers, none from its parameters); ``None`` if ``expr``
        is not (or no longer: an edited buffer) of OREPA's structure."""
        found = self.structure(expr)
        if found is None:
            return None
        b, (frame, M, E) = expr.branches, found
        w0 = b["origin"].weight
        mixer = b["pw_kxk"].pointwise if "pw_kxk" in b else None
        ident = mixer.id_weight().reshape(frame.groups, M // frame.groups, -1) \
            if isinstance(mixer, ResidualConv) else None
        return _Fixed(frame, M, self.patterns(expr, frame, w0), ident, _zeros(b, frame, E, w0))

    def generate(self, expr: A.Expr) -> A.Kernel:
        assert isinstance(expr, BlockExpr)
        b = expr.branches
        w0 = b["origin"].weight
        # kept on the expression while its buffers (and the parameters' dtype and device)
        # are unchanged: the caching rule of blocks.accel.cached
        fixed = cached(expr, "accel_cache", lambda: self.fixed(expr), watch=expr.buffers(), like=(w0,))
        if fixed is None:  # a fixed part was edited out of OREPA's structure (e.g. a placement buffer)
            return expr.fold(check=False)
        frame, M, pats, ident, zero = fixed
        O, C, G, ks = frame.out_channels, frame.in_channels, frame.groups, frame.kernel_size
        Cg, K, Mg, Og = C // G, math.prod(ks), M // G, O // G
        if "pw_kxk" in b:
            mixer = b["pw_kxk"].pointwise
            w1 = mixer.weight.reshape(G, Mg, Cg)
            if isinstance(mixer, ResidualConv):
                w1 = w1 + ident.to(mixer.weight)
            w2 = b["pw_kxk"].weight.reshape(O, Mg, K).transpose(1, 2)
        else:
            w1, w2 = zero["w1"], zero["w2"]
        if "dw_pw" in b:
            dw, pw = b["dw_pw"].depthwise.weight, b["dw_pw"].pointwise.weight
            E = dw.shape[0] // C
            dw, pw = dw.reshape(C, E, K), pw.reshape(G, Og, Cg * E).transpose(1, 2).reshape(G * Cg, E, Og)
        else:
            dw, pw = zero["dw"], zero["pw"]
        W = orepa_kernel(
            w0.reshape(O, Cg, K),
            b["avg"].pointwise.weight.reshape(O, Cg),
            b["prior"].pointwise.weight.reshape(O, Cg) if "prior" in b else zero["p"],
            b["pointwise"].weight.reshape(O, Cg) if "pointwise" in b else zero["q"],
            w1,
            w2,
            dw,
            pw,
            _scales(expr, OREPA_BRANCHES, O, w0),
            pats,
            G,
        )
        return expr.with_bias(A.Kernel(W.reshape(O, Cg, *ks), None, frame))

    @staticmethod
    def patterns(expr: BlockExpr, frame: ConvSpec, ref: torch.Tensor) -> OrepaPatterns:
        """Average and prior patterns ``[O, K]`` and the centre tap."""
        b, O, K = expr.branches, frame.out_channels, math.prod(frame.kernel_size)
        prior = b["prior"].pattern.weight.reshape(O, K).to(ref) if "prior" in b else ref.new_zeros(O, K)
        avg = b["avg"].average.fold(check=False).weight.reshape(O, K).to(ref)
        centre = 0
        for k in frame.kernel_size:
            centre = centre * k + (k - 1) // 2  # flat (row-major) index of the centre tap
        return OrepaPatterns.of(avg, prior, centre)


def _factor(e: Any) -> torch.Tensor | None:
    """The weight of a 1x1 factor of ``orepa_1x1``'s ``pw_pw`` branch (a stride-1,
    unpadded 1x1 conv without bias, or an identity-plus-weight :class:`ResidualConv`)."""
    if isinstance(e, ResidualConv):
        return e.weight + e.id_weight()
    if isinstance(e, A.Conv) and e.bias is None and all(k == 1 for k in e.weight.shape[2:]):
        return e.weight
    return None


class Orepa1x1Accelerator(KernelAccelerator):
    """``origin + pw_pw`` of ``orepa_1x1`` as one batched product (by name and shape):
    ``pw_pw`` is two grouped 1x1 factors (either may be identity-initialised)."""

    def matches(self, expr: A.Expr) -> bool:
        if not isinstance(expr, BlockExpr) or set(expr.branches) != {"origin", "pw_pw"}:
            return False
        origin, pp = expr.branches["origin"], expr.branches["pw_pw"]
        if _parts(origin, ("conv",)) is None or not isinstance(pp, BranchExpr) or pp.end == "bn":
            return False
        spec = origin.parts["conv"].spec
        if origin.parts["conv"].bias is not None or any(k != 1 for k in spec.kernel_size):
            return False
        parts = list(pp.parts.values())
        if len(parts) != 2 or any(_factor(p) is None for p in parts):
            return False
        first, last = parts
        O, C, G = spec.out_channels, spec.in_channels, spec.groups
        M = first.weight.shape[0]
        one = spec.kernel_size
        if first.groups != G or last.groups != G or M % G:
            return False
        if tuple(first.weight.shape) != (M, C // G, *one) or tuple(last.weight.shape) != (O, M // G, *one):
            return False
        # the first factor mixes only (stride 1, no padding); the last carries the conv's geometry
        first_ok = isinstance(first, ResidualConv) or (all(s == 1 for s in first.stride)
                                                       and all(p == (0, 0) for p in first.padding))
        return first_ok and replace(last.spec, in_channels=C) == replace(spec, has_bias=False)

    def generate(self, expr: A.Expr) -> A.Kernel:
        assert isinstance(expr, BlockExpr)
        b = expr.branches
        origin, pp = b["origin"], b["pw_pw"]
        O, Cg = origin.weight.shape[:2]
        first, last = pp.parts.values()
        G = first.groups
        s0, s1 = _scales(expr, ("origin", "pw_pw"), O, origin.weight)
        W = origin.weight.reshape(O, Cg) * s0.reshape(O, 1)
        w1 = _factor(first)
        Mg = w1.shape[0] // G
        w1 = w1.reshape(G, Mg, Cg)
        w2 = (_factor(last).reshape(O, Mg) * s1.reshape(O, 1)).reshape(G, O // G, Mg)
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


def _nested(branch: Any, check: bool = True) -> A.Expr | None:
    """The accelerated block nested in ``branch`` (a :class:`BranchExpr` whose only part
    is a block with an accelerator, ending in a scale or nothing), else ``None``;
    ``check``: also re-check that the accelerator matches (once, not every forward)."""
    if not isinstance(branch, BranchExpr) or branch.end == "bn" or list(branch.parts) != ["inner"]:
        return None
    inner = branch.parts["inner"]
    ok = getattr(inner, "accelerator", None) is not None and (
        not check or inner.accelerator.matches(inner))  # type: ignore[union-attr]
    return inner if ok else None


class NestedAccelerator(KernelAccelerator):
    """A block with a nested accelerated block as a branch (OREPA-VGG's ``orepa``):
    that branch's kernel from the nested block's accelerator, times the branch scale;
    the other branches by the generic fold."""

    def matches(self, expr: A.Expr) -> bool:
        return isinstance(expr, BlockExpr) and any(_nested(b) is not None for b in expr.branches.values())

    def generate(self, expr: A.Expr) -> A.Kernel:
        assert isinstance(expr, BlockExpr)
        kernels = []
        for b in expr.terms:
            inner = _nested(b, check=False)
            if inner is None:
                kernels.append(b.fold(check=False))
                continue
            k = inner.accelerator.generate(inner)  # type: ignore[union-attr]
            s = b.scale  # type: ignore[union-attr]
            if s is not None:
                s = s.reshape(-1, *(1,) * (k.weight.dim() - 1)) if s.dim() else s
                bias = None if k.bias is None else k.bias * (s.reshape(-1) if s.dim() else s)
                k = A.Kernel(k.weight * s, bias, k.spec)
            kernels.append(k)
        return expr.with_bias(A.add(kernels, check=False))
