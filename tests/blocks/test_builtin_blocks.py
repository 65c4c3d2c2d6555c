"""Built-in blocks: exact folds (online and offline), geometry, the fast OREPA
kernel generator, the frequency prior, the linear deep stem, the registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import repcompiler.algebra as A
from repcompiler.blocks import (
    ConvGeometry,
    available_blocks,
    build_block,
    dct_basis,
    frequency_prior,
    get_block,
    register_block,
    unregister_block,
)
from repcompiler.blocks.orepa import OREPA_SCALE_INIT
from repcompiler.errors import IncompatibleError, RegistrationError, UnsupportedError

from helpers import assert_kernel_matches_fold, randomize_bn, rel_err

BUILTIN = ["orepa", "orepa_1x1", "orepa_large", "repvgg", "dbb", "acnet", "qarepvgg"]
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def geom(cin, cout, k, *, s=1, p=None, d=1, g=1, dims=2, bias=False) -> ConvGeometry:
    ks = (k,) * dims if isinstance(k, int) else tuple(k)
    ds = (d,) * dims
    if p is None:
        pads = tuple((dd * (kk - 1) // 2, dd * (kk - 1) // 2) for kk, dd in zip(ks, ds))
    elif isinstance(p, int):
        pads = ((p, p),) * dims
    else:
        pads = tuple(p)
    ss = (s,) * dims if isinstance(s, int) else tuple(s)
    return ConvGeometry(cin, cout, ks, ss, pads, ds, g, dims, bias)


def perturb(expr: nn.Module, seed: int = 0) -> nn.Module:
    """Make every parameter non-trivial (scales init 0 / identity deltas init 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expr.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return randomize_bn(expr, seed)


def reference_output_size(gm: ConvGeometry, size: int) -> tuple[int, ...]:
    return gm.spec.output_size((size,) * gm.dims)


GEOMS = [
    geom(4, 6, 3),
    geom(4, 8, 3, s=2, g=2),
    geom(8, 8, 3, g=8),  # depthwise
    geom(8, 16, 3, s=2, g=8),  # depthwise with multiplier
    geom(4, 6, (3, 5), p=((0, 1), (2, 0))),  # asymmetric kernel and padding
    geom(4, 6, 2, p=0),  # even kernel
    geom(3, 5, 5, d=2, bias=True),  # dilated with bias
    geom(4, 6, 3, p=0),  # 'valid'
    geom(4, 4, 3, dims=1),
    geom(3, 4, 3, dims=3),
    geom(4, 6, 1, s=2),
    geom(4, 6, 7, s=2, p=3),
]


@pytest.mark.parametrize("gm", GEOMS, ids=lambda g: g.describe())
@pytest.mark.parametrize("name", BUILTIN)
@pytest.mark.parametrize("mode", ["online", "offline"])
def test_block_folds_exactly(name, gm, mode):
    try:
        expr = build_block(name, gm, mode=mode)
    except UnsupportedError:
        pytest.skip(f"{name} does not apply to {gm.describe()}")
    expr = perturb(expr.double()).eval()
    assert expr.exactness().exact, expr.exactness()
    x = torch.randn(2, gm.in_channels, *([9] * gm.dims), dtype=torch.float64)
    ref = expr(x)
    assert ref.shape[2:] == reference_output_size(gm, 9)
    assert ref.shape[1] == gm.out_channels
    k = expr.fold()
    assert rel_err(k.apply(x), ref) < 1e-12
    # the deployable conv module too
    conv = expr.to_conv()
    assert rel_err(conv(x), ref) < 1e-12


@pytest.mark.parametrize("gm", GEOMS, ids=lambda g: g.describe())
@pytest.mark.parametrize("name", ["orepa", "orepa_1x1", "orepa_large"])
def test_fast_fold_equals_generic_fold(name, gm):
    try:
        expr = build_block(name, gm)
    except UnsupportedError:
        pytest.skip(f"{name} does not apply to {gm.describe()}")
    expr = perturb(expr.double())
    assert expr.has_fast_fold
    assert_kernel_matches_fold(expr, expr.fast_fold())  # kernels and gradients


@settings(deadline=None, max_examples=25)
@given(
    dims=st.sampled_from([1, 2, 3]),
    k=st.integers(2, 4),
    s=st.integers(1, 2),
    d=st.integers(1, 2),
    gidx=st.integers(0, 2),
    pad_extra=st.integers(-1, 1),
    name=st.sampled_from(["orepa", "repvgg", "dbb", "acnet", "qarepvgg"]),
    mode=st.sampled_from(["online", "offline"]),
)
def test_block_geometry_property(dims, k, s, d, gidx, pad_extra, name, mode):
    cin = 4
    g = [1, 2, 4][gidx]
    cout = 4 * (1 + (gidx == 1))
    half = d * (k - 1) // 2
    p = max(0, half + pad_extra)
    gm = geom(cin, cout, k, s=s, p=p, d=d, g=g, dims=dims)
    try:
        expr = build_block(name, gm, mode=mode)
    except UnsupportedError:
        return
    expr = perturb(expr.double()).eval()
    size = 8 if dims < 3 else 6
    x = torch.randn(1, cin, *([size] * dims), dtype=torch.float64)
    ref = expr(x)
    plain = _CONV[dims](cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=False).double()
    assert ref.shape == plain(x).shape
    assert rel_err(expr.fold().apply(x), ref) < 1e-11
    if name == "orepa" and mode == "online":
        assert rel_err(expr.fast_fold().apply(x), ref) < 1e-11


def test_orepa_branch_structure_and_init():
    expr = build_block("orepa", geom(8, 16, 3))
    assert len(expr.terms) == 6
    inits = [t.terms[-1].scale.detach() for t in expr.terms]
    for s, want in zip(inits, OREPA_SCALE_INIT):
        assert s.shape == (16,) and torch.all(s == want)
    # identity-initialised 1x1 -> kxk: equal to the kxk alone at init
    br = expr.terms[3]
    first = br.terms[0].fold().weight
    eye = torch.eye(8).reshape(8, 8, 1, 1)
    assert torch.equal(first, eye)
    # depthwise multiplier 8
    assert expr.terms[5].terms[0].weight.shape == (64, 1, 3, 3)
    # ablation scalings
    s = build_block("orepa", geom(8, 16, 3), scaling="scalar")
    assert all(t.terms[-1].scale.dim() == 0 for t in s.terms)
    n = build_block("orepa", geom(8, 16, 3), scaling="none")
    assert not any(name.split('.')[-1] == 'scale' for name, _ in n.named_parameters())
    assert any(name.split('.')[-1] == 'scale' for name, _ in s.named_parameters())
    assert n.fast_fold().weight.shape == (16, 8, 3, 3)
    assert not any(getattr(b, "scale", None) is not None for b in n.branches.values())  # every branch weighted 1
    # "fixed": the scales stay at their init values - buffers, nothing learns them
    f = build_block("orepa", geom(8, 16, 3), scaling="fixed")
    assert not any(name.split('.')[-1] == 'scale' for name, _ in f.named_parameters())
    fixed = {name.split('.')[-2]: b for name, b in f.named_buffers() if name.endswith(".scale")}
    assert list(fixed) == list(f.branches)
    for (name, b), want in zip(fixed.items(), OREPA_SCALE_INIT):
        assert b.shape == (16,) and torch.all(b == want), name
    torch.testing.assert_close(f.fast_fold().weight, f.fold(check=False).weight)


def test_offline_blocks_have_a_bn_per_branch():
    for name, want in [("orepa", 6), ("repvgg", 3), ("acnet", 3)]:
        expr = build_block(name, geom(8, 8, 3), mode="offline")
        n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in expr.modules())
        assert n_bn == want, name
    dbb = build_block("dbb", geom(8, 8, 3), mode="offline")
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in dbb.modules()) == 6  # 4 + 2 inner


