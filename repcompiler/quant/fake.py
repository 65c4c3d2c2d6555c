"""Symmetric integer fake quantization (weights and activations) and the SQNR measure.

Owns the quantization arithmetic :mod:`repcompiler.quant` builds on, all through
torch's own primitives: the ranges come from ``torch.ao.quantization`` observers
(:class:`~torch.ao.quantization.MinMaxObserver`,
:class:`~torch.ao.quantization.PerChannelMinMaxObserver`) and the rounding from
:func:`torch.fake_quantize_per_tensor_affine` /
:func:`torch.fake_quantize_per_channel_affine`.

Convention (the one ONNX Runtime and TensorRT use for weights): *symmetric, restricted
range*, zero point 0 and integers in ``[-(2**(bits-1) - 1), 2**(bits-1) - 1]`` (for
INT8 ``[-127, 127]``), so the step is ``delta = max|x| / 127`` per tensor or per
channel. Activations use the same scheme per tensor, with ``max|x|`` observed on the
calibration inputs. :func:`sqnr_db` is ``10 * log10(sum x**2 / sum (x - q(x))**2)``;
for weights uniform in ``[-a, a]`` that is ``10 * log10((a**2 / 3) / (delta**2 / 12))``
= ``10 * log10(4 * 127**2)`` = 48.1 dB at 8 bits, whatever ``a``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.ao.quantization import MinMaxObserver, PerChannelMinMaxObserver

from ..errors import UnsupportedError

__all__ = [
    "qrange",
    "check_bits",
    "tensor_observer",
    "channel_observer",
    "weight_scale",
    "fake_quantize_weight",
    "fake_quantize_per_tensor",
    "sqnr_db",
    "channel_sqnr_db",
    "power_ratio_db",
]

MIN_BITS, MAX_BITS = 2, 16


def check_bits(bits: object, owner: str = "quant_report") -> int:
    """``bits`` as an int, or :class:`UnsupportedError` unless it is an integer in 2..16."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise UnsupportedError(
            f"{owner}: bits must be an integer in {MIN_BITS}..{MAX_BITS} (the symmetric integer grid "
            f"[-(2**(bits-1)-1), 2**(bits-1)-1]), got {bits!r}"
        )
    return bits


def qrange(bits: int) -> tuple[int, int]:
    """The symmetric restricted integer range of ``bits``: ``(-(2**(bits-1)-1), 2**(bits-1)-1)``."""
    q = 2 ** (check_bits(bits) - 1) - 1
    return -q, q


def _dtype(bits: int) -> torch.dtype:
    return torch.qint8 if bits <= 8 else torch.qint32


def tensor_observer(bits: int = 8) -> MinMaxObserver:
    """A per-tensor symmetric observer for ``bits`` (scale ``max|x| / qmax``)."""
    qmin, qmax = qrange(bits)
    return MinMaxObserver(dtype=_dtype(bits), qscheme=torch.per_tensor_symmetric, quant_min=qmin, quant_max=qmax)


def channel_observer(bits: int = 8, axis: int = 0) -> PerChannelMinMaxObserver:
    """A per-channel symmetric observer for ``bits`` along ``axis``."""
    qmin, qmax = qrange(bits)
    return PerChannelMinMaxObserver(ch_axis=axis, dtype=_dtype(bits), qscheme=torch.per_channel_symmetric,
                                    quant_min=qmin, quant_max=qmax)


def weight_scale(weight: Tensor, bits: int = 8, *, per_channel: bool = False, axis: int = 0) -> Tensor:
    """The quantization step of ``weight``: a 1-element tensor per tensor, else one per
    slice along ``axis`` (``max|w| / qmax`` each; a zero tensor/channel gets torch's eps)."""
    obs = channel_observer(bits, axis) if per_channel else tensor_observer(bits)
    obs(weight.detach())
    scale, _ = obs.calculate_qparams()
    return scale


def fake_quantize_per_tensor(x: Tensor, scale: float | Tensor, bits: int = 8) -> Tensor:
    """``x`` rounded to the symmetric ``bits`` grid of step ``scale`` (clamped), back in float."""
    qmin, qmax = qrange(bits)
    return torch.fake_quantize_per_tensor_affine(x, float(scale), 0, qmin, qmax)


def fake_quantize_weight(weight: Tensor, bits: int = 8, *, per_channel: bool = False, axis: int = 0) -> Tensor:
    """``weight`` fake-quantized symmetric per tensor or per channel (along ``axis``), in its dtype."""
    qmin, qmax = qrange(bits)
    w = weight.detach()
    scale = weight_scale(w, bits, per_channel=per_channel, axis=axis)
    if not per_channel:
        return torch.fake_quantize_per_tensor_affine(w, float(scale), 0, qmin, qmax)
    zero = torch.zeros(scale.numel(), dtype=torch.int32, device=w.device)
    axis = axis % w.dim()
    return torch.fake_quantize_per_channel_affine(w, scale.to(w.device, torch.float32), zero, axis, qmin, qmax)


def power_ratio_db(signal: float, noise: float) -> float:
    """``10 * log10(signal / noise)`` for powers (sums of squares): ``inf`` without noise,
    ``nan`` when both are zero."""
    if noise == 0.0:
        return math.inf if signal > 0 else math.nan
    return 10.0 * math.log10(signal / noise) if signal > 0 else -math.inf


def sqnr_db(x: Tensor, xq: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 * log10(sum x**2 / sum (x - xq)**2)``
    (``inf`` when ``xq == x``, ``nan`` for an all-zero ``x``)."""
    x, xq = x.detach().double(), xq.detach().double()
    return power_ratio_db(float(x.square().sum()), float((x - xq).square().sum()))


def channel_sqnr_db(x: Tensor, xq: Tensor, axis: int = 0) -> list[float]:
    """:func:`sqnr_db` of every slice of ``x`` along ``axis``."""
    x, xq = x.detach().double().movedim(axis, 0).flatten(1), xq.detach().double().movedim(axis, 0).flatten(1)
    signal, noise = x.square().sum(1).tolist(), (x - xq).square().sum(1).tolist()
    return [power_ratio_db(s, n) for s, n in zip(signal, noise)]
