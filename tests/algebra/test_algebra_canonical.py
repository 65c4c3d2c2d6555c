"""The known-exact canonical blocks are claimed exact and fold to equal convs, and the
known-inexact compositions are claimed inexact *and really differ* on some input.

Everything in float64, eval mode, BatchNorm with randomized statistics.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import repcompiler.algebra as A
from helpers import randomize_bn, rel_err
from repcompiler.errors import IncompatibleError, InexactFoldError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_SEED = iter(range(10_000))


def conv(dims, cin, cout, k, stride=1, padding=0, dilation=1, groups=1, bias=False):
    m = _CONV[dims](cin, cout, k, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    torch.manual_seed(next(_SEED))
    with torch.no_grad():
        m.weight.normal_(0, 1 / math.sqrt(m.weight[0].numel()))
        if bias:
            m.bias.normal_(0, 0.5)
    return A.Conv.from_module(m.double())


def bn(dims, c):
    return A.BatchNorm(randomize_bn(_BN[dims](c).double(), next(_SEED)).eval())


def check_exact(expr, dims, cin, sizes):
    """Claimed exact, and equal for every size in ``sizes`` (incl. strided remainders)."""
    expr = expr.double().eval()
    ex = expr.exactness()
    assert ex.exact, str(ex)
    assert str(ex) == "exact"
    kernel = expr.fold()
    plain = expr.to_conv()
    for n in sizes:
        x = torch.randn(2, cin, *([n] * dims), dtype=torch.float64)
        with torch.no_grad():
            ref = expr(x)
            assert rel_err(kernel.apply(x), ref) < 1e-10
            assert rel_err(plain(x), ref) < 1e-10
    return kernel


def check_inexact(expr, dims, cin, sizes, must_mention=()):
    """Claimed inexact, fold() refuses, and the unchecked fold really differs (or the
    shapes differ) for at least one size."""
    expr = expr.double().eval()
    ex = expr.exactness()
    assert not ex.exact and not bool(ex)
    assert str(ex).startswith("not exact: ")
    for word in must_mention:
        assert word in str(ex), (word, str(ex))
    with pytest.raises(InexactFoldError):
        expr.fold()
    with pytest.raises(InexactFoldError):
        expr.to_conv()
    differs = False
    for n in sizes:
        x = torch.randn(2, cin, *([n] * dims), dtype=torch.float64)
        with torch.no_grad():
            try:
                ref = expr(x)
            except (IncompatibleError, RuntimeError):  # branch outputs of different shapes
                differs = True
                continue
            try:
                out = expr.fold(check=False).apply(x)
            except InexactFoldError:  # no common frame at all (e.g. strides differ)
                differs = True
                continue
        if out.shape != ref.shape or rel_err(out, ref) > 1e-6:
            differs = True
    assert differs, "the algebra calls this inexact but no input showed a difference"
    return ex


DIMS = [1, 2, 3]


# -- RepVGG ----------------------------------------------------------------------------
@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("stride", [1, 2])
def test_repvgg(dims, stride):
    c = 4
    block = (conv(dims, c, c, 3, stride, 1) >> bn(dims, c)) + (conv(dims, c, c, 1, stride) >> bn(dims, c))
    if stride == 1:
        block = block + (A.Identity(c, dims) >> bn(dims, c))
    k = check_exact(block, dims, c, [5, 6, 7])
    assert k.spec.kernel_size == (3,) * dims and k.spec.padding == ((1, 1),) * dims
    assert k.spec.stride == (stride,) * dims


@pytest.mark.parametrize("groups", [1, 2])
def test_repvgg_grouped(groups):
    c = 4
    block = (conv(2, c, c, 3, 1, 1, groups=groups) >> bn(2, c)) + (conv(2, c, c, 1, groups=groups) >> bn(2, c)) + (
        A.Identity(c, 2) >> bn(2, c))
    k = check_exact(block, 2, c, [6, 7])
    assert k.spec.groups == groups


# -- DBB -------------------------------------------------------------------------------
def dbb(dims, cin, cout, k, stride, groups=1):
    p = k // 2
    mid = cin  # DBB's internal channels for the 1x1-kxk branch (identity-init in the paper)
    kxk = conv(dims, cin, cout, k, stride, p, groups=groups) >> bn(dims, cout)
    one = conv(dims, cin, cout, 1, stride, groups=groups) >> bn(dims, cout)
    avg = (conv(dims, cin, cout, 1, groups=groups) >> A.ZeroPad(cout, dims, p) >> bn(dims, cout)
           >> A.AvgPool(cout, dims, k, stride, 0) >> bn(dims, cout))
    kk = (conv(dims, cin, mid, 1, groups=groups) >> A.ZeroPad(mid, dims, p) >> bn(dims, mid)
          >> conv(dims, mid, cout, k, stride, 0, groups=groups) >> bn(dims, cout))
    return kxk + one + avg + kk


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 1)])
def test_dbb(dims, k, stride):
    if dims == 3 and k == 5:
        pytest.skip("kept small")
    c = 4
    kern = check_exact(dbb(dims, c, c, k, stride), dims, c, [k + 2, k + 3, k + 4])
    assert kern.spec.kernel_size == (k,) * dims


def test_dbb_grouped_and_asymmetric_channels():
    check_exact(dbb(2, 4, 6, 3, 1, groups=2), 2, 4, [5, 6])


def test_dbb_branches_separately():
    c, d = 3, 2
    p = 1
    avg = (conv(d, c, c, 1) >> A.ZeroPad(c, d, p) >> bn(d, c) >> A.AvgPool(c, d, 3, 1, 0) >> bn(d, c))
    kk = (conv(d, c, c, 1) >> A.ZeroPad(c, d, p) >> bn(d, c) >> conv(d, c, c, 3, 1, 0) >> bn(d, c))
    check_exact(avg, d, c, [4, 5])
    check_exact(kk, d, c, [4, 5])
    # the DBB branch is *not* exact if the BN sits before the padding (pads with zeros, not BN(0))
    bad = (conv(d, c, c, 1) >> bn(d, c) >> A.ZeroPad(c, d, p) >> conv(d, c, c, 3, 1, 0) >> bn(d, c))
    check_inexact(bad, d, c, [4, 5], must_mention=["bias"])


# -- ACNet -----------------------------------------------------------------------------
@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 1)])
def test_acnet(k, stride):
    c, p = 4, k // 2
    block = ((conv(2, c, c, k, stride, p) >> bn(2, c)) + (conv(2, c, c, (1, k), stride, (0, p)) >> bn(2, c))
             + (conv(2, c, c, (k, 1), stride, (p, 0)) >> bn(2, c)))
    kern = check_exact(block, 2, c, [k + 1, k + 2, k + 3])
    assert kern.spec.kernel_size == (k, k)


# -- depthwise then pointwise, conv -> BN ------------------------------------------------
@pytest.mark.parametrize("dims", DIMS)
def test_depthwise_then_pointwise(dims):
    c, o = 4, 6
    e = conv(dims, c, c, 3, 1, 1, groups=c, bias=True) >> conv(dims, c, o, 1, bias=True) >> bn(dims, o)
    kern = check_exact(e, dims, c, [4, 5])
    assert kern.spec.groups == 1 and kern.spec.kernel_size == (3,) * dims


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("kw", [dict(k=3, stride=2, padding=1, bias=True), dict(k=2, dilation=2, padding=1),
                                dict(k=3, groups=2, padding=1), dict(k=1, stride=3)])
def test_conv_then_bn(dims, kw):
    kw = dict(kw)
    k = kw.pop("k")
    c = 4
    e = conv(dims, c, c, k, **kw) >> bn(dims, c)
    kern = check_exact(e, dims, c, [5, 6, 7, 8])
    assert kern.bias is not None


# -- strided then dilated ---------------------------------------------------------------
@pytest.mark.parametrize("dims", [1, 2])
def test_strided_then_dilated_composition(dims):
    c = 3
    # stride 2 then a dilated conv (no padding in the second): taps k1 + 2*d2*k2
    e = conv(dims, c, c, 3, 2, 1) >> conv(dims, c, c, 3, 1, 0, dilation=2)
    kern = check_exact(e, dims, c, [11, 12, 13, 14])
    assert kern.spec.stride == (2,) * dims
    assert kern.spec.kernel_size == (11,) * dims and kern.spec.dilation == (1,) * dims
    # pointwise stride 2 then a padded 3x3: a dilated conv, exact (the 1x1 reads no border)
    e = conv(dims, c, c, 1, 2) >> conv(dims, c, c, 3, 1, 1)
    kern = check_exact(e, dims, c, [5, 6, 7])
    assert kern.spec.dilation == (2,) * dims and kern.spec.padding == ((2, 2),) * dims
    # dilated then strided
    e = conv(dims, c, c, 3, 1, 0, dilation=2) >> conv(dims, c, c, 3, 2, 0)
    kern = check_exact(e, dims, c, [9, 10, 11])
    assert kern.spec.dilation == (1,) * dims  # gcd(2, 1)
    # both dilated by 2: stays on dilation 2
    e = conv(dims, c, c, 3, 1, 0, dilation=2) >> conv(dims, c, c, 3, 1, 0, dilation=2)
    kern = check_exact(e, dims, c, [9, 10])
    assert kern.spec.dilation == (2,) * dims and kern.spec.kernel_size == (5,) * dims


def test_patchify_then_padded_conv():
    c = 3
    # even kernel, stride 2, padded right by 1: the output beyond the border reads only zeros
    e = conv(2, c, c, 2, 2, ((0, 1), (0, 1))) >> conv(2, c, c, 3, 1, 1)
    check_exact(e, 2, c, [6, 7, 8])
    bad = conv(2, c, c, 2, 2, 0) >> conv(2, c, c, 3, 1, 1)
    check_inexact(bad, 2, c, [6, 7, 8], must_mention=["right in dims 0, 1"])


def test_grouped_plus_dense_is_block_diagonal():
    c = 4
    e = conv(2, c, c, 3, 1, 1, groups=2) + conv(2, c, c, 3, 1, 1) + conv(2, c, c, 1, groups=4)
    kern = check_exact(e, 2, c, [5])
    assert kern.spec.groups == 1
    e = conv(2, c, c, 3, 1, 1, groups=2) + conv(2, c, c, 1, groups=4)
    kern = check_exact(e, 2, c, [5])
    assert kern.spec.groups == 2


def test_concat_of_branches():
    c = 3
    e = A.Concat(conv(2, c, 2, 3, 1, 1) >> bn(2, 2), conv(2, c, 4, 1, bias=True), A.AvgPool(c, 2, 3, 1, 1))
    kern = check_exact(e, 2, c, [4, 5])
    assert kern.spec.out_channels == 9


def test_orepa_like_block():
    c, d = 4, 2
    block = A.Sum(
        conv(d, c, c, 3, 1, 1) >> A.Scale(c, d, 0.25),
        conv(d, c, c, 1) >> A.ZeroPad(c, d, 1) >> A.AvgPool(c, d, 3, 1) >> A.Scale(c, d, 0.25),
        conv(d, c, c, 1) >> A.ZeroPad(c, d, 1) >> conv(d, c, c, 3) >> A.Scale(c, d, 0.5),
        conv(d, c, c, 1) >> A.Scale(c, d, 1.0),
        conv(d, c, 8 * c, 3, 1, 1, groups=c) >> conv(d, 8 * c, c, 1) >> A.Scale(c, d, 0.5),
    ) >> bn(d, c)
    check_exact(block, d, c, [4, 5, 6])


# -- the inexact ones really differ -------------------------------------------------------
@pytest.mark.parametrize("dims", DIMS)
def test_two_padded_3x3_are_not_one_5x5(dims):
    c = 2
    e = conv(dims, c, c, 3, 1, 1) >> conv(dims, c, c, 3, 1, 1)
    ex = check_inexact(e, dims, c, [5, 6])
    assert len(ex.reasons) == 1  # one message per pair, naming the dims
    dims_text = "dim 0" if dims == 1 else "dims " + ", ".join(map(str, range(dims)))
    assert f"left in {dims_text}" in ex.reasons[0] and f"right in {dims_text}" in ex.reasons[0]
    # but unpadded they compose exactly to one 5x5
    kern = check_exact(conv(dims, c, c, 3) >> conv(dims, c, c, 3), dims, c, [5, 6])
    assert kern.spec.kernel_size == (5,) * dims


def test_biased_conv_then_padded_conv():
    c = 2
    e = conv(2, c, c, 1, bias=True) >> conv(2, c, c, 3, 1, 1)
    ex = check_inexact(e, 2, c, [4, 5], must_mention=["bias"])
    assert len(ex.reasons) == 1 and "beyond the border" not in ex.reasons[0]
    # without the bias it is exact; with the bias but no padding too
    check_exact(conv(2, c, c, 1) >> conv(2, c, c, 3, 1, 1), 2, c, [4])
    check_exact(conv(2, c, c, 1, bias=True) >> conv(2, c, c, 3), 2, c, [4])
    # a bias from a BN before a padded conv: same story
    check_inexact(conv(2, c, c, 1) >> bn(2, c) >> conv(2, c, c, 3, 1, 1), 2, c, [4], must_mention=["bias"])


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_avgpool_count_include_pad_false(dims):
    c = 2
    check_inexact(A.AvgPool(c, dims, 3, 1, 1, count_include_pad=False), dims, c, [4, 5],
                  must_mention=["count_include_pad=False"])
    check_exact(A.AvgPool(c, dims, 3, 1, 1, count_include_pad=True), dims, c, [4, 5])
    check_exact(A.AvgPool(c, dims, 3, 2, 0, count_include_pad=False), dims, c, [5, 6])
    if dims > 1:
        check_exact(A.AvgPool(c, dims, 3, 1, 1, count_include_pad=False, divisor_override=9), dims, c, [4, 5])


def test_avgpool_ceil_mode():
    c = 2
    check_inexact(A.AvgPool(c, 2, 3, 2, 0, ceil_mode=True), 2, c, [6, 7, 8], must_mention=["ceil_mode"])
    check_exact(A.AvgPool(c, 2, 3, 1, 1, ceil_mode=True), 2, c, [5, 6])


def test_misaligned_branches():
    c = 2
    check_inexact(conv(2, c, c, 3) + conv(2, c, c, 1), 2, c, [5], must_mention=["do not align"])
    check_inexact(conv(2, c, c, 3, 2, 1) + conv(2, c, c, 3, 1, 1), 2, c, [5], must_mention=["strides differ"])
    check_inexact(A.Identity(c, 2) + conv(2, c, c, 3, 2, 1), 2, c, [5], must_mention=["strides differ"])
    # aligned although different windows: 3x3 p1 + 5x5 p2 + 1x3 p(0,1) + 3x3 d2 p2
    e = conv(2, c, c, 3, 1, 1) + conv(2, c, c, 5, 1, 2) + conv(2, c, c, (1, 3), 1, (0, 1)) + conv(
        2, c, c, 3, 1, 2, dilation=2)
    check_exact(e, 2, c, [5, 6])


def test_padding_after_extent_inexact_each_side():
    c = 2
    # left only: conv reads the input at output -1 (extent 2 > padding 0 + stride 1 - 1)
    e = conv(1, c, c, 3, 1, ((0, 2),)) >> conv(1, c, c, 3, 1, ((1, 0),))
    ex = check_inexact(e, 1, c, [5, 6])
    assert "left in dim 0" in ex.reasons[0] and "right" not in ex.reasons[0]
    # right only
    e = conv(1, c, c, 3, 1, ((2, 0),)) >> conv(1, c, c, 3, 1, ((0, 1),))
    ex = check_inexact(e, 1, c, [5, 6])
    assert "right in dim 0" in ex.reasons[0] and "left" not in ex.reasons[0]
    # fully padded first conv ("full" convolution): exact on both sides
    check_exact(conv(1, c, c, 3, 1, 2) >> conv(1, c, c, 3, 1, 1), 1, c, [5, 6])


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_avgpool_on_inputs_smaller_than_its_kernel(dims, size):
    """avg_pool3d refuses inputs smaller than the kernel even when padding makes room;
    the leaf pads explicitly there, and still equals its folded kernel."""
    pool = A.AvgPool(4, dims, (3,) * dims, (1,) * dims, (1,) * dims, False, True).double()
    x = torch.randn(2, 4, *([size] * dims), dtype=torch.float64)
    y = pool(x)
    assert y.shape == x.shape
    assert rel_err(pool.fold().apply(x), y) < 1e-12


def test_offline_3d_orepa_runs_on_one_pixel_inputs():
    import repcompiler as rc

    m = nn.Sequential(nn.Conv3d(4, 8, 3, padding=1), nn.BatchNorm3d(8)).double()
    off = rc.orepa_transform(m, mode="offline").double()
    with torch.no_grad():
        for _ in range(2):  # non-trivial BN statistics in every branch
            off.train()(torch.randn(4, 4, 3, 3, 3, dtype=torch.float64))
    off.eval()
    x = torch.randn(2, 4, 1, 1, 1, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(rc.deploy(off)(x), off(x)) < 1e-10