# -- the frequency prior ----------------------------------------------------------------


def _official_prior(out_channels: int, k: int = 3) -> torch.Tensor:
    """The official OREPA prior formula (written for k=3) for comparison."""
    t = torch.zeros(out_channels, k, k)
    half = out_channels / 2
    for i in range(out_channels):
        for h in range(k):
            for w in range(k):
                if i < half:
                    t[i, h, w] = math.cos(math.pi * (h + 0.5) * (i + 1) / 3)
                else:
                    t[i, h, w] = math.cos(math.pi * (w + 0.5) * (i + 1 - half) / 3)
    return t


def test_official_prior_defect_is_fixed():
    off = _official_prior(64)
    zero_official = (off.abs().flatten(1).max(1).values < 1e-6).sum().item()
    assert zero_official >= 64 // 6 - 2  # the defect: ~1/6 of the channels alias to zero
    ours = frequency_prior(64, (3, 3))
    assert (ours.abs().flatten(1).max(1).values > 0.1).all()


@pytest.mark.parametrize("ks", [(2,), (3,), (5,), (2, 2), (3, 3), (4, 4), (5, 5), (7, 7), (3, 5), (1, 3), (3, 3, 3), (2, 3, 4)])
def test_prior_any_kernel(ks):
    prior = frequency_prior(50, ks)
    assert prior.shape == (50, *ks)
    assert torch.isfinite(prior).all()
    assert (prior.abs().flatten(1).max(1).values > 0.1).all(), "a channel's prior is all-zero"
    basis = dct_basis(ks, torch.float64).flatten(1)
    gram = basis @ basis.T
    off = gram - torch.diag(torch.diag(gram))
    assert off.abs().max() < 1e-9  # orthogonal
    assert torch.allclose(basis[-1], torch.ones_like(basis[-1]), atol=1e-12)  # DC last
    n = math.prod(ks)
    if n > 1:  # the first prod(k)-1 channels get distinct non-constant frequencies
        first = frequency_prior(n - 1, ks, torch.float64).flatten(1)
        assert torch.linalg.matrix_rank(first) == n - 1


