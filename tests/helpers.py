"""Small, stable test helpers shared by the test files (keep signatures stable)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["randomize_bn", "rel_err"]


def randomize_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm in ``module`` non-trivial statistics and affine parameters.

    ``running_mean`` ~ N(0, 0.5), ``running_var`` in [0.5, 2], ``weight`` in [0.5, 1.5]
    (random sign flips on a few channels), ``bias`` ~ N(0, 0.5). Deterministic in
    ``seed``; keeps each tensor's dtype/device. Returns ``module``.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            c = m.num_features

            def rnd(*shape: int) -> Tensor:
                return torch.rand(*shape, generator=g, dtype=torch.float64)

            def rn(*shape: int) -> Tensor:
                return torch.randn(*shape, generator=g, dtype=torch.float64)

            if m.running_mean is not None:
                m.running_mean.copy_(0.5 * rn(c))
                m.running_var.copy_(0.5 + 1.5 * rnd(c))
            if m.weight is not None:
                sign = torch.where(rnd(c) < 0.15, -1.0, 1.0).to(torch.float64)
                m.weight.copy_(sign * (0.5 + rnd(c)))
            if m.bias is not None:
                m.bias.copy_(0.5 * rn(c))
    return module


def rel_err(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|`` (computed in float64); shapes must match exactly."""
    assert a.shape == b.shape, f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}"
    a64, b64 = a.detach().double(), b.detach().double()
    scale = b64.abs().max().item() if b64.numel() else 0.0
    diff = (a64 - b64).abs().max().item() if b64.numel() else 0.0
    if scale == 0.0:
        return diff
    return diff / scale
