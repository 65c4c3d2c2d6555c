"""rc.accumulate: online kernels generated once per optimizer step under gradient
accumulation, with the plain loop's gradients (float64, every built-in block, frozen
blocks, eval mode, a block used twice, nested contexts, exceptions, misuse)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repcompiler as rc
from repcompiler.blocks import ConvGeometry, build_block
from repcompiler.errors import RepCompilerError, UnsupportedError
from repcompiler.online.conv import OnlineConv

from helpers import randomize_bn, rel_err

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def geom2d(cin, cout, k, s=1, g=1) -> ConvGeometry:
    p = (k - 1) // 2
    return ConvGeometry(cin, cout, (k, k), (s, s), ((p, p), (p, p)), (1, 1), g, 2, False)


GEOMS = {
    "orepa": [geom2d(4, 8, 3), geom2d(8, 8, 3, s=2, g=2)],
    "orepa_1x1": [geom2d(4, 8, 1), geom2d(8, 8, 1, s=2)],
    "orepa_large": [geom2d(4, 8, 5), geom2d(8, 8, 7, s=2)],
    "dbb": [geom2d(4, 8, 3), geom2d(8, 8, 3, s=2)],
    "repvgg": [geom2d(4, 8, 3), geom2d(8, 8, 3, s=2)],
    "acnet": [geom2d(4, 8, 3), geom2d(8, 8, 3, s=2)],
}


class Net(nn.Module):
    """Two online blocks (the first also used a second time, on its own output's
    channels when ``twice``), pooling and a linear head."""

    def __init__(self, name: str, twice: bool = False) -> None:
        super().__init__()
        g1, g2 = GEOMS[name]
        self.b1 = OnlineConv(build_block(name, g1), nn.BatchNorm2d(8), block=name)
        self.b2 = OnlineConv(build_block(name, g2), nn.BatchNorm2d(8), block=name)
        self.fc = nn.Linear(8, 5)
        self.twice = twice

    def forward(self, x):
        y1 = F.relu(self.b1(x))
        y = F.relu(self.b2(y1))
        if self.twice:
            y = y + F.relu(self.b2(y1.flip(3)))  # the same block (same kernel) on another input
        return self.fc(y.mean((2, 3)))


def make(name: str, twice: bool = False, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = Net(name, twice)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return randomize_bn(m, seed).double()


def micro_batches(n: int = 3, size: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, 10, 10, generator=g, dtype=torch.float64), torch.randint(0, 5, (size,), generator=g))
            for _ in range(n)]


def plain_loop(model, batches):
    for x, y in batches:
        F.cross_entropy(model(x), y).backward()


def accumulated_loop(model, batches):
    with rc.accumulate(model) as acc:
        plain_loop(model, batches)
    return acc


def assert_same_grads(a: nn.Module, b: nn.Module, tol: float = 1e-12) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert rel_err(p.grad, q.grad) < tol, (name, rel_err(p.grad, q.grad))


@pytest.mark.parametrize("name", sorted(GEOMS))
def test_gradients_equal_the_plain_loop(name):
    """Every built-in block, float64: one generation and one generator backward per
    block for the whole step, the plain loop's gradients, outputs and BN statistics."""
    ref = make(name)
    model = copy.deepcopy(ref)
    batches = micro_batches()
    plain_loop(ref, batches)
    acc = accumulated_loop(model, batches)
    assert acc.generated == acc.backpropagated == 2
    assert_same_grads(model, ref)
    for a, b in zip(model.buffers(), ref.buffers()):
        assert torch.equal(a, b)  # running statistics: the same forwards ran


def test_outputs_inside_equal_the_plain_forward():
    ref = make("orepa")
    model = copy.deepcopy(ref)
    x, _ = micro_batches(1)[0]
    with rc.accumulate(model):
        got = model(x)
    assert rel_err(got, ref(x)) < 1e-14


def test_a_block_used_twice_keeps_one_kernel():
    ref = make("orepa", twice=True)
    model = copy.deepcopy(ref)
    batches = micro_batches()
    plain_loop(ref, batches)
    acc = accumulated_loop(model, batches)
    assert acc.generated == 2  # b2 is called twice per forward, three forwards
    assert_same_grads(model, ref)


def test_frozen_and_partly_frozen_blocks():
    """A frozen block (its kernel from the eval cache, no gradient) takes no part; a
    block with only its branch scales trainable accumulates for those."""
    ref = make("orepa")
    ref.b1.expr.requires_grad_(False)
    for n, p in ref.b2.expr.named_parameters():
        p.requires_grad_(p.dim() == 1)  # the per-channel scales (and biases)
    model = copy.deepcopy(ref)
    batches = micro_batches()
    plain_loop(ref, batches)
    acc = accumulated_loop(model, batches)
    assert acc.generated == 1
    assert all(p.grad is None for p in model.b1.expr.parameters())
    assert model.b1.post_bn.weight.grad is not None
    assert_same_grads(model, ref)


def test_eval_mode():
    """Eval mode with gradients enabled accumulates like training mode (gradients equal
    the plain loop's in eval mode); under no_grad nothing is kept."""
    ref = make("dbb").eval()
    model = copy.deepcopy(ref)
    batches = micro_batches()
    plain_loop(ref, batches)
    acc = accumulated_loop(model, batches)
    assert acc.generated == 2
    assert_same_grads(model, ref)
    x, _ = batches[0]
    with rc.accumulate(model) as acc, torch.no_grad():
        out = model(x)
    assert acc.generated == 0 and not out.requires_grad
    assert rel_err(out, ref(x)) < 1e-14


