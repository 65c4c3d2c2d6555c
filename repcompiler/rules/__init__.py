"""Lowering rules: how modules and functions lower into the kernel algebra.

:mod:`.base` holds the types a rule receives, :mod:`.registry` the
:class:`RuleRegistry`, :mod:`.modules`, :mod:`.functions`, :mod:`.layers` and
:mod:`.third_party` the built-in rules (each with a ``register_*_rules(registry)``
function), and :mod:`.defaults` the default registry they are assembled into.
"""

from .base import INPUT, FunctionCall, FunctionRule, LowerInfo
from .defaults import default_rules, lookup_rule, register_default_rules, register_rule, unregister_rule
from .registry import RuleRegistry, call_rule, departure, global_hooks, has_forward_hooks

__all__ = ["INPUT", "FunctionCall", "FunctionRule", "LowerInfo", "RuleRegistry", "call_rule", "default_rules",
           "departure", "global_hooks", "has_forward_hooks", "lookup_rule", "register_default_rules",
           "register_rule", "unregister_rule"]
