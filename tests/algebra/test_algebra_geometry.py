"""The structural rules of the algebra (``geometry``) against torch, in 1-d where every
case is cheap: output sizes, and the sequence / parallel exactness rules in both
directions (claimed exact -> equal for every size; claimed inexact -> some size differs,
for the cases where the rule is tight: stride-1, undilated second conv)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import repcompiler.algebra as A
from helpers import rel_err

pytestmark = pytest.mark.usefixtures("torch_single_thread")
N_EXAMPLES = int(os.environ.get("ALGEBRA_EXAMPLES", "200"))
SET = settings(max_examples=N_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def conv1d(draw, cin, cout=None, bias=None, stride=None, dilation=None):
    cout = cout or draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    s = stride or draw(st.integers(1, 3))
    d = dilation or draw(st.integers(1, 2))
    pad = ((draw(st.integers(0, 4)), draw(st.integers(0, 4))),)
    b = draw(st.booleans()) if bias is None else bias
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**20)))
    w = torch.randn(cout, cin, k, generator=g, dtype=torch.float64)
    bb = torch.randn(cout, generator=g, dtype=torch.float64) if b else None
    return A.Conv(w, bb, stride=s, padding=pad, dilation=d)


def _run(e, n, cin, kernel=None):
    x = torch.randn(1, cin, n, dtype=torch.float64)
    try:
        ref = e(x)
    except RuntimeError:
        return None
    out = (kernel or e.fold(check=False)).apply(x)
    return rel_err(out, ref) if out.shape == ref.shape else 1.0


@SET
@given(data=st.data())
def test_sequence_rule(data):
    cin = 2
    a = data.draw(conv1d(cin))
    tight = data.draw(st.booleans())
    b = data.draw(conv1d(a.spec.out_channels, stride=1 if tight else None, dilation=1 if tight else None))
    e = a >> b
    exact = e.exactness().exact
    k = e.fold(check=False)
    errs = [r for r in (_run(e, n, cin, k) for n in range(1, 18)) if r is not None]
    assume(errs)  # some geometries need inputs longer than the sizes tried
    if exact:
        assert max(errs) < 1e-10
    elif tight:  # the rule is necessary when the second conv reads every padded position
        assert max(errs) > 1e-8, str(e.exactness())


@SET
@given(data=st.data())
def test_parallel_rule(data):
    cin, cout = 2, 2
    n_br = data.draw(st.integers(2, 3))
    s = data.draw(st.integers(1, 2))
    branches = [data.draw(conv1d(cin, cout, stride=s if data.draw(st.integers(0, 4)) else None))
                for _ in range(n_br)]
    e = A.Sum(*branches)
    exact = e.exactness().exact
    consts = {(b.spec.stride, b.spec.padding[0][0] + b.spec.padding[0][1] - b.spec.extent[0]) for b in branches}
    assert exact == (len(consts) == 1)
    if exact:
        k = e.fold()
        for n in range(1, 14):
            r = _run(e, n, cin, k)
            assert r is None or r < 1e-10


@SET
@given(data=st.data())
def test_output_size_matches_torch(data):
    dims = data.draw(st.integers(1, 3))
    ks = [data.draw(st.integers(1, 4)) for _ in range(dims)]
    ss = [data.draw(st.integers(1, 3)) for _ in range(dims)]
    ds = [data.draw(st.integers(1, 3)) for _ in range(dims)]
    ps = [(data.draw(st.integers(0, 3)), data.draw(st.integers(0, 3))) for _ in range(dims)]
    n = [data.draw(st.integers(1, 9)) for _ in range(dims)]
    spec = A.ConvSpec(dims, 1, 1, tuple(ks), tuple(ss), tuple(ps), tuple(ds))
    if any(v + l + r - e - 1 < 0 for v, (l, r), e in zip(n, ps, spec.extent)):
        return
    x = A.kernel.pad_input(torch.zeros(1, 1, *n), ps)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    y = conv(x, torch.zeros(1, 1, *ks), None, ss, 0, ds)
    assert spec.output_size(n) == tuple(y.shape[2:])


@pytest.mark.parametrize("k,d", [(2, 1), (4, 1), (3, 2), (2, 3)])
def test_same_padding_matches_torch(k, d):
    w = torch.randn(3, 2, k, k + 1, dtype=torch.float64)
    e = A.Conv(w, padding="same", dilation=d)
    x = torch.randn(1, 2, 7, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: even kernels copy the input
        ref = F.conv2d(x, w, None, 1, "same", d)
    assert rel_err(e(x), ref) < 1e-12
    assert e.spec.output_size((7, 8)) == (7, 8)


def test_describe_and_spec_basics():
    s = A.ConvSpec(2, 4, 6, (3, 3), (2, 2), ((1, 1), (1, 1)), (1, 1), 2, True)
    assert s.describe() == "conv(2d 4->6, k=3, s=2, p=1, g=2, bias)"
    assert s.extent == (2, 2) and s.symmetric_padding and not s.is_pointwise
    a = A.ConvSpec(1, 2, 2, (1,), (1,), ((0, 0),), (5,), 2)
    assert a.dilation == (1,) and a.is_diagonal  # dilation is meaningless for k=1
    assert A.normalize_padding(1, 2) == ((1, 1), (1, 1))
    assert A.normalize_padding((1, 2), 2) == ((1, 1), (2, 2))
    assert A.normalize_padding(((0, 1), (2, 3)), 2) == ((0, 1), (2, 3))


def test_sequence_plan_strided_then_dilated():
    a = A.ConvSpec(1, 1, 1, (3,), (2,), ((1, 1),), (1,))
    b = A.ConvSpec(1, 1, 1, (3,), (1,), ((0, 0),), (3,))
    p = A.sequence(a, b)
    # taps at k1 + 2*3*k2: dilation gcd(1, 6) = 1, kernel 2 + 12 + 1
    assert p.spec.kernel_size == (15,) and p.spec.dilation == (1,) and p.step == (6,) and not p.reasons
    b2 = A.ConvSpec(1, 1, 1, (3,), (1,), ((0, 0),), (1,))
    a2 = A.ConvSpec(1, 1, 1, (1,), (2,), ((0, 0),), (1,))
    p2 = A.sequence(a2, b2)
    assert p2.spec.kernel_size == (3,) and p2.spec.dilation == (2,) and p2.spec.stride == (2,)


def test_lazy_names_are_only_built_for_messages():
    calls = []

    def name():
        calls.append(1)
        return "X"

    a = A.ConvSpec(1, 1, 1, (3,), (1,), ((0, 0),), (1,))
    A.sequence(a, a, name, name)
    A.parallel([a, a], names=lambda: [name(), name()])
    assert not calls
    b = A.ConvSpec(1, 1, 1, (3,), (1,), ((1, 1),), (1,))
    assert "X" in A.sequence(b, b, name, name).reasons[0]


@settings(max_examples=60, deadline=None)
@given(c=st.sampled_from([2, 3, 4, 6]), e=st.integers(1, 3), g2=st.sampled_from([1, 2, 3, 6]),
       o_per=st.integers(1, 3), k=st.sampled_from([(3, 3), (1, 3), (2, 2)]), stride=st.integers(1, 2),
       dil=st.integers(1, 2), pw_stride=st.integers(1, 2), pad=st.integers(0, 2))
def test_depthwise_multiplier_then_pointwise_composes_exactly(c, e, g2, o_per, k, stride, dil, pw_stride, pad):
    """A depthwise kxk with channel multiplier ``e`` then a (grouped) 1x1 - OREPA's dw -> pw
    branch - folds to the conv of the two in sequence (float64); the pointwise groups that
    hold whole E-bundles take the per-group einsum, the others the dense route."""
    assume((e * c) % g2 == 0)
    torch.manual_seed(0)
    dw = A.Conv(torch.randn(e * c, 1, *k, dtype=torch.float64), stride=stride, padding=pad, dilation=dil, groups=c)
    pw = A.Conv(torch.randn(g2 * o_per, e * c // g2, 1, 1, dtype=torch.float64),
                torch.randn(g2 * o_per, dtype=torch.float64), stride=pw_stride, groups=g2)
    expr = A.Seq(dw, pw)
    assume(expr.exactness().exact)
    x = torch.randn(2, c, 11, 10, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(expr.fold().apply(x), pw(dw(x))) < 1e-12
