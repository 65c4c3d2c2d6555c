"""The OREPA kernel generator (repcompiler/blocks/orepa_kernel.py) against its
reference, the generic fold of the same block: kernels and gradients in float64 for
hypothesis-drawn geometries and every scaling, its hand-written backward against
numerical differentiation (gradcheck, gradgradcheck), higher-order derivatives against
the plain ops, frozen parameters, and the plain-ops path (no grad / tracing) against the
autograd-function path."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from torch import nn

import repcompiler as rc
from hypothesis import strategies as st

from repcompiler.blocks import ConvGeometry, OrepaAccelerator, build_block
from repcompiler.blocks.orepa_kernel import OrepaKernel, OrepaPatterns, _forward, _forward_inplace, orepa_kernel

from helpers import autograd_node_names, rel_err


def _geom(cin, cout, ks, g, dims, s=1, d=1, bias=False) -> ConvGeometry:
    pads = tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for k in ks)
    return ConvGeometry(cin, cout, tuple(ks), (s,) * dims, pads, (d,) * dims, g, dims, bias)


def _perturbed(expr, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in expr.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return expr


def _grads(kernel, params, probe):
    return torch.autograd.grad((kernel.weight * probe).sum() + (0 if kernel.bias is None else kernel.bias.sum()),
                               params, allow_unused=True)


def _check_equal_to_generic(expr, frozen=()):
    for i, p in enumerate(expr.parameters()):
        if i in frozen:
            p.requires_grad_(False)
    params = [p for p in expr.parameters() if p.requires_grad]
    fast, ref = expr.fast_fold(), expr.fold()
    assert fast.spec == ref.spec
    assert rel_err(fast.weight, ref.weight) < 1e-12
    probe = torch.randn_like(ref.weight)
    for a, b in zip(_grads(fast, params, probe), _grads(ref, params, probe)):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.shape == b.shape
            assert rel_err(a, b) < 1e-10


@settings(deadline=None, max_examples=40)
@given(
    dims=st.sampled_from([1, 2, 3]),
    k=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    gidx=st.integers(0, 3),
    mult=st.integers(1, 2),
    scaling=st.sampled_from(["vector", "scalar", "none"]),
    bias=st.booleans(),
    seed=st.integers(0, 3),
)
def test_kernel_and_gradients_equal_generic_fold(dims, k, gidx, mult, scaling, bias, seed):
    ks = tuple(k[:dims])
    if max(ks) < 2:
        ks = (2,) + ks[1:]
    cin = 4
    groups = [1, 2, 4, 4][gidx]
    cout = cin * mult
    expr = build_block("orepa", _geom(cin, cout, ks, groups, dims, bias=bias), scaling=scaling)
    expr = _perturbed(expr.double(), seed)
    assert expr.has_fast_fold
    _check_equal_to_generic(expr)


@pytest.mark.parametrize("cin,cout,ks,groups,dims", [(4, 8, (3, 3), 1, 2), (1, 1, (2,), 1, 1), (4, 1, (3, 1), 1, 2),
                                                     (4, 4, (3, 3, 3), 4, 3)])
def test_generation_never_modifies_the_parameters(cin, cout, ks, groups, dims):
    expr = _perturbed(build_block("orepa", _geom(cin, cout, ks, groups, dims)).double())
    before = [p.detach().clone() for p in expr.parameters()]
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            w = expr.fast_fold().weight
        if grad:
            (w * torch.randn_like(w)).sum().backward()
    for p, b in zip(expr.parameters(), before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("frozen", [(0,), (1, 2, 3), (5, 7), tuple(range(1, 20))])
def test_frozen_parameters_get_no_gradient_and_the_rest_are_right(frozen):
    expr = _perturbed(build_block("orepa", _geom(4, 8, (3, 3), 2, 2)).double())
    _check_equal_to_generic(expr, frozen=frozen)


def _generator_leaves(expr, E: int, seed: int):
    """Independent float64 leaves shaped like the inputs orepa_kernel receives for ``expr``
    (depthwise multiplier ``E``), the block's patterns and its group count."""
    g, internal, _ = OrepaAccelerator().structure(expr)
    O, G, K = g.out_channels, g.groups, math.prod(g.kernel_size)
    Cg, Mg = g.in_channels // G, internal // G
    gen = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    pats = OrepaAccelerator.patterns(expr, g, torch.zeros((), dtype=torch.float64))
    inputs = (leaf(O, Cg, K), leaf(O, Cg), leaf(O, Cg), leaf(O, Cg), leaf(G, Mg, Cg), leaf(O, K, Mg),
              leaf(G * Cg, E, K), leaf(G * Cg, E, O // G), *(leaf(O) for _ in range(6)))
    return inputs, pats, G


@pytest.mark.parametrize("groups,internal", [(1, None), (2, None), (8, None), (1, 12)])
def test_hand_written_backward_passes_gradcheck(groups, internal):
    expr = _perturbed(build_block("orepa", _geom(8, 8, (3, 2), groups, 2), internal_channels=internal).double())
    inputs, pats, G = _generator_leaves(expr, 3, seed=1)
    assert torch.autograd.gradcheck(lambda *t: OrepaKernel.apply(*t, pats, G), inputs, fast_mode=True)


def _forward_only(expr) -> torch.Tensor:
    """The kernel through the plain-ops path (as under torch.compile), still differentiable."""
    from unittest import mock

    with mock.patch("repcompiler.blocks.orepa_kernel.plain_ops_required", return_value=True):
        return expr.fast_fold().weight


def test_plain_path_equals_function_path():
    expr = _perturbed(build_block("orepa", _geom(6, 12, (3, 3), 3, 2)).double())
    with torch.no_grad():
        plain = expr.fast_fold().weight
    fn = expr.fast_fold()
    assert "OrepaKernelBackward" in autograd_node_names(fn.weight)
    assert "OrepaKernelBackward" not in autograd_node_names(_forward_only(expr))
    assert torch.equal(plain, fn.weight.detach())
    # the plain path is differentiable by autograd and gives the same gradients
    params = list(expr.parameters())
    probe = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad((fn.weight * probe).sum(), params, allow_unused=True),
                    torch.autograd.grad((_forward_only(expr) * probe).sum(), params, allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < 1e-12


def test_double_backward_equals_the_plain_paths():
    """create_graph=True through the hand-written backward: gradients of gradients (a
    Hessian-vector product in the branch parameters, and the mixed one with the kernel
    gradient) equal those of the plain-ops path, which autograd differentiates to any order."""
    expr = _perturbed(build_block("orepa", _geom(4, 6, (3, 2), 2, 2)).double())
    params = list(expr.parameters())
    gen = torch.Generator().manual_seed(3)
    probe = torch.randn(6, 2, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    vs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]

    def second_order(weight: torch.Tensor) -> list[torch.Tensor]:
        gs = torch.autograd.grad((weight.square() * probe).sum(), params, create_graph=True, allow_unused=True)
        gv = sum((g * v).sum() for g, v in zip(gs, vs) if g is not None)
        return list(torch.autograd.grad(gv, [*params, probe], allow_unused=True))

    fn = expr.fast_fold().weight
    assert "OrepaKernelBackward" in autograd_node_names(fn)
    got, want = second_order(fn), second_order(_forward_only(expr))
    assert sum(g is not None for g in got) == len(params) + 1
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < 1e-12


def test_hand_written_backward_passes_gradgradcheck():
    inputs, pats, G = _generator_leaves(build_block("orepa", _geom(4, 4, (3,), 2, 1)).double(), 2, seed=2)
    assert torch.autograd.gradgradcheck(lambda *t: OrepaKernel.apply(*t, pats, G), inputs, fast_mode=True)


def test_first_order_backward_stays_hand_written(monkeypatch):
    import repcompiler.blocks.orepa_kernel as ok

    def refuse(*args):
        raise AssertionError("first-order backward took the differentiable path")

    monkeypatch.setattr(ok, "_differentiable_backward", refuse)
    expr = _perturbed(build_block("orepa", _geom(4, 4, (3, 3), 1, 2)).double())
    expr.fast_fold().weight.square().sum().backward()
    assert all(p.grad is not None for p in expr.parameters())
    with pytest.raises(AssertionError, match="differentiable path"):
        torch.autograd.grad(expr.fast_fold().weight.square().sum(), list(expr.parameters()), create_graph=True)


def test_patterns_are_what_the_branches_hold():
    g = _geom(4, 8, (3, 5), 1, 2)
    expr = build_block("orepa", g).double()
    pats = OrepaAccelerator.patterns(expr, OrepaAccelerator().structure(expr)[0], torch.zeros((), dtype=torch.float64))
    assert isinstance(pats, OrepaPatterns)
    assert pats.table.shape == (8, 15, 3)
    assert torch.allclose(pats.avg, torch.full((8, 15), 1 / 15, dtype=torch.float64))
    assert pats.centre == 1 * 5 + 2  # row 1 of 3, column 2 of 5
    # every output channel has a non-zero prior
    assert bool((pats.prior.abs().sum(1) > 0).all())
    # the forward of the raw generator is the documented formula, term by term (inputs in
    # the generator's layouts: w0 [O, Cg, K], w2 [O, K, Mg]; pw [Cg, E, O])
    O, Cg, K, E = 8, 4, 15, 2
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    w0, a, p, q, w1, w2, dw, pw = r(O, Cg, K), r(O, Cg), r(O, Cg), r(O, Cg), r(1, 5, Cg), r(O, 5, K), r(Cg, E, K), \
        r(O, Cg, E)
    s = [r(O) for _ in range(6)]
    want = (s[0][:, None, None] * w0 + (s[1][:, None] * a)[..., None] * pats.avg[:, None]
            + (s[2][:, None] * p)[..., None] * pats.prior[:, None]
            + s[3][:, None, None] * torch.einsum("omk,mc->ock", w2, w1[0])
            + s[5][:, None, None] * torch.einsum("oce,cek->ock", pw, dw))
    want[:, :, pats.centre] += s[4][:, None] * q
    args = (w0, a, p, q, w1, w2.transpose(1, 2).contiguous(), dw,
            pw.permute(1, 2, 0).contiguous(), s, pats, 1)
    got = _forward_inplace(*args)
    assert got.is_contiguous()
    assert rel_err(got, want) < 1e-13
    assert rel_err(_forward(*args), want) < 1e-13
    assert torch.equal(orepa_kernel(*args), got)


@pytest.mark.parametrize("groups", [1, 2])
def test_online_parameters_are_contiguous(groups):
    """Online as offline, every parameter is stored contiguous in its standard layout (what
    FSDP2's ``fully_shard`` shards); the folded kernel is contiguous too."""
    g = _geom(8, 8, (3, 3), groups, 2)
    online, offline = build_block("orepa", g), build_block("orepa", g, mode="offline")
    assert all(p.is_contiguous() for p in online.parameters())
    assert all(p.is_contiguous() for p in offline.parameters())
    assert online.fast_fold().weight.is_contiguous()


@pytest.mark.parametrize("plain_path", [False, True])
def test_channels_last_parameters_give_the_same_kernel_and_gradients(plain_path):
    """A model whose parameters were laid out otherwise
    (``model.to(memory_format=torch.channels_last)``) generates the same kernel and
    gradients."""
    g = _geom(6, 6, (3, 2), 1, 2)
    plain = _perturbed(build_block("orepa", g).double())
    laid = _perturbed(build_block("orepa", g).double())
    with torch.no_grad():
        for a, b in zip(laid.parameters(), plain.parameters()):
            a.data = b.detach().contiguous(memory_format=torch.channels_last) if b.dim() == 4 else b.detach().clone()
    assert not all(p.is_contiguous() for p in laid.parameters())
    fold = _forward_only if plain_path else (lambda e: e.fast_fold().weight)
    wa, wb = fold(laid), fold(plain)
    assert torch.equal(wa, wb)
    probe = torch.randn_like(wa)
    for a, b in zip(torch.autograd.grad((wa * probe).sum(), list(laid.parameters()), allow_unused=True),
                    torch.autograd.grad((wb * probe).sum(), list(plain.parameters()), allow_unused=True)):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < 1e-13


def test_float32_generation_matches_the_float64_reference():
    """Float32 runs other product routines than float64 (oneDNN's matmul where usable):
    kernel and gradients against the float64 generic fold of the same parameters."""
    import copy

    import repcompiler.blocks.orepa_kernel as ok

    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(45, 17, generator=gen), torch.randn(29, 17, generator=gen)
    for big in (False, True):  # torch.mm, then oneDNN where usable
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ok, "_ONEDNN_MIN_MACS", 1 if big else 1 << 62)
            assert rel_err(ok._mm_nt(x, w).double(), x.double() @ w.double().t()) < 1e-6
    expr = _perturbed(build_block("orepa", _geom(24, 40, (3, 3), 1, 2)))
    ref = copy.deepcopy(expr).double()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ok, "_ONEDNN_MIN_MACS", 1)  # this small block's products through oneDNN too
        fast, slow = expr.fast_fold(), ref.fold()
        assert fast.weight.dtype == torch.float32
        assert rel_err(fast.weight.double(), slow.weight) < 1e-5
        probe = torch.randn(slow.weight.shape, generator=gen, dtype=torch.float64)
        grads = zip(_grads(fast, list(expr.parameters()), probe.float()), _grads(slow, list(ref.parameters()), probe))
    for a, b in grads:
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a.double(), b) < 1e-5


