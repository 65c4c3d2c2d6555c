"""OnlineConv / OfflineBlock: one conv per forward, gradients equal the unfolded
block, the eval-mode kernel cache, module-level deploy, pickling."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from repcompiler.blocks import ConvGeometry, build_block
from repcompiler.online.conv import OfflineBlock, OnlineConv

from helpers import randomize_bn, rel_err


class ConvCounter(TorchDispatchMode):
    """Counts convolutions whose input has the feature map's batch size (kernel
    generation convolves kernels, whose leading dim is a channel count)."""

    def __init__(self, batch: int) -> None:
        super().__init__()
        self.batch = batch
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.mkldnn_convolution,
                                   torch.ops.aten._convolution, torch.ops.aten.conv2d):
            if args[0].dim() >= 3 and args[0].shape[0] == self.batch:
                self.count += 1
        return func(*args, **(kwargs or {}))


def geom2d(cin, cout, k, s=1, g=1) -> ConvGeometry:
    p = (k - 1) // 2
    return ConvGeometry(cin, cout, (k, k), (s, s), ((p, p), (p, p)), (1, 1), g, 2, False)


def make(name: str, gm: ConvGeometry, *, double=True, post_bn=True) -> OnlineConv:
    expr = build_block(name, gm)
    bn = nn.BatchNorm2d(gm.out_channels) if post_bn else None
    m = OnlineConv(expr, bn, block=name)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.double() if double else m


BATCH = 5  # distinctive: no kernel dim equals it


@pytest.mark.parametrize("name,gm", [
    ("orepa", geom2d(8, 16, 3)),
    ("orepa", geom2d(8, 8, 3, s=2, g=8)),
    ("orepa_large", geom2d(3, 8, 7, s=2)),
    ("orepa_1x1", geom2d(8, 16, 1, s=2)),
    ("dbb", geom2d(8, 8, 3)),
    ("repvgg", geom2d(8, 8, 3)),
    ("acnet", geom2d(8, 8, 3)),
])
def test_one_feature_map_conv_per_forward(name, gm):
    m = make(name, gm, double=False).train()
    x = torch.randn(BATCH, gm.in_channels, 12, 12, requires_grad=True)
    with ConvCounter(BATCH) as c:
        y = m(x)
    assert c.count == 1
    with ConvCounter(BATCH) as c:  # backward: input grad + weight grad, still the one conv
        y.sum().backward()
    assert c.count <= 2
    # the offline form runs a conv per branch
    off = OfflineBlock(build_block(name, gm, mode="offline")).train()
    with ConvCounter(BATCH) as c:
        off(x.detach())
    assert c.count >= 2 or name == "orepa_1x1"


@pytest.mark.parametrize("name", ["orepa", "orepa_large", "dbb"])
def test_gradients_equal_unfolded(name):
    gm = geom2d(4, 6, 7 if name == "orepa_large" else 3)
    m = make(name, gm).train()
    x = torch.randn(3, 4, 9, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 9, 9, dtype=torch.float64)
    params = [x] + list(m.parameters())
    g_online = torch.autograd.grad((m(x) * w).sum(), params)
    g_unfolded = torch.autograd.grad((m.post_bn(m.expr(x)) * w).sum(), params)  # branches on the feature map
    for a, b in zip(g_online, g_unfolded):
        assert rel_err(a, b) < 1e-9


def test_eval_cache_regenerates_only_on_change():
    m = make("orepa", geom2d(4, 6, 3)).eval()
    randomize_bn(m)
    calls = {"n": 0}
    orig = m.generate

    def counting():
        calls["n"] += 1
        return orig()

    m.generate = counting  # instance attribute shadows the method
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y1 = m(x)
        y2 = m(x)
    assert calls["n"] == 1 and torch.equal(y1, y2)
    with torch.no_grad():  # an optimizer-style in-place update invalidates the cache
        m.expr.terms[0].terms[0].weight.add_(1.0)
        y3 = m(x)
    assert calls["n"] == 2 and not torch.allclose(y1, y3)
    # load_state_dict invalidates it too
    sd = copy.deepcopy(m.state_dict())
    with torch.no_grad():
        m.expr.terms[1].terms[0].weight.zero_()
        m(x)
    m.load_state_dict(sd)
    with torch.no_grad():
        assert torch.allclose(m(x), y3)
    # eval mode with grad enabled: no cache, gradients flow to the branches
    n = calls["n"]
    m(x).sum().backward()
    assert calls["n"] == n + 1
    assert m.expr.terms[0].terms[0].weight.grad is not None
    # training mode with gradients flowing never caches
    m.train()
    m(x)
    m(x)
    assert calls["n"] == n + 3


def test_frozen_block_in_training_mode_uses_the_cache():
    """Fine-tuning with a frozen online backbone: the kernel is generated once, not every
    step; the post-BN still trains (batch statistics); unfreezing regenerates."""
    m = make("orepa", geom2d(4, 6, 3)).train()
    ref = copy.deepcopy(m)
    m.expr.requires_grad_(False)
    calls = {"n": 0}
    orig = m.generate

    def counting():
        calls["n"] += 1
        return orig()

    m.generate = counting
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    for _ in range(3):
        y = m(x)
        assert torch.equal(y, ref(x))  # same kernel, same batch-statistics BN
    assert calls["n"] == 1 and y.requires_grad  # the post-BN's affine still trains
    assert torch.equal(m.post_bn.running_mean, ref.post_bn.running_mean)
    m.expr.requires_grad_(True)
    m(x).sum().backward()
    assert calls["n"] == 2 and all(p.grad is not None for p in m.expr.parameters())


def test_eval_cache_sees_ema_updates_and_drops_on_mode_switch():
    """EMA helpers update ``state_dict()`` tensors in place (detached views: the version
    counter moves, the cache regenerates). ``param.data`` edits do not move it; calling
    ``eval()`` again drops the cache."""
    m, src = (randomize_bn(make("orepa", geom2d(4, 6, 3), post_bn=False)).eval() for _ in range(2))
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)

    def reference():
        with torch.no_grad():
            return m.generate().apply(x)

    with torch.no_grad():
        m(x)
        for v, w in zip(m.state_dict().values(), src.state_dict().values()):
            v.mul_(0.5).add_(w, alpha=0.5)  # an EMA step
        assert torch.equal(m(x), reference())
        for p in m.parameters():
            p.data.mul_(1.5)  # invisible to version counters
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), reference())


def test_module_deploy_equals_eval_output():
    for name in ["orepa", "orepa_1x1", "orepa_large", "dbb", "repvgg", "acnet"]:
        k = 7 if name == "orepa_large" else (1 if name == "orepa_1x1" else 3)
        m = make(name, geom2d(4, 6, k)).eval()
        randomize_bn(m)
        x = torch.randn(2, 4, 10, 10, dtype=torch.float64)
        with torch.no_grad():
            assert rel_err(m.to_conv()(x), m(x)) < 1e-12
        off = OfflineBlock(build_block(name, geom2d(4, 6, k), mode="offline"), nn.BatchNorm2d(6)).double().eval()
        randomize_bn(off)
        with torch.no_grad():
            assert rel_err(off.to_conv()(x), off(x)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", ["orepa", "repvgg", "dbb", "acnet"])
def test_mixed_precision_training_step(block, dtype):
    """Under autocast the kernel is generated in the parameters' dtype (bit-equal to the
    kernel without autocast) and only the conv that applies it runs in low precision."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.BatchNorm2d(8), nn.ReLU(),
                                nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8))
    import repcompiler as rc

    m = randomize_bn(rc.orepa_transform(model, block=block)).train()
    blocks = [b for b in m.modules() if isinstance(b, OnlineConv)]
    x, r = torch.randn(2, 3, 12, 12), torch.randn(2, 8, 12, 12)
    want = [b.generate().weight for b in blocks]
    ref = m(x)
    with torch.autocast("cpu", dtype=dtype):
        got = [b.generate().weight for b in blocks]
        y = m(x)
    assert y.dtype == dtype
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert rel_err(y.float(), ref) < 3e-2
    (y.float() * r).sum().backward()
    assert all(p.grad is not None and p.grad.dtype == p.dtype and p.grad.isfinite().all()
               for b in blocks for p in b.expr.parameters() if p.requires_grad)


