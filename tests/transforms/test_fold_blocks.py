"""fold on training-time blocks written from the papers: one conv per block, same output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import repcompiler
from fixtures_blocks import (
    ACBlock,
    DBBBlock,
    MobileOneBlock,
    RepVGGBlock,
    RepVGGNet,
    count_convs,
    randomize_bn,
)

GEOMS = [
    dict(in_channels=6, out_channels=6),
    dict(in_channels=6, out_channels=12, stride=2),
    dict(in_channels=6, out_channels=6, groups=3),
    dict(in_channels=6, out_channels=6, groups=6),
]
BLOCKS = [RepVGGBlock, DBBBlock, ACBlock, MobileOneBlock]


def _check_one_conv(block: nn.Module, cin: int, size: int = 11) -> repcompiler.FoldReport:
    block = randomize_bn(block.double(), seed=3).eval()
    x = torch.randn(2, cin, size, size, dtype=torch.float64)
    with torch.no_grad():
        want = block(x)
    folded, report = repcompiler.fold(block, return_report=True)
    assert count_convs(folded) == 1, report
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules()), report
    with torch.no_grad():
        got = folded(x)
        # odd sizes and borders: the fold must be exact everywhere
        x2 = torch.randn(1, cin, size + 3, size - 2, dtype=torch.float64)
        assert torch.allclose(folded(x2), block(x2), rtol=1e-10, atol=1e-10)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)
    assert len(report.folded) == 1 and not report.refused, report
    return report


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: "-".join(f"{k[0]}{v}" for k, v in g.items()))
@pytest.mark.parametrize("block_cls", BLOCKS, ids=lambda c: c.__name__)
def test_block_folds_to_one_conv(block_cls, geom):
    _check_one_conv(block_cls(**geom), geom["in_channels"])


@pytest.mark.parametrize("k", [1, 5])
def test_dbb_and_acnet_other_kernel_sizes(k):
    if k > 1:
        _check_one_conv(DBBBlock(4, 8, kernel_size=k), 4)
    _check_one_conv(ACBlock(4, 4, kernel_size=k if k > 1 else 3), 4)


def test_mobileone_k_branches():
    for n in (1, 2, 4):
        _check_one_conv(MobileOneBlock(4, 4, num_branches=n), 4)


def test_block_keeps_class_methods_and_pickles(tmp_path):
    block = randomize_bn(DBBBlock(4, 4)).eval()
    folded = repcompiler.fold(block)
    assert isinstance(folded, DBBBlock) and type(folded).__name__ == "DBBBlock"
    assert folded is not block and count_convs(block) > 1  # user's model untouched
    x = torch.randn(1, 4, 9, 9)
    torch.save(folded, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert isinstance(loaded, DBBBlock)
    assert torch.equal(loaded(x), folded(x))
    import copy

    assert torch.equal(copy.deepcopy(folded)(x), folded(x))


def test_repvgg_net_one_conv_per_block_and_names_kept():
    net = randomize_bn(RepVGGNet()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = net(x)
    folded, report = repcompiler.fold(net, x, return_report=True)
    assert count_convs(folded) == net.num_blocks
    assert torch.allclose(folded(x), want, rtol=1e-5, atol=1e-5)
    assert isinstance(folded, RepVGGNet)
    for i, blk in enumerate(folded.stages):
        assert isinstance(blk, RepVGGBlock)
        assert isinstance(blk.rbr_dense.conv, nn.Conv2d) and blk.rbr_dense.conv.bias is not None
    keys = set(folded.state_dict())
    assert "linear.weight" in keys and "stages.0.rbr_dense.conv.weight" in keys
    assert not any("rbr_1x1" in k or ".bn." in k for k in keys)
    assert report.convs_before == 2 * net.num_blocks and report.convs_after == net.num_blocks
    assert report.params_after < report.params_before


def test_fold_inplace_edits_the_given_model():
    net = randomize_bn(RepVGGNet()).eval()
    out = repcompiler.fold(net, inplace=True)
    assert out is net and count_convs(net) == net.num_blocks


def test_fold_leaves_train_mode_model_untouched():
    net = randomize_bn(RepVGGNet()).train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    folded = repcompiler.fold(net)
    assert net.training and not folded.training
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
