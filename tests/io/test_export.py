"""repcompiler.export: every format, dynamic batch, verification, atomic artifacts, ONNX graph checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from torch import nn

import cli_models as models
from repcompiler.errors import UnsupportedError, VerificationError
from repcompiler.io import writers
from repcompiler.io.export import export, format_from_suffix, has_online_blocks, normalize_format
from repcompiler.io.writers import onnx_op_counts
from repcompiler.explain.report import count_convs
from repcompiler.transforms.orepa import orepa_transform

X = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
X5 = torch.randn(5, 3, 12, 12, generator=torch.Generator().manual_seed(1))  # another batch size


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _run_artifact(fmt: str, path: Path, *args: torch.Tensor) -> list[torch.Tensor]:
    """Load an artifact independently of export()'s own verification and run it."""
    if fmt == "onnx":
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
        return [torch.from_numpy(np.asarray(o)) for o in sess.run(None, feeds)]
    if fmt == "torchscript":
        out = torch.jit.load(str(path))(*args)
    else:
        with open(path, "rb") as f:
            out = torch.export.load(f).module()(*args)
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= rel * float(b.abs().max()) + 1e-6


def _onnx_batch_dim(path: Path) -> object:
    d = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return d.dim_param or d.dim_value


@pytest.mark.parametrize(
    "fmt,suffix,kw",
    [
        ("onnx", ".onnx", {"onnx_exporter": "torchscript"}),
        ("torchscript", ".ts", {}),
        # deploy=False: fold's rewritten forward is not scriptable for modules written with
        # `from __future__ import annotations` (see test_compile_export_torchscript.py); scripting itself is tested here
        ("torchscript", ".ts", {"torchscript_method": "script", "deploy": False}),
        ("exported_program", ".pt2", {}),
    ],
    ids=["onnx-legacy", "ts-trace", "ts-script", "exported_program"],
)
def test_formats_roundtrip_dynamic_batch(tmp_path: Path, fmt: str, suffix: str, kw: dict) -> None:
    model = models.tiny_net(seed=1).train()  # caller's model in train mode: must stay untouched
    model.fc.eval()  # a mixed train/eval state must be restored exactly
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / f"m{suffix}"
    res = export(model, path, X, format=fmt, **kw)
    assert res.path == path and path.is_file() and res.format == fmt
    assert res.dynamic_batch and res.verified_batches == (2, 3) and res.max_rel_error is not None
    assert res.files == (path,) and str(path) in str(res)
    assert model.training and not model.fc.training and model.bn0.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp files left
    # independent check at a batch size export() never saw
    out = _run_artifact(fmt, path, X5)
    assert len(out) == 1 and _close(out[0], _eager(models.tiny_net(seed=1), X5))


def test_onnx_default_exporter_dynamic_and_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxscript")
    monkeypatch.setattr(writers, "_ONNX_EXTERNAL_DATA_BYTES", 0)  # force the large-model path
    path = tmp_path / "net.onnx"
    res = export(models.tiny_net(seed=2), path, X)
    assert res.exporter == "dynamo" and res.dynamic_batch
    data = [p for p in res.files if p != path]
    assert len(data) == 1 and data[0].is_file() and data[0].stat().st_size > 1000  # weights are outside
    proto = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert isinstance(_onnx_batch_dim(path), str)  # symbolic batch
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in res.files)
    out = _run_artifact("onnx", path, X5)
    assert _close(out[0], _eager(models.tiny_net(seed=2), X5))


def test_static_batch(tmp_path: Path) -> None:
    path = tmp_path / "static.onnx"
    res = export(models.tiny_net(), path, X, dynamic_batch=False, onnx_exporter="torchscript")
    assert not res.dynamic_batch and res.verified_batches == (2,)
    assert _onnx_batch_dim(path) == 2
    res = export(models.tiny_net(), tmp_path / "static.pt2", X, format="exported_program", dynamic_batch=False)
    assert not res.dynamic_batch


