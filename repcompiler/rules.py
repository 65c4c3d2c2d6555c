"""The rule registry: how a module type (or a function) lowers into the kernel algebra.

A **module rule** is ``lower(module, info) -> Expr | None``: given a module instance
and what the graph knows about its input (:class:`LowerInfo`), return an algebra
expression computing the same linear map, or ``None`` when this particular instance
is not linear-foldable (e.g. a BN with ``track_running_stats=False``). Modules
without a rule are opaque: never folded.

Lookup walks the module's MRO, so a subclass uses its base's rule unless it registers
its own (``type(m) is X`` checks would miss subclasses; this does not).

**Function rules** (``F.conv2d``, ``F.pad``, ``operator.mul`` ...) are keyed by the
callable; their lowering signature is documented with the graph compiler that calls
them (:mod:`passes.find_regions`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torch import nn

from . import algebra as A
from .errors import RegistrationError

__all__ = [
    "LowerInfo",
    "ModuleRule",
    "RuleRegistry",
    "default_rules",
    "register_rule",
    "unregister_rule",
    "lookup_rule",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LowerInfo:
    """What the graph knows about a module's input when lowering it."""

    in_channels: int
    dims: int
    name: str = ""


ModuleRule = Callable[[nn.Module, LowerInfo], Optional[A.Expr]]


class RuleRegistry:
    """Maps module types and functions to lowering rules."""

    def __init__(self) -> None:
        self._rules: dict[Any, Callable[..., Any]] = {}

    def register(self, target: Any, lower: Callable[..., Any], *, override: bool = False) -> None:
        """Register ``lower`` for ``target`` (a module type or a function)."""
        if not callable(lower):
            raise RegistrationError(f"rule for {_name(target)} must be callable, got {type(lower).__name__}")
        if not (isinstance(target, type) or callable(target)):
            raise RegistrationError(f"rule target must be a module type or a function, got {target!r}")
        if isinstance(target, type) and not issubclass(target, nn.Module):
            raise RegistrationError(f"rule target {target.__name__} is a class but not an nn.Module")
        if target in self._rules and not override:
            raise RegistrationError(f"a rule for {_name(target)} is already registered (pass override=True)")
        self._rules[target] = lower
        log.debug("registered rule for %s", _name(target))

    def unregister(self, target: Any) -> None:
        self._rules.pop(target, None)

    def lookup(self, target: Any) -> Callable[..., Any] | None:
        """The rule for a module instance (MRO walk), a module type, or a function."""
        if isinstance(target, nn.Module):
            target = type(target)
        if isinstance(target, type):
            for cls in target.__mro__:
                if cls in self._rules:
                    return self._rules[cls]
            return None
        try:
            return self._rules.get(target)
        except TypeError:  # unhashable callables
            return None

    def has_module_rule(self, module: nn.Module) -> bool:
        return self.lookup(module) is not None

    def lower_module(self, module: nn.Module, info: LowerInfo) -> A.Expr | None:
        rule = self.lookup(module)
        return None if rule is None else rule(module, info)

    def copy(self) -> "RuleRegistry":
        new = RuleRegistry()
        new._rules = dict(self._rules)
        return new

    def __contains__(self, target: Any) -> bool:
        return self.lookup(target) is not None


def _name(target: Any) -> str:
    return getattr(target, "__qualname__", None) or repr(target)


# -- built-in module rules -----------------------------------------------------------


def _lower_conv(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    if getattr(m, "padding_mode", "zeros") != "zeros":
        return None
    return A.Conv.from_module(m, name=info.name)


def _lower_bn(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    if m.running_mean is None or m.running_var is None:
        return None
    return A.BatchNorm(m, dims=info.dims, name=info.name or type(m).__name__)


def _lower_avgpool(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    return A.AvgPool.from_module(m, info.in_channels)


def _lower_identity(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    return A.Identity(info.in_channels, info.dims)


def _lower_zeropad(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    if float(getattr(m, "value", 0.0)) != 0.0:
        return None
    return A.ZeroPad.from_fpad(info.in_channels, info.dims, m.padding)


default_rules = RuleRegistry()
for _t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    default_rules.register(_t, _lower_conv)
for _t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    default_rules.register(_t, _lower_bn)
for _t in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d):
    default_rules.register(_t, _lower_avgpool)
default_rules.register(nn.Identity, _lower_identity)
for _t in (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d):
    default_rules.register(_t, _lower_zeropad)


def register_rule(target: Any, lower: Callable[..., Any], *, override: bool = False) -> None:
    """Teach repcompiler how ``target`` (a module type or a function) lowers into the
    kernel algebra. See :class:`RuleRegistry`."""
    default_rules.register(target, lower, override=override)


def unregister_rule(target: Any) -> None:
    """Remove a rule (no error if absent)."""
    default_rules.unregister(target)


def lookup_rule(target: Any) -> Callable[..., Any] | None:
    """The rule that applies to a module instance, module type or function, if any."""
    return default_rules.lookup(target)
