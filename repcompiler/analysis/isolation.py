"""Running the user's code for analysis without effects on any model.

The library runs a model's ``forward`` (or traces it with concrete values) to analyse
it: shape propagation, traces whose capture evaluates parameter-only values, reference
outputs, region and whole-model checks, calibration, export. User code can change
state while it runs: a parametrization's power iteration (``spectral_norm`` updates
``_u``/``_v`` in training mode), BatchNorm running statistics and
``num_batches_tracked`` in training mode, an EMA buffer updated in ``forward``, a
tensor cached as an attribute, an input list overwritten in place. None of that may
reach the model the library returns, the caller's model, or the next run that is
compared with this one.

This module owns the one way to do that:

* :func:`preserved_state` - snapshot every parameter, buffer and tensor attribute of
  the modules (and their plain ``bool``/``int``/``float`` attributes such as
  ``training``), restore them on exit (also on an exception). Tensors are restored in
  place (same objects, so views and optimizers holding them stay valid) and only where
  they changed. Attributes added during the run stay (``torch.fx`` stores the tensor
  constants of a trace on its root, and the graph refers to them).
* :func:`fresh_inputs` - a copy of the inputs for one run (tensors cloned, containers
  rebuilt), so a ``forward`` that writes into its inputs cannot change what the next
  run sees.
* :func:`isolated_call` - ``module(*inputs)`` under ``no_grad`` with both of the above
  and the outputs cloned (an output may alias a buffer that is restored afterwards);
  :func:`propagate_shapes` - the same for ``ShapeProp`` on a traced graph.

Nested uses are cheap: a module already preserved by an enclosing
:func:`preserved_state` is not snapshotted again.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.parameter import UninitializedTensorMixin
from torch.utils._pytree import tree_map

__all__ = ["preserved_state", "fresh_inputs", "isolated_call", "detached_copy", "propagate_shapes"]

_PRESERVED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("repcompiler_preserved",
                                                                             default=frozenset())
_SCALARS = (bool, int, float)


class _TensorState:
    """One tensor's identity, storage and (a clone of) its value. Values are compared,
    not version counters: native kernels update BatchNorm running statistics without
    bumping them."""

    __slots__ = ("tensor", "ptr", "value")

    def __init__(self, t: Tensor) -> None:
        self.tensor = t
        self.ptr = t.data_ptr()
        self.value = t.detach().clone()

    def restore(self) -> None:
        t = self.tensor
        if t.data_ptr() != self.ptr or t.shape != self.value.shape or t.dtype != self.value.dtype:
            t.data = self.value  # ``.data`` was replaced (or resized)
        elif not torch.equal(t.detach(), self.value):
            with torch.no_grad():
                t.copy_(self.value)


def _snapshotable(t: object) -> bool:
    return isinstance(t, Tensor) and not t.is_meta and not isinstance(t, UninitializedTensorMixin) and (
        t.layout == torch.strided)


class _ModuleState:
    """What a run may change in one module: its parameter/buffer tables, tensor
    attributes and plain scalar attributes."""

    def __init__(self, m: nn.Module, tensors: dict[int, _TensorState]) -> None:
        self.module = m
        self.params = dict(m._parameters)
        self.buffers = dict(m._buffers)
        self.attrs = {k: v for k, v in m.__dict__.items()
                      if isinstance(v, Tensor) or (type(v) in _SCALARS)}
        for t in (*self.params.values(), *self.buffers.values(), *self.attrs.values()):
            if _snapshotable(t) and id(t) not in tensors:
                tensors[id(t)] = _TensorState(t)  # type: ignore[arg-type]

    def restore(self) -> None:
        m = self.module
        for table, saved in ((m._parameters, self.params), (m._buffers, self.buffers)):
            for k, v in saved.items():
                if table.get(k, v) is not v or k not in table:
                    table[k] = v
        d = m.__dict__
        for k, v in self.attrs.items():
            if d.get(k, v) is not v or k not in d:
                d[k] = v


@contextlib.contextmanager
def preserved_state(*modules: nn.Module) -> Iterator[None]:
    """Snapshot the state of every module under ``modules``; restore it on exit.

    State: each module's parameters and buffers (the same objects back in their tables,
    their values back in place where they changed: parametrization originals and their
    buffers, running statistics, ``num_batches_tracked``, user buffers), its tensor
    attributes and its ``bool``/``int``/``float``
    attributes (``training``, counters). Meta and uninitialized (lazy) tensors hold no
    values and are not snapshotted.
    """
    active = _PRESERVED.get()
    mods: dict[int, nn.Module] = {}
    for root in modules:
        for m in root.modules():
            if id(m) not in active:
                mods.setdefault(id(m), m)
    tensors: dict[int, _TensorState] = {}
    states = [_ModuleState(m, tensors) for m in mods.values()]
    token = _PRESERVED.set(active | frozenset(mods))
    try:
        yield
    finally:
        _PRESERVED.reset(token)
        for s in states:
            s.restore()
        for t in tensors.values():
            t.restore()


def _copy_leaf(x: Any) -> Any:
    if isinstance(x, Tensor):
        return x.detach().clone()
    if isinstance(x, (str, bytes, int, float, bool, type(None))):
        return x
    try:
        return copy.deepcopy(x)
    except Exception:  # broad on purpose: a user object's __deepcopy__ may raise anything; pass it as it is
        return x


def fresh_inputs(inputs: Any) -> Any:
    """A copy of ``inputs`` (a pytree: tuples, lists, dicts of tensors and other
    values) for one run: tensors detached and cloned, containers rebuilt, other
    objects deep-copied where they can be."""
    return tree_map(_copy_leaf, inputs)


def detached_copy(value: Any) -> Any:
    """``value`` with every tensor in it detached and cloned (containers rebuilt; other
    leaves kept): an output kept while the model runs again."""
    return tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, value)


def isolated_call(module: Callable[..., Any], inputs: tuple[Any, ...], *state: nn.Module) -> Any:
    """``module(*inputs)`` under ``no_grad`` on a copy of ``inputs``, with the state of
    ``module`` (when it is an ``nn.Module``) and of ``state`` preserved; the outputs are
    detached copies."""
    roots = ([module] if isinstance(module, nn.Module) else []) + list(state)
    with preserved_state(*roots), torch.no_grad():
        return detached_copy(module(*fresh_inputs(inputs)))


def propagate_shapes(gm: fx.GraphModule, inputs: tuple[Any, ...]) -> Any:
    """Run ``gm`` with :class:`torch.fx.passes.shape_prop.ShapeProp` (every node gets its
    ``tensor_meta``) as :func:`isolated_call` runs a module: ``gm``'s state preserved,
    on a copy of ``inputs``, under ``no_grad``; returns a detached copy of the output."""
    with preserved_state(gm), torch.no_grad():
        return detached_copy(ShapeProp(gm).propagate(*fresh_inputs(inputs)))
