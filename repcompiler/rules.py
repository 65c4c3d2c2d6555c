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
import operator
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from . import algebra as A
from .errors import RegistrationError
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


# -- function rules ------------------------------------------------------------------
#
# A **function rule** is ``lower(call: FunctionCall, info: LowerInfo) -> Expr | None``.
# The region finder (:mod:`passes.find_regions`) calls it for a ``call_function`` (or
# ``call_method``, mapped to the torch function of the same name: ``x.add(..)`` ->
# ``torch.add``) node that has exactly **one** data input. In ``call.args`` /
# ``call.kwargs`` that data input is the :data:`INPUT` sentinel, constant operands
# (parameters, buffers and anything computed from them only) are their tensor values,
# and every other argument is passed as written in the graph. The rule returns the
# expression of the unary linear map ``INPUT -> result`` or ``None`` (opaque).
# Sums and channel concats of several data inputs (``+``, ``torch.add``, ``torch.cat``)
# are handled structurally by the region finder and never reach a rule.


class _InputSentinel:
    """Marks the data input in a :class:`FunctionCall`'s arguments."""

    _instance: "_InputSentinel | None" = None

    def __new__(cls) -> "_InputSentinel":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "INPUT"


INPUT = _InputSentinel()


@dataclass(frozen=True)
class FunctionCall:
    """A call of a function on one data input (the :data:`INPUT` sentinel)."""

    target: Any
    args: tuple
    kwargs: dict

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        """Positional-or-keyword argument ``index`` / ``name``."""
        if index < len(self.args):
            return self.args[index]
        return self.kwargs.get(name, default)

    @property
    def input_index(self) -> int | str | None:
        """Where the data input is (a position, a keyword, or ``None``)."""
        for i, a in enumerate(self.args):
            if a is INPUT:
                return i
        for k, v in self.kwargs.items():
            if v is INPUT:
                return k
        return None


FunctionRule = Callable[[FunctionCall, LowerInfo], Optional[A.Expr]]


def _is_input(value: Any) -> bool:
    return value is INPUT


