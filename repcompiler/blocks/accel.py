"""The kernel-accelerator protocol: a hand-written fast generator attached to a block
declaration.

An online block regenerates its kernel from its branch parameters at every training
step; the generic algebra fold (:meth:`~repcompiler.algebra.Expr.fold`) does it for any
block and is the **reference**. A :class:`KernelAccelerator` computes the same kernel
faster for one block structure. It is attached to a declaration with
:meth:`BlockConfig.accelerate <repcompiler.blocks.config.BlockConfig.accelerate>`; when a
block is built, the first attached accelerator whose :meth:`~KernelAccelerator.matches`
accepts the built expression is recorded on it (``expr.accelerator``), its
:meth:`~KernelAccelerator.prepare` may lay the parameters out as it reads them, and
:class:`~repcompiler.online.conv.OnlineConv` calls :meth:`~KernelAccelerator.generate`
every forward (re-checking ``matches`` once, when the online conv is made).

``matches`` must decide by **structure** - branch names and kinds, tensor shapes and
groups, the ends of the branches - never by position, so a reordered or edited
declaration either still matches (and gets the right kernel) or falls back to the
generic fold. The tests compare every accelerator with the generic fold, kernels and
gradients, in float64.

While ``torch.compile``/``torch.export`` trace, and under ``torch.func`` transforms or
forward-mode AD, an accelerator must generate its kernel as plain differentiable ops
(:func:`plain_ops_required`).

Caching rule (every cache of kernel generation follows it: the online block's kernel,
:mod:`repcompiler.online.cache`, and an accelerator's per-expression structure): a kept
value is valid while :func:`tensor_key` of the tensors it was computed from is unchanged,
and :func:`cached` neither reads nor writes it while :func:`plain_ops_required` (tracers
see the computation instead). An accelerator keeps only what it derives from a block's
structure and fixed buffers, never from its parameters.

Any expression type can be accelerated this way: ``OnlineConv(expr,
accelerator=MyAccelerator())`` (e.g. linearize's squeezed sums) needs nothing else.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Iterable, TypeVar

import torch
from torch import Tensor

from .. import algebra as A

__all__ = ["KernelAccelerator", "LinearizedSumAccelerator", "cached", "plain_ops_required", "tensor_key"]

T = TypeVar("T")
_TRACKED = (torch.Tensor, torch.nn.Parameter)


class KernelAccelerator(abc.ABC):
    """A fast kernel generator for expressions of one structure (see the module doc)."""

    @abc.abstractmethod
    def matches(self, expr: A.Expr) -> bool:
        """Whether :meth:`generate` computes ``expr.fold()`` for this expression (by
        structure: names, kinds, shapes; never by branch position)."""

    @abc.abstractmethod
    def generate(self, expr: A.Expr) -> A.Kernel:
        """The folded kernel of ``expr`` (differentiable in its parameters), equal to
        ``expr.fold(check=False)``."""

    def prepare(self, expr: A.Expr) -> None:
        """Called once on a freshly built online expression that matches: may replace
        parameters by equal ones in the memory layouts :meth:`generate` reads best."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    for name in ("is_compiling", "is_exporting"):
        check = getattr(compiler, name, None)
        if check is not None and check():
            return True
    return False


def _is_transformed() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, jacrev, ...) or a forward-mode
    AD level (``torch.autograd.forward_ad.dual_level``) is active: both follow tensors the
    kernel cache cannot see (batched, wrapped or dual parameters)."""
    functorch = getattr(torch._C, "_functorch", None)
    peek = getattr(functorch, "peek_interpreter_stack", None)
    if peek is not None and peek() is not None:
        return True
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def plain_ops_required() -> bool:
    """Whether kernels must be generated as plain differentiable ops, uncached: while
    torch.compile/torch.export trace (:func:`_is_compiling`) or under torch.func and
    forward-mode AD (:func:`_is_transformed`)."""
    return _is_compiling() or _is_transformed()


def tensor_key(tensors: Iterable[Tensor]) -> tuple | None:
    """What a kept value computed from ``tensors`` is valid for: every tensor's identity,
    data pointer, version counter, dtype and device. In-place updates (optimizer steps,
    ``load_state_dict``, EMA updates of ``state_dict()`` tensors), ``.to()`` and replaced
    tensors all change it; edits through ``.data`` do not (they bypass the version
    counter). ``None`` when a tensor cannot be tracked: a tensor subclass (fake tensors,
    ``DTensor``) or an inference tensor (no version counter)."""
    key = []
    for t in tensors:
        if type(t) not in _TRACKED:
            return None
        try:
            key.append((id(t), t.data_ptr(), t._version, t.dtype, t.device))
        except RuntimeError:  # inference tensors have no version counter
            return None
    return tuple(key)


def cached(holder: Any, attr: str, build: Callable[[], T], watch: Iterable[Tensor],
           like: Iterable[Tensor] = ()) -> T:
    """``build()``, kept in ``holder.<attr>`` (``None`` or a ``(key, value)`` pair) and
    returned again while :func:`tensor_key` of ``watch``, the dtype and device of every
    tensor of ``like`` and whether inference mode is on are unchanged (a value built in
    ``torch.inference_mode()`` holds inference tensors, which autograd refuses outside
    it). Nothing is read or written while
    :func:`plain_ops_required` (``build()`` is traced or transformed instead) or when a
    tensor cannot be tracked."""
    if plain_ops_required():
        return build()
    like = tuple(like)
    key = tensor_key(watch)
    if key is None or any(type(t) not in _TRACKED for t in like):
        return build()
    key = (key, tuple((t.dtype, t.device) for t in like), torch.is_inference_mode_enabled())
    entry = getattr(holder, attr)
    if entry is not None and entry[0] == key:
        return entry[1]
    value = build()
    setattr(holder, attr, (key, value))
    return value


class LinearizedSumAccelerator(KernelAccelerator):
    """The accelerator of :func:`repcompiler.linearize`'s squeezed blocks: a
    :class:`~repcompiler.algebra.LinearizedSum` generates its kernel by adding the
    smaller branch kernels in place into a slice of the largest one
    (:meth:`~repcompiler.algebra.LinearizedSum.fast_fold`, tested against the generic
    fold). Matches any ``LinearizedSum``, whatever its branches."""

    def matches(self, expr: A.Expr) -> bool:
        return isinstance(expr, A.LinearizedSum)

    def generate(self, expr: A.Expr) -> A.Kernel:
        if plain_ops_required():  # in-place slice adds on autograd outputs are not for tracing
            return expr.fold(check=False)
        return expr.fast_fold()  # type: ignore[attr-defined]
