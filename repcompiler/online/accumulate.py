"""Gradient accumulation that generates each online kernel once per optimizer step.

Owns :class:`accumulate` (``rc.accumulate(model)``) and :func:`step_kernel`, which the
online kernel cache (:func:`repcompiler.online.cache.block_kernel`) calls for a kernel
that gradients flow through: a context is the step token its kept kernels belong to.

Without it, every micro-batch regenerates every online block's kernel (forward) and
backpropagates through its generator (backward), so with ``n`` micro-batches the fixed
cost OREPA adds to a step is paid ``n`` times. Inside ``with rc.accumulate(model):``

* the first use of a block generates its kernel once, with the generator's autograd
  graph kept, and hands the conv a *leaf* copy of it (same storage, detached,
  ``requires_grad``); later uses (more micro-batches, or the block called twice in one
  forward) get the same leaf;
* each micro-batch's ``backward()`` stops at the leaf: its kernel gradient accumulates
  in ``leaf.grad`` (the post-BN and every other parameter get theirs as usual);
* on exit, ``torch.autograd.backward(kernel, kernel_grad)`` runs each generator's
  backward once, block after block, turning the accumulated kernel gradients into the
  branch parameters' gradients; each block's kernel and kernel gradient are freed as
  soon as its backward has used them, so the branch gradients replace them instead of
  adding to them. The generators are linear in each parameter's gradient, so the result
  is the plain loop's (up to rounding: float64 agrees to ~1e-15).

Rules (each tested):

* Only kernels gradients flow through take part: under ``torch.no_grad()`` (evaluation
  inside the context), for frozen blocks, and while ``torch.compile``/``torch.func``
  trace, blocks behave as without the context. Eval *mode* with gradients enabled
  accumulates as training mode does.
* Parameters must not change inside the context (the kernel would be stale): call
  ``opt.step()`` after the ``with`` block. A block any of whose parameters changed since
  its kernel was generated (the kernel cache's rule,
  :func:`~repcompiler.blocks.accel.tensor_key`, over the branch parameters and buffers
  and the post-BN's parameters: inside the context the branch parameters have no
  gradient yet, so an optimizer step moves only the post-BN's) raises
  :class:`~repcompiler.errors.RepCompilerError` on its next use, as does a backward
  through a kept kernel after the context closed.
* An exception inside the context discards the kept kernels and their gradients
  (nothing reaches the branch parameters) and propagates.
* Nested contexts: blocks already covered by an enclosing context stay with it (their
  kernels are backpropagated when *it* exits); an inner context covers only blocks no
  outer one does.
* DDP: use it around the micro-batches, ``no_sync()`` around all but the last one's
  forward and backward; the last backward hands DDP the ordinary parameters' gradients,
  and the backward on exit the branch parameters' ones, which completes DDP's
  reduction (tested with two processes). ``find_unused_parameters=True`` would declare
  the branch parameters unused and reduce before they have gradients: refused.
* FSDP (``fully_shard``, ``FullyShardedDataParallel``): the context covers no block
  of an FSDP-managed model, which then trains exactly as without it (each micro-batch
  generates its kernels and backpropagates through them; FSDP reduces the gradients
  as usual, e.g. with ``set_requires_gradient_sync`` on the last micro-batch). FSDP
  frees the gathered parameters after each forward and backward, so a generator's
  backward deferred to the context's exit would read freed storage; the saving of
  kernel generations is DDP's and single-process training's.

Memory: each block keeps its kernel (shared with the leaf), the kernel's gradient and
what its generator saved for the backward (the built-in OREPA generator saves only its
inputs, the parameters) until its backward on exit. Nothing the context made outlives it:
the leaves' hooks reference no tensor (no reference cycle waiting for the garbage
collector), and each leaf's gradient is dropped on exit even when a caller still holds
the last micro-batch's loss (whose graph references the leaves, so the kernels
themselves live until that loss is released).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Callable

import torch
from torch import Tensor, nn

from ..algebra import Kernel
from ..blocks.accel import tensor_key
from ..errors import RepCompilerError, UnsupportedError

__all__ = ["accumulate", "step_kernel"]

log = logging.getLogger(__name__)


@dataclass
class _Kept:
    """One block's kernel inside a context: the generated kernel (autograd graph kept),
    its leaf copy handed to the conv, and the key of the sources it was generated from."""

    name: str
    generated: Kernel
    leaf: Kernel
    key: tuple | None


class _Session:
    """Whether one ``with`` block of a context is still open: what the leaves' hooks
    check. It references no tensor, so the hooks (owned by the leaves) make no reference
    cycle through the leaves: the kept kernels and their gradients are freed as soon as
    the context lets go of them, not at the next garbage collection."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = True


class _Stack(threading.local):
    def __init__(self) -> None:
        self.contexts: list[accumulate] = []


_active = _Stack()


def _fsdp_module(model: nn.Module) -> str | None:
    """The qualified name (``"<model>"`` for the root) of a module of ``model`` that FSDP
    (``fully_shard`` or ``FullyShardedDataParallel``) manages, or ``None``."""
    kinds: list[type] = []
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        kinds = [FSDPModule, FullyShardedDataParallel]
    except ImportError:  # torch.distributed unavailable or older
        return None
    for name, m in model.named_modules():
        if isinstance(m, tuple(kinds)):
            return f"module {name!r}" if name else "the model"
    return None


def _step_key(block: nn.Module) -> tuple | None:
    """What a kept kernel's validity is checked against (see the module docstring)."""
    post = () if block.post_bn is None else tuple(block.post_bn.parameters())
    return tensor_key((*block.sources(), *post))


