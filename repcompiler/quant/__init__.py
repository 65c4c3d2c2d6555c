"""INT8 deployment: post-training quantization checked end to end (:mod:`.ptq`)."""

from __future__ import annotations

from .ptq import ACTIVATION_TYPES, Evaluation, QuantizedModel, cpu_has_vnni, evaluate, quantize_onnx, run_onnx

__all__ = ["ACTIVATION_TYPES", "Evaluation", "QuantizedModel", "cpu_has_vnni", "evaluate", "quantize_onnx", "run_onnx"]
