"""Integer quantization: will a (deployed) model survive INT8, and how to get there.

* :func:`quant_report` (:class:`QuantReport`, :class:`QuantLayerRow`): per conv/linear
  layer weight and activation ranges, SQNRs, simulated end-to-end and per-layer errors,
  flags with reasons (:mod:`.report`, :mod:`.rows`, :mod:`.sim`).
* symmetric fake quantization and SQNR helpers (:mod:`.fake`).
* post-training quantization checked end to end: :func:`quantize_onnx` (onnxruntime
  static QDQ), :func:`run_onnx`, :func:`evaluate` (:mod:`.ptq`).
"""

from __future__ import annotations

from .fake import (
    channel_observer,
    channel_sqnr_db,
    fake_quantize_per_tensor,
    fake_quantize_weight,
    qrange,
    sqnr_db,
    tensor_observer,
    weight_scale,
)
from .ptq import ACTIVATION_TYPES, Evaluation, QuantizedModel, cpu_has_vnni, evaluate, quantize_onnx, run_onnx
from .report import quant_report
from .rows import QuantLayerRow, QuantReport

__all__ = [
    "quant_report",
    "QuantReport",
    "QuantLayerRow",
    "fake_quantize_weight",
    "fake_quantize_per_tensor",
    "weight_scale",
    "qrange",
    "tensor_observer",
    "channel_observer",
    "sqnr_db",
    "channel_sqnr_db",
    "ACTIVATION_TYPES",
    "Evaluation",
    "QuantizedModel",
    "cpu_has_vnni",
    "evaluate",
    "quantize_onnx",
    "run_onnx",
]
