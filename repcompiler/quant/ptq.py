"""Post-training INT8 quantization of a deployed model with onnxruntime, end to end.

Owns :func:`quantize_onnx`, :func:`run_onnx`, :func:`evaluate` and their result types.

The flow: fold the model (``rc.deploy``), export it to ONNX
(``rc.export``, checked against onnxruntime), then onnxruntime's static quantization
(``onnxruntime.quantization.quantize_static``):

* QDQ format (``QuantizeLinear``/``DequantizeLinear`` pairs around every quantized op,
  the format onnxruntime's CPU kernels are optimised for);
* weights ``QInt8``, symmetric, per tensor or per output channel (``per_channel``);
* activations ``QUInt8`` (default) or ``QInt8``, their ranges calibrated with MinMax on
  the caller's calibration tensors, fed through a ``CalibrationDataReader``;
* ``reduce_range`` (7-bit weights): onnxruntime recommends it on x86 CPUs without VNNI
  (``"auto"``, the default, reads the CPU flags), not elsewhere;
* the float model is first run through ``quant_pre_process`` (shape inference and
  graph optimisation), as onnxruntime recommends; where that fails the float model is
  quantized as exported and the log says why.

Every step is CPU-only. :func:`run_onnx` runs an ONNX file (float or quantized) on a
batch of inputs; :func:`evaluate` adds top-1 accuracy and agreement with a float
reference. onnxruntime is part of the export extra; without it these raise
:class:`~repcompiler.errors.UnsupportedError` naming the install command.

torch's PT2E flow (``quantize_pt2e``) is not offered: it lives in the separate
``torchao`` package, not in the supported torch.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import IncompatibleError, UnsupportedError, check_choice
from ..io.export import export
from ..io.writers import onnx_op_counts
from ..io.formats import require_packages

__all__ = ["ACTIVATION_TYPES", "QuantizedModel", "Evaluation", "quantize_onnx", "run_onnx", "evaluate",
           "cpu_has_vnni"]

log = logging.getLogger(__name__)

#: activation types for :func:`quantize_onnx` (weights are always ``qint8``)
ACTIVATION_TYPES = ("quint8", "qint8")

Batch = tuple[Tensor, ...]


@dataclass
class QuantizedModel:
    """What :func:`quantize_onnx` wrote.

    Attributes:
        path: the quantized (QDQ) ONNX file.
        float_path: the float ONNX model it was made from (exported here when a module
            was given).
        per_channel: per-output-channel weight scales (else one per tensor).
        activation_type, weight_type: ``"quint8"``/``"qint8"`` and ``"qint8"``.
        reduce_range: whether weights were quantized to 7 bits.
        preprocessed: whether ``quant_pre_process`` ran.
        calibration_batches, calibration_samples: the calibration data used.
        op_counts: ONNX node types of the quantized graph (``QuantizeLinear``,
            ``DequantizeLinear``, ``Conv``, ...).
        seconds: wall time of the call.
    """

    path: Path
    float_path: Path
    per_channel: bool
    activation_type: str
    weight_type: str
    reduce_range: bool
    preprocessed: bool
    calibration_batches: int
    calibration_samples: int
    op_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def __str__(self) -> str:
        q = self.op_counts.get("QuantizeLinear", 0)
        return (f"{self.path} [INT8 QDQ, weights {self.weight_type} "
                f"{'per channel' if self.per_channel else 'per tensor'}{' (7-bit)' if self.reduce_range else ''}, "
                f"activations {self.activation_type}, MinMax on {self.calibration_samples} samples "
                f"({self.calibration_batches} batches), {q} QuantizeLinear, {self.seconds:.1f} s]")


@dataclass
class Evaluation:
    """What :func:`evaluate` measured on one ONNX model.

    Attributes:
        outputs: the model's (first) output on the inputs, as a float tensor.
        accuracy: top-1 accuracy against ``targets`` (``None`` without targets).
        agreement: fraction of samples whose argmax equals the reference's (``None``
            without a reference).
        max_rel_error: ``max|outputs - reference| / max|reference|`` (``None`` without one).
    """

    outputs: Tensor
    accuracy: float | None = None
    agreement: float | None = None
    max_rel_error: float | None = None


def cpu_has_vnni() -> bool | None:
    """Whether the CPU has a VNNI dot-product instruction (``None``: not an x86 Linux
    CPU whose flags can be read)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return None
    return "vnni" in flags if flags else None


def _require() -> None:
    require_packages("onnx", verify=True, onnx_exporter=None)  # onnx + onnxruntime, or the install command


