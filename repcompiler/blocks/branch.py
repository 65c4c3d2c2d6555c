"""Branch kinds: what one branch of a declared block computes (the public ``Branch`` API).

A :class:`Branch` maps the conv's input to its output with the conv's geometry (its
stride and its **output size for every input size**, its window centred on the conv's
window); :meth:`Branch.parts` builds it for a geometry as named algebra parts, which
:class:`~repcompiler.blocks.config.BlockConfig` wraps in a
:class:`~repcompiler.blocks.named.BranchExpr` with the branch's end (scale or BN).

Kinds: :meth:`Branch.conv` (any kernel, relative dilation, groups), :meth:`Branch.pointwise`,
:meth:`Branch.depthwise`, :meth:`Branch.identity`, :meth:`Branch.avg`,
:meth:`Branch.fixed` (a fixed per-channel pattern, e.g. OREPA's frequency prior),
:meth:`Branch.block` (a whole declared block as one branch, e.g. OREPA-VGG's OREPA 3x3),
:meth:`Branch.custom`. A *front* stage (``pointwise`` or ``depthwise``) chains in front
of another with ``>>``: ``Branch.pointwise(init="residual") >> Branch.conv()``,
``Branch.depthwise(multiplier=8) >> Branch.pointwise()``.

Default branch names (when the declaration gives none) say what the branch is, for the
geometry it is built for: ``conv3x3``, ``conv1x3``, ``pointwise``, ``depthwise``,
``identity``, ``avg``, ``fixed``, a chain joins them (``pointwise_conv3x3``,
``depthwise_pointwise``); a custom branch takes its function's name.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor

from .. import algebra as A
from ..algebra import ConvSpec
from ..errors import IncompatibleError, RegistrationError, UnsupportedError, check_choice
from .named import HOLD, ResidualConv
from .parts import average_pattern, fixed_depthwise, fresh_weight, identity_fits, per_dim, placed_parts, stacked_identity

__all__ = ["Branch", "IntOrTuple", "GeomFn", "Parts", "as_branch", "ALIASES"]

IntOrTuple = Union[int, Sequence[int]]
GeomFn = Callable[[ConvSpec], Any]
Parts = list[tuple[str, A.Expr]]
_INITS = ("random", "identity", "residual")


def _shape(ks: Sequence[int]) -> str:
    return "x".join(str(k) for k in ks)


class Branch:
    """One branch of a block (see the module docstring). Make branches with the
    constructors; chain a front stage in front of another with ``>>``."""

    kind = "branch"
    front_capable = False

    def parts(self, geom: ConvSpec, mode: str = "online") -> Parts:
        """The branch for ``geom`` as named algebra parts (fresh parameters)."""
        raise NotImplementedError

    def build_parts(self, geom: ConvSpec, mode: str = "online", scaling: str = "vector") -> Parts:
        """:meth:`parts`, told the block's branch ``scaling`` too (only a nested block uses it)."""
        return self.parts(geom, mode)

    def front(self, geom: ConvSpec, mode: str) -> tuple[Parts, ConvSpec]:
        """As a front stage: its parts and the geometry the rest of the chain realises."""
        raise RegistrationError(f"{self!r} cannot stand in front of another branch (only pointwise/depthwise)")

    def default_name(self, geom: ConvSpec) -> str:
        return self.kind

    def __rshift__(self, other: "Branch") -> "Branch":
        return _Chain([self, other])

    def __repr__(self) -> str:
        return self.kind

    # -- constructors ---------------------------------------------------------------
    @staticmethod
    def conv(kernel_size: IntOrTuple | GeomFn | None = None, *, dilation: IntOrTuple | GeomFn = 1,
             groups: int | GeomFn | None = None) -> "Branch":
        """A learnable conv. ``kernel_size``: ``None`` for the conv's own kernel, an int,
        a per-dim tuple (``(1, 3)``) or a callable of the geometry. ``dilation`` is
        relative to the conv's; ``groups`` defaults to the conv's. A window smaller than
        the conv's is centred (exactly, with a one-hot placement where the conv has too
        little padding); a larger one grows the deployed kernel."""
        return _Conv(kernel_size, dilation, groups)

    @staticmethod
    def pointwise(out_channels: int | GeomFn | None = None, *, init: str | GeomFn = "random",
                  inner_bn: bool = False) -> "Branch":
        """A 1x1 conv. Alone, a 1x1 branch centred in the conv's window. In front of
        another branch, a channel mixer ``in -> out_channels`` (default: the conv's
        input width; an int or a callable of the geometry) with stride 1 and no padding.
        ``init``: ``"random"``; ``"identity"`` (a learnable weight that starts as the
        identity: in front of another branch its width must be the input's, alone or as
        the last stage the conv must map ``in -> in``; weight decay pulls it toward zero);
        ``"residual"`` (a fixed identity plus a learnable weight starting at zero, as
        OREPA and DBB: weight decay pulls it toward the identity; for a width other than
        the input's, the official OREPA code's stacked identity, row ``i`` reading input
        channel ``i % (in/groups)``); or a callable of the geometry returning one of those. ``inner_bn``: in offline mode, a BatchNorm after the
        mixer that pads with its bias (DBB's BN-and-pad), so the offline block folds
        exactly too."""
        if not callable(init):
            check_choice("init", init, _INITS, owner="Branch.pointwise", error=RegistrationError)
        return _Pointwise(out_channels, init, bool(inner_bn))

    @staticmethod
    def depthwise(multiplier: int = 1) -> "Branch":
        """A learnable depthwise conv with the conv's kernel and window, ``multiplier``
        outputs per input channel. In front of another branch (``depthwise(8) >>
        pointwise()``) it maps ``in -> multiplier * in`` and the rest is a 1x1 with the
        conv's groups; alone it needs ``multiplier * in == out``."""
        if not isinstance(multiplier, int) or multiplier < 1:
            raise RegistrationError(f"Branch.depthwise: multiplier must be a positive int, got {multiplier!r}")
        return _Depthwise(multiplier)

    @staticmethod
    def identity() -> "Branch":
        """The identity (needs ``in == out``, stride 1 and symmetric 'same' padding)."""
        return _Identity()

    @staticmethod
    def avg() -> "Branch":
        """A fixed average over the conv's kernel window (depthwise; needs ``in == out``
        unless preceded by ``pointwise``)."""
        return _Avg()

    @staticmethod
    def fixed(pattern: Callable[[ConvSpec], Tensor]) -> "Branch":
        """A fixed (non-learnable) depthwise kernel in the conv's window:
        ``pattern(geom)`` returns ``[in_channels, *kernel_size]`` (e.g. OREPA's
        frequency prior, ``lambda g: frequency_prior(g.in_channels, g.kernel_size)``)."""
        if not callable(pattern):
            raise RegistrationError(f"Branch.fixed needs a callable, got {type(pattern).__name__}")
        return _Fixed(pattern)

    @staticmethod
    def block(build: Callable[..., A.Expr], label: str = "") -> "Branch":
        """A whole block as one branch: ``build(geom, *, mode, scaling) -> Expr`` (e.g. a
        :class:`~repcompiler.blocks.config.BlockConfig`), built in the enclosing block's
        mode and scaling (OREPA-VGG: an OREPA 3x3 as RepVGG's kxk branch)."""
        if not callable(build):
            raise RegistrationError(f"Branch.block needs a callable (e.g. a BlockConfig), got {type(build).__name__}")
        return _Custom(build, label or getattr(build, "name", "") or getattr(build, "__name__", "block"), nested=True)

    @staticmethod
    def custom(build: Callable[[ConvSpec], A.Expr], label: str = "") -> "Branch":
        """Any algebra expression ``build(geom) -> Expr`` with the conv's geometry."""
        if not callable(build):
            raise RegistrationError(f"Branch.custom needs a callable, got {type(build).__name__}")
        return _Custom(build, label or getattr(build, "__name__", "custom"))


