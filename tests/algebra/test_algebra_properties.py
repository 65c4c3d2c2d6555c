"""Property tests of the kernel algebra on random expression trees (hypothesis).

Trees have depth >= 3 and mix every leaf (Conv with random geometry, Affine / Scale /
Bias / Constant, BatchNorm with random statistics, Identity, AvgPool incl.
``count_include_pad=False`` and ``ceil_mode``, ZeroPad) and every combinator (Seq, Sum,
Concat), in 1-d, 2-d and 3-d, with random input sizes (strided windows often leave a
remainder). Properties:

* claimed exact  -> fold equals the unfolded expression, float64 (< 1e-10) and
  float32 (< 1e-5); ``to_conv()`` is a plain conv equal to it; gradients w.r.t. every
  leaf parameter and the input agree (float64);
* claimed inexact -> the unchecked fold still agrees on the interior (outputs whose
  window lies inside the input), so the reasons only ever concern borders / shapes.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st
from torch import nn

from algebra_strategies import float_copy, trees, working_size
from helpers import rel_err
from repcompiler.errors import IncompatibleError, InexactFoldError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# at least 200 in CI; ALGEBRA_EXAMPLES lowers it for a quick local run
N_EXAMPLES = int(os.environ.get("ALGEBRA_EXAMPLES", "200"))

SETTINGS = settings(
    max_examples=N_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)

EXTRA = st.integers(0, 4)


def _size(data, case, spread=EXTRA, interior=False):
    extra = tuple(data.draw(spread) for _ in range(case.dims))
    size = working_size(case.expr, case.dims, case.cin, extra, interior=interior)
    assume(size is not None)
    note(f"input size {size}")
    return size


@SETTINGS
@given(data=st.data(), case=trees(lean=True))
def test_exact_trees_fold_to_conv_and_gradients(data, case):
    """Claimed exact -> (1) the fold equals the unfolded expression in float64 and in
    float32, (2) ``to_conv()`` is a plain conv equal to it, (3) gradients w.r.t. every
    leaf parameter and the input agree."""
    expr = case.expr
    assume(expr.exactness().exact)
    size = _size(data, case)
    note(repr(expr))
    x = case.input(size)
    spec = expr.spec

    # (1) float64 and float32
    with torch.no_grad():
        kernel = expr.fold()
        ref = expr(x)
        out = kernel.apply(x)
        assert kernel.spec == spec
        assert kernel.weight.shape == (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel_size)
        assert spec.output_size(size) == tuple(ref.shape[2:])
        assert rel_err(out, ref) < 1e-10
        e32 = float_copy(expr)
        x32 = x.float()
        ref32 = e32(x32)
        out32 = e32.fold().apply(x32)
        assert out32.dtype == torch.float32
        assert rel_err(out32, ref32) < 1e-5

    # (2) to_conv: a plain ConvNd (ConstantPadNd(0) -> ConvNd for asymmetric padding)
    module = expr.to_conv()
    conv_type = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[case.dims]
    if spec.symmetric_padding:
        assert type(module) is conv_type
        conv = module
    else:
        assert isinstance(module, nn.Sequential) and type(module[1]) is conv_type
        assert module[0].value == 0.0
        conv = module[1]
    assert conv.groups == spec.groups and tuple(conv.stride) == spec.stride
    assert tuple(conv.dilation) == spec.dilation and (conv.bias is not None) == spec.has_bias
    with torch.no_grad():
        assert rel_err(module(x), ref) < 1e-10
        conv.weight.zero_()  # a detached copy: the expression is untouched
        assert rel_err(expr.fold().apply(x), ref) < 1e-10

    # (3) gradients (float64)
    named = [(n, p) for n, p in expr.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    xg = x.clone().requires_grad_(True)
    ref = expr(xg)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(case.seed), dtype=torch.float64)
    grads_ref = torch.autograd.grad((ref * g).sum(), [xg, *params], allow_unused=True)
    grads = torch.autograd.grad((expr.fold().apply(xg) * g).sum(), [xg, *params], allow_unused=True)
    for name, a, b in zip(["input"] + [n for n, _ in named], grads, grads_ref):
        assert (a is None) == (b is None), name
        if b is not None:
            assert rel_err(a, b) < 1e-9, name


def _interior(spec, size):
    """Per-dim output slices whose folded window lies entirely inside the input."""
    out = []
    for n, (l, _), e, s in zip(size, spec.padding, spec.extent, spec.stride):
        lo = -(-l // s)
        hi = (n - 1 - e + l) // s
        if hi < lo:
            return None
        out.append(slice(lo, hi + 1))
    return tuple(out)


@SETTINGS
@given(data=st.data(), case=trees(align=True))
def test_inexact_trees_agree_in_the_interior(data, case):
    """Where the algebra says "not exact", the unchecked fold is still right away from
    the borders (and fold() refuses it by default)."""
    expr = case.expr
    spec, reasons = expr.plan()
    assume(reasons)
    with pytest.raises(InexactFoldError):
        expr.fold()
    assume(spec is not None)
    size = _size(data, case, st.integers(0, 5), interior=True)
    x = case.input(size)
    with torch.no_grad():
        try:
            ref = expr(x)
        except IncompatibleError:
            assume(False)
        out = expr.fold(check=False).apply(x)
    assume(out.shape == ref.shape)
    sl = _interior(spec, size)
    assume(sl is not None)
    idx = (slice(None), slice(None)) + sl
    assert rel_err(out[idx], ref[idx]) < 1e-10


@settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=trees(min_depth=1, max_depth=2))
def test_plan_is_consistent_with_fold(case):
    """``plan()``'s spec is the geometry fold() produces, for exact and inexact trees."""
    spec, reasons = case.expr.plan()
    assume(spec is not None)
    with torch.no_grad():
        k = case.expr.fold(check=False)
    assert k.spec == spec
    assert k.weight.shape == (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel_size)
    assert (k.bias is not None) == spec.has_bias
    assert case.expr.exactness().exact == (not reasons)
    assert bool(case.expr.exactness()) == (not reasons)
