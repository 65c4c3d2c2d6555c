"""The fixed frequency prior of OREPA's prior branch: the DCT-II basis for any kernel.

The official OREPA code builds its prior only for 3x3 kernels (other sizes read
uninitialised memory, NaN for 5x5) and assigns 1-d cosines with frequency
``channel + 1`` whose indices alias, so every channel with frequency ``3 (mod 6)`` gets
an all-zero prior (about 1/6 of the channels). Here the prior is the separable DCT-II
basis of the kernel's own shape, in any dimensionality (1-d, 2-d, 3-d, asymmetric)::

    B_u(t) = prod_j cos(pi * (t_j + 1/2) * u_j / k_j),   0 <= u_j < k_j

These ``prod(k)`` functions are orthogonal and none is zero. They are ordered by total
frequency (``sum(u)``, then lexicographically); the constant (DC) function, which the
average branch already provides, comes last, and output channel ``o`` gets basis
function ``o mod prod(k)`` of that order. So no channel's prior is all-zero, and the
first ``prod(k) - 1`` channels see distinct non-constant frequencies.

:func:`official_prior` is the official code's prior, for exact reproduction (the
``orepa`` block's ``prior="official"``; 2-d 3x3 only): the first half of the output
channels get ``cos(pi (h + 1/2) (o + 1) / 3)`` (along the kernel's rows), the second half
``cos(pi (w + 1/2) (o + 1 - O/2) / 3)`` (along its columns), ``O/2`` a float as there.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["dct_basis", "frequency_prior", "official_prior", "PRIORS"]

#: the ``orepa`` block's ``prior`` option: the DCT-II prior (default), the official
#: code's 1-d 3x3 prior, or ``None`` (no prior branch: the paper's Tab. 2 ablation)
PRIORS = ("dct", "official", None)


def _frequencies(kernel_size: Sequence[int]) -> list[tuple[int, ...]]:
    freqs = list(itertools.product(*[range(k) for k in kernel_size]))
    nonzero = sorted((f for f in freqs if any(f)), key=lambda f: (sum(f), f))
    return nonzero + [tuple(0 for _ in kernel_size)]


def dct_basis(kernel_size: Sequence[int], dtype: torch.dtype | None = None) -> Tensor:
    """All ``prod(k)`` DCT-II basis functions of a kernel of ``kernel_size`` taps,
    shape ``[prod(k), *kernel_size]``, non-constant ones first (see module doc)."""
    ks = tuple(int(k) for k in kernel_size)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"kernel_size must be positive, got {kernel_size!r}")
    dtype = dtype or torch.get_default_dtype()
    out = torch.empty(math.prod(ks), *ks, dtype=torch.float64)
    grids = torch.meshgrid(*[torch.arange(k, dtype=torch.float64) for k in ks], indexing="ij")
    for i, f in enumerate(_frequencies(ks)):
        b = torch.ones(ks, dtype=torch.float64)
        for t, u, k in zip(grids, f, ks):
            b = b * torch.cos(math.pi * (t + 0.5) * u / k)
        out[i] = b
    return out.to(dtype)


def frequency_prior(out_channels: int, kernel_size: Sequence[int], dtype: torch.dtype | None = None) -> Tensor:
    """The prior kernel of every output channel, shape ``[out_channels, *kernel_size]``:
    channel ``o`` gets DCT-II basis function ``o mod prod(k)`` (never all-zero)."""
    basis = dct_basis(kernel_size, dtype)
    idx = torch.arange(out_channels) % basis.shape[0]
    return basis[idx].contiguous()


def official_prior(out_channels: int, kernel_size: Sequence[int], dtype: torch.dtype | None = None) -> Tensor:
    """The official OREPA code's prior ``[out_channels, 3, 3]`` (see the module
    docstring; channels with frequency ``3 (mod 6)`` are all zero, as there). Raises
    ``ValueError`` for any kernel but 2-d 3x3, the only one the official code builds."""
    if tuple(int(k) for k in kernel_size) != (3, 3):
        raise ValueError(f"the official OREPA prior exists for 3x3 kernels only, got {tuple(kernel_size)}")
    half = out_channels / 2
    t = torch.arange(3, dtype=torch.float64) + 0.5
    out = torch.empty(out_channels, 3, 3, dtype=torch.float64)
    for o in range(out_channels):
        if o < half:
            out[o] = torch.cos(math.pi * t * (o + 1) / 3)[:, None].expand(3, 3)
        else:
            out[o] = torch.cos(math.pi * t * (o + 1 - half) / 3)[None, :].expand(3, 3)
    return out.to(dtype or torch.get_default_dtype())
