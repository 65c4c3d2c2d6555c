"""Analysis of trained re-parameterized models: how diverse a block's branches are.

This module owns :func:`branch_kernels` and :func:`branch_similarity` (the OREPA
paper's Fig. 7: with per-channel "vector" scaling the branches of a block stay
diverse; without scaling, or with a scalar, they tend to become similar).

A branch's *equivalent kernel* is what the branch contributes to the block's folded
kernel: the branch (a term of the block's :class:`~repcompiler.algebra.Sum`), scale
included, folded on its own, then placed in the block's full kernel frame exactly as
the sum places it (zero-padded to the frame's size at the branch's offset, taps spread
by its dilation ratio, groups expanded to the frame's), so the sum of the branch
kernels is the block's kernel. The similarity of two branches is the cosine of the
angle between their flattened equivalent kernels (weights only; biases are left out).

Everything is read from the expression structure (``OnlineConv.expr``), never from
parameter names:

* a block whose ``expr`` is a ``Sum`` (not a ``Concat``): its terms are the branches,
  reported under the block's qualified name;
* a block whose ``expr`` is a ``Seq`` (e.g. the stacked "linear deep stem"): every
  ``Sum`` inside it is compared within its own frame, reported under that sum's
  qualified module name (``"<block>.branches.stage<i>"``); composition mixes the stages,
  so comparing branches across stages in one frame would mean nothing;
* a block with a single branch has nothing to compare and is left out.

A branch whose equivalent kernel is all zero (e.g. OREPA's prior branch at
initialisation, scale 0) has no direction: its row and column are ``NaN``.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from .. import algebra as A
from ..analysis.inputs import check_model
from ..errors import InexactFoldError
from ..blocks.named import BlockExpr
from ..online.conv import OnlineConv

__all__ = ["branch_kernels", "branch_similarity", "cosine_matrix"]

log = logging.getLogger(__name__)


def branch_kernels(expr: A.Expr) -> list[Tensor]:
    """The equivalent kernel of each term of ``expr`` in the sum's frame: new tensors,
    detached, sharing no memory with the block's parameters (editing one leaves the
    block as it is).

    Each tensor has the shape of the folded sum's weight (``[out, in/groups, *k]``)
    and they add up to it."""
    with torch.no_grad():
        kernels = [term.fold(check=False) for term in expr.terms]  # type: ignore[attr-defined]
        plan = A.parallel([k.spec for k in kernels])
        if plan.spec is None:  # strides differ: no online block can hold such a sum
            raise InexactFoldError("branch_kernels: the branches share no kernel frame: " + "; ".join(plan.reasons))
        size = plan.spec.kernel_size
        return [
            # a branch without a scale folds to its own weight: copy it
            A.spread(A.expand_groups(k.weight, k.spec.groups, plan.groups), up, off, size).detach().clone()
            for k, up, off in zip(kernels, plan.ups, plan.offsets)
        ]


def cosine_matrix(kernels: list[Tensor]) -> Tensor:
    """Pairwise cosine similarity ``[B, B]`` (float64) of flattened kernels; rows and
    columns of all-zero kernels are ``NaN``."""
    flat = torch.stack([k.detach().reshape(-1).to(torch.float64) for k in kernels])
    norms = flat.norm(dim=1)
    gram = flat @ flat.T
    sim = gram / (norms[:, None] * norms[None, :])
    zero = norms == 0
    sim[zero, :] = float("nan")
    sim[:, zero] = float("nan")
    return sim.clamp(-1.0, 1.0)


def _is_parallel(expr: A.Expr) -> bool:
    """A parallel sum of branches: the algebra's ``Sum`` or a declared block
    (:class:`~repcompiler.blocks.named.BlockExpr`), not a channel concat."""
    return isinstance(expr, (A.Sum, BlockExpr)) and not isinstance(expr, A.Concat)


def _sums(expr: A.Expr, path: str) -> list[tuple[str, A.Expr]]:
    """The multi-branch sums in ``expr`` (whose module path is ``path``) with their paths."""
    if _is_parallel(expr):
        return [(path, expr)] if len(expr.terms) > 1 else []
    if isinstance(expr, A.Seq):
        return [found for child, term in expr.named_children() if isinstance(term, A.Expr)
                for found in _sums(term, f"{path}.{child}")]
    return []


def branch_similarity(model: nn.Module) -> dict[str, Tensor]:
    """For every online block of ``model``, the pairwise cosine similarity ``[B, B]``
    (float64, on the CPU) of its branches' equivalent kernels, each with its scale
    (see the module docstring for what is compared and how blocks are named).

    Branch ``i`` is term ``i`` of the block's sum, in declaration order (for the
    built-in ``orepa`` block: origin, 1x1->avg, prior, 1x1->kxk, 1x1, depthwise).
    ``model`` is not modified. A model without online blocks gives ``{}``.

    Raises:
        UnsupportedError: ``model`` is not an ``nn.Module``.
    """
    check_model(model, "branch_similarity")
    out: dict[str, Tensor] = {}
    for name, m in model.named_modules():
        if not isinstance(m, OnlineConv):
            continue
        # a sum at the top is the block itself (its name); deeper sums go by module path
        top = _is_parallel(m.expr)
        for key, expr in _sums(m.expr, name if top else (f"{name}.branches" if name else "branches")):
            out[key] = cosine_matrix(branch_kernels(expr)).cpu()
    if not out:
        log.info("branch_similarity: %s has no multi-branch online block", type(model).__name__)
    return out