def _leaf(t: Tensor | None) -> Tensor | None:
    if t is None or not t.requires_grad:
        return None if t is None else t.detach()
    return t.detach().requires_grad_(True)


class accumulate:
    """Context manager: online kernels generated once and backpropagated once for all
    the micro-batches run inside it (see the module docstring for the rules).

    Args:
        model: the model (or a ``DistributedDataParallel`` wrapping it) whose online
            blocks are covered; any module, blocks anywhere inside it.

    Example::

        for batch in loader:
            with rc.accumulate(model):
                for micro in batch.split(16):
                    loss_fn(model(micro)).backward()
            opt.step()
            opt.zero_grad()

    Attributes (read after the ``with`` block, for logging and tests):
        sharded: which module of ``model`` FSDP manages (``None``: none; otherwise the
            context covers no block, see the module docstring).
        generated: kernels generated inside the context.
        backpropagated: kernels whose accumulated gradient went through their generator.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise UnsupportedError(f"rc.accumulate: model must be an nn.Module, got {type(model).__name__}")
        if getattr(model, "find_unused_parameters", False):
            raise UnsupportedError(
                f"rc.accumulate: {type(model).__name__}(find_unused_parameters=True) would reduce the online "
                "blocks' parameters as unused before their gradients exist (they arrive when the context exits); "
                "wrap the model with find_unused_parameters=False"
            )
        self.sharded = _fsdp_module(model)  # FSDP: the context covers no block (module docstring)
        if self.sharded is not None:
            log.info("rc.accumulate: %s is sharded by FSDP; its blocks generate their kernels per micro-batch",
                     self.sharded)
        self.model = model
        self.generated = 0
        self.backpropagated = 0
        self._names: dict[int, str] = {}
        self._kept: dict[int, _Kept] = {}
        self._session = _Session()
        self._open = False

    # -- the context -----------------------------------------------------------------
    def __enter__(self) -> "accumulate":
        if self._open:
            raise RepCompilerError("rc.accumulate: this context is already open (make a new one per step)")
        owned = set().union(*(c._names for c in _active.contexts)) if _active.contexts else set()
        self._names = {} if self.sharded is not None else {
            id(m): name for name, m in self.model.named_modules() if id(m) not in owned}
        self._kept = {}
        self._session = _Session()
        self.generated = self.backpropagated = 0
        self._open = True
        _active.contexts.append(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        _active.contexts.remove(self)
        kept, self._kept, self._open = self._kept, {}, False
        self._session.open = False
        if exc_type is not None:
            if kept:
                log.debug("rc.accumulate: %s inside the context; %d kept kernels discarded", exc_type.__name__,
                          len(kept))
            return None
        while kept:  # one block at a time, freeing its kernel and gradient as soon as they are used
            _, k = kept.popitem()
            outs: list[Tensor] = []
            grads: list[Tensor] = []
            for g, leaf in ((k.generated.weight, k.leaf.weight), (k.generated.bias, k.leaf.bias)):
                if leaf is not None and leaf.grad is not None and g is not None and g.requires_grad:
                    outs.append(g)
                    grads.append(leaf.grad)
                if leaf is not None:
                    leaf.grad = None  # freed now, even if a caller's graph still references the leaf
            if outs:
                self.backpropagated += 1
                torch.autograd.backward(outs, grads)
            del k, outs, grads
        log.debug("rc.accumulate: %d kernels generated, %d backpropagated", self.generated, self.backpropagated)
        return None

    # -- what the hook asks ----------------------------------------------------------
    def _covers(self, block: nn.Module) -> bool:
        return id(block) in self._names

    def _kernel(self, block: nn.Module, generate: Callable[[], Kernel]) -> Kernel:
        kept = self._kept.get(id(block))
        if kept is not None:
            if _step_key(block) != kept.key:
                raise RepCompilerError(
                    f"rc.accumulate: parameters of block {kept.name!r} changed after its kernel was generated "
                    "inside the context (an optimizer step or an in-place edit): step the optimizer after the "
                    "`with rc.accumulate(...)` block"
                )
            return kept.leaf
        key = _step_key(block)
        k = generate()
        leaf = Kernel(_leaf(k.weight), _leaf(k.bias), k.spec)  # type: ignore[arg-type]
        kept = _Kept(self._names[id(block)] or "<model>", k, leaf, key)
        for t in (leaf.weight, leaf.bias):
            if t is not None and t.requires_grad:
                t.register_hook(_late_check(self._session, kept.name))
        self._kept[id(block)] = kept
        self.generated += 1
        return leaf


def _late_check(session: _Session, name: str) -> Callable[[Tensor], None]:
    """A hook for a kept leaf: raise if a backward reaches it after its ``with`` block
    closed. It holds only ``session`` and ``name``, never the leaf (see :class:`_Session`)."""

    def hook(grad: Tensor) -> None:
        if not session.open:
            raise RepCompilerError(
                f"rc.accumulate: a backward reached block {name!r}'s kernel after its "
                "`with rc.accumulate(...)` block had closed; its gradient would be lost: call backward() "
                "inside the context"
            )

    return hook


def step_kernel(block: nn.Module, generate: Callable[[], Kernel]) -> Kernel:
    """The kernel an online block applies when gradients flow to its parameters:
    ``generate()`` itself, or, inside an :class:`accumulate` context covering ``block``,
    the leaf copy of the kernel generated once for the whole context."""
    for ctx in _active.contexts:  # outermost first: it owns the blocks it covers
        if ctx._covers(block):
            return ctx._kernel(block, generate)
    return generate()
