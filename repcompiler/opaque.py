"""Why a module the rules know stays opaque: the "nothing to do" cases a fold report
must still explain.

A module whose class (or a base class) has a lowering rule is a leaf of the trace;
when its rule declines (returns ``None``) it is opaque, so no region contains it and
no region entry would mention it. :func:`opaque_reasons` lists every such module with
the reason: forward hooks (a fold would drop them), a subclass overriding
``forward`` (the base class's rule does not describe it, e.g. a weight-standardized
conv), a BatchNorm without running statistics (``track_running_stats=False``
normalizes with batch statistics even in eval mode), a non-zero padding mode, or the
rule declining for another reason.

Owns :func:`opaque_reasons`; ``fold``/``deploy`` add its rows to their report with
action ``"opaque"``.
"""

from __future__ import annotations

from torch import nn

from .rules import LowerInfo, RuleRegistry, default_rules, has_forward_hooks

__all__ = ["opaque_reasons"]

_CONV_BN = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def _ruled_base(module: nn.Module, rules: RuleRegistry) -> type:
    """The most basic class in ``module``'s MRO that still finds a rule: the class the
    rule was written for (``nn.Conv2d`` for a ``Conv2d`` subclass)."""
    return [c for c in type(module).__mro__ if isinstance(c, type) and rules.lookup(c) is not None][-1]


def _info(module: nn.Module, path: str) -> LowerInfo:
    dims = next((d for cls, d in _DIMS.items() if isinstance(module, cls)), 2)
    channels = getattr(module, "in_channels", None) or getattr(module, "num_features", None) or 1
    return LowerInfo(int(channels), dims, path)


def _reason(module: nn.Module, base: type) -> str:
    if has_forward_hooks(module):
        return "has forward hooks (a fold would drop them; hook-based weight/spectral norm live there)"
    if type(module).forward is not base.forward:
        return (f"{type(module).__name__} overrides forward(); the rule for {base.__name__} does not describe "
                "what it computes")
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
        return "track_running_stats=False: normalizes with batch statistics even in eval mode (not affine)"
    mode = getattr(module, "padding_mode", "zeros")
    if mode != "zeros":
        return f"padding_mode={mode!r}: only zero padding is linear in the kernel"
    return f"the rule for {base.__name__} declines this instance"


def opaque_reasons(model: nn.Module, rules: RuleRegistry | None = None) -> list[tuple[str, str]]:
    """``(qualified name, reason)`` for every conv or BatchNorm of ``model`` that has a
    rule (for its class or a base class) but stays opaque, in ``named_modules`` order.

    A module is opaque when it has forward hooks or its rule returns ``None`` for it.
    Modules inside a module that is itself listed are not repeated.
    """
    rules = rules if rules is not None else default_rules
    out: list[tuple[str, str]] = []
    for path, module in model.named_modules():
        if not isinstance(module, _CONV_BN) or rules.lookup(module) is None:
            continue
        if any(path.startswith(p + ".") for p, _ in out):
            continue
        if not has_forward_hooks(module):
            try:
                if rules.lower_module(module, _info(module, path)) is not None:
                    continue
            except Exception as exc:  # a rule that fails on this instance: opaque too
                out.append((path, f"its rule raised {type(exc).__name__}: {exc}"))
                continue
        out.append((path, _reason(module, _ruled_base(module, rules))))
    return out