def test_float32_deploy_relative_error():
    m = make("orepa", geom2d(16, 32, 3), double=False).eval()
    randomize_bn(m)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        assert rel_err(m.to_conv()(x), m(x)) < 1e-5


def test_pickle_and_deepcopy_roundtrip():
    m = make("orepa", geom2d(4, 6, 3)).eval()
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = m(x)  # fills the cache
    assert m._cache is not None
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    assert m2._cache is None
    m3 = pickle.loads(pickle.dumps(m))
    m4 = copy.deepcopy(m)
    with torch.no_grad():
        for other in (m2, m3, m4):
            assert torch.equal(other(x), y)


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("name", ["orepa", "orepa_1x1", "repvgg", "dbb", "acnet"])
def test_gradients_have_their_parameters_strides(name, groups, dims):
    """Autograd's gradient layout contract, exactly (size-1 dims included): DDP aliases
    each gradient into its bucket only when the strides are equal, and warns otherwise.
    The online OREPA parameters are stored in non-default layouts, so this is checked."""
    if name == "acnet" and dims == 1:
        pytest.skip("acnet has no 1-d form")
    k = 1 if name == "orepa_1x1" else 3
    p = (k - 1) // 2
    gm = ConvGeometry(4, 8, (k,) * dims, (1,) * dims, ((p, p),) * dims, (1,) * dims, groups, dims, False)
    m = OnlineConv(build_block(name, gm), None, block=name)
    x = torch.randn(2, 4, *(6,) * dims)
    m(x).square().sum().backward()
    bad = [(n, tuple(q.stride()), tuple(q.grad.stride())) for n, q in m.named_parameters()
           if q.grad is not None and q.stride() != q.grad.stride()]
    assert not bad


def test_ddp_trains_the_online_model_like_the_model_itself():
    """DistributedDataParallel (one gloo process) over a transformed model: same
    parameters after a few SGD steps as the model trained alone, and no gradient-layout
    warning from DDP's reducer."""
    import warnings

    import torch.distributed as dist

    import repcompiler

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model = repcompiler.orepa_transform(plain)
    alone = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 12, 12), torch.randint(0, 16, (4,))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ddp = nn.parallel.DistributedDataParallel(model)
            for m in (ddp, alone):
                opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
                for _ in range(3):
                    opt.zero_grad()
                    nn.functional.cross_entropy(m(x), y).backward()
                    opt.step()
    finally:
        dist.destroy_process_group()
    assert not [w for w in caught if "strides" in str(w.message)]
    for a, b in zip(model.parameters(), alone.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        assert a.stride() == b.stride()
