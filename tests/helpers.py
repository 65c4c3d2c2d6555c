"""Small, stable test helpers shared by the test files (keep signatures stable)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

__all__ = ["autograd_node_names", "randomize_bn", "rel_err"]


def randomize_bn(
    module: nn.Module,
    seed: int = 0,
    *,
    mean_std: float = 0.5,
    var_range: tuple[float, float] = (0.5, 2.0),
    bias_std: float = 0.5,
    flip_prob: float = 0.15,
    skip_untracked: bool = False,
    draw_dtype: torch.dtype = torch.float64,
    extra: Callable[[nn.Module, torch.Generator], None] | None = None,
) -> nn.Module:
    """Give every BatchNorm in ``module`` non-trivial statistics and affine parameters.

    ``running_mean`` ~ N(0, ``mean_std``), ``running_var`` uniform in ``var_range``,
    ``weight`` in [0.5, 1.5] with its sign flipped on each channel with probability
    ``flip_prob``, ``bias`` ~ N(0, ``bias_std``). A BN with ``track_running_stats=False``
    still gets random affine parameters, unless ``skip_untracked`` (then it is left as
    it is). Random numbers are drawn in ``draw_dtype`` from one generator seeded with
    ``seed`` (deterministic) and copied into each tensor's own dtype/device.

    ``extra(m, generator)``, if given, is called on every other submodule, in
    ``module.modules()`` order with the same generator, so a fixture can randomize its
    own zero-initialised layers too (``fixtures_blocks``). The defaults are this
    module's; ``fixtures_blocks`` and ``zoo_utils`` bind their own. Returns ``module``.
    """
    g = torch.Generator().manual_seed(seed)
    var_lo, var_hi = var_range

    def rnd(c: int) -> Tensor:
        return torch.rand(c, generator=g, dtype=draw_dtype)

    def rn(c: int) -> Tensor:
        return torch.randn(c, generator=g, dtype=draw_dtype)

    with torch.no_grad():
        for m in module.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                if extra is not None:
                    extra(m, g)
                continue
            c = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(mean_std * rn(c))
                m.running_var.copy_(var_lo + (var_hi - var_lo) * rnd(c))
            elif skip_untracked:
                continue
            if m.weight is not None:
                sign = torch.where(rnd(c) < flip_prob, -1.0, 1.0).to(draw_dtype) if flip_prob else 1.0
                m.weight.copy_(sign * (0.5 + rnd(c)))
            if m.bias is not None:
                m.bias.copy_(bias_std * rn(c))
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


def autograd_node_names(t: Tensor) -> set[str]:
    """Type names of every autograd node ``t`` was computed through."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        n = todo.pop()
        if n is not None and n not in seen:
            seen.add(n)
            todo += [m for m, _ in n.next_functions]
    return {type(n).__name__ for n in seen}
