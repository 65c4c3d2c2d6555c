"""Conv geometry and the exactness rules of the kernel algebra.

A folded expression is one convolution, described by a :class:`ConvSpec`:
dimensionality, channels, kernel size, stride, per-side zero padding, dilation,
groups and whether it has a bias. This module holds the *structural* half of the
algebra: given the specs of two operands it computes the spec of their sequential
composition or parallel sum/concat, and the list of reasons (if any) why the folded
form would differ from the unfolded expression for some input. No tensor is touched
here, so exactness is decided before (and independently of) any weight values.

Notation (per spatial dimension): a conv with stride ``s``, dilation ``d``, kernel
size ``K`` (extent ``e = d*(K-1)``) and padding ``(l, r)`` computes output ``q`` from
the zero-extended input ``x~`` at positions ``s*q - l + d*k``. Its output length is
``floor((L + l + r - e - 1) / s) + 1``.

Sequential composition ``A then B`` is the conv with stride ``s1*s2``, padding
``(l1 + s1*l2, r1 + s1*r2)`` and taps at ``d1*k1 + s1*d2*k2`` (so a strided conv
followed by a dilated one composes on a common dilation ``gcd(d1, s1*d2)``). It is
*exact* iff the zeros ``B`` pads ``A``'s output with are what ``A`` would compute
there on the zero-extended input, i.e. where ``B`` pads (``l2 > 0`` or ``r2 > 0``):

* ``A`` has no bias (a biased conv before a zero-padded conv is not equal at borders);
* left: ``e1 - l1 < s1`` (output ``-1`` of ``A`` sees only zeros);
* right: ``r1 >= e1`` (output ``L_A`` of ``A`` sees only zeros, for every ``L``).

A parallel sum (or channel concat) is exact iff every branch has the same stride and
the same output length for every input (``l + r - e`` equal), i.e. the branch windows
align; the branches are then placed in one frame with padding ``max(l)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Sequence

from ..errors import IncompatibleError

__all__ = ["ConvSpec", "SeqPlan", "ParPlan", "sequence", "parallel", "normalize_padding"]

Pads = tuple[tuple[int, int], ...]


def _tuple(value: int | Sequence[int], dims: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (int(value),) * dims
    out = tuple(int(v) for v in value)
    if len(out) == 1 and dims > 1:
        out = out * dims
    if len(out) != dims:
        raise IncompatibleError(f"{what}={tuple(value)} has {len(out)} entries for a {dims}-d conv")
    return out


def normalize_padding(padding: int | Sequence[int] | Sequence[Sequence[int]], dims: int) -> Pads:
    """Per-dimension ``(left, right)`` padding from an int, a per-dim tuple or pairs."""
    if isinstance(padding, int):
        return ((int(padding), int(padding)),) * dims
    items = list(padding)
    if items and all(isinstance(p, (tuple, list)) for p in items):
        pads = tuple((int(a), int(b)) for a, b in items)
    else:
        pads = tuple((int(p), int(p)) for p in _tuple(tuple(items), dims, "padding"))  # type: ignore[arg-type]
    if len(pads) != dims:
        raise IncompatibleError(f"padding={padding!r} has {len(pads)} entries for a {dims}-d conv")
    return pads


@dataclass(frozen=True)
class ConvSpec:
    """The geometry of one convolution (what a folded expression evaluates to).

    ``padding`` is per spatial dimension ``(left, right)``; ``dilation`` is
    normalised to 1 along dimensions whose kernel size is 1 (it has no effect there).
    """

    dims: int
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: Pads
    dilation: tuple[int, ...]
    groups: int = 1
    has_bias: bool = False

    def __post_init__(self) -> None:
        if self.dims not in (1, 2, 3):
            raise IncompatibleError(f"only 1-d, 2-d and 3-d convs are supported, got dims={self.dims}")
        for name in ("kernel_size", "stride", "dilation", "padding"):
            if len(getattr(self, name)) != self.dims:
                raise IncompatibleError(f"{name}={getattr(self, name)} does not match dims={self.dims}")
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise IncompatibleError(
                f"groups={self.groups} must divide in_channels={self.in_channels} "
                f"and out_channels={self.out_channels}"
            )
        if any(k < 1 for k in self.kernel_size) or any(s < 1 for s in self.stride) or any(
            d < 1 for d in self.dilation
        ):
            raise IncompatibleError(f"kernel, stride and dilation must be positive: {self.describe()}")
        if any(p < 0 for pair in self.padding for p in pair):
            raise IncompatibleError(f"negative padding is not supported: {self.describe()}")
        dil = tuple(1 if k == 1 else d for k, d in zip(self.kernel_size, self.dilation))
        object.__setattr__(self, "dilation", dil)

    # -- derived -----------------------------------------------------------------
    @property
    def extent(self) -> tuple[int, ...]:
        """``dilation * (kernel - 1)`` per dimension: the receptive field minus one."""
        return tuple(d * (k - 1) for d, k in zip(self.dilation, self.kernel_size))

    @property
    def symmetric_padding(self) -> bool:
        return all(a == b for a, b in self.padding)

    @property
    def is_pointwise(self) -> bool:
        """A 1x..x1 kernel with stride 1 and no padding: acts on channels only."""
        return (
            all(k == 1 for k in self.kernel_size)
            and all(s == 1 for s in self.stride)
            and all(p == (0, 0) for p in self.padding)
        )

    @property
    def is_diagonal(self) -> bool:
        """Pointwise and depthwise with in == out: a per-channel affine map."""
        return self.is_pointwise and self.groups == self.in_channels == self.out_channels

    def output_size(self, size: Sequence[int]) -> tuple[int, ...]:
        """Spatial output size for a given spatial input size."""
        return tuple(
            (n + l + r - e - 1) // s + 1
            for n, (l, r), e, s in zip(size, self.padding, self.extent, self.stride)
        )

    def describe(self) -> str:
        def fmt(t: tuple[int, ...]) -> str:
            return str(t[0]) if len(set(t)) == 1 else "x".join(map(str, t))

        parts = [f"{self.dims}d {self.in_channels}->{self.out_channels}", f"k={fmt(self.kernel_size)}"]
        if any(s != 1 for s in self.stride):
            parts.append(f"s={fmt(self.stride)}")
        if any(p != (0, 0) for p in self.padding):
            if self.symmetric_padding:
                parts.append(f"p={fmt(tuple(a for a, _ in self.padding))}")
            else:
                parts.append(f"p={list(self.padding)}")
        if any(d != 1 for d in self.dilation):
            parts.append(f"d={fmt(self.dilation)}")
        if self.groups != 1:
            parts.append(f"g={self.groups}")
        if self.has_bias:
            parts.append("bias")
        return "conv(" + ", ".join(parts) + ")"


def _gcd_all(values: Sequence[int]) -> int:
    vals = [v for v in values if v]
    return reduce(math.gcd, vals) if vals else 1


@dataclass(frozen=True)
class SeqPlan:
    """How ``a then b`` composes: the result spec, tap placement and exactness reasons.

    The composed kernel lives on dilation ``spec.dilation``; ``a``'s taps are spread by
    ``up`` and ``b``'s taps are ``step`` apart in that frame.
    """

    spec: ConvSpec
    groups: int
    up: tuple[int, ...]
    step: tuple[int, ...]
    reasons: tuple[str, ...] = field(default_factory=tuple)


def sequence(a: ConvSpec, b: ConvSpec, a_name: str = "", b_name: str = "") -> SeqPlan:
    """Plan the sequential composition ``a then b`` (``b(a(x))``).

    Raises :class:`IncompatibleError` when the two cannot be chained at all; returns
    the reasons the folded conv would differ from the chain at the borders otherwise.
    """
    an = a_name or a.describe()
    bn = b_name or b.describe()
    if a.dims != b.dims:
        raise IncompatibleError(f"cannot compose {an} ({a.dims}-d) then {bn} ({b.dims}-d)")
    if a.out_channels != b.in_channels:
        raise IncompatibleError(
            f"cannot compose {an} then {bn}: {a.out_channels} output channels feed "
            f"{b.in_channels} input channels"
        )
    reasons: list[str] = []
    dil, up, step, ksize, pads = [], [], [], [], []
    pads_b_read = False
    for i in range(a.dims):
        k1, k2 = a.kernel_size[i], b.kernel_size[i]
        s1, d1, d2 = a.stride[i], a.dilation[i], b.dilation[i]
        terms = ([d1] if k1 > 1 else []) + ([s1 * d2] if k2 > 1 else [])
        df = _gcd_all(terms)
        u, st = d1 // df if k1 > 1 else 1, s1 * d2 // df if k2 > 1 else 1
        dil.append(df)
        up.append(u)
        step.append(st)
        ksize.append((k1 - 1) * u + (k2 - 1) * st + 1)
        (l1, r1), (l2, r2) = a.padding[i], b.padding[i]
        pads.append((l1 + s1 * l2, r1 + s1 * r2))
        e1 = a.extent[i]
        if l2 or r2:
            pads_b_read = True
        if l2 and e1 - l1 >= s1:
            reasons.append(
                f"{bn} zero-pads (left {l2}, dim {i}) the output of {an}, whose outputs left of "
                f"the border would still read the input (extent {e1} > padding {l1} + stride {s1} - 1)"
            )
        if r2 and r1 < e1:
            reasons.append(
                f"{bn} zero-pads (right {r2}, dim {i}) the output of {an}, whose outputs right of "
                f"the border would still read the input (right padding {r1} < extent {e1})"
            )
    if pads_b_read and a.has_bias:
        reasons.append(
            f"{an} has a bias and {bn} zero-pads its output: the folded conv would see the "
            f"bias at the border where the chain sees zeros"
        )
    groups = math.gcd(a.groups, b.groups)
    spec = ConvSpec(
        dims=a.dims,
        in_channels=a.in_channels,
        out_channels=b.out_channels,
        kernel_size=tuple(ksize),
        stride=tuple(x * y for x, y in zip(a.stride, b.stride)),
        padding=tuple(pads),
        dilation=tuple(dil),
        groups=groups,
        has_bias=a.has_bias or b.has_bias,
    )
    return SeqPlan(spec=spec, groups=groups, up=tuple(up), step=tuple(step), reasons=tuple(reasons))


@dataclass(frozen=True)
class ParPlan:
    """How branches sum (or concat) in one frame: each branch's taps are spread by
    ``ups[i]`` and shifted by ``offsets[i]`` (in units of ``spec.dilation``).

    ``spec`` is ``None`` when the branches cannot share a frame at all (strides differ).
    """

    spec: ConvSpec | None
    groups: int
    ups: tuple[tuple[int, ...], ...]
    offsets: tuple[tuple[int, ...], ...]
    reasons: tuple[str, ...] = field(default_factory=tuple)


def parallel(specs: Sequence[ConvSpec], concat: bool = False, names: Sequence[str] | None = None) -> ParPlan:
    """Plan the parallel sum (``concat=False``) or channel concat of branches on one input."""
    if not specs:
        raise IncompatibleError("a parallel combination needs at least one branch")
    names = list(names) if names else [s.describe() for s in specs]
    first = specs[0]
    for s, n in zip(specs[1:], names[1:]):
        if s.dims != first.dims:
            raise IncompatibleError(f"branches {names[0]} ({first.dims}-d) and {n} ({s.dims}-d) differ in dims")
        if s.in_channels != first.in_channels:
            raise IncompatibleError(
                f"branches {names[0]} and {n} read different channel counts "
                f"({first.in_channels} vs {s.in_channels})"
            )
        if not concat and s.out_channels != first.out_channels:
            raise IncompatibleError(
                f"cannot sum branches {names[0]} and {n}: {first.out_channels} vs "
                f"{s.out_channels} output channels"
            )
    reasons: list[str] = []
    dims = first.dims
    for s, n in zip(specs[1:], names[1:]):
        if s.stride != first.stride:
            reasons.append(f"branch windows do not align: {names[0]} has stride {first.stride}, {n} has {s.stride}")
    if reasons:
        return ParPlan(spec=None, groups=1, ups=(), offsets=(), reasons=tuple(reasons))
    for i in range(dims):
        consts = [s.padding[i][0] + s.padding[i][1] - s.extent[i] for s in specs]
        if len(set(consts)) > 1:
            detail = ", ".join(f"{n}: {c}" for n, c in zip(names, consts))
            reasons.append(
                f"branch windows do not align in dim {i}: output sizes differ "
                f"(padding minus extent per branch: {detail})"
            )
    lf = [max(s.padding[i][0] for s in specs) for i in range(dims)]
    offs_raw = [[lf[i] - s.padding[i][0] for i in range(dims)] for s in specs]
    dil, ksize, pads = [], [], []
    ups: list[list[int]] = [[] for _ in specs]
    offsets: list[list[int]] = [[] for _ in specs]
    for i in range(dims):
        terms = [s.dilation[i] for s in specs if s.kernel_size[i] > 1] + [o[i] for o in offs_raw]
        df = _gcd_all(terms)
        dil.append(df)
        size = 1
        for j, s in enumerate(specs):
            u = s.dilation[i] // df if s.kernel_size[i] > 1 else 1
            o = offs_raw[j][i] // df
            ups[j].append(u)
            offsets[j].append(o)
            size = max(size, o + (s.kernel_size[i] - 1) * u + 1)
        ksize.append(size)
        const = max(s.padding[i][0] + s.padding[i][1] - s.extent[i] for s in specs)
        pads.append((lf[i], df * (size - 1) + const - lf[i]))
    if any(r < 0 for _, r in pads):
        reasons.append(f"branches {', '.join(names)} would need negative padding when merged")
        return ParPlan(spec=None, groups=1, ups=(), offsets=(), reasons=tuple(reasons))
    groups = 1 if concat else _gcd_all([s.groups for s in specs])
    spec = ConvSpec(
        dims=dims,
        in_channels=first.in_channels,
        out_channels=sum(s.out_channels for s in specs) if concat else first.out_channels,
        kernel_size=tuple(ksize),
        stride=first.stride,
        padding=tuple(pads),
        dilation=tuple(dil),
        groups=groups,
        has_bias=any(s.has_bias for s in specs),
    )
    return ParPlan(
        spec=spec,
        groups=groups,
        ups=tuple(tuple(u) for u in ups),
        offsets=tuple(tuple(o) for o in offsets),
        reasons=tuple(reasons),
    )
