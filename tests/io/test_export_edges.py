"""Export of what a user has after training: a trained float32 online model passes the
default check in every format (the check is against the model's float64 value, with a
tolerance no tighter than the model's own rounding); a batch-1 example still gives a
dynamic batch; a static-batch fallback is a ``UserWarning``; a channels-last model
exports without torch's guard tracebacks; fold/deploy keep the channels-last layout."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import repcompiler as rc
import repcompiler.io.export as export_module
from repcompiler.io.export import ROUNDING_FACTOR, export
from repcompiler.rewrite.verify import relative_error

pytest.importorskip("onnxruntime")

CHANNELS_LAST = torch.channels_last


def _mobile_like(seed: int = 0) -> nn.Module:
    """mobilenet_v3_small's structure in miniature: stem, inverted residual blocks
    (1x1 expand, depthwise 3x3, 1x1 project; hardswish), pooled classifier."""

    def block(c: int, stride: int) -> list[nn.Module]:
        e = 4 * c
        return [nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.Hardswish(),
                nn.Conv2d(e, e, 3, stride, 1, groups=e, bias=False), nn.BatchNorm2d(e), nn.Hardswish(),
                nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)]

    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish(), *block(16, 2), *block(16, 1)]
    net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # running statistics = the batches' average, as after a long training
    return net


# raw readings with a large offset (un-normalised sensor counts): each BN subtracts a
# running mean close to the activations, so float32 loses digits in the model itself
OFFSET = 3e5


def _trained_online(seed: int = 0) -> nn.Module:
    model = rc.orepa_transform(_mobile_like(seed), init="fresh")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        x = torch.randn(8, 3, 16, 16, generator=g) + OFFSET
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,), generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_trained_float32_online_model_exports_with_the_default_check(tmp_path: Path) -> None:
    model = _trained_online()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5)) + OFFSET
    with torch.no_grad():
        ref32 = model(x)
        exact = model.double()(x.double())
        model.float()
        deployed = rc.deploy(model)(x)
    rounding = relative_error(ref32, exact)
    # the situation the check must handle: float32 alone moves the reference by so much
    # that two float32 computations in different orders (online, deployed) differ by
    # about the dtype's default tolerance (1e-4; here 1.2e-4), while the deploy itself
    # is exact: in float64 it equals the reference to 1e-12
    assert rounding > 1e-5, rounding
    with torch.no_grad():
        assert relative_error(rc.deploy(model.double())(x.double()), exact) < 1e-12
    model.float()
    assert relative_error(deployed, exact) < ROUNDING_FACTOR * rounding
    for suffix in (".pt", ".pt2", ".onnx"):
        res = export(model, tmp_path / f"m{suffix}", x)
        assert res.verified_batches == (2, 3) and res.reference_rounding is not None, res
        assert res.reference_rounding >= rounding * 0.999 and res.rtol == pytest.approx(
            ROUNDING_FACTOR * res.reference_rounding), res
        assert res.max_rel_error <= res.rtol and res.rtol > 1e-4  # the tolerance follows the model's rounding


def test_the_check_still_catches_a_wrong_artifact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tolerance grows with the model's rounding, not with the artifact's error."""
    model = _trained_online()
    x = torch.randn(2, 3, 16, 16) + OFFSET
    real = export_module.deploy_model

    def off_by_a_bit(*args, **kwargs):
        out, report = real(*args, **kwargs)
        with torch.no_grad():
            out[-1].bias.add_(0.05 * out[-1].bias.abs().max() + 0.05)
        return out, report

    monkeypatch.setattr(export_module, "deploy_model", off_by_a_bit)
    with pytest.raises(rc.errors.VerificationError, match="differs from the original"):
        export(model, tmp_path / "m.pt", x)


def test_batch_one_example_gives_a_dynamic_batch(tmp_path: Path) -> None:
    model = _mobile_like().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no static fallback
        res = export(model, tmp_path / "m.pt2", torch.randn(1, 3, 16, 16))
    assert res.dynamic_batch and res.verified_batches == (1, 2)


def test_channels_last_batch_one_exports_quietly(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    model = _mobile_like().eval().to(memory_format=CHANNELS_LAST)
    x = torch.randn(1, 3, 16, 16).to(memory_format=CHANNELS_LAST)
    for suffix, exporter in ((".pt2", "torch.export"), (".onnx", "dynamo")):
        res = export(model, tmp_path / f"m{suffix}", x)
        assert res.dynamic_batch and res.exporter == exporter and f"via {exporter}" in str(res)
    err = capfd.readouterr().err
    assert "Error while creating guard" not in err and "Traceback" not in err, err[:2000]


def _kxk_weights(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]


def _channels_last(model: nn.Module) -> bool:
    weights = _kxk_weights(model)
    return bool(weights) and all(p.is_contiguous(memory_format=CHANNELS_LAST) for p in weights)


def _standard(model: nn.Module) -> bool:
    weights = _kxk_weights(model)
    return bool(weights) and all(p.is_contiguous() for p in weights)


def test_fold_and_deploy_keep_channels_last() -> None:
    plain = _mobile_like().eval()
    folded = rc.fold(plain.to(memory_format=CHANNELS_LAST))
    assert folded is not plain and _channels_last(folded) and not _standard(folded)
    assert _standard(rc.fold(_mobile_like().eval()))  # standard stays standard
    online = rc.orepa_transform(_mobile_like(), init="fresh").to(memory_format=CHANNELS_LAST).eval()
    deployed = rc.deploy(online)
    assert _channels_last(deployed) and not _standard(deployed)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert relative_error(deployed(x), online(x)) < 1e-5
