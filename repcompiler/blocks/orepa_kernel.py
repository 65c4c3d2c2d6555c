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

with as few passes over kernel-sized memory as we could manage. Kernel generation is
memory-bound apart from the two big products of the 1x1 -> kxk branch, so:

* the 1x1 -> kxk branch is one matrix product per group, ``[Og*K, Mg] @ [Mg, Cg]``,
  in the forward and in each of the two gradients (at the machine's matmul rate);
* the depthwise -> pointwise products are batched over input channels with output
  channels innermost in every operand (small inner dimensions are only fast that way);
* the origin and the three "1x1 times a fixed pattern" branches are one batched
  product against the ``[O, K, 3]`` pattern table, forward and backward;
* the backward (:class:`OrepaKernel`) computes only the gradients autograd asks for,
  reuses the scaled, re-laid-out operands of the forward, writes every gradient in
  its parameter's layout (so autograd can take it without a copy) and takes scale
  gradients as per-row dot products without temporaries. Autograd's generic backward
  of the same forward ran small-inner-dimension products on strided operands with
  per-batch copies.

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

    table: Tensor  # [O, K, 3]: average pattern, frequency prior, centre one-hot
    centre: int  # flat tap index of the zero-padded 1x1

    @classmethod
    def of(cls, avg: Tensor, prior: Tensor, centre: int) -> "OrepaPatterns":
        """From the average pattern and the prior (each ``[O, K]``) and the centre tap."""
        one = torch.zeros_like(avg)
        one[:, centre] = 1.0
        return cls(torch.stack([avg, prior, one], dim=2), centre)

    @property
    def avg(self) -> Tensor:
        return self.table[:, :, 0]

    @property
    def prior(self) -> Tensor:
        return self.table[:, :, 1]


def _t(x: Tensor) -> Tensor:
    """``x [N, A, B]`` transposed into a new contiguous ``[N, B, A]`` tensor (never a view of
    ``x``, so callers may scale it in place; a single matrix goes through torch's blocked
    2-d transpose copy, about twice as fast as the batched one)."""
    out = x.new_empty(x.shape[0], x.shape[2], x.shape[1])
    if x.shape[0] == 1:
        out[0].copy_(x[0].t())
    else:
        out.copy_(x.transpose(1, 2))
    return out


def _scaled_t(x: Tensor, s: Tensor, fused: bool) -> Tensor:
    """``_t(x * s)`` for ``s`` broadcastable to ``[N, A, 1]``; scaled in place when
    ``fused`` (no autograd)."""
    xt, st = _t(x), s.transpose(1, 2)
    return xt.mul_(st) if fused else xt * st


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Per-row dot products of two same-shape tensors (rows = dim 0), no temporary."""
    n = x.shape[0]
    return torch.bmm(x.reshape(n, 1, -1), y.reshape(n, -1, 1)).reshape(n)


def _forward(w0: Tensor, a: Tensor, p: Tensor, q: Tensor, w1: Tensor, w2: Tensor, dw: Tensor, pw: Tensor,
             s: Sequence[Tensor], pats: OrepaPatterns, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel ``[O, Cg, K]`` plus the two re-laid-out operands the backward reuses:
    ``s3 * w2`` as ``[G, Og*K, Mg]`` and ``s5 * pw`` as ``[G*Cg, E, Og]``."""
    O, Cg, K = w0.shape
    G = groups
    Og, Mg, E = O // G, w1.shape[1], pw.shape[2]
    s0, s1, s2, s3, s4, s5 = s
    fused = not torch.is_grad_enabled() and not _is_compiling()
    # origin plus the three "1x1 times a fixed pattern" branches: [O, Cg, 3] @ [O, 3, K]
    coef = torch.stack([a * s1[:, None], p * s2[:, None], q * s4[:, None]], dim=2)
    W = (w0 * s0.reshape(O, 1, 1)).baddbmm_(coef, pats.table.transpose(1, 2))
    # 1x1 -> kxk: one product per group, [Og*K, Mg] @ [Mg, Cg], added with a transposed read
    w2s = _scaled_t(w2, s3.reshape(O, 1, 1), fused).reshape(G, Og * K, Mg)
    W = W.add_(torch.bmm(w2s, w1).reshape(O, K, Cg).transpose(1, 2))
    # depthwise -> pointwise, per input channel [K, E] @ [E, Og]: output channels innermost
    # in every operand (small inner dimensions are only fast that way), then transposed
    # into the kernel's layout
    pws = _scaled_t(pw.reshape(G, Og, Cg * E), s5.reshape(G, Og, 1), fused).reshape(G * Cg, E, Og)
    dws = torch.bmm(dw.reshape(G * Cg, E, K).transpose(1, 2), pws).reshape(G, Cg * K, Og)
    W = W.reshape(G, Og, Cg * K).add_(_t(dws)).reshape(O, Cg, K)
    return W, w2s, pws


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
        W, w2s, pws = _forward(w0, a, p, q, w1, w2, dw, pw, s, pats, groups)
        ctx.save_for_backward(w0, a, p, q, w1, w2, w2s, dw, pw, pws, *s, pats.table)
        ctx.groups = groups
        return W

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gW: Tensor) -> tuple[Tensor | None, ...]:
        w0, a, p, q, w1, w2, w2s, dw, pw, pws, s0, s1, s2, s3, s4, s5, table = ctx.saved_tensors
        need = ctx.needs_input_grad
        O, Cg, K = w0.shape
        G = ctx.groups
        Og, Mg, E = O // G, w1.shape[1], pw.shape[2]
        gW = gW.contiguous()
        g: list[Tensor | None] = [None] * 16
        # origin
        if need[0]:
            g[0] = gW * s0.reshape(O, 1, 1)
        if need[8]:
            g[8] = _dot(gW, w0)
        # the fixed-pattern branches: the kernel gradient against the patterns, [O, Cg, 3]
        if any(need[i] for i in (1, 2, 3, 9, 10, 12)):
            r = torch.bmm(gW, table)
            for j, (ci, si, coef, scale) in enumerate(((1, 9, a, s1), (2, 10, p, s2), (3, 12, q, s4))):
                if need[ci]:
                    g[ci] = r[:, :, j] * scale[:, None]
                if need[si]:
                    g[si] = _dot(r[:, :, j].contiguous(), coef)
        # 1x1 -> kxk: the kernel gradient laid out [G, Og*K, Cg] for the two products
        if need[4] or need[5] or need[11]:
            gWt = _t(gW).reshape(G, Og * K, Cg)
            if need[5] or need[11]:
                h = torch.bmm(gWt, w1.transpose(1, 2))  # [G, Og*K, Mg]: d/d(s3 * w2), kc layout
                gw2 = _t(h.reshape(O, K, Mg))
                if need[11]:
                    g[11] = _dot(gw2, w2)
                if need[5]:
                    g[5] = gw2.mul_(s3.reshape(O, 1, 1))
            if need[4]:
                g[4] = torch.bmm(w2s.transpose(1, 2), gWt)
        # depthwise -> pointwise: the kernel gradient as [G*Cg, K, Og] (see the forward)
        if need[6] or need[7] or need[13]:
            gWo = _t(gW.reshape(G, Og, Cg * K)).reshape(G * Cg, K, Og)
            if need[7] or need[13]:
                z = torch.bmm(dw, gWo).reshape(G, Cg * E, Og)  # d/d(s5 * pw), [c, e] x o
                gpw = _t(z).reshape(O, Cg, E)
                if need[13]:
                    g[13] = _dot(gpw, pw)
                if need[7]:
                    g[7] = gpw.mul_(s5.reshape(O, 1, 1))
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