def _batches(calibration_inputs: Any, batch_size: int) -> list[Batch]:
    """The calibration data as a list of batches (tuples of positional inputs)."""
    what = "quantize_onnx: calibration_inputs"
    if isinstance(calibration_inputs, Tensor):
        if calibration_inputs.dim() == 0 or len(calibration_inputs) == 0:
            raise IncompatibleError(f"{what} is an empty or 0-d tensor; pass samples stacked along dim 0")
        return [(calibration_inputs[i:i + batch_size],) for i in range(0, len(calibration_inputs), batch_size)]
    if isinstance(calibration_inputs, (str, bytes)) or not isinstance(calibration_inputs, Iterable):
        raise IncompatibleError(f"{what} must be a tensor of samples or an iterable of batches, "
                                f"got {type(calibration_inputs).__name__}")
    out: list[Batch] = []
    for i, b in enumerate(calibration_inputs):
        batch = (b,) if isinstance(b, Tensor) else tuple(b) if isinstance(b, (tuple, list)) else None
        if not batch or not all(isinstance(t, Tensor) for t in batch):
            raise IncompatibleError(f"{what}: batch {i} is {type(b).__name__}, not a tensor or a tuple of tensors")
        out.append(batch)
    if not out:
        raise IncompatibleError(f"{what} is empty; quantization needs calibration data")
    return out


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])


def _feeds(session: Any, batch: Batch) -> dict[str, np.ndarray]:
    names = [i.name for i in session.get_inputs()]
    if len(names) != len(batch):
        raise IncompatibleError(f"the ONNX model takes {len(names)} input(s) ({', '.join(names)}), "
                                f"got batches of {len(batch)}")
    return {n: t.detach().cpu().float().numpy() for n, t in zip(names, batch)}


class _Reader:
    """An onnxruntime ``CalibrationDataReader`` over the calibration batches."""

    def __init__(self, session: Any, batches: Sequence[Batch]) -> None:
        self._feeds = [_feeds(session, b) for b in batches]
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def _float_model(model_or_path: nn.Module | str | os.PathLike[str], example: Batch, out: Path,
                 export_options: dict[str, Any]) -> Path:
    if isinstance(model_or_path, nn.Module):
        float_path = out.with_name(out.stem + ".float.onnx")
        res = export(model_or_path, float_path, tuple(t[:2] for t in example), format="onnx", dynamic_batch=True,
                     **export_options)
        log.info("quantize_onnx: float model %s", res)
        return float_path
    if isinstance(model_or_path, (str, os.PathLike)):
        p = Path(model_or_path)
        if p.suffix != ".onnx" or not p.is_file():
            raise IncompatibleError(f"quantize_onnx: model_or_path {str(p)!r} is not an existing .onnx file")
        return p
    raise IncompatibleError(f"quantize_onnx: model_or_path must be an nn.Module or a path to an .onnx file, "
                            f"got {type(model_or_path).__name__}")


