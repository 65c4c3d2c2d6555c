"""Post-training quantization (``repcompiler.quant``): a small deployed model is
exported, quantized by onnxruntime per tensor and per channel, and run; its INT8
outputs differ from float (quantization happened) but stay close and agree in argmax
(it is not broken). Missing onnxruntime and bad arguments raise the library's errors."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import repcompiler as rc
from repcompiler.errors import IncompatibleError, UnsupportedError

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from repcompiler.quant import evaluate, quantize_onnx, run_onnx  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )
    t = rc.orepa_transform(m, block="qarepvgg")
    t.train()
    with torch.no_grad():  # BN statistics from data, then eval
        for _ in range(3):
            t(torch.randn(32, 1, 12, 12))
    return t.eval()


def _weight_scales(path) -> list[tuple[int, ...]]:
    """Shapes of the scales of every int8 initializer's DequantizeLinear (the weights)."""
    g = onnx.load(str(path)).graph
    init = {i.name: i for i in g.initializer}
    out = []
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in init and init[n.input[0]].data_type == onnx.TensorProto.INT8:
            out.append(tuple(init[n.input[1]].dims))
    return out


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    d = tmp_path_factory.mktemp("ptq")
    model = _model()
    calib = torch.randn(48, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    per_tensor = quantize_onnx(model, calib, d / "m.onnx", batch_size=16,
                               export_options={"onnx_exporter": "torchscript"})
    per_channel = quantize_onnx(per_tensor.float_path, [calib[:24], (calib[24:],)], d / "m_pc.onnx",
                                per_channel=True, activation_type="qint8")
    return model, per_tensor, per_channel


def test_ptq_end_to_end(quantized):
    model, per_tensor, per_channel = quantized
    x = torch.randn(64, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(x)
    fl = evaluate(per_tensor.float_path, x, reference=ref)
    assert fl.max_rel_error < 1e-4 and fl.agreement == 1.0  # the exported float model is the model
    for q in (per_tensor, per_channel):
        assert q.op_counts["QuantizeLinear"] >= 3 and q.op_counts["DequantizeLinear"] >= 3
        assert q.calibration_samples == 48 and "INT8 QDQ" in str(q)
        ev = evaluate(q.path, x, ref.argmax(1), reference=ref)
        assert 1e-4 < ev.max_rel_error < 0.15, ev.max_rel_error  # quantized, and not broken
        assert ev.agreement >= 0.9 and ev.accuracy == ev.agreement
    assert per_tensor.calibration_batches == 3 and per_channel.calibration_batches == 2
    # weights are int8: one scale per tensor, or one per output channel
    assert _weight_scales(per_tensor.path) and all(s in ((), (1,)) for s in _weight_scales(per_tensor.path))
    assert {(8,), (16,)} <= set(_weight_scales(per_channel.path))
    assert run_onnx(per_channel.path, x, batch_size=10).shape == (64, 10)
    assert rc.quant.quantize_onnx is quantize_onnx  # rc.quant resolves without importing it first


def test_missing_onnxruntime_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(UnsupportedError, match=r"onnxruntime.*repcompiler\[export\]"):
        quantize_onnx(nn.Conv2d(1, 1, 3), torch.randn(2, 1, 4, 4), tmp_path / "q.onnx")


def test_bad_arguments(quantized, tmp_path):
    _, per_tensor, _ = quantized
    src = per_tensor.float_path
    x = torch.randn(4, 1, 12, 12)
    with pytest.raises(IncompatibleError, match="calibration_inputs is empty"):
        quantize_onnx(src, [], tmp_path / "q.onnx")
    with pytest.raises(IncompatibleError, match="batch 0 is str"):
        quantize_onnx(src, ["x"], tmp_path / "q.onnx")
    with pytest.raises(IncompatibleError, match="activation_type must be one of"):
        quantize_onnx(src, x, tmp_path / "q.onnx", activation_type="int4")
    with pytest.raises(IncompatibleError, match="must end with .onnx"):
        quantize_onnx(src, x, tmp_path / "q.bin")
    with pytest.raises(IncompatibleError, match="not an existing .onnx file"):
        quantize_onnx(tmp_path / "none.onnx", x, tmp_path / "q.onnx")
    with pytest.raises(IncompatibleError, match="targets of shape"):
        evaluate(src, x, torch.zeros(3, dtype=torch.long))
