"""Small, stable test helpers shared by the test files (keep signatures stable)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

import repcompiler.testing as rct

__all__ = ["autograd_node_names", "randomize_bn", "rel_err", "randomized_eval", "first_tensor",
           "assert_kernel_matches_fold"]


def randomize_bn(
    module: nn.Module,
    seed: int = 0,
    *,
    extra: Callable[[nn.Module, torch.Generator], None] | None = None,
    **settings: Any,
) -> nn.Module:
    """:func:`repcompiler.testing.randomize_bn` (which documents the ``settings``:
    ``mean_std``, ``var_range``, ``bias_std``, ``flip_prob``, ``skip_untracked``,
    ``draw_dtype``) with one generator seeded with ``seed`` (deterministic).

    ``extra(m, generator)``, if given, is called on every other submodule, in
    ``module.modules()`` order with the same generator, so a fixture can randomize its
    own zero-initialised layers too (``fixtures_blocks``). The defaults are the
    library's; ``fixtures_blocks`` and ``zoo_utils`` bind their own. Returns ``module``.
    """
    g = torch.Generator().manual_seed(seed)
    if extra is None:
        return rct.randomize_bn(module, g, **settings)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                rct.randomize_bn(m, g, **settings)
            else:
                extra(m, g)
    return module


def rel_err(a: Tensor, b: Tensor) -> float:
    """``max|a - b| / max|b|`` (computed in float64); shapes must match exactly."""
    assert a.shape == b.shape, f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}"
    a64, b64 = a.detach().double(), b.detach().double()
    scale = b64.abs().max().item() if b64.numel() else 0.0
    diff = (a64 - b64).abs().max().item() if b64.numel() else 0.0
    if scale == 0.0:
        return diff
    return diff / scale


def autograd_node_names(t: Tensor) -> set[str]:
    """Type names of every autograd node ``t`` was computed through."""
    seen, todo = set(), [t.grad_fn]
    while todo:
        n = todo.pop()
        if n is not None and n not in seen:
            seen.add(n)
            todo += [m for m, _ in n.next_functions]
    return {type(n).__name__ for n in seen}


def linear_bn_folds(model: nn.Module, *example_inputs: Any) -> tuple[nn.Module, list[tuple[str, ...]]]:
    """``rc.fold`` ``model`` and return the folded model and the ``(linear, bn)`` pairs
    its report lists as folded."""
    import repcompiler as rc

    folded, report = rc.fold(model, *example_inputs, return_report=True)
    return folded, [tuple(e.name.split(" -> ")) for e in report.by_action("folded") if e.kind == "linear"]


def randomized_eval(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with randomized BN statistics (library defaults, seeded), in eval mode."""
    rct.randomize_bn(model, torch.Generator().manual_seed(seed))
    return model.eval()


def first_tensor(out: Any) -> Tensor:
    """The first tensor of a (nested) tuple/list output (a detector's raw output)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def assert_kernel_matches_fold(expr: nn.Module, fast: Any) -> None:
    """``fast``, a kernel a fast path generated for ``expr``, equals ``expr.fold()``: the same
    spec, weight and bias within relative 1e-12, and the same gradient for every parameter
    of ``expr`` (relative 1e-10, probed with a random weight cotangent)."""
    ref = expr.fold()
    assert fast.spec == ref.spec
    assert rel_err(fast.weight, ref.weight) < 1e-12
    if ref.bias is None:
        assert fast.bias is None
    else:
        assert rel_err(fast.bias, ref.bias) < 1e-12
    probe = torch.randn_like(ref.weight)
    params = list(expr.parameters())
    g_fast = torch.autograd.grad((fast.weight * probe).sum(), params, allow_unused=True)
    g_ref = torch.autograd.grad((expr.fold().weight * probe).sum(), params, allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            assert rel_err(a, b) < 1e-10
