"""The online kernel cache's invalidation rule (repcompiler.online.cache): a kept kernel
is reused exactly while its sources are unchanged - optimizer steps, load_state_dict,
.to(dtype), train/eval, grad mode, inference mode, rc.accumulate steps - and nothing is
kept while torch.compile traces; the accelerator's cache keeps no parameter values."""

from __future__ import annotations

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repcompiler as rc
from repcompiler.blocks import ConvGeometry, build_block
from repcompiler.blocks.accel import cached, tensor_key
from repcompiler.errors import RepCompilerError
from repcompiler.online.conv import OnlineConv

from helpers import randomize_bn, rel_err

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def geom2d(cin: int, cout: int, k: int, s: int = 1) -> ConvGeometry:
    p = (k - 1) // 2
    return ConvGeometry(cin, cout, (k, k), (s, s), ((p, p), (p, p)), (1, 1), 1, 2, False)


class Counted(OnlineConv):
    """An online block counting its kernel generations."""

    generations = 0

    def generate(self):
        self.generations += 1
        return super().generate()


def block(name: str = "orepa", seed: int = 0) -> Counted:
    torch.manual_seed(seed)
    m = Counted(build_block(name, geom2d(4, 6, 3)), nn.BatchNorm2d(6), block=name)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return randomize_bn(m, seed).double()


X = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


def reference(m: OnlineConv, x: torch.Tensor = X) -> torch.Tensor:
    """The block's output with a freshly generated kernel (no cache involved)."""
    with torch.no_grad():
        y = m.generate().apply(x)
        return y if m.post_bn is None else m.post_bn(y)


def test_no_grad_forwards_reuse_one_kernel_until_an_optimizer_step():
    m = block().eval()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    with torch.no_grad():
        y1, y2 = m(X), m(X)
    assert m.generations == 1 and torch.equal(y1, y2)
    m(X).square().sum().backward()  # eval mode, grad on: generated, and the kept kernel dropped
    assert m.generations == 2 and m._cache is None
    opt.step()
    with torch.no_grad():
        y3 = m(X)
    assert m.generations == 3 and not torch.allclose(y1, y3)
    assert torch.equal(y3, reference(m))


def test_load_state_dict_and_dtype_changes_invalidate():
    m, other = block(seed=0).eval(), block(seed=1).eval()
    with torch.no_grad():
        m(X)
        m.load_state_dict(other.state_dict())
        assert torch.equal(m(X), reference(other))
        n = m.generations
        m.float()
        y = m(X.float())
    assert m.generations == n + 1 and y.dtype == torch.float32
    assert m._cache[1].weight.dtype == torch.float32
    assert rel_err(y.double(), reference(other)) < 1e-5


def test_train_eval_switch_drops_the_kept_kernel():
    m = block().eval()
    with torch.no_grad():
        m(X)
    assert m._cache is not None
    m.train()
    assert m._cache is None
    with torch.no_grad():
        m(X)  # no gradient can flow: kept in training mode too
    assert m._cache is not None
    m.eval()
    assert m._cache is None


def test_no_grad_kernel_never_serves_a_gradient_forward():
    """A kept (detached) kernel would cut the graph: with grad enabled the block
    generates, and its branch parameters get the unfolded block's gradients."""
    m = block().eval()
    with torch.no_grad():
        m(X)
    kept = m._cache[1]
    y = m(X)
    assert y.requires_grad and m.generations == 2
    y.sum().backward()
    assert all(p.grad is not None for p in m.expr.parameters())
    ref = copy.deepcopy(m)
    ref.zero_grad()
    m.zero_grad()
    ref.post_bn(ref.expr(X)).sum().backward()  # the branches run unfolded
    m(X).sum().backward()
    for p, q in zip(m.expr.parameters(), ref.expr.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-10
    assert kept.weight.grad_fn is None


def test_inference_mode_kernel_is_not_reused_elsewhere():
    """A kernel (or an accelerator's pattern table) built in inference mode holds
    inference tensors, which autograd refuses: it is reused only in inference mode."""
    m = block().eval()
    m.expr.requires_grad_(False)  # a frozen block: its kernel kept even with grad on
    with torch.inference_mode():
        m(X)
        m(X)
    assert m.generations == 1
    x = X.clone().requires_grad_(True)
    m(x).sum().backward()  # grad on: the conv saves its weight for the input's gradient
    assert m.generations == 2 and x.grad is not None


def test_accumulate_generates_once_per_step_and_equals_the_plain_loop():
    """Float64, two optimizer steps of three micro-batches: one generation per step
    (the context is the step token), gradients and parameters equal to the plain loop."""
    ref, m = block(), block()
    opts = [torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9) for b in (ref, m)]
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=g) for _ in range(3)]
    for step in range(2):
        for b, opt in zip((ref, m), opts):
            opt.zero_grad(set_to_none=True)
        for x in batches:
            ref(x).square().mean().backward()
        before = m.generations
        with rc.accumulate(m) as acc:
            for x in batches:
                m(x).square().mean().backward()
        assert m.generations - before == 1 and acc.generated == acc.backpropagated == 1
        for p, q in zip(m.parameters(), ref.parameters()):
            assert rel_err(p.grad, q.grad) < 1e-12
        for opt in opts:
            opt.step()
    for p, q in zip(m.parameters(), ref.parameters()):
        assert rel_err(p, q) < 1e-12


