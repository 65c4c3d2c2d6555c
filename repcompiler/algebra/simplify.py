"""Simplification of linearized expressions, and the sum with a fast kernel generator.

:func:`simplify` returns an equal expression without no-op leaves and with nested
sums flattened into one :class:`LinearizedSum`, whose :meth:`LinearizedSum.fast_fold`
is the kernel generator ``linearize``'s online blocks call every training forward.
Pure algebra (no fx): the generic :meth:`Sum.fold` stays the reference.
"""

from __future__ import annotations

import torch
from torch import nn

from .expr import Concat, Expr, Seq, Sum
from .geometry import parallel
from .kernel import Kernel, add, expand_groups, spread
from .leaves import Affine
from .leaves_fixed import Identity

__all__ = ["LinearizedSum", "simplify"]


class LinearizedSum(Sum):
    """The parallel sum of a linearized block's branches, with :meth:`fast_fold`.

    Same semantics as :class:`~repcompiler.algebra.Sum` (``fold`` is inherited and is
    the reference); :class:`~repcompiler.online.conv.OnlineConv` calls ``fast_fold`` every
    training forward. It folds each branch, then adds the smaller branch kernels
    **in place into a slice** of the largest one (``W[:, :, 1:2, 1:2] += w_1x1`` for a
    1x1 branch, a scatter onto the diagonal for an identity/per-channel branch) instead
    of padding every branch to the full frame, stacking and summing: about a third of
    the full-size tensor traffic, forward and backward. Branches that need a spread
    (dilation) or other group structures fall back to the generic frame.
    :class:`repcompiler.blocks.accel.LinearizedSumAccelerator` attaches it to an online
    conv through the kernel-accelerator protocol.
    """

    has_fast_fold = True

    def fast_fold(self) -> Kernel:
        kernels = [t.fold(check=False) for t in self.terms]
        plan = parallel([k.spec for k in kernels])
        spec = plan.spec
        if spec is None or len(kernels) == 1:
            return self.fold(check=False)
        size = tuple(spec.kernel_size)
        groups = plan.groups
        base_i = next(
            (i for i, k in enumerate(kernels)
             if tuple(k.weight.shape[2:]) == size and k.spec.groups == groups
             and all(u == 1 for u in plan.ups[i]) and not any(plan.offsets[i])),
            None,
        )
        if base_i is None or groups != spec.groups:
            return add(kernels, check=False)
        w = kernels[base_i].weight
        # only edit a fresh tensor whose producer did not save it for backward
        fresh = w.grad_fn is not None and type(w.grad_fn).__name__ in ("MulBackward0", "CloneBackward0")
        if not fresh:
            w = w.clone()
        cin_g = w.shape[1]
        for i, k in enumerate(kernels):
            if i == base_i:
                continue
            up, off = plan.ups[i], plan.offsets[i]
            kw = k.weight.to(w.dtype)
            window = (slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(off, kw.shape[2:]))
            if any(u != 1 for u in up):
                w = w + spread(expand_groups(kw, k.spec.groups, groups), up, off, size)
            elif k.spec.groups == groups:
                w[window] += kw
            elif kw.shape[1] == 1 and k.spec.groups == kw.shape[0] and kw.shape[0] == w.shape[0]:
                # per-channel (identity-like) branch: channel c reads input c, which is
                # column c % (C / groups) of its group in the frame
                rows = torch.arange(kw.shape[0], device=kw.device)
                sub = w[window]
                sub.index_put_((rows, rows % cin_g), kw[:, 0], accumulate=True)
            else:
                w = w + spread(expand_groups(kw, k.spec.groups, groups), up, off, size)
        biases = [k.bias for k in kernels if k.bias is not None]
        bias = None
        if biases:
            bias = biases[0]
            for b in biases[1:]:
                bias = bias + b
        return Kernel(w, bias, spec)


def _is_noop(e: Expr) -> bool:
    if isinstance(e, Identity):
        return True
    if type(e) is Affine and e.scale is None and not isinstance(e.shift, nn.Parameter):
        return e.shift is None or not bool(e.shift.detach().ne(0).any())
    return False


def simplify(expr: Expr) -> Expr:
    """An equal expression without no-op leaves (identity, ``+ 0``) in sequences and
    with nested sums flattened into one :class:`LinearizedSum` (fewer kernel ops every
    training step). Leaves are reused, not copied."""
    if isinstance(expr, Concat):
        return Concat(*[simplify(t) for t in expr.terms])
    if isinstance(expr, Sum):
        flat: list[Expr] = []
        for t in expr.terms:
            t = simplify(t)
            if isinstance(t, Sum) and not isinstance(t, Concat):
                flat.extend(t.terms)
            else:
                flat.append(t)
        return LinearizedSum(*flat)
    if isinstance(expr, Seq):
        terms = [simplify(t) for t in expr.terms]
        kept = [t for t in terms if not _is_noop(t)]
        if not kept:
            return terms[0]
        return kept[0] if len(kept) == 1 else Seq(*kept)
    return expr
