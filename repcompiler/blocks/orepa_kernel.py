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
memory-bound apart from the big products of the 1x1 -> kxk branch, so:

* the online block stores every weight contiguous in its conv's standard layout (so
  FSDP2's ``fully_shard``, which shards only contiguous parameters, takes the model as
  it is); the origin ``w0 [O, C, K]`` is added to the kernel in that layout and its
  gradient is the kernel gradient scaled, with no transpose either way; ``w2`` is read
  channels-last ``[O, K, Mg]`` and ``pw`` input-channel-major ``[C*E, O]`` through one
  transposing copy each (:func:`orepa_kernel`), their gradients transposed back by
  autograd;
* the three "1x1 times a fixed pattern" branches (one batched product against the
  ``[O, K, 3]`` pattern table) and the 1x1 -> kxk branch (one matrix product per
  group, ``[Og*K, Mg] @ [Mg, Cg]``, whose output buffer the others are added into) are
  summed in that channels-last layout, and one transpose (within each output channel)
  takes the sum to the conv's ``[O, C, K]``; the backward transposes the kernel
  gradient back once and shares it between those branches; big float32 products
  go through oneDNN's matmul where it is usable (:func:`_mm_nt`);
* the depthwise -> pointwise products are batched over input channels with output
  channels innermost in every operand (small inner dimensions are only fast that way);
  this is the one branch that must exchange input and output channels: in the forward
  when adding it to the kernel (in cache-sized blocks of input channels), in the
  backward by one copy of the kernel gradient that feeds both its products;
* nothing kernel-sized is saved for the backward and few fresh kernel-sized buffers
  are made (each costs page faults on every training step, more than the pass that
  fills it): the forward makes two, the backward's temporaries live in per-thread
  scratch buffers (:class:`_Scratch`);
* the backward (:class:`OrepaKernel`) computes only the gradients autograd asks for and
  takes scale gradients as per-row dot products without temporaries.

Under ``torch.compile``/``torch.export``, ``torch.func`` transforms (vmap, grad, jvp,
...) and forward-mode AD, :func:`orepa_kernel` runs the same forward as plain
differentiable ops (:func:`_forward`; tracers and transforms see ordinary aten ops),
without gradients the in-place forward alone. Higher-order derivatives
(``create_graph=True``) go through the hand-written backward's differentiable fallback,
which differentiates :func:`_forward` instead. The tests prove them equal to the generic
fold, kernels and gradients (and gradients of gradients against the plain ops), in float64
(and float32 against float64).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from .accel import plain_ops_required

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


logger = logging.getLogger(__name__)

_CHUNK = 1 << 17  # elements of the depthwise product exchanged per pass (a cache-sized block)
_ONEDNN_MIN_MACS = 1 << 28
_SCRATCH_MAX_BYTES = 32 << 20  # bigger scratch buffers are allocated per call


class _Scratch(threading.local):
    """Per-thread scratch buffers for the backward's kernel-sized temporaries.

    A fresh kernel-sized buffer costs page faults on every training step (glibc hands
    big blocks back to the OS and takes them again), more than the pass that fills it:
    about 3.5 ms for a 512x512x3x3 kernel, on a ~0.5 ms pass. The buffers handed out here
    never leave the call that asked for them (they are never returned, saved or put in a
    gradient), so one per slot and thread is enough. CPU only, and only up to
    ``_SCRATCH_MAX_BYTES`` each: the CUDA caching allocator reuses blocks already, and a
    very big model should not keep its biggest kernel's worth of memory for good."""

    def __init__(self) -> None:
        self.slots: dict[tuple[int, torch.dtype], Tensor] = {}

    def get(self, slot: int, shape: Sequence[int], like: Tensor) -> Tensor:
        """An uninitialised contiguous ``shape`` tensor of ``like``'s dtype and device."""
        numel = math.prod(shape)
        if like.device.type != "cpu" or numel * like.element_size() > _SCRATCH_MAX_BYTES:
            return like.new_empty(shape)
        key = (slot, like.dtype)
        buf = self.slots.get(key)
        if buf is None or buf.numel() < numel:
            with torch.inference_mode(False):  # a normal tensor works in and out of inference mode
                buf = self.slots[key] = like.new_empty(numel)
        return buf[:numel].view(shape)


