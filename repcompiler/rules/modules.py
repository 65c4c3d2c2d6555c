"""The built-in **module rules**: convs, BatchNorms (and torchvision's
``FrozenBatchNorm2d``), average pooling, ``nn.Identity`` and constant zero padding.
:func:`register_module_rules` registers them into a registry.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .. import algebra as A
from .base import LowerInfo
from .registry import RuleRegistry

__all__ = ["register_module_rules"]


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


def _lower_frozen_bn(m: nn.Module, info: LowerInfo) -> A.Expr | None:
    scale = m.weight * torch.rsqrt(m.running_var + m.eps)
    shift = m.bias - m.running_mean * scale
    return A.Affine(scale.shape[0], info.dims, scale=scale.detach(), shift=shift.detach(),
                    name=info.name or "FrozenBatchNorm2d")


def register_module_rules(registry: RuleRegistry) -> None:
    """Register the built-in module rules into ``registry``."""
    for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        registry.register(t, _lower_conv, override=True)
    for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
        registry.register(t, _lower_bn, override=True)
    for t in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d):
        registry.register(t, _lower_avgpool, override=True)
    registry.register(nn.Identity, _lower_identity, override=True)
    for t in (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d):
        registry.register(t, _lower_zeropad, override=True)
    # torchvision is imported by the models that use its layers; importing it here would
    # only slow down ``import repcompiler``.
    misc = sys.modules.get("torchvision.ops.misc")
    if misc is not None:
        registry.register(misc.FrozenBatchNorm2d, _lower_frozen_bn, override=True)
    else:
        registry.register_third_party("torchvision.ops.misc", "FrozenBatchNorm2d", _lower_frozen_bn)
