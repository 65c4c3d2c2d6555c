"""Rules for layers of third-party packages.

:func:`register_third_party_rules` registers each rule here by class path with
:meth:`~repcompiler.rules.registry.RuleRegistry.register_third_party`: it takes effect as soon
as the user's code has imported that package (an instance of the class can only exist
then), and importing :mod:`repcompiler` never imports the package. ``fold``,
``deploy``, ``linearize`` and ``orepa_transform`` therefore agree on every such layer.

Where a rule declines an instance (returns ``None``), the tracer traces into the
layer's ``forward`` (:class:`repcompiler.capture.tracing.RepTracer`), so the linear part
inside (``F.batch_norm``) still folds through its function rule.

Add a layer: write ``lower(module, info) -> Expr | None`` and one line in
:func:`register_third_party_rules`.
"""

from __future__ import annotations

from torch import nn

from .. import algebra as A
from .base import LowerInfo
from .registry import RuleRegistry

__all__ = ["lower_timm_bn_act", "register_third_party_rules"]


def lower_timm_bn_act(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    """timm ``BatchNormAct2d``: a BN when its activation and drop are ``nn.Identity``
    (RepVGG / MobileOne branches) and it tracks running statistics; else ``None``."""
    if not isinstance(getattr(m, "act", None), nn.Identity) or not isinstance(getattr(m, "drop", None), nn.Identity):
        return None
    if m.running_mean is None or m.running_var is None:
        return None
    return A.BatchNorm(m, dims=info.dims, name=info.name or type(m).__name__)


def register_third_party_rules(registry: RuleRegistry) -> None:
    """Register every third-party rule of this module into ``registry``."""
    registry.register_third_party("timm.layers.norm_act", "BatchNormAct2d", lower_timm_bn_act)
