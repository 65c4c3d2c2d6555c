"""The default rule registry: every built-in rule, built once on first use.

:func:`default_rules` is the registry ``fold``, ``deploy``, ``linearize``,
``orepa_transform`` and ``export`` use when they are not given ``rules=``; the
first call builds it with :func:`register_default_rules`. :func:`register_rule`,
:func:`unregister_rule` and :func:`lookup_rule` (``rc.register_rule`` ...) act on it.

A registry of one's own starts empty (``RuleRegistry()``) or from the defaults::

    rules = default_rules().copy()
    rules.register(MyLayer, lower_my_layer)
    rc.fold(model, rules=rules)
"""

from __future__ import annotations

from typing import Any, Callable

from ..online.conv import register_online_rules
from .functions import register_function_rules
from .layers import register_layer_rules
from .modules import register_module_rules
from .registry import RuleRegistry
from .third_party import register_third_party_rules

__all__ = ["default_rules", "register_default_rules", "register_rule", "unregister_rule", "lookup_rule"]

_DEFAULT: list[RuleRegistry] = []


def register_default_rules(registry: RuleRegistry) -> None:
    """Register every built-in rule into ``registry``: module rules, function rules,
    the rules for layers of real models, third-party layers and the training blocks
    (:class:`~repcompiler.online.conv.OnlineConv`, ``OfflineBlock``). A rule ``registry``
    already has for one of these targets is replaced."""
    register_module_rules(registry)
    register_function_rules(registry)
    register_layer_rules(registry)
    register_third_party_rules(registry)
    register_online_rules(registry)


def default_rules() -> RuleRegistry:
    """The default registry (built on the first call; the same object afterwards)."""
    if not _DEFAULT:
        registry = RuleRegistry()
        register_default_rules(registry)
        _DEFAULT.append(registry)
    return _DEFAULT[0]


def register_rule(target: Any, lower: Callable[..., Any], *, override: bool = False) -> None:
    """Teach repcompiler how ``target`` (a module type or a function) lowers into the
    kernel algebra, in the default registry. See
    :class:`~repcompiler.rules.registry.RuleRegistry`."""
    default_rules().register(target, lower, override=override)


def unregister_rule(target: Any) -> None:
    """Remove a rule from the default registry (no error if absent)."""
    default_rules().unregister(target)


def lookup_rule(target: Any) -> Callable[..., Any] | None:
    """The rule of the default registry that applies to a module instance, module type
    or function, if any."""
    return default_rules().lookup(target)