def _lower_fconv(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
    if not _is_input(call.arg(0, "input")):
        return None
    weight, bias = call.arg(1, "weight"), call.arg(2, "bias")
    if not isinstance(weight, torch.Tensor) or (bias is not None and not isinstance(bias, torch.Tensor)):
        return None
    return A.Conv(
        weight,
        bias,
        stride=call.arg(3, "stride", 1),
        padding=call.arg(4, "padding", 0),
        dilation=call.arg(5, "dilation", 1),
        groups=call.arg(6, "groups", 1),
        name=info.name,
    )


def _lower_fbatch_norm(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
    if not _is_input(call.arg(0, "input")) or call.arg(5, "training", False):
        return None
    mean, var = call.arg(1, "running_mean"), call.arg(2, "running_var")
    weight, bias = call.arg(3, "weight"), call.arg(4, "bias")
    eps = float(call.arg(7, "eps", 1e-5))
    if not isinstance(mean, torch.Tensor) or not isinstance(var, torch.Tensor):
        return None
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = weight * scale
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return A.Affine(mean.shape[0], info.dims, scale=scale.detach(), shift=shift.detach(), name=info.name or "batch_norm")


def _lower_fpad(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
    if not _is_input(call.arg(0, "input")):
        return None
    mode = call.arg(2, "mode", "constant")
    value = call.arg(3, "value", None)
    if mode != "constant" or (value is not None and float(value) != 0.0):
        return None
    pad = call.arg(1, "pad")
    if not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
        return None
    if any(p < 0 for p in pad) or len(pad) // 2 > info.dims:
        return None
    return A.ZeroPad.from_fpad(info.in_channels, info.dims, pad)


def _lower_favgpool(dims: int) -> FunctionRule:
    def lower(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
        if not _is_input(call.arg(0, "input")) or info.dims != dims:
            return None
        ks = call.arg(1, "kernel_size")
        stride = call.arg(2, "stride", None)
        padding = call.arg(3, "padding", 0)
        kwargs = dict(
            ceil_mode=bool(call.arg(4, "ceil_mode", False)),
            count_include_pad=bool(call.arg(5, "count_include_pad", True)),
        )
        if dims > 1:
            kwargs["divisor_override"] = call.arg(6, "divisor_override", None)
        return A.AvgPool(info.in_channels, dims, ks, stride, padding, **kwargs)

    return lower


def _per_channel(value: Any, info: LowerInfo) -> Any:
    """A scalar (python number or 0-d/1-element tensor) or a per-channel tensor of shape
    ``[C]+[1]*dims`` / ``[1, C]+[1]*dims``, as a float or a ``[C]`` tensor; else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if not isinstance(value, torch.Tensor) or value.is_complex() or not value.is_floating_point():
        return None
    if value.numel() == 1 and value.dim() <= info.dims + 2:
        return value.reshape(()).detach()
    shape = tuple(value.shape)
    c = info.in_channels
    ok = shape in ((c,) + (1,) * info.dims, (1, c) + (1,) * info.dims)
    return value.reshape(c).detach() if ok else None


def _lower_mul(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
    if len(call.args) != 2 or call.kwargs:
        return None
    other = call.args[1] if call.args[0] is INPUT else call.args[0]
    v = _per_channel(other, info)
    if v is None:
        return None
    if isinstance(v, float):
        return A.Constant(info.in_channels, info.dims, v, name=info.name or f"x{v:g}")
    return A.Affine(info.in_channels, info.dims, scale=v.clone() if v.dim() else v.clone(),
                    name=info.name or "mul")


def _lower_div(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
    if len(call.args) != 2 or call.kwargs or call.args[0] is not INPUT:
        return None
    v = _per_channel(call.args[1], info)
    if v is None:
        return None
    if isinstance(v, float):
        return None if v == 0.0 else A.Constant(info.in_channels, info.dims, 1.0 / v, name=info.name or f"/{v:g}")
    return A.Affine(info.in_channels, info.dims, scale=1.0 / v, name=info.name or "div")


def _lower_add(sign: float) -> FunctionRule:
    """``a + sign*alpha*b`` with one of ``a``/``b`` the input and the other a constant."""

    def lower(call: FunctionCall, info: LowerInfo) -> A.Expr | None:
        alpha = call.kwargs.get("alpha", 1)
        if len(call.args) != 2 or set(call.kwargs) - {"alpha"} or not isinstance(alpha, (int, float)):
            return None
        first_is_input = call.args[0] is INPUT
        v = _per_channel(call.args[1] if first_is_input else call.args[0], info)
        if v is None:
            return None
        c = info.in_channels
        if isinstance(v, float):
            shift = torch.full((c,), v)
        elif v.dim() == 0:
            shift = v.expand(c).clone()
        else:
            shift = v.clone()
        if first_is_input:  # x + sign*alpha*v
            scale, shift = None, shift * (sign * alpha)
        else:  # v + sign*alpha*x
            scale = None if sign * alpha == 1 else float(sign * alpha)
        return A.Affine(c, info.dims, scale=scale, shift=shift.detach(), name=info.name or "add")

    return lower


def _register_function_rules(reg: RuleRegistry) -> None:
    for f in (F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d):
        reg.register(f, _lower_fconv, override=True)
    reg.register(F.batch_norm, _lower_fbatch_norm, override=True)
    reg.register(F.pad, _lower_fpad, override=True)
    for d, f in ((1, F.avg_pool1d), (2, F.avg_pool2d), (3, F.avg_pool3d)):
        reg.register(f, _lower_favgpool(d), override=True)
    for f in (operator.mul, torch.mul, operator.imul):
        reg.register(f, _lower_mul, override=True)
    for f in (operator.truediv, torch.div, operator.itruediv):
        reg.register(f, _lower_div, override=True)
    for f in (operator.add, torch.add, operator.iadd):
        reg.register(f, _lower_add(1.0), override=True)
    for f in (operator.sub, torch.sub, operator.isub):
        reg.register(f, _lower_add(-1.0), override=True)


def _lower_frozen_bn(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    scale = m.weight * torch.rsqrt(m.running_var + m.eps)
    shift = m.bias - m.running_mean * scale
    return A.Affine(scale.shape[0], info.dims, scale=scale.detach(), shift=shift.detach(),
                    name=info.name or "FrozenBatchNorm2d")


_register_function_rules(default_rules)
default_rules.register(FrozenBatchNorm2d, _lower_frozen_bn, override=True)
register_third_party_rules(default_rules)

__all__ += ["INPUT", "FunctionCall", "FunctionRule"]
