"""The rule registry: how a module type (or a function) lowers into the kernel algebra.

A **module rule** is ``lower(module, info) -> Expr | None``: given a module instance
and what the graph knows about its input (:class:`~repcompiler.rules.base.LowerInfo`),
return an algebra expression computing the same linear map, or ``None`` when this
particular instance is not linear-foldable (e.g. a BN with
``track_running_stats=False``). Modules without a rule are opaque: never folded.
**Function rules** (``F.conv2d``, ``F.pad``, ``operator.mul`` ...) are keyed by the
callable (:mod:`repcompiler.rules.base` describes what they receive).

Lookup walks the module's MRO, so a subclass uses its base's rule unless it registers
its own (``type(m) is X`` checks would miss subclasses; this does not).

A rule that raises one of :mod:`repcompiler.errors`' types (the algebra refusing an
operand) refuses that instance; any other exception is a bug in the rule and surfaces
as :class:`~repcompiler.errors.RuleError` naming the rule and the module.

This module holds the :class:`RuleRegistry` type only; the default registry, with the
built-in rules, is :func:`repcompiler.rules.defaults.default_rules`.
"""

from __future__ import annotations

import functools
import inspect
import logging
import sys
import types
from typing import Any, Callable

from torch import nn

from .. import algebra as A
from ..errors import RegistrationError, RepCompilerError, RuleError, first_line
from .base import LowerInfo

__all__ = ["has_forward_hooks", "global_hooks", "departure", "RuleRegistry", "call_rule"]

log = logging.getLogger(__name__)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward or forward-pre hooks of its own: they may change
    what it computes, so a fold or a block replacing it would drop them."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


# how a module is called and how its attributes are read: overriding one of these
# changes what any forward computes
_CALL_PATH = ("__call__", "_call_impl", "_wrapped_call_impl", "__getattr__", "__getattribute__", "forward")


@functools.lru_cache(maxsize=None)
def _methods_used(base: type) -> tuple[str, ...]:
    """The methods of ``base`` its ``forward`` calls, transitively (``_conv_forward`` for
    ``nn.Conv2d``, ``_check_input_dim`` for ``nn.BatchNorm2d``), with the call path."""
    found: list[str] = list(_CALL_PATH)
    todo = [base.forward]
    seen: set[int] = set()
    while todo:
        f = inspect.unwrap(todo.pop())
        code = getattr(f, "__code__", None)
        if code is None or id(code) in seen:
            continue
        seen.add(id(code))
        for name in code.co_names:
            attr = inspect.getattr_static(base, name, None)
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            if isinstance(attr, types.FunctionType) and name not in found:
                found.append(name)
                todo.append(attr)
    return tuple(found)


def departure(module: nn.Module, base: type) -> str | None:
    """Why ``module`` (an instance of ``base``, the class a rule was written for) may not
    compute what ``base`` computes, or ``None``: its class overrides ``forward`` or a method
    ``base.forward`` calls (``_conv_forward`` ...), or how the module is called or its
    attributes are read (``__call__``, ``__getattr__`` ...)."""
    cls = type(module)
    if cls is base:
        return None
    for name in _methods_used(base):
        mine = inspect.getattr_static(cls, name, None)
        if mine is not inspect.getattr_static(base, name, None):
            where = "" if name == "forward" else f", which {base.__name__}.forward relies on"
            return f"{cls.__name__} overrides {name}(){where}; the rule for {base.__name__} does not describe it"
    return None


_GLOBAL_HOOKS = {
    "_global_forward_pre_hooks": "register_module_forward_pre_hook",
    "_global_forward_hooks": "register_module_forward_hook",
    "_global_backward_pre_hooks": "register_module_full_backward_pre_hook",
    "_global_backward_hooks": "register_module_full_backward_hook / register_module_backward_hook",
    "_global_module_registration_hooks": "register_module_module_registration_hook",
    "_global_parameter_registration_hooks": "register_module_parameter_registration_hook",
    "_global_buffer_registration_hooks": "register_module_buffer_registration_hook",
}