def test_fixed_batch_model_falls_back_to_static(tmp_path: Path) -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="retrying with a static batch"):
        res = export(models.FixedBatch(), tmp_path / "fixed.pt2", X, format="exported_program")
    assert not res.dynamic_batch and res.verified_batches == (2,)
    with open(tmp_path / "fixed.pt2", "rb") as f:
        loaded = torch.export.load(f).module()
    with pytest.raises(Exception):  # the artifact really is static
        loaded(torch.randn(3, 3, 12, 12))


def test_multiple_inputs_and_outputs(tmp_path: Path) -> None:
    x, z = torch.randn(2, 3, 6, 6), torch.randn(2, 2, 6, 6)
    x3, z3 = torch.randn(3, 3, 6, 6), torch.randn(3, 2, 6, 6)
    ref = models.two_in_out().eval()(x3, z3)
    for fmt, suffix in [("onnx", ".onnx"), ("exported_program", ".pt2")]:
        path = tmp_path / f"two{suffix}"
        only_onnx = {"onnx_exporter": "torchscript"} if fmt == "onnx" else {}
        res = export(models.two_in_out(), path, (x, z), format=fmt, **only_onnx)
        assert res.dynamic_batch
        out = _run_artifact(fmt, path, x3, z3)
        assert len(out) == 2 and all(_close(o, r.detach()) for o, r in zip(out, ref))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported_program"])
def test_mismatch_raises_and_writes_nothing(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"bad.{fmt}"
    path.write_bytes(b"previous artifact")
    only_onnx = {"onnx_exporter": "torchscript"} if fmt == "onnx" else {}
    with pytest.raises(VerificationError, match="differs from the original by relative"):
        export(models.trace_sensitive(), path, X, format=fmt, **only_onnx)
    assert path.read_bytes() == b"previous artifact"  # never replaced by a wrong artifact
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    # verify=False writes it (the caller asked for no check)
    res = export(models.trace_sensitive(), path, X, format=fmt, verify=False, **only_onnx)
    assert res.verified_batches == () and res.max_rel_error is None and path.stat().st_size > 100


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedError, match="format"):
        export(models.tiny_net(), tmp_path / "m.x", X, format="tflite")
    with pytest.raises(UnsupportedError, match="tensors only"):
        export(models.tiny_net(), tmp_path / "m.onnx", (X, 3))
    with pytest.raises(FileNotFoundError):
        export(models.tiny_net(), tmp_path / "no_dir" / "m.onnx", X)
    with pytest.raises(IsADirectoryError):
        export(models.tiny_net(), tmp_path, X)
    with pytest.raises(UnsupportedError, match="exporter"):
        export(models.tiny_net(), tmp_path / "m.onnx", X, onnx_exporter="nope")
    assert list(tmp_path.iterdir()) == []
    assert normalize_format("TorchScript") == "torchscript" and normalize_format("pt2") == "exported_program"
    assert format_from_suffix("a.pt2") == "exported_program" and format_from_suffix("a.onnx") == "onnx"
    assert format_from_suffix("a.pt") == "torchscript" and format_from_suffix("a.bin") is None


def test_bn_counting_helper_on_manually_fused_model(tmp_path: Path) -> None:
    """The ONNX graph checks used for deployed models must be able to fail: with the
    exporter's own optimizations off, an unfolded model shows its BatchNormalization
    nodes, a (manually) fused one has none and the same Conv count."""
    plain = models.tiny_net(seed=3).eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    res = export(plain, tmp_path / "plain.onnx", X, deploy=False, onnx_optimize=False, onnx_exporter="torchscript")
    counts = onnx_op_counts(res.path)
    assert counts["BatchNormalization"] == n_bn == 3 and counts["Conv"] == count_convs(plain) == 3

    fused = models.tiny_net(seed=3).eval()
    for conv, bn in [("stem", "bn0"), ("conv1", "bn1"), ("conv2", "bn2")]:
        setattr(fused, conv, torch.nn.utils.fusion.fuse_conv_bn_eval(getattr(fused, conv), getattr(fused, bn)))
        setattr(fused, bn, nn.Identity())
    res = export(fused, tmp_path / "fused.onnx", X, deploy=False, onnx_optimize=False, onnx_exporter="torchscript")
    counts = onnx_op_counts(res.path)
    assert counts["BatchNormalization"] == 0 and counts["Conv"] == count_convs(plain)
    out = _run_artifact("onnx", res.path, X5)
    assert _close(out[0], _eager(plain, X5))  # the fused artifact equals the unfused model


