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

The folded conv always has the chain's output length (``floor`` nests), so an inexact
composition differs only at the borders. The rule is exact-for-every-input sufficient;
it is also necessary when ``B`` reads every position it pads (stride 1, no dilation,
the RepVGG/DBB/ACNet/OREPA case). With a strided or dilated ``B`` that skips some
padded positions it may call a composition inexact that happens to be equal
(conservative, never wrong). ``tests/algebra/test_algebra_geometry.py`` checks both directions.

A parallel sum (or channel concat) is exact iff every branch has the same stride and
the same output length for every input (``l + r - e`` equal), i.e. the branch windows
align; the branches are then placed in one frame with padding ``max(l)`` (the merged
right padding is then never negative).

Messages: at most one reason per offending pair (sequence) or per combination
(parallel), naming the operands once and the affected dims, e.g.
``conv(2d 4->4, k=3, p=1) zero-pads the output of conv(2d 2->4, k=3, p=1, bias) (not
equal at the borders): that output would still read the input beyond the border (left
in dims 0, 1; right in dims 0, 1) and that output has a bias, which the padding
replaces by zeros``. Operand names may be passed as callables; they are evaluated
only when a message is built, so planning on the training hot path (``fold`` every
step) formats no strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import reduce
from typing import Callable, Sequence

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
    """The geometry of one convolution: what a folded expression evaluates to, and
    the conv a training-time block replaces (``repcompiler.blocks.ConvGeometry`` builds
    this type with the block registry's argument order).

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

    @property
    def bias(self) -> bool:  # a block builder reads it as "the block needs a bias"
        return self.has_bias

    @property
    def spec(self) -> "ConvSpec":  # a spec is its own geometry (blocks read ``geom.spec``)
        return self

    @property
    def is_pointwise_kernel(self) -> bool:  # every kernel dim is 1 (any stride/padding)
        return all(k == 1 for k in self.kernel_size)

    @property
    def is_depthwise(self) -> bool:
        return self.groups == self.in_channels and self.groups > 1

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


def _resolve(name: "str | Callable[[], str]", spec: ConvSpec) -> str:
    """A name given as a string or as a zero-argument callable (evaluated lazily, only
    when a message is built, so planning stays cheap on the hot path)."""
    if callable(name):
        name = name()
    return name or spec.describe()


def _dims_text(dims: Sequence[int]) -> str:
    return ("dim " if len(dims) == 1 else "dims ") + ", ".join(map(str, dims))


def sequence(
    a: ConvSpec,
    b: ConvSpec,
    a_name: "str | Callable[[], str]" = "",
    b_name: "str | Callable[[], str]" = "",
) -> SeqPlan:
    """Plan the sequential composition ``a then b`` (``b(a(x))``).

    Raises :class:`IncompatibleError` when the two cannot be chained at all; returns
    the reasons the folded conv would differ from the chain at the borders otherwise
    (at most one message per pair, naming the affected dims). ``a_name``/``b_name``
    label the operands in messages; they may be callables, evaluated only when a
    message is actually built.
    """
    if a.dims != b.dims:
        an, bn = _resolve(a_name, a), _resolve(b_name, b)
        raise IncompatibleError(f"cannot compose {an} ({a.dims}-d) then {bn} ({b.dims}-d): dims differ")
    if a.out_channels != b.in_channels:
        an, bn = _resolve(a_name, a), _resolve(b_name, b)
        raise IncompatibleError(
            f"cannot compose {an} then {bn}: {a.out_channels} output channels feed "
            f"{b.in_channels} input channels"
        )
    dil, up, step, ksize, pads = [], [], [], [], []
    pads_b_read = False
    left_bad: list[int] = []
    right_bad: list[int] = []
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
            left_bad.append(i)
        if r2 and r1 < e1:
            right_bad.append(i)
    reasons: list[str] = []
    if left_bad or right_bad or (pads_b_read and a.has_bias):
        an, bn = _resolve(a_name, a), _resolve(b_name, b)
        why = []
        if left_bad or right_bad:
            sides = ([f"left in {_dims_text(left_bad)}"] if left_bad else []) + (
                [f"right in {_dims_text(right_bad)}"] if right_bad else []
            )
            why.append(f"that output would still read the input beyond the border ({'; '.join(sides)})")
        if pads_b_read and a.has_bias:
            why.append("that output has a bias, which the padding replaces by zeros")
        reasons.append(f"{bn} zero-pads the output of {an} (not equal at the borders): " + " and ".join(why))
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


def parallel(
    specs: Sequence[ConvSpec],
    concat: bool = False,
    names: "Sequence[str] | Callable[[], Sequence[str]] | None" = None,
) -> ParPlan:
    """Plan the parallel sum (``concat=False``) or channel concat of branches on one input.

    ``names`` labels the branches in messages (a callable is evaluated lazily, only
    when a message is built). Raises :class:`IncompatibleError` when the branches
    cannot be combined at all (dims, input channels, or output channels of a sum).
    """
    if not specs:
        raise IncompatibleError("a parallel combination needs at least one branch")
    nm = _BranchNames(specs, names)
    _check_combinable(specs, concat, nm)
    first = specs[0]
    if any(s.stride != first.stride for s in specs[1:]):
        detail = ", ".join(f"{nm(j)}: {'x'.join(map(str, s.stride))}" for j, s in enumerate(specs))
        reasons = (f"branch windows do not align: strides differ ({detail})",)
        return ParPlan(spec=None, groups=1, ups=(), offsets=(), reasons=reasons)
    reasons = _misaligned(specs, nm)
    dil, ksize, pads, ups, offsets = _frame(specs)
    if any(r < 0 for _, r in pads):  # pragma: no cover - impossible (see docstring), kept as a guard
        reasons.append(
            f"branches {', '.join(nm(j) for j in range(len(specs)))} would need negative padding when merged"
        )
        return ParPlan(spec=None, groups=1, ups=(), offsets=(), reasons=tuple(reasons))
    groups = 1 if concat else _gcd_all([s.groups for s in specs])
    spec = ConvSpec(
        dims=first.dims,
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


class _BranchNames:
    """Branch ``j``'s label in messages: the given name, else its geometry (the names are
    computed on first use)."""

    def __init__(self, specs: Sequence[ConvSpec], names: "Sequence[str] | Callable[[], Sequence[str]] | None") -> None:
        self._specs, self._given, self._names = specs, names, []  # type: ignore[var-annotated]

    def __call__(self, j: int) -> str:
        if not self._names:
            given = self._given() if callable(self._given) else self._given
            self._names.extend(given if given else [s.describe() for s in self._specs])
        return self._names[j] or self._specs[j].describe()


def _check_combinable(specs: Sequence[ConvSpec], concat: bool, nm: _BranchNames) -> None:
    """Raise :class:`IncompatibleError` unless the branches agree in dims and input
    channels (and, for a sum, output channels)."""
    first = specs[0]
    for j, s in enumerate(specs[1:], 1):
        if s.dims != first.dims:
            raise IncompatibleError(f"branches {nm(0)} ({first.dims}-d) and {nm(j)} ({s.dims}-d) differ in dims")
        if s.in_channels != first.in_channels:
            raise IncompatibleError(
                f"branches {nm(0)} and {nm(j)} read different channel counts "
                f"({first.in_channels} vs {s.in_channels})"
            )
        if not concat and s.out_channels != first.out_channels:
            raise IncompatibleError(
                f"cannot sum branches {nm(0)} and {nm(j)}: {first.out_channels} vs "
                f"{s.out_channels} output channels"
            )


def _misaligned(specs: Sequence[ConvSpec], nm: _BranchNames) -> list[str]:
    """Why the branches' outputs differ in size (padding minus extent per dim), if they do."""
    dims = specs[0].dims
    consts = [tuple(s.padding[i][0] + s.padding[i][1] - s.extent[i] for i in range(dims)) for s in specs]
    bad = [i for i in range(dims) if len({c[i] for c in consts}) > 1]
    if not bad:
        return []
    detail = ", ".join(f"{nm(j)}: {'x'.join(str(c[i]) for i in bad)}" for j, c in enumerate(consts))
    return [f"branch windows do not align: output sizes differ in {_dims_text(bad)} "
            f"(padding minus extent per branch: {detail})"]


def _frame(specs: Sequence[ConvSpec]) -> tuple[list[int], list[int], list[tuple[int, int]], list[list[int]],
                                               list[list[int]]]:
    """The shared frame of same-stride branches: its dilation, kernel size and padding per
    dim, and each branch's tap spread (``ups``) and offset in it."""
    dims = specs[0].dims
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
    return dil, ksize, pads, ups, offsets
