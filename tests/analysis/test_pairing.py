"""Which BatchNorm follows each conv (repcompiler.analysis.pairing), checked directly.

A conv is paired with a BN when the BN is the conv output's only user (in the traced
graph, with the analysis ``orepa_transform`` runs), or with a norm-plus-activation module
that is its only user; parts that do not trace pair by sibling order in the parent.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from repcompiler.analysis.pairing import pair_by_order, pair_by_regions
from repcompiler.analysis.regions import analyse_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _pairs(model: nn.Module) -> dict[str, str | None]:
    """The pairing as orepa_transform reads it: one training-mode analysis."""
    analysis = analyse_model(model, training=True, bns_become_scales=True)
    pairs, _, _, _ = pair_by_regions(model, analysis)
    return pairs


def _block(c: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())


def test_conv_then_bn_is_paired() -> None:
    model = nn.Sequential(_block(), _block())
    analysis = analyse_model(model, training=True, bns_become_scales=True)
    pairs, order, covered, skipped = pair_by_regions(model, analysis)
    assert pairs == {"0.0": "0.1", "1.0": "1.1"}
    assert order == ["0.0", "1.0"]
    assert covered == {""} and skipped == []


def test_pairing_traces_by_itself_without_an_analysis() -> None:
    pairs, order, _, _ = pair_by_regions(nn.Sequential(_block(), _block()))
    assert pairs == {"0.0": "0.1", "1.0": "1.1"} and order == ["0.0", "1.0"]


def test_conv_without_bn_is_paired_with_none() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1))
    assert _pairs(model) == {"0": None, "2": None}


def test_bn_after_a_nonlinear_op_is_not_the_conv_post_bn() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    assert _pairs(model) == {"0": None}


class _ConvUsedTwice(nn.Module):
    """One conv module called on two inputs, each call followed by its own BN."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(4)
        self.bn_b = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_a(self.conv(x)) + self.bn_b(self.conv(torch.relu(x)))


def test_conv_called_twice_has_no_single_post_bn() -> None:
    assert _pairs(_ConvUsedTwice()) == {"conv": None}


class _OutputUsedTwice(nn.Module):
    """A conv whose output feeds its BN and a residual sum: the BN is not its only user."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_conv_output_read_elsewhere_is_not_paired() -> None:
    assert _pairs(_OutputUsedTwice()) == {"conv": None}


class _BNSiLU(nn.BatchNorm2d):
    """A norm-plus-activation module in timm's style: F.batch_norm, then F.silu."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return F.silu(x)


def test_norm_act_module_is_the_conv_post_bn() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _BNSiLU(4), nn.Conv2d(4, 4, 1))
    assert _pairs(model) == {"0": "1", "2": None}


def test_timm_batchnorm_act_is_the_conv_post_bn() -> None:
    timm_norm_act = pytest.importorskip("timm.layers.norm_act")
    model = nn.Sequential(nn.Conv2d(3, 4, 3), timm_norm_act.BatchNormAct2d(4, act_layer=nn.ReLU))
    assert _pairs(model) == {"0": "1"}


def test_norm_act_over_other_channels_is_not_paired() -> None:
    class Mismatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = _BNSiLU(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.norm(self.conv(x)[:, :2])

    assert _pairs(Mismatch()) == {"conv": None}


def test_channels_last_model_pairs_the_same() -> None:
    model = nn.Sequential(_block(), nn.Conv2d(4, 4, 1), _BNSiLU(4)).to(memory_format=torch.channels_last)
    assert _pairs(model) == {"0.0": "0.1", "1": "2"}


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace this forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.Conv2d(4, 4, 1)
        self.wrong = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = self.bn(self.conv(x))
        return self.other(x)


def test_untraced_parts_pair_by_sibling_order() -> None:
    model = nn.Sequential(_block(), _Untraceable())
    analysis = analyse_model(model, training=True, bns_become_scales=True)
    pairs, _, covered, skipped = pair_by_regions(model, analysis)
    assert pairs == {"0.0": "0.1"}  # the traced part
    assert [path for path, _ in skipped] == ["1"] and "module order" in skipped[0][1]
    assert "1" not in covered
    assert pair_by_order(model, "1.conv") == "1.bn"
    assert pair_by_order(model, "1.other") is None  # the next sibling is a BN over other channels
    assert pair_by_order(model, "0.0") == "0.1"
