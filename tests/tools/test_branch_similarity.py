"""repcompiler.tools.similarity: branch kernels and their pairwise cosine similarity (Fig. 7).

The reference for a real block is computed independently of the algebra's fold: each
branch's equivalent kernel is read off its *unfolded* forward as an impulse response
in float64 (one input per channel, a single 1 in the middle), which also checks that
the kernels are placed in the block's frame as the sum places them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import repcompiler as rc
from repcompiler import algebra as A
from repcompiler.tools.similarity import branch_kernels, branch_similarity, cosine_matrix
from repcompiler.online.conv import OnlineConv


def _online(*branches: A.Expr) -> nn.Module:
    return nn.Sequential(OnlineConv(A.Sum(*branches), block="hand"))


def test_identical_branches_similarity_one():
    w = torch.randn(4, 3, 3, 3)
    model = _online(A.Conv(nn.Parameter(w.clone()), padding=1), A.Conv(nn.Parameter(w.clone()), padding=1))
    sim = branch_similarity(model)["0"]
    assert sim.shape == (2, 2) and sim.dtype == torch.float64
    torch.testing.assert_close(sim, torch.ones(2, 2, dtype=torch.float64))


def test_orthogonal_branches_similarity_zero():
    a, b = torch.zeros(4, 3, 3, 3), torch.zeros(4, 3, 3, 3)
    a[..., 0, :] = torch.randn(4, 3, 3)  # top row only
    b[..., 2, :] = torch.randn(4, 3, 3)  # bottom row only
    model = _online(A.Conv(nn.Parameter(a), padding=1), A.Conv(nn.Parameter(b), padding=1))
    sim = branch_similarity(model)["0"]
    assert abs(sim[0, 1].item()) < 1e-12 and abs(sim[1, 0].item()) < 1e-12


def test_smaller_branch_is_placed_in_the_block_frame():
    """A 1x1 branch is compared at the centre tap of the 3x3 frame: equal to a 3x3
    kernel that is only that centre tap (1), orthogonal to one with a zero centre (0)."""
    w1 = torch.randn(4, 3, 1, 1)
    centre = torch.zeros(4, 3, 3, 3)
    centre[..., 1:2, 1:2] = w1
    ring = torch.randn(4, 3, 3, 3)
    ring[..., 1, 1] = 0
    model = _online(A.Conv(nn.Parameter(w1)), A.Conv(nn.Parameter(centre), padding=1),
                    A.Conv(nn.Parameter(ring), padding=1))
    sim = branch_similarity(model)["0"]
    assert sim[0, 1].item() == pytest.approx(1.0, abs=1e-12)
    assert abs(sim[0, 2].item()) < 1e-12


def test_zero_branch_is_nan_and_kernels_sum_to_the_block():
    w = torch.randn(4, 3, 3, 3)
    expr = A.Sum(A.Conv(nn.Parameter(w), padding=1), A.Conv(nn.Parameter(torch.zeros(4, 3, 1, 1))))
    sim = cosine_matrix(branch_kernels(expr))
    assert torch.isnan(sim[1]).all() and torch.isnan(sim[:, 1]).all() and sim[0, 0].item() == pytest.approx(1.0, abs=1e-12)
    torch.testing.assert_close(sum(branch_kernels(expr)), expr.fold().weight.detach())


class _Net(nn.Module):
    def __init__(self, dims: int, k: int, groups: int) -> None:
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv1d
        bn = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
        self.conv = conv(4, 6, k, padding=k // 2, groups=groups, bias=False)
        self.bn = bn(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def _impulse_kernels(block: OnlineConv, dims: int) -> list[torch.Tensor]:
    """Each branch's kernel ``[O, C, *k]`` (dense over groups) from its unfolded forward."""
    conv_spec = block.expr.spec
    k, pad = conv_spec.kernel_size[0], conv_spec.padding[0][0]
    C = conv_spec.in_channels
    n = 2 * k + 1
    x = torch.zeros(C, C, *(n,) * dims, dtype=torch.float64)
    q = k
    for c in range(C):
        x[(c, c) + (q,) * dims] = 1.0
    out = []
    with torch.no_grad():
        for term in block.expr.terms:
            y = term(x)  # [C (which impulse), O, *spatial]
            idx = torch.tensor([q + pad - j for j in range(k)])  # output position for tap j
            for d in range(dims):
                y = y.index_select(2 + d, idx)
            out.append(y.transpose(0, 1).contiguous())  # [O, C, *k]
    return out


def _reference_similarity(kernels: list[torch.Tensor]) -> torch.Tensor:
    B = len(kernels)
    ref = torch.empty(B, B, dtype=torch.float64)
    for i in range(B):
        for j in range(B):
            a, b = kernels[i].reshape(-1), kernels[j].reshape(-1)
            ref[i, j] = torch.dot(a, b) / (a.norm() * b.norm())
    return ref


@pytest.mark.parametrize("dims,k,groups", [(2, 3, 1), (2, 3, 2), (1, 5, 1)])
def test_real_orepa_block_matches_float64_impulse_reference(dims, k, groups):
    torch.manual_seed(0)
    model = rc.orepa_transform(_Net(dims, k, groups), policy={"*": "orepa"})  # not the deep stem
    with torch.no_grad():  # trained-looking scales: every branch non-zero, per-channel different
        for name, p in model.named_parameters():
            if p.dim() == 1 or p.numel() == 1:
                p.copy_(torch.randn_like(p))
            else:
                p.add_(0.1 * torch.randn_like(p))
    before = copy.deepcopy(model.state_dict())
    sim = branch_similarity(model)
    assert list(sim) == ["conv"] and sim["conv"].shape == (6, 6)
    for key, value in model.state_dict().items():  # the model is not modified
        assert torch.equal(value, before[key])

    ref_model = copy.deepcopy(model).double()
    block = ref_model.conv
    ref = _reference_similarity(_impulse_kernels(block, dims))
    torch.testing.assert_close(branch_similarity(ref_model)["conv"], ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(sim["conv"], ref, rtol=0, atol=1e-5)  # float32 model
    assert (ref - torch.eye(6, dtype=torch.float64)).abs().max() > 1e-3  # not trivially the identity


def test_deep_stem_reports_each_stage_and_plain_model_is_empty():
    class Stem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
            self.bn = nn.BatchNorm2d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.bn(self.conv(x))

    model = rc.orepa_transform(Stem())
    sim = branch_similarity(model)
    assert sorted(sim) == [f"conv.branches.stage{i}" for i in range(3)]
    for i, v in enumerate(sim.values()):
        assert v.shape == (6, 6)
        stage = model.get_submodule(f"conv.branches.stage{i}")
        assert len(stage.terms) == 6 and len(stage.branches) == 6  # a declared OREPA block per stage
    assert branch_similarity(Stem()) == {}


def test_not_a_module_raises():
    with pytest.raises(rc.UnsupportedError, match="branch_similarity"):
        branch_similarity([1, 2])  # type: ignore[arg-type]