def global_hooks() -> list[str]:
    """The kinds of global module hooks registered now (``torch.nn.modules.module``'s
    ``register_module_forward_hook`` ...), each with how many: they run on every module
    call (or registration), so no rule describes a module while they are there."""
    from torch.nn.modules import module as _module

    out = []
    for table, how in _GLOBAL_HOOKS.items():
        hooks = getattr(_module, table, None)
        if hooks:
            out.append(f"{len(hooks)} x {how}")
    return out


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
        """Remove the rule of ``target`` (no error if it has none)."""
        self._rules.pop(target, None)

    def ruled_class(self, target: Any) -> type | None:
        """The class in the MRO of a module (or module type) whose rule applies to it."""
        if self._pending:
            self._resolve_pending()
        cls = type(target) if isinstance(target, nn.Module) else target
        if isinstance(cls, type):
            return next((c for c in cls.__mro__ if c in self._rules), None)
        return None

    def departure(self, module: nn.Module) -> str | None:
        """Why ``module``'s rule does not describe it (:func:`departure` against the class
        the rule was written for), or ``None``."""
        base = self.ruled_class(module)
        return None if base is None else departure(module, base)

    def describes(self, module: nn.Module) -> bool:
        """Whether a rule applies to ``module`` and describes what it computes (no
        override of what the rule's class relies on; hooks not considered)."""
        return self.ruled_class(module) is not None and self.departure(module) is None

    def lookup(self, target: Any) -> Callable[..., Any] | None:
        """The rule for a module instance (MRO walk), a module type, or a function."""
        if self._pending:
            self._resolve_pending()
        if isinstance(target, nn.Module):
            target = type(target)
        if isinstance(target, type):
            cls = self.ruled_class(target)
            return None if cls is None else self._rules[cls]
        try:
            return self._rules.get(target)
        except TypeError:  # unhashable callables
            return None

    def lower_module(self, module: nn.Module, info: LowerInfo) -> A.Expr | None:
        """The module's expression, or ``None`` (opaque): no rule, the rule declines, or the
        module has forward hooks (they may change what it computes, and a fold would drop
        them; hook-based ``spectral_norm``/``weight_norm`` recompute the weight in one), or
        its class overrides what the rule's class relies on (:func:`departure`). Errors of
        the rule: see :func:`call_rule`."""
        if has_forward_hooks(module) or self.departure(module) is not None:
            return None
        rule = self.lookup(module)
        return None if rule is None else call_rule(rule, module, info)

    def probe(self, module: nn.Module, info: LowerInfo) -> bool | None:
        """Ask ``module``'s rule with a guessed ``info``: ``True`` when it lowers the
        module, ``False`` when it declines (returns ``None``), ``None`` when there is no
        rule or the rule refuses the guess with one of :mod:`repcompiler.errors`' types
        (the algebra rejecting the guessed geometry). Any other error of the rule raises
        :class:`~repcompiler.errors.RuleError`."""
        rule = self.lookup(module)
        if rule is None:
            return None
        try:
            return call_rule(rule, module, info) is not None
        except RuleError:
            raise
        except RepCompilerError as exc:  # the guessed geometry is wrong for this rule
            log.debug("rule for %s refuses the guessed %s: %s", type(module).__name__, info, exc)
            return None

    def declines(self, module: nn.Module) -> bool:
        """True when ``module``'s type has a rule that returns ``None`` for this
        instance (e.g. timm's ``BatchNormAct2d`` with a ReLU): the tracer then traces
        into its ``forward``, so the linear ops inside (``F.batch_norm``) can still
        fold. The rule is asked (:meth:`probe`) with the geometry the module declares
        (``in_channels`` or ``num_features``; dims from ``kernel_size`` or a
        ``...1d/2d/3d`` class name): a module that declares none, or a rule that
        refuses that geometry, counts as not declining (it stays a leaf), since a rule
        may decline only because the guessed geometry is wrong. A module whose class
        overrides what the rule's class relies on (:func:`departure`) always declines."""
        rule = self.lookup(module)
        if rule is not None and self.departure(module) is not None:
            return True
        geometry = _declared_geometry(module)
        if rule is None or geometry is None:
            return False
        return self.probe(module, LowerInfo(*geometry)) is False

    def copy(self) -> "RuleRegistry":
        """A new registry with the same rules (registrations into it leave this one alone)."""
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


def call_rule(rule: Callable[..., Any], target: Any, info: LowerInfo) -> A.Expr | None:
    """``rule(target, info)``: ``target`` is the module (or the
    :class:`~repcompiler.rules.base.FunctionCall`) being lowered. The rule's
    :class:`~repcompiler.errors.RepCompilerError` (the algebra refusing an operand)
    propagates as it is; any other exception is a bug in the rule and is raised as
    :class:`~repcompiler.errors.RuleError` naming the rule and what it was lowering."""
    try:
        return rule(target, info)
    except RepCompilerError:
        raise
    except Exception as exc:  # the rule is arbitrary user code: name it in the error
        what = type(target).__name__ if isinstance(target, nn.Module) else _name(getattr(target, "target", target))
        where = f" at {info.name!r}" if info.name else ""
        raise RuleError(f"the rule {_name(rule)} for {what}{where} raised {type(exc).__name__}: "
                        f"{first_line(exc)}") from exc
