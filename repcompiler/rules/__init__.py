"""Lowering rules: how modules and functions lower into the kernel algebra.

:mod:`.registry` holds the registry and the public registration functions,
:mod:`.functions` the function rules, :mod:`.layers` and :mod:`.third_party` the rules
for layers of real models and of third-party packages.
"""

from .functions import INPUT, FunctionCall, FunctionRule
from .registry import (
    LowerInfo,
    RuleRegistry,
    default_rules,
    departure,
    global_hooks,
    has_forward_hooks,
    lookup_rule,
    register_rule,
    unregister_rule,
)

__all__ = ["INPUT", "FunctionCall", "FunctionRule", "LowerInfo", "RuleRegistry", "default_rules", "departure",
           "global_hooks", "has_forward_hooks", "lookup_rule", "register_rule", "unregister_rule"]