def test_accumulate_refuses_a_stale_kernel():
    m = block()
    with pytest.raises(RepCompilerError, match="changed"):
        with rc.accumulate(m):
            m(X).sum().backward()
            with torch.no_grad():
                next(m.expr.parameters()).add_(1.0)  # a branch parameter edited inside the step
            m(X)


def test_tracing_keeps_nothing():
    """While torch.compile/torch.export trace (plain_ops_required), every forward
    generates, nothing is kept (block kernel, accelerator patterns) and rc.accumulate
    keeps nothing either."""
    m = block().eval()
    for e in m.modules():
        if hasattr(e, "accel_cache"):
            e.accel_cache = None
    with mock.patch("repcompiler.online.cache.plain_ops_required", return_value=True), \
            mock.patch("repcompiler.blocks.accel.plain_ops_required", return_value=True):
        with torch.no_grad():
            y1, y2 = m(X), m(X)
        with rc.accumulate(m) as acc:
            m(X).sum().backward()
    assert m.generations == 3 and acc.generated == 0 and torch.equal(y1, y2)
    assert m._cache is None and all(getattr(e, "accel_cache", None) is None for e in m.modules())
    assert all(p.grad is not None for p in m.expr.parameters())


@pytest.mark.slow
def test_compiled_eval_forward_reads_and_writes_no_cache():
    """torch.compile (eager backend: cheap) of a no-grad eval forward: the result equals
    eager, no kept kernel is written while tracing, and the compiled block follows a
    parameter update (the compiled graph generates every call)."""
    import torch._dynamo

    m = block().eval()
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    try:
        with torch.no_grad():
            assert rel_err(compiled(X), reference(m)) < 1e-12
            assert m._cache is None
            next(m.expr.parameters()).add_(0.5)
            assert rel_err(compiled(X), reference(m)) < 1e-12
    finally:
        torch._dynamo.reset()


def test_accelerator_cache_keeps_structure_not_parameter_values():
    """The OREPA accelerator's per-expression entry is built once, survives optimizer
    steps (it watches buffers, not parameters), shares no storage with a parameter, and
    is rebuilt when a buffer (the prior pattern) is edited in place."""
    m = block().eval()
    expr = m.expr
    with torch.no_grad():
        m(X)
    entry = expr.accel_cache
    assert entry is not None
    params = {p.untyped_storage().data_ptr() for p in expr.parameters()}
    kept = [t for t in (entry[1].patterns.table, entry[1].ident, *entry[1].zeros.values()) if t is not None]
    assert not any(t.untyped_storage().data_ptr() in params for t in kept)
    with torch.no_grad():
        for p in expr.parameters():
            p.mul_(1.1)
        m(X)
    assert expr.accel_cache is entry
    prior = expr.branches["prior"].pattern.weight
    with torch.no_grad():
        prior.mul_(2.0)
        y = m(X)
    assert expr.accel_cache is not entry and torch.equal(y, reference(m))
    assert rel_err(m.generate().weight, expr.fold(check=False).weight) < 1e-12


def test_tensor_key_and_cached():
    a, b = torch.zeros(3), torch.ones(3)
    k = tensor_key([a, b])
    assert k == tensor_key([a, b])
    a.add_(1)
    assert tensor_key([a, b]) != k  # version counter
    assert tensor_key([a.double()]) != tensor_key([a])
    with torch.inference_mode():
        assert tensor_key([torch.zeros(2)]) is None  # no version counter

    class Holder:
        slot = None

    h, calls = Holder(), []

    def build():
        calls.append(1)
        return b.sum()

    assert cached(h, "slot", build, watch=[b]) == cached(h, "slot", build, watch=[b]) and len(calls) == 1
    b.mul_(2)
    assert cached(h, "slot", build, watch=[b]) == 6 and len(calls) == 2
    cached(h, "slot", build, watch=[b], like=[torch.zeros(1, dtype=torch.float64)])
    assert len(calls) == 3  # another dtype of the like tensors