class _Conv(Branch):
    kind = "conv"

    def __init__(self, kernel_size: Any, dilation: Any, groups: Any) -> None:
        self.kernel_size, self.dilation, self.groups = kernel_size, dilation, groups
        ks = "own" if kernel_size is None else ("f(geom)" if callable(kernel_size) else kernel_size)
        self.label = f"conv(k={ks}" + (f", d={dilation}" if dilation != 1 else "") + ")"

    def _ks(self, geom: ConvSpec) -> tuple[int, ...]:
        return geom.kernel_size if self.kernel_size is None else per_dim(self.kernel_size, geom, "kernel_size")

    def parts(self, geom: ConvSpec, mode: str = "online") -> Parts:
        ks, rel = self._ks(geom), per_dim(self.dilation, geom, "dilation")
        g = geom.groups if self.groups is None else int(self.groups(geom) if callable(self.groups) else self.groups)
        if geom.in_channels % g or geom.out_channels % g:
            raise UnsupportedError(f"{self.label}: groups={g} does not divide {geom.describe()}")
        weight = fresh_weight(geom.out_channels, geom.in_channels // g, *ks)
        return placed_parts(weight, geom, tuple(d * r for d, r in zip(geom.dilation, rel)), g)

    def default_name(self, geom: ConvSpec) -> str:
        return "conv" + _shape(self._ks(geom))

    def __repr__(self) -> str:
        return self.label


class _Pointwise(Branch):
    kind = "pointwise"
    front_capable = True

    def __init__(self, out_channels: Any, init: Any, inner_bn: bool) -> None:
        self.out_channels, self.init, self.inner_bn = out_channels, init, inner_bn

    def _init(self, geom: ConvSpec) -> str:
        init = self.init(geom) if callable(self.init) else self.init
        check_choice("init", init, _INITS, owner="Branch.pointwise")
        return init

    def width(self, geom: ConvSpec) -> int:
        if self.out_channels is None:
            return geom.in_channels
        return int(self.out_channels(geom) if callable(self.out_channels) else self.out_channels)

    def front(self, geom: ConvSpec, mode: str) -> tuple[Parts, ConvSpec]:
        c, g, m, init = geom.in_channels, geom.groups, self.width(geom), self._init(geom)
        if m < 1 or m % g:
            raise UnsupportedError(f"{self!r}: width {m} is not a positive multiple of groups={g} ({geom.describe()})")
        one = (1,) * geom.dims
        if init == "identity" and m != c:
            raise UnsupportedError(f"{self!r}: identity init needs width == in_channels ({m} != {c}); "
                                   f"'residual' starts any width as the (stacked) identity")
        if init == "residual":
            mixer: A.Expr = ResidualConv(torch.nn.Parameter(torch.zeros(m, c // g, *one)), groups=g)
        elif init == "identity":
            mixer = A.Conv(torch.nn.Parameter(stacked_identity(m, c // g, geom.dims)), groups=g)
        else:
            mixer = A.Conv(fresh_weight(m, c // g, *one), groups=g)
        parts: Parts = [("pointwise", mixer)]
        try:
            inner = replace(geom, in_channels=m)
        except IncompatibleError as exc:  # ConvSpec validation (groups must divide)
            raise UnsupportedError(f"{self!r}: {exc}") from None
        if self.inner_bn and mode == "offline":  # DBB's BN-and-pad: pad with the BN's bias
            parts += [("pad", A.ZeroPad(m, geom.dims, geom.padding)),
                      ("norm", A.BatchNorm(_bn(m, geom.dims), dims=geom.dims))]
            inner = replace(inner, padding=((0, 0),) * geom.dims)
        return parts, inner

    def parts(self, geom: ConvSpec, mode: str = "online") -> Parts:
        init = self._init(geom)
        if init == "residual":
            raise UnsupportedError(f"{self!r}: {self.init} init only makes sense in front of another branch")
        if self.out_channels is not None and self.width(geom) != geom.out_channels:
            raise UnsupportedError(f"{self!r}: alone, a 1x1 branch maps to the conv's {geom.out_channels} channels")
        shape = (geom.out_channels, geom.in_channels // geom.groups, *(1,) * geom.dims)
        if init == "identity":  # a learnable 1x1 that starts as the (grouped) identity
            if geom.in_channels != geom.out_channels:
                raise UnsupportedError(f"{self!r}: identity init needs in == out channels ({geom.describe()})")
            weight = torch.nn.Parameter(stacked_identity(shape[0], shape[1], geom.dims))
        else:
            weight = fresh_weight(*shape)
        return placed_parts(weight, geom, geom.dilation, geom.groups)

    def __repr__(self) -> str:
        args = [] if self.out_channels is None else ["f(geom)" if callable(self.out_channels) else str(self.out_channels)]
        if self.init != "random":
            args.append(f"init={'f(geom)' if callable(self.init) else self.init}")
        return f"pointwise({', '.join(args)})"


def _bn(channels: int, dims: int) -> torch.nn.Module:
    return {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}[dims](channels)


class _Depthwise(Branch):
    kind = "depthwise"
    front_capable = True

    def __init__(self, multiplier: int) -> None:
        self.multiplier = multiplier

    def _conv(self, geom: ConvSpec) -> A.Conv:
        c = geom.in_channels
        return A.Conv(fresh_weight(self.multiplier * c, 1, *geom.kernel_size), stride=geom.stride,
                      padding=geom.padding, dilation=geom.dilation, groups=c)

    def front(self, geom: ConvSpec, mode: str) -> tuple[Parts, ConvSpec]:
        d, one = geom.dims, (1,) * geom.dims
        inner = ConvSpec(d, self.multiplier * geom.in_channels, geom.out_channels, one, one, ((0, 0),) * d, one,
                         geom.groups, False)
        return [("depthwise", self._conv(geom))], inner

    def parts(self, geom: ConvSpec, mode: str = "online") -> Parts:
        if self.multiplier * geom.in_channels != geom.out_channels:
            raise UnsupportedError(f"{self!r}: alone it needs multiplier * in == out, got {geom.describe()}")
        return [(HOLD, self._conv(geom))]

    def __repr__(self) -> str:
        return f"depthwise(x{self.multiplier})"


class _Identity(Branch):
    kind = "identity"

    def parts(self, geom: ConvSpec, mode: str = "online") -> Parts:
        if not identity_fits(geom):
            raise UnsupportedError(
                f"identity branch needs in == out, stride 1 and symmetric 'same' padding, got {geom.describe()}"
            )
        return [("identity", A.Identity(geom.in_channels, geom.dims))]


class _Avg(Branch):
    kind = "avg"

    def parts(self, geom: ConvSpec, mode: str = "online") -> Parts:
        if geom.in_channels != geom.out_channels:
            raise UnsupportedError(f"avg branch needs in == out (put Branch.pointwise() in front), got {geom.describe()}")
        return [("average", average_pattern(geom.in_channels, geom))]


class _Fixed(Branch):
    kind = "fixed"

    def __init__(self, pattern: Callable[[ConvSpec], Tensor]) -> None:
        self.pattern = pattern

    def parts(self, geom: ConvSpec, mode: str = "online") -> Parts:
        if geom.in_channels != geom.out_channels:
            raise UnsupportedError(f"fixed branch needs in == out (put Branch.pointwise() in front), "
                                   f"got {geom.describe()}")
        pat = torch.as_tensor(self.pattern(geom))
        if tuple(pat.shape) != (geom.in_channels, *geom.kernel_size):
            raise RegistrationError(f"Branch.fixed: the pattern has shape {tuple(pat.shape)}, want "
                                    f"{(geom.in_channels, *geom.kernel_size)} for {geom.describe()}")
        return [("pattern", fixed_depthwise(pat.to(torch.get_default_dtype()), geom))]


class _Custom(Branch):
    kind = "custom"

    def __init__(self, build: Callable[..., A.Expr], label: str, nested: bool = False) -> None:
        self._build, self.label, self.nested = build, label, nested

    def build_parts(self, geom: ConvSpec, mode: str = "online", scaling: str = "vector") -> Parts:
        expr = self._build(geom, mode=mode, scaling=scaling) if self.nested else self._build(geom)
        if not isinstance(expr, A.Expr):
            raise RegistrationError(f"{self!r} returned {type(expr).__name__}, not an algebra Expr")
        return [("inner" if self.nested else "expr", expr)]

    def parts(self, geom: ConvSpec, mode: str = "online") -> Parts:
        return self.build_parts(geom, mode)

    def default_name(self, geom: ConvSpec) -> str:
        name = re.sub(r"\W", "_", self.label).strip("_") or "custom"
        return name if not name[0].isdigit() else "custom_" + name

    def __repr__(self) -> str:
        return f"{'block' if self.nested else 'custom'}({self.label})"


class _Chain(Branch):
    kind = "chain"

    def __init__(self, stages: list[Branch]) -> None:
        flat: list[Branch] = []
        for s in stages:
            if not isinstance(s, Branch):
                raise RegistrationError(f"'... >> {s!r}' needs a Branch, got {type(s).__name__}")
            flat.extend(s.stages if isinstance(s, _Chain) else [s])
        for s in flat[:-1]:
            if not s.front_capable:
                raise RegistrationError(
                    f"only Branch.pointwise(...) or Branch.depthwise(...) can stand in front of another branch "
                    f"('{' >> '.join(map(repr, flat))}')"
                )
        self.stages = flat

    def parts(self, geom: ConvSpec, mode: str = "online") -> Parts:
        parts: Parts = []
        for s in self.stages[:-1]:
            p, geom = s.front(geom, mode)
            parts += p
        last = self.stages[-1].parts(geom, mode)
        if isinstance(self.stages[-1], (_Pointwise, _Depthwise)):  # name the last stage after its kind
            last = [(self.stages[-1].kind if n == HOLD else n, e) for n, e in last]
        names = {n for n, _ in parts}
        return parts + [(n if n == HOLD or n not in names else f"{n}_2", e) for n, e in last]

    def default_name(self, geom: ConvSpec) -> str:
        names, g = [], geom
        for s in self.stages[:-1]:
            names.append(s.default_name(g))
            g = s.front(g, "online")[1]
        names.append(self.stages[-1].default_name(g))
        return "_".join(names)

    def __repr__(self) -> str:
        return " >> ".join(map(repr, self.stages))


ALIASES: dict[str, Callable[[], Branch]] = {
    "kxk": Branch.conv,
    "conv": Branch.conv,
    "1x1": Branch.pointwise,
    "pointwise": Branch.pointwise,
    "identity": Branch.identity,
    "avg": Branch.avg,
    "1x1>kxk": lambda: Branch.pointwise(init="identity") >> Branch.conv(),
    "1x1>avg": lambda: Branch.pointwise(lambda g: g.out_channels) >> Branch.avg(),
}


def as_branch(b: Branch | str | Callable[[ConvSpec], A.Expr]) -> Branch:
    """A :class:`Branch` from a branch, an alias in :data:`ALIASES` or a callable ``geom -> Expr``."""
    if isinstance(b, Branch):
        return b
    if isinstance(b, str):
        try:
            return ALIASES[b]()
        except KeyError:
            raise RegistrationError(f"unknown branch {b!r}; known: {', '.join(ALIASES)}") from None
    if callable(b):
        return Branch.custom(b)
    raise RegistrationError(f"a branch must be a Branch, an alias string or a callable, got {type(b).__name__}")