def test_prior_in_5x5_block_is_finite():
    expr = build_block("orepa", geom(4, 12, 5))
    assert torch.isfinite(expr.fold().weight).all()


# -- linear deep stem ------------------------------------------------------------------


@pytest.mark.parametrize("k,s,p", [(5, 1, 2), (7, 2, 3), (7, 2, 0), (9, 1, 4)])
def test_orepa_large_is_the_composition_of_stacked_3x3(k, s, p):
    gm = geom(3, 8, k, s=s, p=p)
    expr = perturb(build_block("orepa_large", gm).double())
    n = (k - 1) // 2
    assert len(expr.terms) == n
    x = torch.randn(2, 3, 17, 17, dtype=torch.float64)
    # run the stacked 3x3 kernels on the feature map: padding first, stride last
    y = x
    for i, sub in enumerate(expr.terms):
        kern = sub.fold()
        assert kern.weight.shape[-2:] == (3, 3)
        y = F.conv2d(y, kern.weight, kern.bias, stride=s if i == n - 1 else 1, padding=p if i == 0 else 0)
    folded = expr.fold()
    assert folded.weight.shape[-2:] == (k, k)
    assert rel_err(folded.apply(x), y) < 1e-12
    assert rel_err(expr.fast_fold().weight, folded.weight) < 1e-12
    # and it is a true convolution of kernels, not cross-correlation
    k1, k2 = expr.terms[0].fold().weight, expr.terms[1].fold().weight
    if n == 2:
        true = F.conv2d(k1.transpose(0, 1), k2.flip(-1, -2), padding=2).transpose(0, 1)
        xcorr = F.conv2d(k1.transpose(0, 1), k2, padding=2).transpose(0, 1)
        assert rel_err(folded.weight, true) < 1e-12
        assert rel_err(folded.weight, xcorr) > 1e-3


# -- registry ----------------------------------------------------------------------------


def test_registry():
    for name in BUILTIN:
        assert name in available_blocks()
        assert callable(get_block(name))
    with pytest.raises(RegistrationError):
        register_block("orepa", get_block("repvgg"))
    with pytest.raises(RegistrationError):
        get_block("no-such-block")

    def bad(gm, **_):  # wrong output size: kxk without padding
        return A.Conv(torch.randn(gm.out_channels, gm.in_channels, *gm.kernel_size))

    register_block("test_bad_block", bad)
    try:
        with pytest.raises(IncompatibleError, match="output size"):
            build_block("test_bad_block", geom(4, 4, 3))
        register_block("test_bad_block", get_block("repvgg"), override=True)
        assert build_block("test_bad_block", geom(4, 4, 3)).spec.kernel_size == (3, 3)
    finally:
        unregister_block("test_bad_block")


def test_geometry_from_module():
    c = nn.Conv2d(4, 6, (3, 4), padding="same", dilation=2, bias=True)
    gm = ConvGeometry.from_module(c)
    assert gm.padding == ((2, 2), (3, 3)) and gm.bias
    c = nn.Conv1d(4, 6, 4, padding="same")
    assert ConvGeometry.from_module(c).padding == ((1, 2),)
    with pytest.raises(UnsupportedError):
        ConvGeometry.from_module(nn.Linear(2, 2))
