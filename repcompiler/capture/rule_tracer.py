"""The tracer whose leaves are the modules the rule registry lowers.

:class:`RuleTracer` is an ``fx.Tracer`` (with :class:`~repcompiler.capture.python.CaptureTracerMixin`)
whose leaf modules are

* every module with a lowering rule in the rule registry (MRO lookup, so subclasses of
  ``nn.Conv2d`` and ``OnlineConv`` blocks are leaves: the compiler lowers them whole),
  **unless the rule declines that instance** (:meth:`RuleRegistry.declines
  <repcompiler.rules.registry.RuleRegistry.declines>`, asked once per module, or
  :meth:`RuleTracer.traces_into`): then its ``forward`` is traced, so e.g. timm's
  ``BatchNormAct2d`` with a ReLU becomes ``F.batch_norm`` (which folds) followed by
  the ReLU. A module in training mode stays a leaf (its traced ``forward`` would bake
  the training branch, batch statistics and all, into a rewritten owner's code)
  unless it is a conv subclass whose ``forward`` does not read ``self.training``
  (DBB's identity-based 1x1: the same code in both modes), and so does one with
  forward hooks of its own (tracing into it would run the hooks on proxies);
* the usual ``torch.nn`` leaves (activations, pooling, linear, ... but not containers);
* torchvision's op modules that do not trace (RoI ops, deformable conv, ...),

and it autowraps ``math`` and the ``torchvision.ops`` functions, as torchvision's own
feature extractor does. The compiler's tracer,
:class:`repcompiler.capture.tracing.RepTracer`, adds norm-plus-activation modules to
the modules traced into.
"""

from __future__ import annotations

import math
import sys
from types import ModuleType
from typing import Any, Iterable

import torch.fx as fx
from torch import nn

from .python import CaptureTracerMixin
from ..rules.defaults import default_rules
from ..rules.registry import RuleRegistry, has_forward_hooks

__all__ = ["RuleTracer"]

_TV_OPAQUE_OPS = (
    "RoIAlign",
    "RoIPool",
    "PSRoIAlign",
    "PSRoIPool",
    "MultiScaleRoIAlign",
    "DeformConv2d",
    "StochasticDepth",
    "DropBlock2d",
    "DropBlock3d",
)


def _torchvision_ops() -> ModuleType | None:
    """``torchvision.ops`` if something imported it: a model that uses its layers or
    functions has, and importing it only to trace other models is slow."""
    return sys.modules.get("torchvision.ops")


class RuleTracer(CaptureTracerMixin, fx.Tracer):
    """``fx.Tracer`` whose leaves are rule-registered modules plus the usual ``torch.nn``
    leaves (see the module docstring). ``extra_leaves`` adds module types to keep opaque."""

    proxy_buffer_attributes = True
    """Buffers read in traced code (``self.bn.running_var``) are ``get_attr`` nodes, as
    parameters are: every read of a module's tensors is visible (:mod:`repcompiler.analysis.uses`),
    and an in-place update of a buffer is a node, not a write done while tracing."""

    def __init__(self, rules: RuleRegistry | None = None, extra_leaves: Iterable[type] = (),
                 bns_become_scales: bool = False) -> None:
        tvops = _torchvision_ops()
        super().__init__(autowrap_modules=(math,) if tvops is None else (math, tvops))
        self.bns_become_scales = bns_become_scales
        self.rules = rules if rules is not None else default_rules()
        tv_leaves = () if tvops is None else tuple(getattr(tvops, n) for n in _TV_OPAQUE_OPS if hasattr(tvops, n))
        self.extra_leaves = tuple(extra_leaves) + tv_leaves
        self._declined: dict[int, bool] = {}
        self.opaque: dict[int, str] = {}
        """``id(module) -> reason``: submodules kept as opaque calls because their own
        ``forward`` does not trace (see :func:`repcompiler.capture.tracing.trace_model`)."""
        self.failed: tuple[nn.Module, str, str] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, fx.GraphModule):
            return False
        if id(m) in self.opaque:
            return True
        if self.rules.lookup(m) is not None and not self._declines(m):
            return True
        if self.extra_leaves and isinstance(m, self.extra_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def _declines(self, m: nn.Module) -> bool:
        """Whether ``m``'s rule declines it (cached per module; asked before tracing,
        since fx patches parameter access while it traces)."""
        if id(m) not in self._declined:
            self._declined[id(m)] = ((not m.training or _mode_free_conv(m)) and not has_forward_hooks(m)
                                     and (self.rules.declines(m) or (not m.training and self.traces_into(m))))
        return self._declined[id(m)]

    def traces_into(self, m: nn.Module) -> bool:
        """Whether the eval-mode module ``m``, which has a rule that does not decline it,
        is traced into all the same (:class:`repcompiler.capture.tracing.RepTracer`: a
        norm-plus-activation module). ``False`` here."""
        return False

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # the module's own forward may raise anything: note where, re-raise
            if self.failed is None:  # the innermost module whose forward failed
                self.failed = (m, self.path_of_module(m), short_reason(exc))
            raise

    def trace(self, root: Any, concrete_args: dict[str, Any] | None = None) -> fx.Graph:
        self.failed = None
        if isinstance(root, nn.Module):
            for m in root.modules():
                if self.rules.lookup(m) is not None:
                    self._declines(m)
        return super().trace(root, concrete_args)


def _mode_free_conv(m: nn.Module) -> bool:
    """A conv subclass whose own ``forward`` does not read ``self.training``: tracing
    into it gives the same code in training and eval mode."""
    fwd = getattr(type(m).forward, "__code__", None)
    return isinstance(m, nn.modules.conv._ConvNd) and fwd is not None and "training" not in fwd.co_names


def short_reason(exc: BaseException) -> str:
    """The first line of ``exc``'s message after its type name, without fx's long hint."""
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else type(exc).__name__
    first = first.split(". This can be attempted")[0]  # fx's long iteration hint
    return f"{type(exc).__name__}: {first[:200]}"
