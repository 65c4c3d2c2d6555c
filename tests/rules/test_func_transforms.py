"""Transformed models under ``torch.func`` (grad, vmap, jvp) and higher-order autograd.

Per-sample gradients (``vmap(grad(...))``, as differential-privacy training computes
them), forward-mode derivatives and Hessian-vector products must work on an online
model and agree with independent references: autograd on the same model one sample at
a time, and central finite differences in float64. Every built-in block is covered (the
OREPA blocks go through the hand-written kernel generator, the others through the
generic fold)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

import repcompiler as rc

from helpers import autograd_node_names, randomize_bn, rel_err

BLOCKS = ["orepa", "orepa_1x1", "repvgg", "dbb", "acnet"]


def _model(block: str) -> nn.Module:
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(3, 8, 5, padding=2), nn.BatchNorm2d(8), nn.ReLU(),  # the stem: orepa_large
        nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 36, 3))
    model = rc.orepa_transform(plain, block=block).double()
    with torch.no_grad():  # zero-initialised scales and placeholder branches become non-trivial
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return randomize_bn(model).eval()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _loss_fn(model: nn.Module):
    buffers = dict(model.named_buffers())

    def loss(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, (params, buffers), (x[None],)).square().sum()

    return loss


def _inputs(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("block", BLOCKS)
def test_per_sample_gradients_equal_autograd_per_sample(block):
    model = _model(block)
    x = _inputs()
    got = vmap(grad(_loss_fn(model)), in_dims=(None, 0))(_params(model), x)
    names = [k for k, _ in model.named_parameters()]
    for i in range(x.shape[0]):
        model.zero_grad()
        model(x[i:i + 1]).square().sum().backward()
        for k, p in zip(names, model.parameters()):
            want = p.grad if p.grad is not None else torch.zeros_like(p)
            assert rel_err(got[k][i], want) < 1e-10, (block, k)


@pytest.mark.parametrize("block", ["orepa", "dbb"])
def test_grad_transform_equals_autograd(block):
    model = _model(block)
    x = _inputs(1)
    got = grad(_loss_fn(model))(_params(model), x[0])
    model(x).square().sum().backward()
    for k, p in model.named_parameters():
        assert rel_err(got[k], p.grad) < 1e-10, (block, k)


def _directional(f, p: dict[str, torch.Tensor], v: dict[str, torch.Tensor], eps: float = 1e-6):
    """Central finite difference of ``f`` at ``p`` along ``v`` (float64)."""
    plus = f({k: p[k] + eps * v[k] for k in p})
    minus = f({k: p[k] - eps * v[k] for k in p})
    if isinstance(plus, dict):
        return {k: (plus[k] - minus[k]) / (2 * eps) for k in plus}
    return (plus - minus) / (2 * eps)


def _direction(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) for k, p in params.items()}


@pytest.mark.parametrize("block", BLOCKS)
def test_jvp_in_the_parameters_equals_finite_differences(block):
    model = _model(block)
    x, params = _inputs(2), _params(model)
    v = _direction(params)
    buffers = dict(model.named_buffers())

    def out(p):
        return functional_call(model, (p, buffers), (x,))

    want = _directional(out, params, v)
    _, tangent = jvp(out, (params,), (v,))
    assert rel_err(tangent, want) < 1e-6
    # the same through torch.autograd.forward_ad (dual tensors, no torch.func)
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        dual = {k: fwAD.make_dual(params[k], v[k]) for k in params}
        tangent = fwAD.unpack_dual(out(dual)).tangent
    assert rel_err(tangent, want) < 1e-6


@pytest.mark.parametrize("block", ["orepa", "dbb"])
def test_hessian_vector_products_equal_finite_differences(block):
    """Double backward (``create_graph=True``) through the online blocks, and the same
    product by ``torch.func`` (forward-over-reverse)."""
    model = _model(block)
    x, params = _inputs(2), _params(model)
    v = _direction(params)
    buffers = dict(model.named_buffers())

    def loss(p):
        return functional_call(model, (p, buffers), (x,)).square().sum()

    def gradient(p):
        return grad(loss)(p)

    want = _directional(gradient, params, v)
    # reverse-over-reverse with plain autograd
    leaves = {k: t.clone().requires_grad_() for k, t in params.items()}
    gs = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    hv = torch.autograd.grad(sum((g * v[k]).sum() for g, k in zip(gs, leaves)), list(leaves.values()))
    # forward-over-reverse with torch.func
    _, hv_func = jvp(gradient, (params,), (v,))
    for (k, w), a in zip(want.items(), hv):
        scale = max(float(w.abs().max()), 1.0)
        assert float((a - w).abs().max()) / scale < 1e-5, (block, k)
        assert float((hv_func[k] - w).abs().max()) / scale < 1e-5, (block, k)


def test_func_transforms_leave_the_eager_paths_as_they_were():
    """After a transform the model trains through the hand-written backward again."""
    model = _model("orepa").train()
    vmap(grad(_loss_fn(model.eval())), in_dims=(None, 0))(_params(model), _inputs())
    model.train()
    assert "OrepaKernelBackward" in autograd_node_names(model(_inputs()))