def test_nested_contexts():
    """An inner context over blocks the outer one covers does nothing; one over other
    blocks backpropagates them when it exits; gradients equal the plain loop's."""
    ref = make("orepa")
    batches = micro_batches()
    plain_loop(ref, batches)

    model = copy.deepcopy(ref)
    with rc.accumulate(model) as outer:
        with rc.accumulate(model) as inner:
            plain_loop(model, batches)
        assert inner.generated == 0
        assert all(p.grad is None for p in model.b1.expr.parameters())  # not yet: outer owns them
    assert outer.generated == outer.backpropagated == 2
    assert_same_grads(model, ref)

    model = copy.deepcopy(ref)
    for p in model.parameters():
        p.grad = None
    with rc.accumulate(model.b1) as outer:
        with rc.accumulate(model) as inner:
            plain_loop(model, batches)
        assert inner.generated == inner.backpropagated == 1  # b2 only
        assert all(p.grad is not None for p in model.b2.expr.parameters())
        assert all(p.grad is None for p in model.b1.expr.parameters())
    assert outer.generated == 1
    assert_same_grads(model, ref)


def test_exception_inside_discards_kernels_and_cleans_up():
    ref = make("orepa")
    model = copy.deepcopy(ref)
    batches = micro_batches()
    with pytest.raises(KeyError):
        with rc.accumulate(model):
            plain_loop(model, batches[:1])
            raise KeyError("boom")
    # nothing reached the branch parameters; the ordinary ones have the micro-batch's
    # gradients, as the plain loop would have
    assert all(p.grad is None for b in (model.b1, model.b2) for p in b.expr.parameters())
    assert model.fc.weight.grad is not None
    # no state left behind: the next steps are ordinary
    model.zero_grad(set_to_none=True)
    plain_loop(model, batches)
    plain_loop(ref, batches)
    assert_same_grads(model, ref)
    model.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    accumulated_loop(model, batches)
    plain_loop(ref, batches)
    assert_same_grads(model, ref)


def test_optimizer_step_inside_is_refused():
    model = make("orepa")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x, y), (x2, y2) = micro_batches(2)
    with pytest.raises(RepCompilerError, match="b1.*changed.*after the"):
        with rc.accumulate(model):
            F.cross_entropy(model(x), y).backward()
            opt.step()
            model(x2)


def test_backward_after_the_context_is_refused():
    model = make("orepa")
    x, y = micro_batches(1)[0]
    with rc.accumulate(model):
        loss = F.cross_entropy(model(x), y)
    with pytest.raises(RepCompilerError, match="after its `with rc.accumulate"):
        loss.backward()


def _spy_leaves(monkeypatch) -> list:
    """Weak references to every leaf kernel a context hands out (its ``_kernel``, wrapped)."""
    import sys
    import weakref

    mod = sys.modules["repcompiler.online.accumulate"]
    refs, original = [], mod.accumulate._kernel

    def spy(self, block, generate):
        leaf = original(self, block, generate)
        refs.append((weakref.ref(leaf.weight), weakref.ref(self._kept[id(block)].generated.weight)))
        return leaf

    monkeypatch.setattr(mod.accumulate, "_kernel", spy)
    return refs


def test_kernels_and_their_gradients_are_freed_on_exit(monkeypatch):
    """Nothing the context kept outlives it (no reference cycle left for the garbage
    collector: a whole model's kernels and kernel gradients would live through the
    optimizer step); a caller holding the last loss keeps the leaves (its graph references
    them) but not their gradients."""
    import gc

    refs = _spy_leaves(monkeypatch)
    model = make("orepa")
    batches = micro_batches()
    enabled = gc.isenabled()
    gc.disable()
    try:
        accumulated_loop(model, batches)
        assert refs and all(leaf() is None and gen() is None for leaf, gen in refs)
        refs.clear()
        with rc.accumulate(model):
            for x, y in batches:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
        held = [leaf() for leaf, _ in refs if leaf() is not None]
        assert held and all(t.grad is None for t in held)
        del loss, held
        assert all(leaf() is None for leaf, _ in refs)
    finally:
        if enabled:
            gc.enable()


def test_bad_arguments():
    with pytest.raises(UnsupportedError, match="nn.Module"):
        rc.accumulate("model")  # type: ignore[arg-type]
    model = make("orepa")
    ctx = rc.accumulate(model)
    with ctx:
        with pytest.raises(RepCompilerError, match="already open"):
            ctx.__enter__()


def test_orepa_transformed_model_float32():
    """A whole transformed model (stem 7x7 -> orepa_large, 3x3 -> orepa, 1x1 ->
    orepa_1x1), float32: accumulated gradients agree with the plain loop's to rounding."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    ref = rc.orepa_transform(plain)
    model = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 16, (4,), generator=g)) for _ in range(4)]
    plain_loop(ref, batches)
    acc = accumulated_loop(model, batches)
    assert acc.generated == 3
    assert_same_grads(model, ref, tol=1e-5)


def test_ddp_no_sync_one_process():
    """DDP (one gloo process): no_sync around all micro-batches but the last, the
    branch parameters' gradients arrive on exit and complete the reduction; equal to
    the plain loop. find_unused_parameters=True is refused."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    ref = make("orepa")
    model = copy.deepcopy(ref)
    batches = micro_batches()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        for step in range(2):
            for m in (ddp, ref):
                m.zero_grad(set_to_none=True)
            plain_loop(ref, batches)
            with rc.accumulate(ddp):
                for i, (x, y) in enumerate(batches):
                    sync = ddp.no_sync() if i < len(batches) - 1 else torch.enable_grad()
                    with sync:
                        F.cross_entropy(ddp(x), y).backward()
            assert_same_grads(model, ref)
        with pytest.raises(UnsupportedError, match="find_unused_parameters"):
            rc.accumulate(nn.parallel.DistributedDataParallel(copy.deepcopy(ref), find_unused_parameters=True))
    finally:
        dist.destroy_process_group()
