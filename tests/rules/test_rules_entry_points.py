"""Every entry point takes ``rules=``: a registry of one's own that knows a custom layer
folds it; without that registry the layer stays opaque."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import repcompiler as rc
from repcompiler import algebra as A
from repcompiler.online.conv import OfflineBlock, OnlineConv
from repcompiler.rules import LowerInfo, RuleRegistry, default_rules
from repcompiler.testing import randomize_bn

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class Gain(nn.Module):
    """A per-channel scale written with ``einsum``: no built-in rule lowers it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,c->nchw", x, self.weight)


def _lower_gain(m: nn.Module, info: LowerInfo) -> A.Expr:
    return A.Affine(info.in_channels, info.dims, scale=m.weight)


def _rules() -> RuleRegistry:
    rules = default_rules().copy()
    rules.register(Gain, _lower_gain)
    return rules


def _chain() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Gain(4), nn.BatchNorm2d(4))).eval()


class _Branches(nn.Module):
    """A two-branch block: ``bn1(conv1(x)) + bn2(gain(conv2(x)))``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.gain, self.bn2 = nn.Conv2d(4, 4, 1, bias=False), Gain(4), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv1(x)) + self.bn2(self.gain(self.conv2(x)))


X = torch.randn(2, 3, 8, 8)


def _has(model: nn.Module, cls: type) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


def test_the_registry_is_not_the_default_one() -> None:
    assert default_rules().lookup(Gain) is None and _rules().lookup(Gain) is _lower_gain


@pytest.mark.parametrize("entry", [rc.fold, rc.deploy])
def test_fold_and_deploy_use_the_given_registry(entry) -> None:
    model = _chain()
    folded = entry(model, X, rules=_rules())
    assert not _has(folded, Gain) and not _has(folded, nn.BatchNorm2d) and _has(folded, nn.Conv2d) == 1
    assert torch.allclose(folded(X), model(X), atol=1e-5)
    kept = entry(model, X)
    assert _has(kept, Gain) and _has(kept, nn.BatchNorm2d)  # opaque: the BN after it cannot fold either


def test_export_passes_the_registry_to_deploy(tmp_path) -> None:
    result = rc.export(_chain(), tmp_path / "m.pt", X, format="torchscript", rules=_rules())
    assert result.batch_norms == 0 and result.convs == 1
    assert rc.export(_chain(), tmp_path / "n.pt", X, format="torchscript").batch_norms == 1


def test_linearize_uses_the_given_registry() -> None:
    model = randomize_bn(_Branches()).eval()
    assert _has(rc.linearize(model, rules=_rules()), OnlineConv) == 1
    assert _has(rc.linearize(model), OnlineConv) == 0  # the gain branch is opaque: not a linear block


def test_orepa_transform_uses_the_given_registry() -> None:
    model = randomize_bn(_Branches()).eval()
    blocks = (OnlineConv, OfflineBlock)
    assert _has(rc.orepa_transform(model, rules=_rules()), blocks) == 1  # the block linearized whole
    assert _has(rc.orepa_transform(model), blocks) == 2  # each conv wrapped on its own


@pytest.mark.parametrize("entry", ["fold", "deploy", "linearize", "export"])
def test_a_registry_must_be_a_rule_registry(entry, tmp_path) -> None:
    call = {"fold": lambda: rc.fold(_chain(), rules={}), "deploy": lambda: rc.deploy(_chain(), rules={}),
            "linearize": lambda: rc.linearize(_chain(), rules={}),
            "export": lambda: rc.export(_chain(), tmp_path / "m.pt", X, rules={})}[entry]
    with pytest.raises(rc.UnsupportedError, match="rules must be a RuleRegistry"):
        call()


def test_rule_config_registers_into_a_given_registry() -> None:
    rules = default_rules().copy()
    rc.RuleConfig(Gain).lower(_lower_gain).register(rules=rules)
    assert rules.lookup(Gain) is not None and default_rules().lookup(Gain) is None
    assert not _has(rc.fold(_chain(), X, rules=rules), Gain)


def test_rule_config_checks_the_rule_in_the_registry_it_went_into() -> None:
    """``.check()`` of a config registered with ``rules=`` looks the rule up there and folds
    with that registry (the default registry has no rule for ``Gain``)."""
    rules = default_rules().copy()
    config = rc.RuleConfig(Gain).lower(_lower_gain).example(lambda channels: Gain(channels)).register(rules=rules)
    result = config.check(max_examples=4, derandomize=True, dims=(2,))
    assert result.accepted == 4 and default_rules().lookup(Gain) is None
    with pytest.raises(rc.testing.CheckFailure, match="no rule is registered for Gain"):
        rc.testing.check_rule(Gain, lambda channels: Gain(channels), max_examples=2, derandomize=True, dims=(2,))
