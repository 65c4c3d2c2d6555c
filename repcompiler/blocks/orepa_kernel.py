"""The OREPA kxk kernel generator: one forward, one hand-written backward.

Online training regenerates every block's kernel from its branch parameters at every
step, so this is the fixed cost OREPA adds to a training step. The generic algebra
(:meth:`~repcompiler.algebra.Sum.fold`) is the reference; this module computes the
same kernel

.. code-block:: text

    W[o,c,k] = s0[o] w0[o,c,k]                       origin
             + s1[o] a[o,c] avg[o,k]                 1x1 -> kxk average
             + s2[o] p[o,c] prior[o,k]               1x1 x frequency prior
             + s3[o] sum_m w2[o,m,k] w1[m,c]         1x1 -> kxk (per group)
             + s4[o] q[o,c] [k == centre]            1x1 zero-padded
             + s5[o] sum_e pw[o,c,e] dw[c,e,k]       depthwise (x E) -> pointwise

with as few passes over kernel-sized memory as we could manage, and a backward
(:class:`OrepaKernel`) that runs the two big products of the 1x1 -> kxk branch as
single matrix products at the machine's matmul throughput, batches the depthwise ->
pointwise products over input channels with contiguous operands, and reduces the
fixed-pattern branches elementwise (autograd's generic backward of the same forward
ran small-inner-dimension batched products and per-batch copies, about 3x slower).

Under ``torch.compile``/``torch.export`` or without gradients, :func:`orepa_kernel`
runs the same forward as plain differentiable ops instead (tracers see ordinary aten
ops). The tests prove both equal to the generic fold, kernels and gradients, in float64.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..online import _is_compiling

__all__ = ["OrepaKernel", "OrepaPatterns", "orepa_kernel"]


class OrepaPatterns(NamedTuple):
    """The fixed (non-learnable) parts of an OREPA block's kernel."""

    avg: Tensor  # [O, K] average pattern of the 1x1 -> kxk average branch
    prior: Tensor  # [O, K] frequency prior, one basis function per output channel
    centre: int  # flat tap index of the zero-padded 1x1


