"""What fold/deploy/transform leave behind and how they report it: a fused conv takes
the name of its largest kernel's conv (timm repvgg_a0's ``conv_kxk.conv``, also in
``quant_report``); fold report rows come in model order; a transform report counts
online blocks as convs; folding a rule-less affine layer into its conv removes the
layer's module and parameters."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repcompiler as rc

from cli_models import tiny_net


class Affine(nn.Module):
    """A per-channel affine with no rule registered: the trace goes into its forward."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.bias = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


class AffineNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.aff = Affine(8)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.aff2 = Affine(8)
        self.scale = Affine(8)  # read by a regularizer-like method too: its parameters stay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.aff(self.conv(x)))
        return torch.relu(self.aff2(self.conv2(y))) + self.scale.weight.sum()


def test_folding_a_ruleless_affine_removes_what_no_longer_runs() -> None:
    torch.manual_seed(0)
    model = AffineNet().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    folded, report = rc.fold(model, (x,), return_report=True)
    assert isinstance(folded.aff, nn.Identity) and isinstance(folded.aff2, nn.Identity)
    assert isinstance(folded.scale, Affine)  # still read outside any folded region
    names = {n for n, _ in folded.named_parameters()}
    assert not any(n.startswith(("aff.", "aff2.")) for n in names) and "scale.weight" in names
    assert report.params_after == report.params_before - 2 * 16
    assert isinstance(model.aff, Affine)  # the user's model is untouched
    with torch.no_grad():
        assert rc.rewrite.verify.relative_error(folded(x), model(x)) < 1e-12


def test_transform_report_counts_online_blocks_as_convs() -> None:
    model, report = rc.orepa_transform(tiny_net(), init="fresh", return_report=True)
    assert report.convs_before == report.convs_after == 3 and "convs 3 -> 3" in report.summary()
    _, deployed = rc.deploy(model.eval(), return_report=True)
    assert deployed.convs_before == deployed.convs_after == 3


@pytest.fixture(scope="module")
def repvgg():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("repvgg_a0", num_classes=10).eval()
    return model, *rc.fold(model, return_report=True)


def test_fused_conv_takes_the_largest_kernels_name(repvgg) -> None:
    _, folded, _ = repvgg
    block = folded.stages[0][0]
    assert isinstance(block.conv_kxk.conv, nn.Conv2d) and block.conv_kxk.conv.kernel_size == (3, 3)
    assert isinstance(block.conv_1x1.conv, nn.Identity)
    report = rc.quant_report(folded, torch.randn(1, 3, 16, 16), max_layers=0)
    names = [row.name for row in report.rows]
    assert "stages.0.0.conv_kxk.conv" in names and not any("conv_1x1" in n for n in names), names[:5]


def test_fold_report_rows_in_model_order(repvgg) -> None:
    model, _, report = repvgg
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    heads = [e.name.split(" ", 1)[0] for e in report.entries]
    positions = [order[h] for h in heads if h in order]
    assert len(positions) == len(heads) > 20 and positions == sorted(positions), heads
