"""Fluent, declarative registration of blocks and lowering rules (the public front door).

The two registries of repcompiler (blocks: :func:`repcompiler.blocks.register_block`;
lowering rules: :func:`repcompiler.register_rule`) take plain callables. This
module gives them a form that reads like a description of the thing being registered,
in the style of ``torch.ao.quantization``'s ``BackendPatternConfig``. It owns
:class:`RuleConfig` and the decorators :func:`rule` and :func:`block`; blocks are
declared with :class:`~repcompiler.blocks.config.BlockConfig` and
:class:`~repcompiler.blocks.branch.Branch` (re-exported here), the same API the
built-in blocks are declared with.

A block, declared by its named branches::

    from repcompiler.config import BlockConfig, Branch

    (BlockConfig("cross")
        .describe("kxk + 1xk + kx1 + 1x1 -> kxk")
        .branch(Branch.conv(), name="square")                          # the conv's own kernel
        .branch(Branch.conv(lambda g: (1, g.kernel_size[1])), name="wide")
        .branch(Branch.conv(lambda g: (g.kernel_size[0], 1)), name="tall")
        .branch(Branch.pointwise(init="identity") >> Branch.conv(), name="mixed", init=0.5)
        .requires(lambda g: g.dims == 2, "2-d convs only")
        .register())

    rc.orepa_transform(model, block="cross")    # parameters: conv1.branches.square.weight, ...
    rc.testing.check_block("cross")             # the library's equivalence properties

A lowering rule for a user layer::

    from repcompiler.config import RuleConfig

    RuleConfig(ScaleLayer).affine(scale="weight", shift="bias").register()
    # or, for anything else:  RuleConfig(MyLayer).lower(lambda m, info: ...).register()
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn

from . import algebra as A
from .blocks.branch import Branch
from .blocks.config import BlockConfig
from .blocks.parts import placed
from .blocks.registry import register_block
from .errors import RegistrationError
from .rules.base import LowerInfo
from .rules.defaults import register_rule
from .rules.registry import RuleRegistry

__all__ = [
    "Branch",
    "BlockConfig",
    "RuleConfig",
    "block",
    "rule",
    "placed",
]

log = logging.getLogger(__name__)

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
    to :func:`repcompiler.register_rule` (the default registry).
    """

    def __init__(self, target: Any) -> None:
        if not (isinstance(target, type) or callable(target)):
            raise RegistrationError(f"rule target must be a module type or a function, got {target!r}")
        self.target = target
        self._lower: Callable[..., A.Expr | None] | None = None
        self._when: list[tuple[Callable[[Any], bool], str]] = []
        self._example: Callable[..., nn.Module] | None = None
        self._doc = ""
        self._registry: RuleRegistry | None = None

    @property
    def name(self) -> str:
        return getattr(self.target, "__qualname__", None) or repr(self.target)

    def lower(self, fn: Callable[..., A.Expr | None]) -> "RuleConfig":
        """The lowering ``fn(module, info) -> Expr | None`` (``None``: this instance is
        opaque). For function targets: ``fn(call, info)`` (see :mod:`repcompiler.rules.base`)."""
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

    def register(self, *, override: bool = False, rules: RuleRegistry | None = None) -> "RuleConfig":
        """Register the rule into ``rules`` (default: the default registry, as
        :func:`repcompiler.register_rule`); raises :class:`RegistrationError` if
        ``target`` already has its own rule there, unless ``override``. Returns ``self``."""
        if rules is None:
            register_rule(self.target, self.rule, override=override)
        else:
            rules.register(self.target, self.rule, override=override)
        self._registry = rules
        return self

    def check(self, **kwargs: Any) -> Any:
        """Run :func:`repcompiler.testing.check_rule` on the registered rule (using the
        :meth:`example` factory unless ``make_module`` is given, and the registry it was
        registered into unless ``rules`` is given)."""
        from .testing import check_rule  # testing imports the library, not the reverse

        if "make_module" not in kwargs and self._example is not None:
            kwargs["make_module"] = self._example
        if "rules" not in kwargs and self._registry is not None:
            kwargs["rules"] = self._registry
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
