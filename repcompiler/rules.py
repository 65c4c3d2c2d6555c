"""The rule registry: how a module type (or a function) lowers into the kernel algebra.

A **module rule** is ``lower(module, info) -> Expr | None``: given a module instance
and what the graph knows about its input (:class:`LowerInfo`), return an algebra
expression computing the same linear map, or ``None`` when this particular instance
is not linear-foldable (e.g. a BN with ``track_running_stats=False``). Modules
without a rule are opaque: never folded.

Lookup walks the module's MRO, so a subclass uses its base's rule unless it registers
its own (``type(m) is X`` checks would miss subclasses; this does not).

**Function rules** (``F.conv2d``, ``F.pad``, ``operator.mul`` ...) are keyed by the
callable; the built-in ones and the types they receive (:class:`FunctionCall`,
:data:`INPUT`) live in :mod:`repcompiler.function_rules`, re-exported here.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from . import algebra as A
from .errors import RegistrationError
from .function_rules import INPUT, FunctionCall, FunctionRule, register_function_rules
from .third_party import register_third_party_rules

__all__ = [
    "has_forward_hooks",
    "LowerInfo",
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


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or forward-pre hooks of its own: they may change
    what it computes, so a fold or a block replacing it would drop them."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


class RuleRegistry:
    """Maps module types and functions to lowering rules."""

    def __init__(self) -> None:
        self._rules: dict[Any, Callable[..., Any]] = {}
        self._pending: dict[tuple[str, str], Callable[..., Any]] = {}

    def register_third_party(self, module: str, qualname: str, lower: Callable[..., Any]) -> None:
        """Register ``lower`` for the class ``module.qualname`` of a package that may not
        be installed: the rule takes effect once that module has been imported (by the
        user's code; this never imports it), and an explicit :meth:`register` of the
        class wins."""
        if not callable(lower):
            raise RegistrationError(f"rule for {module}.{qualname} must be callable, got {type(lower).__name__}")
        self._pending[(module, qualname)] = lower

    def _resolve_pending(self) -> None:
        for key in [k for k in self._pending if k[0] in sys.modules]:
            lower = self._pending.pop(key)
            cls: Any = sys.modules[key[0]]
            for part in key[1].split("."):
                cls = getattr(cls, part, None)
            if isinstance(cls, type) and issubclass(cls, nn.Module) and cls not in self._rules:
                self._rules[cls] = lower
                log.debug("registered third-party rule for %s.%s", *key)

    def register(self, target: Any, lower: Callable[..., Any], *, override: bool = False) -> None:
        """Register ``lower`` for ``target`` (a module type or a function)."""
        if not isinstance(override, bool):
            raise RegistrationError(f"rule for {_name(target)}: override must be True or False, got {override!r}")
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
        if self._pending:
            self._resolve_pending()
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

    def lower_module(self, module: nn.Module, info: LowerInfo) -> A.Expr | None:
        """The module's expression, or ``None`` (opaque): no rule, the rule declines, or the
        module has forward hooks (they may change what it computes, and a fold would drop
        them; hook-based ``spectral_norm``/``weight_norm`` recompute the weight in one)."""
        if has_forward_hooks(module):
            return None
        rule = self.lookup(module)
        return None if rule is None else rule(module, info)

    def declines(self, module: nn.Module) -> bool:
        """True when ``module``'s type has a rule that returns ``None`` for this
        instance (e.g. timm's ``BatchNormAct2d`` with a ReLU): the tracer then traces
        into its ``forward``, so the linear ops inside (``F.batch_norm``) can still
        fold. The rule is asked with the geometry the module declares (``in_channels``
        or ``num_features``; dims from ``kernel_size`` or a ``...1d/2d/3d`` class
        name): a module that declares none, or a rule that raises, counts as not
        declining (it stays a leaf, as it always was), since a rule may decline
        only because the guessed geometry is wrong."""
        rule = self.lookup(module)
        geometry = _declared_geometry(module)
        if rule is None or geometry is None:
            return False
        try:
            return rule(module, LowerInfo(*geometry)) is None
        except Exception:  # a rule may need real graph information: keep the leaf
            return False

    def copy(self) -> "RuleRegistry":
        new = RuleRegistry()
        new._rules = dict(self._rules)
        new._pending = dict(self._pending)
        return new

    def __contains__(self, target: Any) -> bool:
        return self.lookup(target) is not None


def _declared_geometry(module: nn.Module) -> tuple[int, int] | None:
    """``(channels, dims)`` a module declares of its input, or ``None`` if it does not."""
    channels = getattr(module, "in_channels", None) or getattr(module, "num_features", None)
    ks = getattr(module, "kernel_size", None)
    dims = len(ks) if isinstance(ks, tuple) else next(
        (int(c.__name__[-2]) for c in type(module).__mro__ if c.__name__[-2:] in ("1d", "2d", "3d")), None)
    if not isinstance(channels, int) or dims is None:
        return None
    return channels, dims


def _name(target: Any) -> str:
    return getattr(target, "__qualname__", None) or repr(target)


# -- built-in module rules -----------------------------------------------------------


def _own_forward(m: nn.Module, bases: tuple[type, ...]) -> bool:
    """True if ``m``'s class overrides ``forward`` of the built-in ``bases`` (e.g. a
    weight-standardized conv): the base rule would then not describe what it computes."""
    fwd = type(m).forward
    return all(fwd is not b.forward for b in bases)


def _lower_conv(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    if getattr(m, "padding_mode", "zeros") != "zeros":
        return None
    if _own_forward(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return None
    return A.Conv.from_module(m, name=info.name)


def _lower_bn(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    if m.running_mean is None or m.running_var is None:
        return None
    if _own_forward(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.modules.batchnorm._BatchNorm)):
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


def _lower_frozen_bn(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    scale = m.weight * torch.rsqrt(m.running_var + m.eps)
    shift = m.bias - m.running_mean * scale
    return A.Affine(scale.shape[0], info.dims, scale=scale.detach(), shift=shift.detach(),
                    name=info.name or "FrozenBatchNorm2d")


register_function_rules(default_rules)
default_rules.register(FrozenBatchNorm2d, _lower_frozen_bn, override=True)
register_third_party_rules(default_rules)

__all__ += ["INPUT", "FunctionCall", "FunctionRule"]