_scratch = _Scratch()


@functools.cache
def _onednn_ok() -> bool:
    """Whether torch's oneDNN matmul (``mkldnn._linear_pointwise``, what inductor emits for
    CPU linear layers) exists here and agrees with ``torch.mm`` on a small problem
    (checked once per process)."""
    ok = False
    try:
        if torch.backends.mkldnn.is_available():
            gen = torch.Generator().manual_seed(0)
            x, w = torch.randn(37, 19, generator=gen), torch.randn(23, 19, generator=gen)
            got = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            ok = bool(torch.allclose(got, x @ w.t(), rtol=1e-5, atol=1e-5))
    except (AttributeError, RuntimeError, TypeError) as e:  # no such op, not built with oneDNN, another signature
        logger.debug("oneDNN matmul unavailable (%s); using torch.mm", e)
    logger.debug("OREPA kernel products use %s", "oneDNN" if ok else "torch.mm")
    return ok


def _mm_nt(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` for 2-d ``x [N, K]``, ``w [M, K]``. Big float32 products on the CPU go
    through oneDNN when it is usable: for the 1x1 -> kxk products' shapes
    (``[O*K, C] @ [C, C]``, C >= 512) it runs about 20-25% faster than torch.mm (MKL) on
    the machine the benchmarks ran on; below ~2^28 multiply-adds they are equal or
    oneDNN's per-call overhead loses."""
    big = x.shape[0] * x.shape[1] * w.shape[0] >= _ONEDNN_MIN_MACS
    if big and x.dtype == torch.float32 and x.device.type == "cpu" and w.dtype == x.dtype and _onednn_ok():
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), None, "none", [], "")
    return torch.mm(x, w.t())


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """Per-row dot products of two same-shape tensors (rows = dim 0), no temporary."""
    n = x.shape[0]
    return torch.bmm(x.reshape(n, 1, -1), y.reshape(n, -1, 1)).reshape(n)


def _forward(w0: Tensor, a: Tensor, p: Tensor, q: Tensor, w1: Tensor, w2: Tensor, dw: Tensor, pw: Tensor,
             s: Sequence[Tensor], pats: OrepaPatterns, groups: int) -> Tensor:
    """The kernel ``[O, Cg, K]``, with plain differentiable ops (the reference for
    :func:`_forward_inplace`; what tracers and autograd see when they need the ops)."""
    O, Cg, K = w0.shape
    G = groups
    Og, Mg, E = O // G, w1.shape[1], dw.shape[1]
    s0, s1, s2, s3, s4, s5 = s
    coef = torch.stack([a * s1[:, None], p * s2[:, None], q * s4[:, None]], dim=1)
    W = torch.bmm(pats.table, coef)
    W = W + torch.bmm((w2 * s3.reshape(O, 1, 1)).view(G, Og * K, Mg), w1).view(O, K, Cg)
    d = torch.bmm(dw.transpose(1, 2), pw.view(G * Cg, E, Og))  # [G*Cg, K, Og]
    d = d.view(G, Cg, K, Og).permute(0, 3, 1, 2) * s5.view(G, Og, 1, 1)
    return (W.transpose(1, 2).reshape(G, Og, Cg, K) + d).reshape(O, Cg, K) + w0 * s0.reshape(O, 1, 1)


def _forward_inplace(w0: Tensor, a: Tensor, p: Tensor, q: Tensor, w1: Tensor, w2: Tensor, dw: Tensor, pw: Tensor,
                     s: Sequence[Tensor], pats: OrepaPatterns, groups: int) -> Tensor:
    """:func:`_forward` without autograd: two kernel-sized allocations (the result, and a
    buffer used for the channels-last sum and then the depthwise product)."""
    O, Cg, K = w0.shape
    G = groups
    Og, Mg, E = O // G, w1.shape[1], dw.shape[1]
    s0, s1, s2, s3, s4, s5 = s
    # in the "kc" layout [O, K, Cg]: 1x1 -> kxk (one product per group, [Og*K, Mg] @ [Mg, Cg]),
    # scaled, plus the origin, plus the three "1x1 times a fixed pattern" branches
    # ([O, K, 3] @ [O, 3, Cg] against the pattern table)
    if G == 1:
        W = _mm_nt(w2.view(O * K, Mg), w1[0].t())
    else:
        W = torch.bmm(w2.view(G, Og * K, Mg), w1)
    W = W.view(O, K, Cg).mul_(s3.view(O, 1, 1))
    coef = torch.stack([a * s1[:, None], p * s2[:, None], q * s4[:, None]], dim=1)
    W.baddbmm_(pats.table, coef)
    # to the conv's layout [O, Cg, K]: a transpose within each output channel
    out = W.new_empty(O, Cg, K).copy_(W.transpose(1, 2))  # never a view of W (reused below)
    out.addcmul_(w0, s0.view(O, 1, 1))  # the origin, stored in the conv's layout
    # depthwise -> pointwise, per input channel [K, E] @ [E, Og] (output channels innermost:
    # small inner dimensions are only fast that way) into W's buffer, then added scaled,
    # exchanging input and output channels
    d = torch.bmm(dw.transpose(1, 2), pw.view(G * Cg, E, Og), out=W.view(G * Cg, K, Og))
    d, dst, s5v = d.view(G, Cg, K, Og).permute(0, 3, 1, 2), out.view(G, Og, Cg, K), s5.view(G, Og, 1, 1)
    step = max(1, _CHUNK // (K * Og))  # a few input channels at a time: twice as fast for big kernels
    for c in range(0, Cg, step):
        dst[:, :, c:c + step].addcmul_(d[:, :, c:c + step], s5v)
    return out


class OrepaKernel(torch.autograd.Function):
    """Autograd function for the OREPA kernel (see the module docstring for the formula).

    Inputs, in the memory layouts of the online block's parameters: ``w0 [O,Cg,K]``,
    ``a, p, q [O,Cg]``, ``w1 [G,Mg,Cg]``, ``w2 [O,K,Mg]``, ``dw [G*Cg,E,K]``,
    ``pw [G*Cg,E,Og]`` (the kernel-sized ones contiguous), six scales ``[O]``, then the
    fixed patterns and the group count. Output ``[O,Cg,K]``. Gradients come back in the inputs' layouts. Only the inputs are
    saved for the backward (no kernel-sized intermediates live across the step).
    """

    @staticmethod
    def forward(ctx: Any, w0: Tensor, a: Tensor, p: Tensor, q: Tensor, w1: Tensor, w2: Tensor, dw: Tensor,
                pw: Tensor, s0: Tensor, s1: Tensor, s2: Tensor, s3: Tensor, s4: Tensor, s5: Tensor,
                pats: OrepaPatterns, groups: int) -> Tensor:
        s = (s0, s1, s2, s3, s4, s5)
        ctx.save_for_backward(w0, a, p, q, w1, w2, dw, pw, *s, pats.table)
        ctx.groups, ctx.centre = groups, pats.centre
        return _forward_inplace(w0, a, p, q, w1, w2, dw, pw, s, pats, groups)

    @staticmethod
    def backward(ctx: Any, gW: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable
            return _differentiable_backward(ctx, gW)
        w0, a, p, q, w1, w2, dw, pw, s0, s1, s2, s3, s4, s5, table = ctx.saved_tensors
        need = ctx.needs_input_grad
        O, Cg, K = w0.shape
        G = ctx.groups
        Og, Mg, E = O // G, w1.shape[1], dw.shape[1]
        gW = gW.contiguous()
        g: list[Tensor | None] = [None] * 16
        gkc: Tensor | None = None
        if need[0]:  # the origin is stored in the kernel's layout
            g[0] = gW * s0.view(O, 1, 1)
        if need[8]:
            g[8] = _dot(gW, w0)
        # the kernel gradient in the kc layout, shared by the pattern branches and the
        # 1x1 -> kxk products
        if any(need[i] for i in (1, 2, 3, 4, 5, 9, 10, 11, 12)):
            gkc = _scratch.get(0, (O, K, Cg), gW).copy_(gW.transpose(1, 2))  # scaled below, then reused
            if any(need[i] for i in (1, 2, 3, 9, 10, 12)):
                r = torch.bmm(table.transpose(1, 2), gkc)  # [O, 3, Cg]
                for j, (ci, si, coef, scale) in enumerate(((1, 9, a, s1), (2, 10, p, s2), (3, 12, q, s4))):
                    if need[ci]:
                        g[ci] = r[:, j] * scale[:, None]
                    if need[si]:
                        g[si] = _dot(r[:, j], coef)
            if need[5] or need[11]:
                # d/d(s3 * w2)
                h = (_mm_nt(gkc.view(O * K, Cg), w1[0]) if G == 1 else
                     torch.bmm(gkc.view(G, Og * K, Cg), w1.transpose(1, 2))).view(O, K, Mg)
                if need[11]:
                    g[11] = _dot(h, w2)
                if need[5]:
                    g[5] = h.mul_(s3.view(O, 1, 1))
            if need[4]:  # d/d w1 = (s3 * w2)^T gkc = w2^T (s3 * gkc); gkc is not needed after this
                gkc.mul_(s3.view(O, 1, 1))
                g[4] = torch.bmm(w2.view(G, Og * K, Mg).transpose(1, 2), gkc.view(G, Og * K, Cg))
        # depthwise -> pointwise: the kernel gradient as [G*Cg, K, Og]
        if need[6] or need[7] or need[13]:
            # one copy, then both products read it contiguously (faster than two strided reads);
            # into gkc's scratch slot, which is finished with by now
            src = gW.view(G, Og, Cg, K).permute(0, 2, 3, 1)
            gWo = _scratch.get(0, (G, Cg, K, Og), gW).copy_(src).view(G * Cg, K, Og)
            s5g, pwv = s5.view(G, 1, Og), pw.view(G, Cg * E, Og)
            if need[7] or need[13]:
                z = torch.bmm(dw, gWo).view(G, Cg * E, Og)  # d/d(s5 * pw); becomes pw's gradient
                if need[13]:
                    g[13] = torch.mul(z, pwv, out=_scratch.get(1, z.shape, z)).sum(1).reshape(O)
                if need[7]:
                    g[7] = z.mul_(s5g).view(G * Cg, E, Og)
            if need[6]:
                pws = torch.mul(pwv, s5g, out=_scratch.get(1, pwv.shape, pwv))
                g[6] = torch.bmm(pws.view(G * Cg, E, Og), gWo.transpose(1, 2))
        return tuple(g)


def _differentiable_backward(ctx: Any, gW: Tensor) -> tuple[Tensor | None, ...]:
    """:meth:`OrepaKernel.backward` when autograd records it (``create_graph=True``: a
    Hessian-vector product, a penalty on parameter gradients): the gradients of the
    plain-ops forward (:func:`_forward`, re-run on the saved inputs), as differentiable
    functions of the inputs and of ``gW``. Slower than the hand-written backward; only
    higher-order derivatives take this path."""
    *inputs, table = ctx.saved_tensors
    need = ctx.needs_input_grad
    wanted = [i for i in range(len(inputs)) if need[i]]
    W = _forward(*inputs[:8], inputs[8:], OrepaPatterns(table, ctx.centre), ctx.groups)
    grads = torch.autograd.grad(W, [inputs[i] for i in wanted], gW, create_graph=True, allow_unused=True)
    g: list[Tensor | None] = [None] * 16
    for i, gi in zip(wanted, grads):
        g[i] = gi if gi is not None else torch.zeros_like(inputs[i])
    return tuple(g)


def orepa_kernel(w0: Tensor, a: Tensor, p: Tensor, q: Tensor, w1: Tensor, w2: Tensor, dw: Tensor, pw: Tensor,
                 scales: Sequence[Tensor], pats: OrepaPatterns, groups: int) -> Tensor:
    """The OREPA kernel ``[O, Cg, K]`` (shapes as in :class:`OrepaKernel`): through the
    hand-written backward when eager autograd needs it, as plain ops otherwise. The kernel-
    sized inputs are made contiguous here, once for every path (a no-op for ``w0``, a
    transposing copy of the standard-layout ``w2`` and ``pw``)."""
    w0, w2, dw, pw = w0.contiguous(), w2.contiguous(), dw.contiguous(), pw.contiguous()
    inputs = (w0, a, p, q, w1, w2, dw, pw, *scales)
    if plain_ops_required():
        return _forward(w0, a, p, q, w1, w2, dw, pw, scales, pats, groups)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return OrepaKernel.apply(*inputs, pats, groups)
    return _forward_inplace(w0, a, p, q, w1, w2, dw, pw, scales, pats, groups)
