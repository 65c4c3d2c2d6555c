"""``orepa_transform`` left at its default ``init`` warns, naming ``init="from_conv"``,
when the model's weights look trained (they would be discarded); a fresh model, or an
explicit ``init="fresh"``, gives no warning."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import repcompiler as rc
from repcompiler.blocks.init import trained_evidence

torchvision = pytest.importorskip("torchvision")


def _no_bn_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def _transform_warnings(model: nn.Module, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc.orepa_transform(model, **kwargs)
    return [str(w.message) for w in caught if "looks trained" in str(w.message)]


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf"])
def test_a_fresh_torchvision_model_does_not_look_trained(name: str) -> None:
    assert trained_evidence(getattr(torchvision.models, name)(weights=None)) == []


def test_a_fresh_torchvision_model_gives_no_warning() -> None:
    assert _transform_warnings(torchvision.models.mobilenet_v3_small(weights=None)) == []


def test_a_fresh_model_without_bn_gives_no_warning() -> None:
    torch.manual_seed(0)
    assert _transform_warnings(_no_bn_net()) == []


def test_two_training_steps_warn_naming_from_conv() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    (message,) = _transform_warnings(model)
    assert "init='from_conv'" in message and "2 BatchNorm(s)" in message and "(1, 4)" in message
    # the user chose: no warning
    assert _transform_warnings(model, init="fresh") == []
    assert _transform_warnings(model, init="from_conv") == []


def test_a_loaded_state_dict_warns() -> None:
    """Trained filters differ in norm far more than freshly drawn ones (no BN here to tell)."""
    torch.manual_seed(0)
    trained = _no_bn_net()
    with torch.no_grad():  # as training leaves them: some filters grow, others shrink
        for m in trained.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.rand(m.weight.shape[0], 1, 1, 1) * 3)
    model = _no_bn_net()
    model.load_state_dict(trained.state_dict())
    (message,) = _transform_warnings(model)
    assert "init='from_conv'" in message and "conv(s) whose filters" in message and "2" in message
    assert rc.orepa_transform(model, init="from_conv") is not None
