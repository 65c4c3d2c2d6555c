"""The kernel cache of online blocks: which kernel an :class:`~repcompiler.online.conv.OnlineConv`
applies in a forward, generated anew or kept, decided in one place (:func:`block_kernel`).

Three things are kept around kernel generation, under one rule
(:func:`~repcompiler.blocks.accel.tensor_key`: a kept value is valid while the identity,
data pointer, version counter, dtype and device of every tensor it was computed from are
unchanged):

* **The block's kernel, no gradient flowing** (``torch.no_grad()``/``inference_mode()``,
  or no branch parameter requiring grad: evaluation, a frozen block): kept detached in
  ``block._cache``, watching the branch parameters and buffers (:meth:`OnlineConv.sources
  <repcompiler.online.conv.OnlineConv.sources>`). Optimizer steps, ``load_state_dict``,
  ``.to()``/``.double()``, EMA updates of ``state_dict()`` tensors and any in-place edit
  invalidate it; so do ``train()``/``eval()`` (the one way to drop it after edits through
  ``param.data``, which the version counter does not see), ``_apply`` and pickling. A
  kernel kept in ``torch.inference_mode()`` (inference tensors) is reused only there.
* **The block's kernel for one optimizer step, gradients flowing**, inside
  :class:`~repcompiler.online.accumulate.accumulate` (the step token): generated once per
  context, its autograd graph kept, the conv handed a leaf copy; the key of the same
  sources (and of the post-BN's parameters) is taken when it is generated, and a use
  after they changed (an optimizer step inside the context) raises instead of
  regenerating, since the kept kernel's gradient would be lost. Without a context, a gradient-flowing forward always generates (so caching never
  cuts the autograd graph) and drops the no-gradient kernel (a kernel-sized tensor not
  needed while training).
* **An accelerator's structure and fixed inputs** (e.g. the OREPA pattern table, see
  :mod:`repcompiler.blocks.orepa_accel`): kept on the expression, watching its buffers
  only, never parameter values. It stays separate from this cache because it is a part
  of generation itself (it serves every generation, kept or not, including an
  accelerator called without an online block) and the block library does not depend on
  the online runtime.

torch.compile, torch.export, torch.func and forward-mode AD: while
:func:`~repcompiler.blocks.accel.plain_ops_required` holds, :func:`block_kernel`
generates the kernel and keeps nothing (no read, no write, no accumulate context); the
compiled graph is the cache. :func:`~repcompiler.blocks.accel.cached` applies the same
predicate to the accelerator's cache, reached inside generation. Nothing traced reads a
data pointer or a version counter, so a compiled step has no data-dependent guards.

DDP and FSDP2: the kept kernels are not parameters or buffers (not in ``state_dict``,
not broadcast, not sharded). ``rc.accumulate`` covers no FSDP-managed block; under DDP
it hands the branch parameters' gradients to DDP on exit (see
:mod:`repcompiler.online.accumulate`). FSDP2 refills its unsharded parameters without
moving their version counters, so a no-gradient kernel of an FSDP2-sharded block is
valid until the next ``train()``/``eval()`` or gradient-flowing forward (both drop it):
after an optimizer step, switch modes (``model.eval()``) before evaluating.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..algebra import Kernel
from ..blocks.accel import cached, plain_ops_required
from .accumulate import step_kernel

__all__ = ["block_kernel"]


def _gradient_flows(block: nn.Module) -> bool:
    """Whether a gradient can reach ``block``'s branch parameters now (grad mode on and
    one of them requiring grad)."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in block.expr.parameters())


def _detached(generate: Callable[[], Kernel]) -> Kernel:
    with torch.no_grad():
        return generate().detach()


def block_kernel(block: nn.Module, generate: Callable[[], Kernel]) -> Kernel:
    """The kernel ``block`` (an :class:`~repcompiler.online.conv.OnlineConv`) applies now:
    ``generate()`` under tracers and transforms; its kept detached kernel when no
    gradient flows (regenerated when a source changed); the step's kept kernel inside an
    ``rc.accumulate`` context covering it; ``generate()`` otherwise (see the module
    docstring)."""
    if plain_ops_required():
        return generate()
    if not _gradient_flows(block):
        return cached(block, "_cache", lambda: _detached(generate), watch=block.sources())
    block._cache = None
    return step_kernel(block, generate)
