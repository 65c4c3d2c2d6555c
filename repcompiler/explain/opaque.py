"""Why a module the rules know stays opaque: the "nothing to do" cases a fold report
must still explain.

A module whose class (or a base class) has a lowering rule is a leaf of the trace;
when its rule declines (returns ``None``) it is opaque, so no region contains it and
no region entry would mention it. :func:`opaque_reasons` lists every such module with
the reason: forward hooks (a fold would drop them), a subclass overriding
``forward`` or a method the base class's ``forward`` calls (``_conv_forward`` ...; the
base class's rule does not describe it, e.g. a weight-standardized conv), a BatchNorm without running statistics (``track_running_stats=False``
normalizes with batch statistics even in eval mode), a non-zero padding mode, or the
rule declining for another reason.

Owns :func:`opaque_reasons` (``fold``/``deploy`` add its rows to their report with
action ``"opaque"``) and :func:`conv_reason`, the one place that decides why a conv is
not a plain conv (``orepa_transform`` refuses such a conv with that reason): the
registry's decision (no rule, e.g. a transposed conv; the conv rule declining it; forward
hooks) plus, for a block target, what a block cannot carry over (uninitialised lazy
parameters, a weight parametrization, which the rule folds at its current value).
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from ..errors import RepCompilerError, RuleError
from ..rules.base import LowerInfo
from ..rules.defaults import default_rules
from ..rules.registry import RuleRegistry, departure, has_forward_hooks

__all__ = ["opaque_reasons", "conv_reason"]

_CONV_BN = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def _ruled_base(module: nn.Module, rules: RuleRegistry) -> type:
    """The class the rule that applies to ``module`` was written for (``nn.Conv2d`` for a
    ``Conv2d`` subclass without a rule of its own)."""
    return rules.ruled_class(module)  # type: ignore[return-value]


def _info(module: nn.Module, path: str) -> LowerInfo:
    dims = next((d for cls, d in _DIMS.items() if isinstance(module, cls)), 2)
    channels = getattr(module, "in_channels", None) or getattr(module, "num_features", None) or 1
    return LowerInfo(int(channels), dims, path)


def _reason(module: nn.Module, base: type) -> str:
    if has_forward_hooks(module):
        return "has forward hooks (a fold or a block would drop them; hook-based weight/spectral norm live there)"
    why = departure(module, base)
    if why is not None:
        return why
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
        return "track_running_stats=False: normalizes with batch statistics even in eval mode (not affine)"
    mode = getattr(module, "padding_mode", "zeros")
    if mode != "zeros":
        return f"padding_mode={mode!r}: only zero padding is linear in the kernel"
    return f"the rule for {base.__name__} declines this instance"


def _declined(module: nn.Module, path: str, rules: RuleRegistry) -> str | None:
    """Why ``module`` (which has a rule) is opaque, or ``None`` when its rule lowers it."""
    if not has_forward_hooks(module):
        try:
            if rules.lower_module(module, _info(module, path)) is not None:
                return None
        except RuleError:  # a bug in the rule: surfaces
            raise
        except RepCompilerError as exc:  # the algebra refuses this instance: opaque too
            return f"its rule raised {type(exc).__name__}: {exc}"
    return _reason(module, _ruled_base(module, rules))


def conv_reason(module: nn.Module, rules: RuleRegistry | None = None, *, block: bool = False) -> str | None:
    """Why the conv ``module`` is not a plain conv, or ``None`` when it is one.

    The registry decides (the module docstring): a conv type without a rule (transposed
    convs), a rule that declines the instance (``padding_mode``, a subclass overriding
    ``forward``), forward hooks. With ``block`` (the conv would be replaced by a training
    block, :func:`repcompiler.orepa_transform`) also a lazy conv with uninitialised
    parameters, a parametrized weight (the rule folds its current value; a block
    would drop the parametrization) and backward hooks (training would lose them).
    """
    rules = rules if rules is not None else default_rules()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return "transposed conv (no lowering rule: not a plain conv, not a block target)"
    if block and isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        return "lazy conv with uninitialised parameters"
    if rules.lookup(module) is None:
        return f"{type(module).__name__} has no lowering rule (not a plain conv)"
    if block and parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())  # type: ignore[union-attr]
        return f"parametrized {names} (e.g. spectral_norm, weight_norm): a block would drop the parametrization"
    if block and (module._backward_hooks or module._backward_pre_hooks):
        return "has backward hooks (a block would drop them, and they change what training computes)"
    return _declined(module, "", rules)


def opaque_reasons(model: nn.Module, rules: RuleRegistry | None = None) -> list[tuple[str, str]]:
    """``(qualified name, reason)`` for every conv or BatchNorm of ``model`` that has a
    rule (for its class or a base class) but stays opaque, in ``named_modules`` order.

    A module is opaque when it has forward hooks or its rule returns ``None`` for it.
    Modules inside a module that is itself listed are not repeated.
    """
    rules = rules if rules is not None else default_rules()
    out: list[tuple[str, str]] = []
    for path, module in model.named_modules():
        if not isinstance(module, _CONV_BN) or rules.lookup(module) is None:
            continue
        if any(path.startswith(p + ".") for p, _ in out):
            continue
        why = _declined(module, path, rules)
        if why is not None:
            out.append((path, why))
    return out
