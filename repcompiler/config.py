"""Fluent, declarative registration of blocks and lowering rules.

The two registries of repcompiler (blocks: :func:`repcompiler.blocks.register_block`;
lowering rules: :func:`repcompiler.rules.register_rule`) take plain callables. This
module gives them a form that reads like a description of the thing being registered,
in the style of ``torch.ao.quantization``'s ``BackendPatternConfig``: a config object
whose setters return ``self`` and whose :meth:`~BlockConfig.register` hands the
composed callable to the plain registry (so everything registered here is also
reachable through ``get_block`` / ``lookup_rule`` and behaves exactly like a
hand-written builder or rule).

A block, declared by its branches::

    from repcompiler.config import BlockConfig, Branch

    (BlockConfig("cross")
        .describe("kxk + 1xk + kx1 + 1x1 -> kxk")
        .branch(Branch.conv())                                   # the conv's own kernel
        .branch(Branch.conv(lambda g: (1, g.kernel_size[1])))    # 1xk, centred
        .branch(Branch.conv(lambda g: (g.kernel_size[0], 1)))    # kx1, centred
        .branch(Branch.pointwise(init="identity") >> Branch.conv(), init=0.5)
        .requires(lambda g: g.dims == 2, "2-d convs only")
        .register())

    rc.orepa_transform(model, block="cross")    # online training, one conv per forward
    rc.testing.check_block("cross")             # the library's equivalence properties

A lowering rule for a user layer::

    from repcompiler.config import RuleConfig

    RuleConfig(ScaleLayer).affine(scale="weight", shift="bias").register()
    # or, for anything else:  RuleConfig(MyLayer).lower(lambda m, info: ...).register()

Branch semantics (per spatial dimension, for the conv being replaced with stride
``s``, dilation ``d``, kernel ``k`` and padding ``(l, r)``):

* every branch maps the conv's input to its output with the conv's stride and the
  conv's **output size for every input size**, its window **centred** on the conv's
  window (for an even difference of extents the extra tap goes right, as torch's
  ``padding="same"``);
* :meth:`Branch.conv` takes a kernel size (default: the conv's own) and a dilation
  *relative* to the conv's (``dilation=2`` on a conv with ``dilation=1`` gives a
  dilated kernel). A branch window smaller than the conv's is placed with reduced
  padding (or, where the conv has too little padding, a fixed one-hot placement conv
  in front: exact either way). A window *larger* than the conv's is allowed: the
  deployed kernel then grows to cover it (e.g. a dilated 3x3 branch in a 3x3 block
  deploys as a 5x5 conv). The output size never changes.
* each branch ends with a learnable scale (online mode; ``"vector"``, ``"scalar"`` or
  no scale following the transform's ``scaling`` option) or a fresh BatchNorm
  (offline mode, as DBB/RepVGG train), initialised to the branch's ``init`` (with
  ``scaling="none"`` there is no scale, and ``init`` does not apply).

Everything a config builds goes through the algebra, so exactness is checked, never
assumed: a branch combination that would not fold exactly is refused by
:class:`~repcompiler.online.OnlineConv` and caught by
:func:`repcompiler.testing.check_block`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

from . import algebra as A
from .blocks import MODES, SCALINGS
from .blocks.registry import ConvGeometry, register_block
from .errors import RegistrationError, UnsupportedError, check_choice
from .rules import LowerInfo, register_rule

__all__ = [
    "Branch",
    "BlockConfig",
    "RuleConfig",
    "block",
    "rule",
    "placed",
]

log = logging.getLogger(__name__)

IntOrTuple = Union[int, Sequence[int]]
GeomFn = Callable[[ConvGeometry], Any]
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


# -- helpers ---------------------------------------------------------------------------


def _per_dim(value: Any, geom: ConvGeometry, what: str) -> tuple[int, ...]:
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


def _fresh(*shape: int) -> nn.Parameter:
    """Initialised as ``nn.Conv*d`` initialises its weight: U(-1/sqrt(fan_in), +)."""
    bound = 1.0 / math.sqrt(max(math.prod(shape[1:]), 1))
    return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))


def _end(expr: A.Expr, geom: ConvGeometry, init: float, mode: str, scaling: str) -> A.Expr:
    """End a branch: a learnable scale (online) or a fresh BN with gamma = init (offline)."""
    c, d = geom.out_channels, geom.dims
    if mode == "offline":
        bn = _BN[d](c)
        with torch.no_grad():
            bn.weight.fill_(float(init))
        return A.Seq(expr, A.BatchNorm(bn, dims=d))
    if scaling == "none":  # the paper's ablation: no branch scale (init does not apply)
        return expr
    return A.Seq(expr, A.Scale(c, d, init=float(init), kind=scaling))


# -- branches --------------------------------------------------------------------------


class Branch:
    """One branch of a block: ``build(geom) -> Expr`` mapping the conv's input to its
    output with the conv's geometry (see the module docstring).

    Make branches with the constructors :meth:`conv`, :meth:`pointwise`,
    :meth:`identity`, :meth:`avg`, :meth:`custom`; chain a channel-mixing 1x1 in front
    of another branch with ``Branch.pointwise(...) >> Branch.conv()``.
    """

    label: str = "branch"

    def build(self, geom: ConvGeometry) -> A.Expr:
        raise NotImplementedError

    def __rshift__(self, other: "Branch") -> "Branch":
        return _SeqBranch(self, other)

    def __repr__(self) -> str:
        return self.label

    # -- constructors ---------------------------------------------------------------
    @staticmethod
    def conv(kernel_size: IntOrTuple | GeomFn | None = None, *, dilation: IntOrTuple | GeomFn = 1,
             groups: int | GeomFn | None = None) -> "Branch":
        """A learnable conv branch. ``kernel_size``: ``None`` for the conv's own kernel,
        an int, a per-dim tuple (``(1, 3)``) or a callable of the
        :class:`~repcompiler.blocks.ConvGeometry`. ``dilation`` is relative to the
        conv's; ``groups`` defaults to the conv's."""
        return _ConvBranch(kernel_size, dilation, groups)

    @staticmethod
    def pointwise(out_channels: int | GeomFn | None = None, *, init: str = "random") -> "Branch":
        """A 1x1 conv. Alone, a 1x1 branch (centred in the conv's window). In front of
        another branch (``pointwise(...) >> conv()``) a channel mixer ``in ->
        out_channels`` (default: the conv's input width) with stride 1 and no padding;
        ``init="identity"`` starts it as the identity (needs ``out_channels == in``)."""
        check_choice("init", init, ("random", "identity"), owner="Branch.pointwise", error=RegistrationError)
        return _PointwiseBranch(out_channels, init)

    @staticmethod
    def identity() -> "Branch":
        """The identity (needs ``in == out``, stride 1 and the conv's window centred on
        each output pixel, i.e. symmetric 'same' padding)."""
        return _IdentityBranch()

    @staticmethod
    def avg() -> "Branch":
        """A fixed average over the conv's kernel window (depthwise; needs ``in == out``
        unless preceded by ``pointwise``)."""
        return _AvgBranch()

    @staticmethod
    def custom(build: Callable[[ConvGeometry], A.Expr], label: str = "") -> "Branch":
        """Any algebra expression ``build(geom) -> Expr`` with the conv's geometry."""
        if not callable(build):
            raise RegistrationError(f"Branch.custom needs a callable, got {type(build).__name__}")
        return _CustomBranch(build, label or getattr(build, "__name__", "custom"))


class _ConvBranch(Branch):
    def __init__(self, kernel_size: Any, dilation: Any, groups: Any) -> None:
        self.kernel_size, self.dilation, self.groups = kernel_size, dilation, groups
        ks = "own" if kernel_size is None else ("f(geom)" if callable(kernel_size) else kernel_size)
        self.label = f"conv(k={ks}" + (f", d={dilation}" if dilation != 1 else "") + ")"

    def build(self, geom: ConvGeometry) -> A.Expr:
        ks = geom.kernel_size if self.kernel_size is None else _per_dim(self.kernel_size, geom, "kernel_size")
        rel = _per_dim(self.dilation, geom, "dilation")
        g = geom.groups if self.groups is None else int(self.groups(geom) if callable(self.groups) else self.groups)
        if geom.in_channels % g or geom.out_channels % g:
            raise UnsupportedError(f"{self.label}: groups={g} does not divide {geom.describe()}")
        weight = _fresh(geom.out_channels, geom.in_channels // g, *ks)
        return placed(weight, geom, tuple(d * r for d, r in zip(geom.dilation, rel)), g)


class _PointwiseBranch(Branch):
    def __init__(self, out_channels: Any, init: str) -> None:
        self.out_channels, self.init = out_channels, init
        args = [] if out_channels is None else ["f(geom)" if callable(out_channels) else str(out_channels)]
        if init == "identity":
            args.append("identity-init")
        self.label = f"pointwise({', '.join(args)})"

    def width(self, geom: ConvGeometry) -> int:
        if self.out_channels is None:
            return geom.in_channels
        return int(self.out_channels(geom) if callable(self.out_channels) else self.out_channels)

    def mixer(self, geom: ConvGeometry) -> tuple[A.Expr, int]:
        """The channel-mixing 1x1 ``in -> width`` (stride 1, no padding, no bias)."""
        c, g, m = geom.in_channels, geom.groups, self.width(geom)
        if m < 1 or m % g:
            raise UnsupportedError(f"{self.label}: width {m} is not a positive multiple of groups={g} ({geom.describe()})")
        one = (1,) * geom.dims
        if self.init == "identity":
            if m != c:
                raise UnsupportedError(f"{self.label}: identity init needs width == in_channels ({m} != {c})")
            w = torch.zeros(m, c // g, *one)
            for i in range(m):
                w[(i, i % (c // g)) + (0,) * geom.dims] = 1.0
            weight = nn.Parameter(w)
        else:
            weight = _fresh(m, c // g, *one)
        return A.Conv(weight, groups=g), m

    def build(self, geom: ConvGeometry) -> A.Expr:
        # alone, a pointwise branch maps in -> out (centred 1x1); width/init are for mixers
        if self.init == "identity":
            raise UnsupportedError(f"{self.label}: identity init only makes sense in front of another branch")
        if self.out_channels is not None and self.width(geom) != geom.out_channels:
            raise UnsupportedError(f"{self.label}: alone, a 1x1 branch maps to the conv's {geom.out_channels} channels")
        weight = _fresh(geom.out_channels, geom.in_channels // geom.groups, *(1,) * geom.dims)
        return placed(weight, geom, geom.dilation, geom.groups)


class _SeqBranch(Branch):
    def __init__(self, first: Branch, then: Branch) -> None:
        if not isinstance(first, _PointwiseBranch):
            raise RegistrationError(
                f"only Branch.pointwise(...) can stand in front of another branch ('{first!r} >> {then!r}')"
            )
        if not isinstance(then, Branch):
            raise RegistrationError(f"'{first!r} >> ...' needs a Branch, got {type(then).__name__}")
        self.first, self.then = first, then
        self.label = f"{first!r} >> {then!r}"

    def build(self, geom: ConvGeometry) -> A.Expr:
        mix, width = self.first.mixer(geom)
        try:
            inner = replace(geom, in_channels=width)
        except Exception as exc:  # ConvSpec validation (groups must divide)
            raise UnsupportedError(f"{self.label}: {exc}") from None
        return A.Seq(mix, self.then.build(inner))


class _IdentityBranch(Branch):
    label = "identity"

    def build(self, geom: ConvGeometry) -> A.Expr:
        spec = geom.spec
        centred = all(l == r and 2 * l == e for (l, r), e in zip(spec.padding, spec.extent))
        if geom.in_channels != geom.out_channels or any(s != 1 for s in geom.stride) or not centred:
            raise UnsupportedError(
                f"identity branch needs in == out, stride 1 and symmetric 'same' padding, got {geom.describe()}"
            )
        return A.Identity(geom.in_channels, geom.dims)


class _AvgBranch(Branch):
    label = "avg"

    def build(self, geom: ConvGeometry) -> A.Expr:
        if geom.in_channels != geom.out_channels:
            raise UnsupportedError(
                f"avg branch needs in == out (put Branch.pointwise() in front), got {geom.describe()}"
            )
        c, ks = geom.in_channels, geom.kernel_size
        pattern = torch.full((c, 1, *ks), 1.0 / math.prod(ks))  # a buffer: fixed
        return A.Conv(pattern, stride=geom.stride, padding=geom.padding, dilation=geom.dilation, groups=c)


class _CustomBranch(Branch):
    def __init__(self, build: Callable[[ConvGeometry], A.Expr], label: str) -> None:
        self._build, self.label = build, f"custom({label})"

    def build(self, geom: ConvGeometry) -> A.Expr:
        expr = self._build(geom)
        if not isinstance(expr, A.Expr):
            raise RegistrationError(f"{self.label} returned {type(expr).__name__}, not an algebra Expr")
        return expr


def placed(weight: Tensor, geom: ConvGeometry, dilation: Sequence[int], groups: int,
           bias: Tensor | None = None) -> A.Expr:
    """A conv with kernel ``weight`` and ``dilation``, its window centred on the window
    of the conv ``geom`` (same stride and output size for every input size).

    Where the needed padding is non-negative this is one conv; where the branch window
    is smaller than the conv's and the conv has too little padding for that (e.g. a
    'valid' conv), a fixed one-hot depthwise placement conv runs first. Exact either way.
    """
    ks = tuple(weight.shape[2:])
    spec = geom.spec
    pads, place_dims = [], []
    for i, ((l, r), e, k, d) in enumerate(zip(spec.padding, spec.extent, ks, dilation)):
        eb = d * (k - 1)
        delta = e - eb
        off = delta // 2
        nl, nr = l - off, r - (delta - off)
        if nl >= 0 and nr >= 0:
            pads.append((nl, nr))
        else:  # only possible when delta > 0: shift/crop with a one-hot conv first
            pads.append((0, 0))
            place_dims.append((i, off, delta))
    conv = A.Conv(weight, bias, stride=geom.stride, padding=tuple(pads), dilation=tuple(dilation), groups=groups)
    if not place_dims:
        return conv
    c = geom.in_channels
    pk = [1] * geom.dims
    ppad = [(0, 0)] * geom.dims
    idx = [0] * geom.dims
    for i, off, delta in place_dims:
        pk[i], ppad[i], idx[i] = delta + 1, spec.padding[i], off
    onehot = torch.zeros(c, 1, *pk)
    onehot[(slice(None), 0) + tuple(idx)] = 1.0
    return A.Seq(A.Conv(onehot, padding=tuple(ppad), groups=c), conv)


_ALIASES: dict[str, Callable[[], Branch]] = {
    "kxk": Branch.conv,
    "conv": Branch.conv,
    "1x1": Branch.pointwise,
    "pointwise": Branch.pointwise,
    "identity": Branch.identity,
    "avg": Branch.avg,
    "1x1>kxk": lambda: Branch.pointwise(init="identity") >> Branch.conv(),
    "1x1>avg": lambda: Branch.pointwise(lambda g: g.out_channels) >> Branch.avg(),
}


def _as_branch(b: Branch | str | Callable[[ConvGeometry], A.Expr]) -> Branch:
    if isinstance(b, Branch):
        return b
    if isinstance(b, str):
        try:
            return _ALIASES[b]()
        except KeyError:
            raise RegistrationError(f"unknown branch {b!r}; known: {', '.join(_ALIASES)}") from None
    if callable(b):
        return Branch.custom(b)
    raise RegistrationError(f"a branch must be a Branch, an alias string or a callable, got {type(b).__name__}")


# -- blocks ----------------------------------------------------------------------------


@dataclass
class _BranchEntry:
    branch: Branch
    init: float
    optional: bool


class BlockConfig:
    """A block topology declared branch by branch; :meth:`register` makes it a block.

    Every setter returns ``self``. The registered builder is :meth:`build` (signature
    ``build(geom, *, mode="online", scaling="vector")``, as the block registry expects).
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise RegistrationError(f"a block name must be a non-empty string, got {name!r}")
        self.name = name
        self._branches: list[_BranchEntry] = []
        self._requires: list[tuple[Callable[[ConvGeometry], bool], str]] = []
        self._scaling: str | None = None
        self._bias: bool | None = None
        self._doc = ""

    # -- declaration ----------------------------------------------------------------
    def branch(self, branch: Branch | str | Callable[[ConvGeometry], A.Expr], *, init: float = 1.0,
               optional: bool = False) -> "BlockConfig":
        """Add a branch. ``branch``: a :class:`Branch`, an alias (``"kxk"``, ``"1x1"``,
        ``"identity"``, ``"avg"``, ``"1x1>kxk"``, ``"1x1>avg"``) or a callable
        ``geom -> Expr``. ``init``: the branch's initial scale (online) / BN gamma
        (offline). ``optional``: drop the branch (instead of rejecting the conv) where
        it cannot be built for a geometry, as RepVGG drops its identity branch."""
        self._branches.append(_BranchEntry(_as_branch(branch), float(init), bool(optional)))
        return self

    def requires(self, predicate: Callable[[ConvGeometry], bool], reason: str) -> "BlockConfig":
        """Only convs with ``predicate(geom)`` true get this block; others are left as
        they are and the transform reports ``reason``."""
        if not callable(predicate):
            raise RegistrationError(f"block {self.name!r}: requires() needs a callable predicate")
        self._requires.append((predicate, str(reason)))
        return self

    def scaling(self, kind: str | None) -> "BlockConfig":
        """Fix the branch scaling (``"vector"``, ``"scalar"``, ``"none"``) whatever the
        transform asks for; ``None`` (the default) follows the transform's option."""
        check_choice("scaling", kind, SCALINGS, owner=f"block {self.name!r}", allow_none=True, error=RegistrationError)
        self._scaling = kind
        return self

    def bias(self, enabled: bool | None) -> "BlockConfig":
        """A learnable bias after the branch sum: ``None`` (default) exactly when the
        conv needs one (it has a bias and no BN follows), or always/never."""
        self._bias = enabled
        return self

    def describe(self, text: str) -> "BlockConfig":
        """A one-line description (shown in ``repr``)."""
        self._doc = str(text)
        return self

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> "BlockConfig":
        """The declarative form::

            BlockConfig.from_dict({
                "name": "cross",
                "description": "kxk + 1x3 + 3x1 + dilated 3x3",
                "branches": [
                    "kxk",
                    {"kernel_size": (1, 3)},
                    {"kernel_size": (3, 1)},
                    {"kernel_size": 3, "dilation": 2, "init": 0.5},
                    {"branch": "identity", "optional": True},
                ],
                "scaling": None,        # optional
            }).register()

        A branch is an alias string, a :class:`Branch`, a callable ``geom -> Expr``, or
        a dict: ``branch`` (any of those) or the :meth:`Branch.conv` keywords
        ``kernel_size``/``dilation``/``groups``, plus ``init`` and ``optional``."""
        known = {"name", "description", "branches", "scaling", "bias", "requires"}
        unknown = set(spec) - known
        if unknown:
            raise RegistrationError(f"BlockConfig.from_dict: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        if "name" not in spec or not spec.get("branches"):
            raise RegistrationError("BlockConfig.from_dict needs a 'name' and a non-empty 'branches' list")
        cfg = cls(spec["name"])
        if spec.get("description"):
            cfg.describe(spec["description"])
        for item in spec["branches"]:
            if isinstance(item, dict):
                item = dict(item)
                init, optional = float(item.pop("init", 1.0)), bool(item.pop("optional", False))
                if "branch" in item:
                    b = item.pop("branch")
                else:
                    b = Branch.conv(item.pop("kernel_size", None), dilation=item.pop("dilation", 1),
                                    groups=item.pop("groups", None))
                if item:
                    raise RegistrationError(f"block {cfg.name!r}: unknown branch keys {sorted(item)}")
                cfg.branch(b, init=init, optional=optional)
            else:
                cfg.branch(item)
        if "scaling" in spec:
            cfg.scaling(spec["scaling"])
        if "bias" in spec:
            cfg.bias(spec["bias"])
        for pred, reason in spec.get("requires", ()):
            cfg.requires(pred, reason)
        return cfg

    # -- use --------------------------------------------------------------------------
    @property
    def branches(self) -> list[Branch]:
        return [b.branch for b in self._branches]

    def build(self, geom: ConvGeometry, *, mode: str = "online", scaling: str = "vector") -> A.Expr:
        """Build the block for ``geom`` (fresh parameters)."""
        check_choice("mode", mode, MODES, owner=f"block {self.name!r}")
        scaling = self._scaling or scaling
        check_choice("scaling", scaling, SCALINGS, owner=f"block {self.name!r}")
        if not self._branches:
            raise RegistrationError(f"block {self.name!r} has no branches")
        for pred, reason in self._requires:
            if not pred(geom):
                raise UnsupportedError(f"block {self.name!r} does not apply to {geom.describe()}: {reason}")
        exprs: list[A.Expr] = []
        for entry in self._branches:
            try:
                e = entry.branch.build(geom)
            except UnsupportedError as exc:
                if entry.optional:
                    log.debug("block %s: optional branch %r dropped for %s (%s)", self.name, entry.branch,
                              geom.describe(), exc)
                    continue
                raise UnsupportedError(f"block {self.name!r}, branch {entry.branch!r}: {exc}") from None
            exprs.append(_end(e, geom, entry.init, mode, scaling))
        if not exprs:
            raise UnsupportedError(f"block {self.name!r}: no branch applies to {geom.describe()}")
        out: A.Expr = A.Sum(*exprs) if len(exprs) > 1 else exprs[0]
        if self._bias if self._bias is not None else geom.bias:
            out = A.Seq(out, A.Bias(geom.out_channels, geom.dims))
        return out

    def __call__(self, geom: ConvGeometry, *, mode: str = "online", scaling: str = "vector") -> A.Expr:
        return self.build(geom, mode=mode, scaling=scaling)

    def register(self, *, override: bool = False, validate: bool = True) -> "BlockConfig":
        """Register under :attr:`name` (raises :class:`RegistrationError` if the name is
        taken, unless ``override``). Returns ``self``.

        ``validate`` first builds the block (both modes) for a few common convs
        (2-d 3x3 and 1x1, 1-d, 3-d, strided, grouped): a geometry the block declines
        (``UnsupportedError``) is fine, but any other error, an expression without the
        conv's geometry or one that does not fold exactly raises
        :class:`RegistrationError` here rather than in the middle of a transform. The
        full proof is :meth:`check`."""
        if not self._branches:
            raise RegistrationError(f"block {self.name!r} has no branches; add some with .branch(...)")
        if validate:
            self._validate()
        register_block(self.name, self.build, override=override)
        return self

    def _validate(self) -> None:
        from .blocks.registry import check_geometry

        def g(cin: int, cout: int, k: int, dims: int, s: int = 1, groups: int = 1) -> ConvGeometry:
            return ConvGeometry(cin, cout, (k,) * dims, (s,) * dims, ((k // 2, k // 2),) * dims, (1,) * dims,
                                groups, dims, False)

        samples = [g(4, 4, 3, 2), g(4, 8, 1, 2), g(4, 8, 3, 2, s=2), g(4, 8, 3, 2, groups=2), g(2, 2, 5, 1),
                   g(2, 2, 3, 3)]
        for geom in samples:
            for mode in MODES:
                try:
                    expr = self.build(geom, mode=mode)
                    check_geometry(expr, geom, f"block {self.name!r}")
                    reasons = expr.exactness().reasons
                except UnsupportedError:
                    continue
                except Exception as exc:
                    raise RegistrationError(
                        f"block {self.name!r} failed to build for {geom.describe()} ({mode}): "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                if reasons:
                    raise RegistrationError(
                        f"block {self.name!r} does not fold exactly for {geom.describe()} ({mode}): "
                        + "; ".join(reasons)
                    )

    def check(self, **kwargs: Any) -> Any:
        """Run :func:`repcompiler.testing.check_block` on this (registered) block."""
        from .testing import check_block

        return check_block(self.name, **kwargs)

    def __repr__(self) -> str:
        lines = [f"BlockConfig({self.name!r}{', ' + repr(self._doc) if self._doc else ''})"]
        for e in self._branches:
            lines.append(f"  + {e.branch!r} (init {e.init:g}{', optional' if e.optional else ''})")
        for _, reason in self._requires:
            lines.append(f"  requires: {reason}")
        return "\n".join(lines)


# -- rules -----------------------------------------------------------------------------

Accessor = Union[str, Callable[[nn.Module], Any], None]


def _get(module: nn.Module, acc: Accessor) -> Any:
    if acc is None:
        return None
    if isinstance(acc, str):
        return getattr(module, acc)
    return acc(module)


class RuleConfig:
    """A lowering rule for a module type (or a function) declared fluently.

    ``RuleConfig(MyLayer).lower(fn)`` wraps a rule ``fn(module, info) -> Expr | None``;
    ``RuleConfig(MyLayer).affine(scale=..., shift=...)`` declares a per-channel affine
    layer without writing the rule. ``.when(predicate, reason)`` makes instances that
    fail the predicate opaque (never folded). :meth:`register` hands the composed rule
    to :func:`repcompiler.rules.register_rule`.
    """

    def __init__(self, target: Any) -> None:
        if not (isinstance(target, type) or callable(target)):
            raise RegistrationError(f"rule target must be a module type or a function, got {target!r}")
        self.target = target
        self._lower: Callable[..., A.Expr | None] | None = None
        self._when: list[tuple[Callable[[Any], bool], str]] = []
        self._example: Callable[..., nn.Module] | None = None
        self._doc = ""

    @property
    def name(self) -> str:
        return getattr(self.target, "__qualname__", None) or repr(self.target)

    def lower(self, fn: Callable[..., A.Expr | None]) -> "RuleConfig":
        """The lowering ``fn(module, info) -> Expr | None`` (``None``: this instance is
        opaque). For function targets: ``fn(call, info)`` (see :mod:`repcompiler.rules`)."""
        if not callable(fn):
            raise RegistrationError(f"rule for {self.name}: lower() needs a callable, got {type(fn).__name__}")
        self._lower = fn
        return self

    def affine(self, scale: Accessor = None, shift: Accessor = None) -> "RuleConfig":
        """The layer computes ``x * scale + shift`` per channel. ``scale``/``shift``:
        an attribute name, a callable ``module -> tensor | float | None``, or ``None``
        (absent). A module's own ``nn.Parameter`` is shared by the expression (so the
        lowered form trains); computed values are taken as constants."""
        if scale is None and shift is None:
            raise RegistrationError(f"rule for {self.name}: affine() needs a scale or a shift")

        def lower(m: nn.Module, info: LowerInfo) -> A.Expr | None:
            s, b = _get(m, scale), _get(m, shift)
            c = info.in_channels
            s = _affine_operand(s, c, scalar_ok=True)
            b = _affine_operand(b, c, scalar_ok=True)
            if s is _BAD or b is _BAD:
                return None
            if b is not None and b.dim() == 0:
                b = b.expand(c).clone()
            return A.Affine(c, info.dims, scale=s, shift=b, name=info.name or type(m).__name__)

        self._lower = lower
        return self

    def when(self, predicate: Callable[[Any], bool], reason: str = "") -> "RuleConfig":
        """Lower only instances with ``predicate(module)``; others stay opaque."""
        if not callable(predicate):
            raise RegistrationError(f"rule for {self.name}: when() needs a callable predicate")
        self._when.append((predicate, reason))
        return self

    def example(self, make_module: Callable[..., nn.Module]) -> "RuleConfig":
        """A factory of instances (``make_module(channels=..., dims=...)``, taking the
        keywords it wants) that :meth:`check` uses."""
        self._example = make_module
        return self

    def describe(self, text: str) -> "RuleConfig":
        self._doc = str(text)
        return self

    @property
    def rule(self) -> Callable[..., A.Expr | None]:
        """The composed rule callable (what :meth:`register` registers)."""
        if self._lower is None:
            raise RegistrationError(f"rule for {self.name} has no lowering; call .lower(fn) or .affine(...)")
        lower, conds, name = self._lower, list(self._when), self.name

        def rule(obj: Any, info: LowerInfo) -> A.Expr | None:
            for pred, reason in conds:
                if not pred(obj):
                    log.debug("rule for %s: instance is opaque (%s)", name, reason or "predicate false")
                    return None
            return lower(obj, info)

        rule.__name__ = f"lower_{getattr(self.target, '__name__', 'target')}"
        rule.__qualname__ = rule.__name__
        rule.__doc__ = self._doc or f"Lowering rule for {name} (declared with RuleConfig)."
        return rule

    def register(self, *, override: bool = False) -> "RuleConfig":
        """Register the rule (raises :class:`RegistrationError` if ``target`` already has
        its own rule, unless ``override``). Returns ``self``."""
        register_rule(self.target, self.rule, override=override)
        return self

    def check(self, **kwargs: Any) -> Any:
        """Run :func:`repcompiler.testing.check_rule` on the registered rule (using the
        :meth:`example` factory unless ``make_module`` is given)."""
        from .testing import check_rule

        if "make_module" not in kwargs and self._example is not None:
            kwargs["make_module"] = self._example
        return check_rule(self.target, **kwargs)

    def __repr__(self) -> str:
        return f"RuleConfig({self.name}{', when ' + str(len(self._when)) + ' condition(s)' if self._when else ''})"


class _Bad:
    pass


_BAD = _Bad()


def _affine_operand(v: Any, channels: int, scalar_ok: bool) -> Any:
    """A ``[C]`` or 0-d tensor (parameters kept as they are), ``None``, or ``_BAD``."""
    if v is None:
        return None
    if isinstance(v, bool):
        return _BAD
    if isinstance(v, (int, float)):
        return torch.tensor(float(v))
    if not isinstance(v, Tensor) or not v.is_floating_point():
        return _BAD
    if v.numel() == 1 and scalar_ok:
        return v if (isinstance(v, nn.Parameter) and v.dim() == 0) else v.detach().reshape(())
    if v.numel() != channels or channels < 1:
        return _BAD
    if isinstance(v, nn.Parameter) and v.dim() == 1:
        return v
    return v.detach().reshape(channels)


# -- decorators ------------------------------------------------------------------------


def rule(target: Any, *, override: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator form of :func:`repcompiler.register_rule`::

        @rule(MyLayer)
        def lower_my_layer(module, info):
            return A.Affine(info.in_channels, info.dims, scale=module.gain)
    """

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        register_rule(target, fn, override=override)
        return fn

    return deco


def block(name: str, *, override: bool = False) -> Callable[[Callable[..., A.Expr]], Callable[..., A.Expr]]:
    """Decorator form of :func:`repcompiler.register_block`::

        @block("my_block")
        def build(geom, *, mode="online", scaling="vector"):
            ...
    """

    def deco(fn: Callable[..., A.Expr]) -> Callable[..., A.Expr]:
        register_block(name, fn, override=override)
        return fn

    return deco