def _forward(w0: Tensor, a: Tensor, p: Tensor, q: Tensor, w1: Tensor, w2: Tensor, dw: Tensor, pw: Tensor,
             s: Sequence[Tensor], pats: OrepaPatterns, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel ``[O, Cg, K]`` plus the two re-laid-out operands the backward reuses:
    ``w2`` as ``[G, Og*K, Mg]`` and ``s5 * pw`` as ``[G*Cg, E, Og]``."""
    O, Cg, K = w0.shape
    G = groups
    Og, Mg, E = O // G, w1.shape[1], pw.shape[2]
    s0, s1, s2, s3, s4, s5 = s
    col = (O, 1, 1)
    W = w0 * s0.reshape(col)
    W = W.addcmul_((a * s1[:, None]).unsqueeze(2), pats.avg.unsqueeze(1))
    W = W.addcmul_((p * s2[:, None]).unsqueeze(2), pats.prior.unsqueeze(1))
    W[:, :, pats.centre] += q * s4[:, None]
    # 1x1 -> kxk: one product per group, [Og*K, Mg] @ [Mg, Cg], added with a transposed read
    w2kc = w2.transpose(1, 2).reshape(G, Og * K, Mg)
    prod = torch.bmm(w2kc, w1).reshape(O, K, Cg)
    W = W.addcmul_(prod.transpose(1, 2), s3.reshape(col))
    # depthwise -> pointwise, per input channel [K, E] @ [E, Og]: output channels innermost
    # in every operand (small inner dimensions are only fast that way), then transposed
    # into the kernel's layout
    pws = (pw.reshape(O, Cg * E) * s5[:, None]).reshape(G, Og, Cg * E).transpose(1, 2).reshape(G * Cg, E, Og)
    dws = torch.bmm(dw.reshape(G * Cg, E, K).transpose(1, 2), pws).reshape(G, Cg * K, Og)
    W = W.reshape(G, Og, Cg * K).add_(dws.transpose(1, 2).contiguous()).reshape(O, Cg, K)
    return W, w2kc, pws


class OrepaKernel(torch.autograd.Function):
    """Autograd function for the OREPA kernel (see the module docstring for the formula).

    Inputs: ``w0 [O,Cg,K]``, ``a, p, q [O,Cg]``, ``w1 [G,Mg,Cg]``, ``w2 [O,Mg,K]``,
    ``dw [G*Cg,E,K]``, ``pw [O,Cg,E]``, six scales ``[O]``, then the fixed patterns and
    the group count. Output ``[O,Cg,K]``.
    """

    @staticmethod
    def forward(ctx: Any, w0: Tensor, a: Tensor, p: Tensor, q: Tensor, w1: Tensor, w2: Tensor, dw: Tensor,
                pw: Tensor, s0: Tensor, s1: Tensor, s2: Tensor, s3: Tensor, s4: Tensor, s5: Tensor,
                pats: OrepaPatterns, groups: int) -> Tensor:
        s = (s0, s1, s2, s3, s4, s5)
        W, w2kc, pws = _forward(w0, a, p, q, w1, w2, dw, pw, s, pats, groups)
        ctx.save_for_backward(w0, a, p, q, w1, w2kc, dw, pw, pws, *s, pats.avg, pats.prior)
        ctx.centre, ctx.groups = pats.centre, groups
        return W

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gW: Tensor) -> tuple[Tensor | None, ...]:
        w0, a, p, q, w1, w2kc, dw, pw, pws, s0, s1, s2, s3, s4, s5, avg, prior = ctx.saved_tensors
        need = ctx.needs_input_grad
        O, Cg, K = w0.shape
        G = ctx.groups
        Og, Mg, E = O // G, w1.shape[1], pw.shape[2]
        gW = gW.contiguous()
        col = (O, 1, 1)
        g: list[Tensor | None] = [None] * 16

        def per_out(x: Tensor, y: Tensor) -> Tensor:  # sum over everything but dim 0
            return torch.linalg.vecdot(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1))

        # origin
        if need[0]:
            g[0] = gW * s0.reshape(col)
        if need[8]:
            g[8] = per_out(gW, w0)
        # the three fixed-pattern branches: reduce the kernel gradient against the pattern
        for ci, si, coef, pat in ((1, 9, a, avg), (2, 10, p, prior), (3, 12, q, None)):
            if not (need[ci] or need[si]):
                continue
            r = gW[:, :, ctx.centre] if pat is None else torch.linalg.vecdot(gW, pat.unsqueeze(1))
            scale = s1 if ci == 1 else (s2 if ci == 2 else s4)
            if need[ci]:
                g[ci] = r * scale[:, None]
            if need[si]:
                g[si] = per_out(r, coef)
        # 1x1 -> kxk: kernel gradient laid out [G, Og*K, Cg] for the two products
        if need[4] or need[5] or need[11]:
            gWt = gW.transpose(1, 2).reshape(G, Og * K, Cg)
            if need[5] or need[11]:
                h = torch.bmm(gWt, w1.transpose(1, 2)).reshape(O, K, Mg)  # d/d(s3 * w2), kc layout
                if need[5]:
                    g[5] = (h * s3.reshape(col)).transpose(1, 2)
                if need[11]:
                    g[11] = per_out(h, w2kc.reshape(O, K, Mg))
            if need[4]:
                scaled = (gWt.reshape(O, K, Cg) * s3.reshape(col)).reshape(G, Og * K, Cg)
                g[4] = torch.bmm(w2kc.transpose(1, 2), scaled)
        # depthwise -> pointwise: kernel gradient as [G*Cg, K, Og] (see the forward)
        if need[6] or need[7] or need[13]:
            gWo = gW.reshape(G, Og, Cg * K).transpose(1, 2).reshape(G * Cg, K, Og)
            if need[7] or need[13]:
                z = torch.bmm(dw, gWo).reshape(G, Cg * E, Og).transpose(1, 2).reshape(O, Cg * E)  # d/d(s5 * pw)
                if need[7]:
                    g[7] = (z * s5[:, None]).reshape(O, Cg, E)
                if need[13]:
                    g[13] = per_out(z, pw)
            if need[6]:
                g[6] = torch.bmm(pws, gWo.transpose(1, 2))
        return tuple(g)


def orepa_kernel(w0: Tensor, a: Tensor, p: Tensor, q: Tensor, w1: Tensor, w2: Tensor, dw: Tensor, pw: Tensor,
                 scales: Sequence[Tensor], pats: OrepaPatterns, groups: int) -> Tensor:
    """The OREPA kernel ``[O, Cg, K]`` (shapes as in :class:`OrepaKernel`): through the
    hand-written backward when eager autograd needs it, as plain ops otherwise."""
    inputs = (w0, a, p, q, w1, w2, dw, pw, *scales)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs) and not _is_compiling():
        return OrepaKernel.apply(*inputs, pats, groups)
    return _forward(w0, a, p, q, w1, w2, dw, pw, scales, pats, groups)[0]