@pytest.mark.parametrize("cin,cout,ks,groups", [(5, 7, (3, 3), 1), (6, 4, (2, 3), 2), (4, 4, (3,), 4)])
def test_blocked_depthwise_exchange_equals_generic_fold(monkeypatch, cin, cout, ks, groups):
    """The depthwise product is added a few input channels at a time (blocks of
    ``_CHUNK`` elements); tiny blocks with a ragged last one give the same kernel."""
    import repcompiler.blocks.orepa_kernel as ok

    monkeypatch.setattr(ok, "_CHUNK", 2 * math.prod(ks) * (cout // groups))  # two input channels per block
    expr = _perturbed(build_block("orepa", _geom(cin, cout, ks, groups, len(ks))).double())
    _check_equal_to_generic(expr)


def _block_grads(expr, probe):
    params = list(expr.parameters())
    return [g.clone() for g in _grads(expr.fast_fold(), params, probe)], params


def test_scratch_buffers_never_reach_a_result():
    """The backward's temporaries live in per-thread scratch buffers reused by the next
    call: a gradient or kernel that shared one would change when another block (bigger,
    other dtype, other groups) runs. Gradients and kernels kept from the first call must
    still equal their copies afterwards, and the generic fold."""
    a = _perturbed(build_block("orepa", _geom(6, 8, (3, 3), 1, 2)).double(), seed=1)
    b = _perturbed(build_block("orepa", _geom(8, 12, (3, 3), 2, 2)).double(), seed=2)
    probe_a = torch.randn(8, 6, 3, 3, dtype=torch.float64)
    kept_kernel = a.fast_fold().weight
    kept_copy = kept_kernel.detach().clone()
    grads_a = _grads(a.fast_fold(), list(a.parameters()), probe_a)
    copies = [None if g is None else g.clone() for g in grads_a]
    for expr in (b, b.float(), a):  # other shapes, another dtype, then the same block again
        probe = torch.randn(expr.fast_fold().weight.shape, dtype=next(expr.parameters()).dtype)
        _grads(expr.fast_fold(), list(expr.parameters()), probe)
    assert torch.equal(kept_kernel.detach(), kept_copy)
    for g, c in zip(grads_a, copies):
        assert (g is None and c is None) or torch.equal(g, c)
    _check_equal_to_generic(a)


def test_scratch_is_per_thread_and_optional(monkeypatch):
    """Backward passes running in two threads at once (each has its own scratch) and the
    no-scratch path (buffers above the size limit are allocated per call) give the
    single-threaded gradients, bit for bit."""
    import threading

    import repcompiler.blocks.orepa_kernel as ok

    blocks = [_perturbed(build_block("orepa", _geom(16, 16, (3, 3), 1, 2)).double(), seed=s) for s in (3, 4)]
    probe = torch.randn(16, 16, 3, 3, dtype=torch.float64)
    want = [[g.clone() for g in _grads(e.fast_fold(), list(e.parameters()), probe)] for e in blocks]
    got: dict[int, list[list[torch.Tensor]]] = {}

    def work(i: int) -> None:
        got[i] = [[g.clone() for g in _grads(blocks[i].fast_fold(), list(blocks[i].parameters()), probe)]
                  for _ in range(20)]

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in (0, 1):
        for rep in got[i]:
            assert all(torch.equal(a, b) for a, b in zip(rep, want[i]))
    monkeypatch.setattr(ok, "_SCRATCH_MAX_BYTES", 0)
    for e, w in zip(blocks, want):
        assert all(torch.equal(a, b) for a, b in zip(_grads(e.fast_fold(), list(e.parameters()), probe), w))


def test_scratch_made_in_inference_mode_serves_training():
    """A thread whose scratch buffers were first handed out under
    ``torch.inference_mode`` then trains: they must still accept the backward's in-place
    writes (an inference tensor would refuse them outside inference mode)."""
    import threading

    import repcompiler.blocks.orepa_kernel as ok

    expr = _perturbed(build_block("orepa", _geom(8, 8, (3, 3), 1, 2)).double())
    probe = torch.randn(8, 8, 3, 3, dtype=torch.float64)
    want = [g.clone() for g in _grads(expr.fast_fold(), list(expr.parameters()), probe)]
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                expr.fast_fold()
                for slot in (0, 1):
                    ok._scratch.get(slot, (1 << 14,), probe)  # big enough for this block
            got = _grads(expr.fast_fold(), list(expr.parameters()), probe)
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert not errors, errors


def test_dynamo_traces_the_accelerated_stem_block_without_breaks_or_recompiles() -> None:
    """The large-kernel stem block (stacked OREPA kernels, the first 3x3 placed by a one-hot
    ``Placement``) compiles in one graph and stays compiled: the accelerator reads the
    placement's tap from Python ints (a ``nonzero()`` of the buffer was a data-dependent
    graph break) and neither reads nor writes its pattern cache while dynamo traces (the
    replayed cache write made the second call recompile, then fail in inductor with
    dynamic shapes: found compiling a ResNet-18 training step)."""
    import torch._dynamo

    torch.manual_seed(0)
    stem = rc.orepa_transform(nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(8)))
    block = stem[0]
    assert any(type(m).__name__ == "Placement" for m in block.modules())  # the case this test is about
    x = torch.randn(2, 3, 16, 16)
    want = block(x)
    for m in block.modules():  # start from no cache, as a model compiled before any eager call
        if hasattr(m, "accel_cache"):
            m.accel_cache = None
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="eager", fullgraph=True)  # fullgraph: a graph break raises
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            got = compiled(x)
            got.sum().backward()
    torch._dynamo.reset()
    assert rel_err(got, want) <= 1e-6
    assert all(getattr(m, "accel_cache", None) is None for m in block.modules())