def quantize_onnx(
    model_or_path: nn.Module | str | os.PathLike[str],
    calibration_inputs: Tensor | Iterable[Tensor | Sequence[Tensor]],
    out_path: str | os.PathLike[str],
    *,
    per_channel: bool = False,
    activation_type: str = "quint8",
    reduce_range: bool | str = "auto",
    batch_size: int = 64,
    preprocess: bool = True,
    export_options: dict[str, Any] | None = None,
) -> QuantizedModel:
    """Quantize a model to INT8 with onnxruntime's static quantization (see the module
    docstring) and write it to ``out_path``.

    Args:
        model_or_path: a model (deployed or not: it is exported with :func:`rc.export
            <repcompiler.export>`, which deploys and verifies it, to
            ``<out stem>.float.onnx`` with a dynamic batch) or a float ``.onnx`` file.
        calibration_inputs: samples stacked along dim 0 (one tensor, split into batches
            of ``batch_size``), or an iterable of batches (tensors or tuples of tensors,
            one per model input). Use data like what the model will see.
        out_path: the quantized ``.onnx`` file to write.
        per_channel: one weight scale per output channel (else one per tensor).
        activation_type: ``"quint8"`` (onnxruntime's recommendation for x86 CPUs) or ``"qint8"``.
        reduce_range: 7-bit weights; ``"auto"``: on x86 CPUs without VNNI, as
            onnxruntime recommends.
        batch_size: calibration batch size when ``calibration_inputs`` is one tensor.
        preprocess: run onnxruntime's ``quant_pre_process`` first.
        export_options: extra keywords for ``rc.export`` (e.g. ``{"opset": 17}``).

    Returns:
        a :class:`QuantizedModel`. Raises :class:`~repcompiler.errors.UnsupportedError`
        when onnx/onnxruntime are missing, :class:`~repcompiler.errors.IncompatibleError`
        for bad arguments.
    """
    t0 = time.perf_counter()
    _require()
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    check_choice("activation_type", activation_type, ACTIVATION_TYPES, owner="quantize_onnx",
                 error=IncompatibleError)
    if reduce_range not in (True, False, "auto"):
        raise IncompatibleError(f"quantize_onnx: reduce_range must be True, False or 'auto', got {reduce_range!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise IncompatibleError(f"quantize_onnx: batch_size must be a positive int, got {batch_size!r}")
    out = Path(out_path)
    if out.suffix != ".onnx":
        raise IncompatibleError(f"quantize_onnx: out_path {str(out)!r} must end with .onnx")
    batches = _batches(calibration_inputs, batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    float_path = _float_model(model_or_path, batches[0], out, dict(export_options or {}))
    reduce = bool(cpu_has_vnni() is False) if reduce_range == "auto" else bool(reduce_range)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        source = float_path
        if preprocess:
            pre = Path(tmp) / "preprocessed.onnx"
            try:
                quant_pre_process(os.fspath(float_path), os.fspath(pre), skip_symbolic_shape=True)
                source = pre
            # broad on purpose: onnxruntime's optional pre-processing raises many unrelated types on
            # graphs it cannot handle; the model is then quantized as exported (with a warning)
            except Exception as exc:  # noqa: BLE001
                log.warning("quantize_onnx: quant_pre_process failed (%s: %s); quantizing the model as exported",
                            type(exc).__name__, exc)
        reader = _Reader(_session(source, threads=None), batches)
        quantize_static(
            os.fspath(source), os.fspath(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
            reduce_range=reduce,
            activation_type=QuantType.QUInt8 if activation_type == "quint8" else QuantType.QInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        )
    result = QuantizedModel(out, float_path, per_channel, activation_type, "qint8", reduce, source != float_path,
                            len(batches), sum(len(b[0]) for b in batches), dict(onnx_op_counts(out)),
                            time.perf_counter() - t0)
    if not result.op_counts.get("QuantizeLinear"):
        raise UnsupportedError(f"quantize_onnx: onnxruntime quantized no tensor of {float_path}; "
                               f"ops: {result.op_counts}")
    log.info("quantize_onnx: %s", result)
    return result


@torch.no_grad()
def run_onnx(path: str | os.PathLike[str], inputs: Tensor | Sequence[Tensor], *, batch_size: int = 256,
             threads: int | None = None) -> Tensor:
    """The (first) output of the ONNX model at ``path`` on ``inputs`` (a tensor, or a
    tuple with one tensor per model input, samples along dim 0), run with onnxruntime on
    the CPU in batches of ``batch_size`` (``threads``: intra-op threads, default
    onnxruntime's), as a float32 tensor."""
    _require()
    p = Path(path)
    if not p.is_file():
        raise IncompatibleError(f"run_onnx: {str(p)!r} is not a file")
    xs = (inputs,) if isinstance(inputs, Tensor) else tuple(inputs)
    if not xs or not all(isinstance(t, Tensor) for t in xs):
        raise IncompatibleError("run_onnx: inputs must be a tensor or a tuple of tensors")
    session = _session(p, threads)
    outs = []
    for i in range(0, len(xs[0]), batch_size):
        outs.append(torch.from_numpy(session.run(None, _feeds(session, tuple(t[i:i + batch_size] for t in xs)))[0]))
    return torch.cat(outs).float()


def evaluate(path: str | os.PathLike[str], inputs: Tensor | Sequence[Tensor], targets: Tensor | None = None, *,
             reference: Tensor | None = None, batch_size: int = 256, threads: int | None = None) -> Evaluation:
    """Run the ONNX model at ``path`` (:func:`run_onnx`) and measure: top-1 accuracy
    against ``targets`` (class indices), and against ``reference`` (e.g. the float
    model's outputs) the argmax agreement and the largest relative output error."""
    out = run_onnx(path, inputs, batch_size=batch_size, threads=threads)
    ev = Evaluation(out)
    if targets is not None:
        if targets.shape != out.shape[:1]:
            raise IncompatibleError(f"evaluate: targets of shape {tuple(targets.shape)} for {len(out)} outputs")
        ev.accuracy = (out.argmax(1) == targets.to(out.device)).float().mean().item()
    if reference is not None:
        ref = reference.detach().float().cpu()
        if ref.shape != out.shape:
            raise IncompatibleError(f"evaluate: reference of shape {tuple(ref.shape)} vs outputs {tuple(out.shape)}")
        ev.agreement = (out.argmax(1) == ref.argmax(1)).float().mean().item()
        ev.max_rel_error = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
    return ev