def _online_tiny() -> nn.Module:
    """A tiny model with online blocks."""
    return orepa_transform(models.tiny_net(seed=4))


def test_online_model_is_deployed_before_export(tmp_path: Path) -> None:
    model = _online_tiny()
    assert has_online_blocks(model)
    n_online = sum(type(m).__name__ == "OnlineConv" for m in model.modules())
    res = export(model, tmp_path / "online.onnx", X, onnx_exporter="torchscript", onnx_optimize=False)
    assert res.deployed and has_online_blocks(model)  # the caller's model still trains
    counts = onnx_op_counts(res.path)
    assert counts["BatchNormalization"] == 0
    assert counts["Conv"] == count_convs(models.tiny_net()) and n_online >= 1
    assert _close(_run_artifact("onnx", res.path, X5)[0], _eager(model, X5))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_deployed_zoo_onnx_graph_is_plain(tmp_path: Path, name: str) -> None:
    """Deployed ResNet-18 / MobileNetV3: no BatchNormalization, exactly the plain Conv count.

    The exporter's own BN folding is switched off (onnx_optimize=False) so the graph shows
    what repcompiler.deploy produced."""
    import helpers

    plain = helpers.randomize_bn(torchvision.models.get_model(name, weights=None, num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    model = _maybe_transform(plain)
    res = export(model, tmp_path / f"{name}.onnx", x, onnx_exporter="torchscript", onnx_optimize=False)
    counts = onnx_op_counts(res.path)
    assert res.deployed and res.dynamic_batch
    assert counts["BatchNormalization"] == 0, counts
    assert counts["Conv"] == count_convs(plain), (counts["Conv"], count_convs(plain))


def _maybe_transform(plain: nn.Module) -> nn.Module:
    """The transformed (online) form of ``plain``."""
    import copy

    import helpers

    out = orepa_transform(copy.deepcopy(plain))
    model = out[0] if isinstance(out, tuple) else out
    return helpers.randomize_bn(model, seed=1).eval()


@pytest.mark.zoo_full
def test_deployed_resnet18_default_exporter(tmp_path: Path) -> None:
    """The default (dynamo) ONNX exporter on a deployed transformed ResNet-18."""
    pytest.importorskip("onnxscript")
    plain = torchvision.models.resnet18(num_classes=10).eval()
    model = _maybe_transform(plain)
    res = export(model, tmp_path / "r18.onnx", torch.randn(1, 3, 32, 32), onnx_optimize=False)
    counts = onnx_op_counts(res.path)
    assert res.exporter == "dynamo" and counts["BatchNormalization"] == 0
    assert counts["Conv"] == count_convs(plain) == 20


def test_export_reports_batch_norms_left(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The result states how many Conv / BatchNormalization nodes the
    artifact has, and a BatchNorm left is a warning naming why."""
    res = export(models.tiny_net(seed=3), tmp_path / "plain.onnx", X, onnx_exporter="torchscript",
                 onnx_optimize=False)
    assert (res.convs, res.batch_norms) == (3, 0) and "0 BatchNorm" in str(res)
    assert "BatchNorm layer" not in caplog.text

    res = export(models.tiny_net(seed=3), tmp_path / "raw.onnx", X, deploy=False, onnx_optimize=False,
                 onnx_exporter="torchscript")
    assert res.batch_norms == onnx_op_counts(res.path)["BatchNormalization"] == 3 and "3 BatchNorm" in str(res)
    assert "raw.onnx still has 3 BatchNorm layer(s) (exported with deploy=False)" in caplog.text

    torch.manual_seed(0)
    bn_after_act = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8)).eval()
    caplog.clear()
    res = export(bn_after_act, tmp_path / "act.pt2", X, format="exported_program")
    assert res.batch_norms == 1 and res.convs == 1
    assert "act.pt2 still has 1 BatchNorm layer(s)" in caplog.text
