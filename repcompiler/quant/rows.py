"""The data of a quantization report: :class:`QuantLayerRow` (one conv/linear layer) and
:class:`QuantReport` (the rows, the end-to-end errors, the settings), with the readable
table (``str(report)``), ranking (:meth:`QuantReport.worst`) and JSON form.

Owns the two dataclasses and their formatting; :mod:`.report` computes them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["QuantLayerRow", "QuantReport"]


@dataclass
class QuantLayerRow:
    """What one conv/linear layer does under symmetric integer quantization.

    Ranges are of the float weight (an online block's eval-mode kernel) and of the layer's
    output on the calibration inputs. A channel's *range* for the ratio is ``max|w|``
    over the channel (what a symmetric scale must cover). SQNRs are in dB (``inf``: no
    noise). ``sensitivity`` is the end-to-end relative L2 output error when only this
    layer (weights in the report's ``weight_mode`` and its output activation) is
    quantized, ``error_share`` its squared error over the sum of every measured layer's
    (``None`` when not measured: past ``max_layers`` or not called).
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    weight_min: float
    weight_max: float
    channel_min: list[float]
    channel_max: list[float]
    channel_range_ratio: float
    sqnr_per_tensor_db: float
    sqnr_per_channel_db: float
    worst_channel_sqnr_per_tensor_db: float
    calls: int = 0
    act_min: float | None = None
    act_max: float | None = None
    act_channel_range_ratio: float | None = None
    act_sqnr_db: float | None = None
    sensitivity: float | None = None
    sensitivity_top1: float | None = None
    error_share: float | None = None
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: tuples become lists, non-finite floats ``None``."""
        return _jsonable(asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _num(x: float | None, fmt: str = ".3g") -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, fmt)


def _span(lo: float | None, hi: float | None) -> str:
    return "-" if lo is None or hi is None else f"[{_num(lo)}, {_num(hi)}]"


@dataclass
class QuantReport:
    """The result of :func:`~repcompiler.quant.quant_report`.

    Attributes:
        rows: one :class:`QuantLayerRow` per conv/linear layer, in call order (layers the
            calibration inputs never reached last, with ``calls == 0``).
        end_to_end: ``{"per_tensor": {...}, "per_channel": {...}}``: the output error of
            the fully simulated integer model (every layer's weights in that variant,
            every layer's output activation per tensor) against float:
            ``rel_l2`` and ``top1_agreement`` (``None`` unless the output is logits: one
            2-D tensor with more than one column).
        settings: bits, axis, weight mode, calibration size, thresholds and notes.
    """

    rows: list[QuantLayerRow]
    end_to_end: dict[str, dict[str, float | None]]
    settings: dict[str, Any]

    @property
    def flagged(self) -> list[QuantLayerRow]:
        """Rows with at least one flag, in call order."""
        return [r for r in self.rows if r.flags]

    def worst(self, k: int = 3) -> list[QuantLayerRow]:
        """The ``k`` rows contributing most to the error: flagged first, then by error
        share (unmeasured rows after measured ones), then by weight channel range ratio."""
        def key(r: QuantLayerRow) -> tuple:
            share = r.error_share if r.error_share is not None else -1.0
            return (not r.flags, -share, -r.channel_range_ratio)
        return sorted(self.rows, key=key)[: max(int(k), 0)]

    def to_dict(self) -> dict[str, Any]:
        """The whole report as JSON-able data (non-finite floats become ``None``)."""
        return _jsonable({"settings": self.settings, "end_to_end": self.end_to_end,
                          "rows": [asdict(r) for r in self.rows]})

    def __str__(self) -> str:
        s = self.settings
        head = [
            f"quant_report: {len(self.rows)} conv/linear layers, INT{s['bits']} symmetric (weights per tensor and "
            f"per channel along axis {s['per_channel_axis']}, activations per tensor), calibration "
            f"{s['batches']} batch(es), {s['samples']} sample(s)",
        ]
        head += [f"note: {n}" for n in s.get("notes", [])]
        cols = ["layer", "kind", "weight range", "ch ratio", "SQNR t/c dB", "act range", "act ratio", "solo err",
                "share", "flags"]
        table = [cols]
        for i, r in enumerate(self.rows, 1):
            table.append([
                r.name, r.kind, _span(r.weight_min, r.weight_max), _num(r.channel_range_ratio, ".1f") + "x",
                f"{_num(r.sqnr_per_tensor_db, '.1f')}/{_num(r.sqnr_per_channel_db, '.1f')}",
                _span(r.act_min, r.act_max),
                "-" if r.act_channel_range_ratio is None else _num(r.act_channel_range_ratio, ".1f") + "x",
                _num(r.sensitivity, ".2e"),
                "-" if r.error_share is None else f"{100 * r.error_share:.0f}%",
                str(len(r.flags)) if r.flags else "",
            ])
        widths = [max(len(row[j]) for row in table) for j in range(len(cols))]
        lines = head + ["  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))
                        for row in table]
        lines.append(f"end to end, simulated INT{s['bits']} (all weights and activations) vs float:")
        for mode, m in self.end_to_end.items():
            top1 = m.get("top1_agreement")
            agree = "" if top1 is None else f", top-1 agreement {100 * top1:.1f}%"
            lines.append(f"  {mode.replace('_', '-')} weights: relative L2 error {_num(m['rel_l2'], '.3e')}{agree}")
        flagged = self.flagged
        lines.append(f"flagged: {len(flagged)} layer(s)" + (":" if flagged else ""))
        for r in flagged:
            for reason in r.flags:
                lines.append(f"  {r.name}: {reason}")
        return "\n".join(lines)
