"""The INT8 post-training quantization experiment (benchmarks/quant/ptq_digits.py) in
its tiny preset: every configuration (plain, RepVGG, OREPA, QARepVGG) trains, deploys,
is quantized per tensor and per channel by onnxruntime and evaluated; its float ONNX
model matches the deployed model; quant_report's layers and the results files are
written."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "quant"))

pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")

import ptq_digits  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_tiny_ptq_experiment(tmp_path, capsys):
    res = ptq_digits.main(["--tiny", "--out", str(tmp_path)])
    quantized = [r for r in res["runs"] if "quant" in r]
    assert sorted(r["config"] for r in quantized) == sorted(ptq_digits.CONFIGS)
    for r in quantized:
        q = r["quant"]
        assert r["deploy"] == "ok" and r["deployed_equal_acc"]
        assert q["onnx_float_acc"] == q["torch_float_acc"]  # the exported float model is the deployed model
        for key in ("int8_per_tensor", "int8_per_channel"):
            assert 0.0 <= q[key]["acc"] <= 1.0 and q[key]["quantize_linear"] >= 4
            assert 0.0 < q[key]["max_rel_error"] < 1.0  # quantized, not broken
        names = [layer["name"] for layer in q["report"]["layers"]]
        assert names == ["features.0", "features.3", "features.6", "features.9", "head"]
        assert all(math.isfinite(layer["channel_range_ratio"]) and layer["channel_range_ratio"] >= 1.0
                   for layer in q["report"]["layers"])
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data["summary"]) == {f"digits/{c}" for c in ptq_digits.CONFIGS}
    text = (tmp_path / "results.md").read_text()
    assert "QARepVGG" in text and "INT8 per channel" in text and "Weight channel range ratio" in text
    assert "the float ONNX model has the same test accuracy in every run" in text
    assert text in capsys.readouterr().out
