"""Randomizers for equivalence tests: non-trivial BatchNorm statistics and perturbed
parameters, so a zero-initialised branch or an identity BN cannot hide a mistake.

Owns :func:`randomize_bn` and :func:`randomize_module`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UnsupportedError

__all__ = ["randomize_bn", "randomize_module"]


def randomize_bn(
    module: nn.Module,
    generator: torch.Generator | int | None = None,
    *,
    mean_std: float = 0.5,
    var_range: tuple[float, float] = (0.5, 2.0),
    bias_std: float = 0.5,
    flip_prob: float = 0.15,
    skip_untracked: bool = False,
    draw_dtype: torch.dtype = torch.float64,
) -> nn.Module:
    """Give every BatchNorm in ``module`` non-trivial running statistics and affine
    parameters, so that an identity BN cannot hide a mistake. Returns ``module``.

    Per BN (any ``_BatchNorm``, e.g. ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``), in
    ``module.modules()`` order:

    * ``running_mean`` normal (mean 0, standard deviation ``mean_std``) and
      ``running_var`` uniform in ``var_range``, when the BN tracks running statistics;
    * ``weight`` uniform in [0.5, 1.5], its sign flipped on each channel with
      probability ``flip_prob``;
    * ``bias`` normal (mean 0, standard deviation ``bias_std``).

    Args:
        module: a model, or a single BatchNorm.
        generator: where the random numbers come from: a ``torch.Generator`` (pass
            your own to chain draws, e.g. after :func:`randomize_module`), an ``int``
            seed, or ``None`` (a new generator seeded with 0: deterministic).
        mean_std: standard deviation of the running means.
        var_range: ``(low, high)``, the range of the running variances (``low > 0``).
        bias_std: standard deviation of the BN biases (beta).
        flip_prob: probability that a channel's weight (gamma) is negative; ``0``
            keeps every gamma positive (and draws no signs).
        skip_untracked: leave a BN with ``track_running_stats=False`` as it is (by
            default it still gets random affine parameters).
        draw_dtype: the floating dtype the numbers are drawn in; they are copied into
            each tensor's own dtype and device. ``float32`` draws give other values
            (same distributions) for the same generator state.
    """
    lo, hi = (float(v) for v in var_range)
    if not 0.0 < lo <= hi:
        raise UnsupportedError(f"randomize_bn: var_range must satisfy 0 < low <= high, got {var_range}")
    if not 0.0 <= flip_prob <= 1.0:
        raise UnsupportedError(f"randomize_bn: flip_prob must be in [0, 1], got {flip_prob}")
    if not draw_dtype.is_floating_point:
        raise UnsupportedError(f"randomize_bn: draw_dtype must be a floating dtype, got {draw_dtype}")
    if isinstance(generator, bool) or not isinstance(generator, (torch.Generator, int, type(None))):
        raise UnsupportedError(f"randomize_bn: generator must be a torch.Generator, an int seed or None, "
                               f"got {type(generator).__name__}")
    g = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(generator or 0)

    def rand(c: int) -> Tensor:
        return torch.rand(c, generator=g, dtype=draw_dtype)

    def randn(c: int) -> Tensor:
        return torch.randn(c, generator=g, dtype=draw_dtype)

    with torch.no_grad():
        for m in module.modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            c = m.num_features
            if m.running_mean is not None:
                m.running_mean.copy_(mean_std * randn(c))
                m.running_var.copy_(lo + (hi - lo) * rand(c))
            elif skip_untracked:
                continue
            if m.weight is not None:
                sign = torch.where(rand(c) < flip_prob, -1.0, 1.0).to(draw_dtype) if flip_prob else 1.0
                m.weight.copy_(sign * (0.5 + rand(c)))
            if m.bias is not None:
                m.bias.copy_(bias_std * randn(c))
    return module


def randomize_module(module: nn.Module, generator: torch.Generator | None = None, scale: float = 0.3, *,
                     buffers: bool = True) -> nn.Module:
    """Perturb every floating parameter (and, with ``buffers``, buffer) of ``module``;
    BatchNorms get :func:`randomize_bn`. Tensors that are all positive (variances,
    gains) are multiplied by ``exp(U(-0.5, 0.5))`` so they stay positive; others get
    additive ``N(0, scale)`` noise (zero-initialised scales and biases become
    non-trivial). Integer buffers are left alone. Returns ``module``.

    :func:`check_block` passes ``buffers=False``: a block's non-BN buffers are fixed
    structure (a frequency prior, an averaging or placement kernel), not state."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    skip = {id(t) for m in bns for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
    with torch.no_grad():
        seen: set[int] = set()
        for t in (*module.parameters(), *(module.buffers() if buffers else ())):
            if id(t) in skip or id(t) in seen or not t.is_floating_point() or t.numel() == 0:
                continue
            seen.add(id(t))
            if bool((t > 0).all()):
                t.mul_(torch.exp(torch.rand(t.shape, generator=g, dtype=torch.float64) - 0.5).to(t.dtype))
            else:
                t.add_((scale * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype))
    for m in bns:
        randomize_bn(m, g)
    return module
