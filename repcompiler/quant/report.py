"""``quant_report``: will a (deployed) model survive integer quantization, layer by layer?

Owns :func:`quant_report`: argument checks, the calibration batches, the per-layer
weight and activation statistics, the end-to-end and per-layer (sensitivity) errors of
simulated integer inference, and the flags. The simulation is :class:`.sim.QuantSim`
(a private eval-mode copy of the model); the result types are in :mod:`.rows`.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UnsupportedError, check_choice
from ..analysis.inputs import as_inputs, check_model
from .fake import channel_sqnr_db, check_bits, power_ratio_db, sqnr_db
from .rows import QuantLayerRow, QuantReport
from .sim import QuantSim, SimLayer

__all__ = ["quant_report", "WEIGHT_MODES"]

log = logging.getLogger(__name__)

WEIGHT_MODES = ("per_tensor", "per_channel")
_TITLE = "quant_report"


def _batches(calibration_inputs: Any, max_batches: int | None) -> list[tuple[Any, ...]]:
    if isinstance(calibration_inputs, Tensor):
        items: Iterable[Any] = [calibration_inputs]
    elif isinstance(calibration_inputs, Mapping) or not isinstance(calibration_inputs, Iterable):
        raise UnsupportedError(
            f"{_TITLE}: calibration_inputs must be a tensor (one batch) or an iterable of batches (each a tensor "
            f"or a tuple of positional inputs), got {type(calibration_inputs).__name__}")
    else:
        items = calibration_inputs
    batches = [as_inputs(b, f"{_TITLE}: calibration batch {i}", required=True)
               for i, b in enumerate(itertools.islice(items, max_batches))]
    if not batches:
        raise UnsupportedError(f"{_TITLE}: calibration_inputs is empty; pass at least one batch")
    return batches


def _check_number(name: str, value: Any, *, minimum: float = 0.0, integer: bool = False) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not value >= minimum:
        what = "an integer" if integer else "a number"
        raise UnsupportedError(f"{_TITLE}: {name} must be {what} >= {minimum:g}, got {value!r}")


def _ratio(absmax: Tensor) -> float:
    """Largest over median of ``absmax`` (``inf`` when the median is 0 and the largest not)."""
    top, med = float(absmax.max()), float(torch.quantile(absmax.double(), 0.5))
    return top / med if med > 0 else (math.inf if top > 0 else 1.0)


def _errors(ref: list[list[Tensor]], got: list[list[Tensor]]) -> dict[str, float | None]:
    """Relative L2 error of ``got`` against ``ref`` over every batch and output, and the
    top-1 agreement when the outputs are logits (one 2-D tensor with > 1 column)."""
    num = sum(float((g.double() - r.double()).square().sum()) for rb, gb in zip(ref, got) for r, g in zip(rb, gb))
    den = sum(float(r.double().square().sum()) for rb in ref for r in rb)
    rel = math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)
    top1 = None
    if all(len(rb) == 1 and rb[0].dim() == 2 and rb[0].shape[1] > 1 for rb in ref):
        agree = sum(int((gb[0].argmax(1) == rb[0].argmax(1)).sum()) for rb, gb in zip(ref, got))
        top1 = agree / sum(rb[0].shape[0] for rb in ref)
    return {"rel_l2": rel, "top1_agreement": top1}


def _row(sim: QuantSim, layer: SimLayer, axis: int) -> QuantLayerRow:
    w = layer.weight.detach()
    flat = w.movedim(axis, 0).flatten(1).double()
    cmin, cmax = flat.amin(1), flat.amax(1)
    per_tensor, per_channel = sim.quantized_weight(layer, "per_tensor"), sim.quantized_weight(layer, "per_channel")
    channels = [x for x in channel_sqnr_db(w, per_tensor, axis) if not math.isnan(x)]
    row = QuantLayerRow(
        name=layer.name, kind=layer.kind, weight_shape=tuple(w.shape),
        weight_min=float(cmin.min()), weight_max=float(cmax.max()),
        channel_min=cmin.tolist(), channel_max=cmax.tolist(),
        channel_range_ratio=_ratio(torch.maximum(-cmin, cmax)),
        sqnr_per_tensor_db=sqnr_db(w, per_tensor), sqnr_per_channel_db=sqnr_db(w, per_channel),
        worst_channel_sqnr_per_tensor_db=min(channels) if channels else math.nan,
        calls=layer.calls,
    )
    if layer.calls:
        row.act_min, row.act_max = float(layer.act_obs.min_val), float(layer.act_obs.max_val)
        obs = layer.act_channel_obs
        if obs.min_val.numel():
            row.act_channel_range_ratio = _ratio(torch.maximum(-obs.min_val, obs.max_val))
        row.act_sqnr_db = power_ratio_db(layer.act_signal, layer.act_noise)
    return row


def _flag(row: QuantLayerRow, n_measured: int, e2e: float, *, bits: int, weight_mode: str,
          channel_ratio_threshold: float, act_ratio_threshold: float, min_sqnr_db: float,
          dominate_share: float) -> None:
    if row.channel_range_ratio > channel_ratio_threshold:
        row.flags.append(
            f"weight channel range ratio {row.channel_range_ratio:.0f}x > {channel_ratio_threshold:g}x: per-tensor "
            f"INT{bits} crushes small channels (per-tensor SQNR {row.sqnr_per_tensor_db:.0f} dB vs per-channel "
            f"{row.sqnr_per_channel_db:.0f} dB; worst channel {row.worst_channel_sqnr_per_tensor_db:.0f} dB)")
    sqnr = row.sqnr_per_tensor_db if weight_mode == "per_tensor" else row.sqnr_per_channel_db
    if sqnr < min_sqnr_db:
        row.flags.append(f"{weight_mode.replace('_', '-')} weight SQNR {sqnr:.1f} dB < {min_sqnr_db:g} dB")
    if row.act_channel_range_ratio is not None and row.act_channel_range_ratio > act_ratio_threshold:
        row.flags.append(
            f"activation outlier: output channel range ratio {row.act_channel_range_ratio:.0f}x > "
            f"{act_ratio_threshold:g}x, per-tensor INT{bits} output SQNR {row.act_sqnr_db:.0f} dB")
    elif row.act_sqnr_db is not None and row.act_sqnr_db < min_sqnr_db:
        row.flags.append(f"output activation SQNR {row.act_sqnr_db:.1f} dB < {min_sqnr_db:g} dB "
                         f"(range [{row.act_min:.3g}, {row.act_max:.3g}])")
    if n_measured >= 2 and row.error_share is not None and row.error_share > dominate_share:
        row.flags.append(
            f"dominates end-to-end error ({100 * row.error_share:.0f}% of it: relative L2 {row.sensitivity:.2e} "
            f"with only this layer quantized, {e2e:.2e} with all)")


def quant_report(
    model: nn.Module,
    calibration_inputs: Any,
    *,
    per_channel_axis: int = 0,
    bits: int = 8,
    max_batches: int | None = None,
    weight_mode: str = "per_tensor",
    max_layers: int | None = 64,
    channel_ratio_threshold: float = 10.0,
    act_ratio_threshold: float = 20.0,
    min_sqnr_db: float = 30.0,
    dominate_share: float = 0.5,
) -> QuantReport:
    """Per conv/linear layer, how ``model`` fares under symmetric ``bits``-bit quantization.

    Works on any model (deployed, folded or not; run it on the model you will ship: on an
    unfolded model a conv's output is not what a runtime quantizes). An online/offline
    block is one layer, reported by its eval-mode kernel (branches and post-BN folded).
    Everything runs on an eval-mode copy under ``no_grad``: ``model`` is not modified.

    Args:
        model: the model.
        calibration_inputs: one batch (a tensor) or an iterable of batches, each a tensor
            or a tuple of positional inputs (for a ``(x, y)`` loader pass
            ``(x for x, _ in loader)``). Iterated once; the batches are kept in memory.
        per_channel_axis: the weight axis of the per-channel variant (0: output channels).
        bits: integer width, 2..16 (weights ``[-(2**(bits-1)-1), 2**(bits-1)-1]``).
        max_batches: use at most this many calibration batches (``None``: all).
        weight_mode: ``"per_tensor"`` or ``"per_channel"``: the weight variant of the
            per-layer sensitivity, the error shares and the low-SQNR flag.
        max_layers: measure the sensitivity of at most this many layers (in call
            order; one pass over the calibration batches each; ``None``: all, 0: none).
        channel_ratio_threshold: flag a layer whose largest weight channel range is more
            than this many times the median one.
        act_ratio_threshold: flag an output activation whose largest channel range is more
            than this many times the median one (an activation outlier).
        min_sqnr_db: flag a weight (in ``weight_mode``) or output activation SQNR below this.
        dominate_share: flag a layer whose share of the error (its squared solo error
            over the sum of all measured layers') exceeds this (when >= 2 were measured).

    Returns:
        a :class:`QuantReport`.

    Raises:
        UnsupportedError: no conv/linear layer, ``bits`` outside 2..16, a bad option,
            empty or malformed calibration inputs.
        IncompatibleError: the model does not run on a calibration batch (shape, dtype).
    """
    thresholds = dict(channel_ratio_threshold=channel_ratio_threshold, act_ratio_threshold=act_ratio_threshold,
                      min_sqnr_db=min_sqnr_db, dominate_share=dominate_share)
    bits = _check_args(model, bits=bits, weight_mode=weight_mode, per_channel_axis=per_channel_axis,
                       max_batches=max_batches, max_layers=max_layers, **thresholds)
    batches = _batches(calibration_inputs, max_batches)
    sim = QuantSim(model, bits, per_channel_axis)
    log.info("%s: %d layers, calibrating on %d batch(es)", _TITLE, len(sim.layers), len(batches))
    ref = sim.calibrate(batches)
    end_to_end = {mode: _errors(ref, sim.run(batches, {layer: mode for layer in sim.order})) for mode in WEIGHT_MODES}
    measured = sim.order if max_layers is None else sim.order[:max_layers]
    solo = _sensitivities(sim, ref, batches, measured, weight_mode)
    rows = _rows(sim, solo, per_channel_axis, end_to_end[weight_mode]["rel_l2"], bits=bits, weight_mode=weight_mode,
                 **thresholds)
    settings = {
        "bits": bits, "per_channel_axis": per_channel_axis, "weight_mode": weight_mode,
        "batches": len(batches), "samples": sum(_batch_size(b) for b in batches),
        "max_layers": max_layers, "sensitivity_layers": len(measured),
        "thresholds": {"channel_ratio": channel_ratio_threshold, "act_ratio": act_ratio_threshold,
                       "min_sqnr_db": min_sqnr_db, "dominate_share": dominate_share},
        "notes": _notes(sim, measured),
    }
    return QuantReport(rows, end_to_end, settings)


def _check_args(model: nn.Module, *, bits: int, weight_mode: str, per_channel_axis: int, max_batches: int | None,
                max_layers: int | None, channel_ratio_threshold: float, act_ratio_threshold: float,
                min_sqnr_db: float, dominate_share: float) -> int:
    """Check :func:`quant_report`'s arguments; the checked ``bits``."""
    if not isinstance(model, nn.Module):
        raise UnsupportedError(f"{_TITLE}: model must be an nn.Module, got {type(model).__name__}")
    check_model(model, _TITLE)
    bits = check_bits(bits, _TITLE)
    check_choice("weight_mode", weight_mode, WEIGHT_MODES, owner=_TITLE)
    if isinstance(per_channel_axis, bool) or not isinstance(per_channel_axis, int):
        raise UnsupportedError(f"{_TITLE}: per_channel_axis must be an integer, got {per_channel_axis!r}")
    if max_batches is not None:
        _check_number("max_batches", max_batches, minimum=1, integer=True)
    if max_layers is not None:
        _check_number("max_layers", max_layers, integer=True)
    for name, value in (("channel_ratio_threshold", channel_ratio_threshold),
                        ("act_ratio_threshold", act_ratio_threshold), ("dominate_share", dominate_share)):
        _check_number(name, value)
    _check_number("min_sqnr_db", min_sqnr_db, minimum=-math.inf)
    return bits


def _sensitivities(sim: QuantSim, ref: list[list[Tensor]], batches: list[tuple[Any, ...]], measured: list[SimLayer],
                   weight_mode: str) -> dict[SimLayer, dict[str, float | None]]:
    """The end-to-end errors with only one layer quantized, for each ``measured`` layer."""
    solo: dict[SimLayer, dict[str, float | None]] = {}
    for i, layer in enumerate(measured):
        log.info("%s: sensitivity %d/%d (%s)", _TITLE, i + 1, len(measured), layer.name)
        solo[layer] = _errors(ref, sim.run(batches, {layer: weight_mode}))
    return solo


def _notes(sim: QuantSim, measured: list[SimLayer]) -> list[str]:
    """What the report did not measure: layers past ``max_layers``, layers never called."""
    notes: list[str] = []
    if len(measured) < len(sim.order):
        notes.append(f"per-layer sensitivity measured for the first {len(measured)} of {len(sim.order)} layers "
                     "in call order (max_layers)")
    uncalled = [layer.name for layer in sim.layers if not layer.calls]
    if uncalled:
        notes.append(f"{len(uncalled)} layer(s) not called on the calibration inputs (no activation range, no "
                     f"sensitivity): {', '.join(uncalled[:5])}{' ...' if len(uncalled) > 5 else ''}")
    return notes


def _rows(sim: QuantSim, solo: dict[SimLayer, dict[str, float | None]], axis: int, e2e: float,
          **flag_options: Any) -> list[QuantLayerRow]:
    """One flagged row per layer: the called ones in call order, then the others."""
    total = sum(e["rel_l2"] ** 2 for e in solo.values())
    rows = []
    for layer in sim.order + [la for la in sim.layers if not la.calls]:
        row = _row(sim, layer, axis % layer.weight.dim())
        if layer in solo:
            row.sensitivity, row.sensitivity_top1 = solo[layer]["rel_l2"], solo[layer]["top1_agreement"]
            row.error_share = row.sensitivity ** 2 / total if total > 0 else 0.0
        _flag(row, len(solo), e2e, **flag_options)
        rows.append(row)
    return rows


def _batch_size(batch: tuple[Any, ...]) -> int:
    first = next((a for a in batch if isinstance(a, Tensor)), None)
    return int(first.shape[0]) if first is not None and first.dim() > 0 else 1
