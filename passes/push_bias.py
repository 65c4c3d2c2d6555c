"""Push a conv's bias into the BatchNorms that consume its output.

A BN in eval mode computes ``gamma * (x - mean) / std + beta``, so a per-channel constant
added to its input is the same as subtracting it from ``running_mean``:
``BN(x + b; mean) == BN(x; mean - b)``. :class:`PushBias` removes the bias of the given
convs when **every** use of the conv's output reaches eval-mode BNs through ops that
carry a per-channel constant through unchanged: channel concatenation (the offset is
tracked), ``nn.Identity``, max pooling, and average pooling without padding. It is
refused (the bias kept) for any other use, a BN or conv called more than once, or a
channel count it cannot infer (from ``ShapeProp``'s ``tensor_meta`` when the graph was
shape-propagated, else structurally from convs, BNs and concatenations). In training mode such a BN subtracts the batch mean, so
the shift cancels there too and the BN's running mean keeps tracking the same quantity.

``deploy`` uses it for the bias an inserted post-BN leaves on a conv that had none
(DenseNet's convs before a concatenation): the deployed model then has exactly the
plain model's parameters.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from .base import GraphPass, PassResult
from .state import pipeline_state

__all__ = ["PushBias"]

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
from ..algebra import CONV_TYPES as _CONV
_MAXPOOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
_AVGPOOL = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_CAT = (torch.cat, torch.concat)


class PushBias(GraphPass):
    """Move the biases of the convs named in ``targets`` into consumer BNs (see module doc).

    The convs whose bias was removed are appended to
    ``pipeline_state(gm).pushed_biases``."""

    def __init__(self, targets: Iterable[str]) -> None:
        self.targets = set(targets)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        pushed = pipeline_state(graph_module).pushed_biases
        first = len(pushed)
        uses = Counter(n.target for n in graph_module.graph.nodes if n.op == "call_module")
        channels: dict[fx.Node, int | None] = {}
        for node in list(graph_module.graph.nodes):
            if node.op != "call_module" or node.target not in self.targets or uses[node.target] != 1:
                continue
            conv = graph_module.get_submodule(node.target)
            if not isinstance(conv, _CONV) or conv.bias is None:
                continue
            edits: list[tuple[nn.Module, int]] = []
            if not _reach_bns(graph_module, node, 0, edits, uses, channels):
                log.debug("bias of %s kept: some use does not reach a BatchNorm", node.target)
                continue
            with torch.no_grad():
                for bn, offset in edits:
                    bn.running_mean[offset: offset + conv.out_channels] -= conv.bias.to(bn.running_mean.dtype)
            conv.bias = None
            pushed.append(str(node.target))
        return PassResult(graph_module, len(pushed) > first)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        for target in pipeline_state(graph_module).pushed_biases:
            if graph_module.get_submodule(target).bias is not None:
                self.fail(f"{target} still has a bias after it was pushed")


def _reach_bns(gm: fx.GraphModule, node: fx.Node, offset: int, edits: list, uses: Counter,
               channels: dict[fx.Node, int | None]) -> bool:
    """Collect ``(bn, channel offset)`` for every use of ``node``; False if some use is
    not a constant-carrying path to an eval-ready BN."""
    if not node.users:
        return False  # a graph output (or dead): the constant would be visible
    for user in node.users:
        if user.op == "call_module":
            mod = gm.get_submodule(user.target)
            if isinstance(mod, _BN):
                if uses[user.target] != 1 or mod.running_mean is None:
                    return False
                edits.append((mod, offset))
                continue
            if isinstance(mod, nn.Identity) or isinstance(mod, _MAXPOOL) or (
                    isinstance(mod, _AVGPOOL) and _no_padding(mod.padding) and not mod.ceil_mode):
                if not _reach_bns(gm, user, offset, edits, uses, channels):
                    return False
                continue
            return False
        if user.op == "call_function" and user.target in _CAT:
            parts = _channel_cat_parts(user)
            if parts is None:
                return False
            start = 0
            for part in parts:
                if part is node and not _reach_bns(gm, user, offset + start, edits, uses, channels):
                    return False
                c = _channels(gm, part, channels) if isinstance(part, fx.Node) else None
                if c is None:
                    return False
                start += c
            continue
        return False
    return True


def _channel_cat_parts(node: fx.Node) -> list | None:
    """The inputs of a ``torch.cat`` node along dim 1 (None: another dim or unknown args)."""
    parts = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return list(parts) if dim == 1 and isinstance(parts, (list, tuple)) else None


def _no_padding(padding) -> bool:
    return all(p == 0 for p in (padding if isinstance(padding, (tuple, list)) else (padding,)))


def _channels(gm: fx.GraphModule, node: fx.Node, memo: dict[fx.Node, int | None]) -> int | None:
    """Channel count of ``node``'s output, inferred structurally (None: unknown)."""
    if node in memo:
        return memo[node]
    c: int | None = None
    meta = node.meta.get("tensor_meta")  # from torch.fx.passes.shape_prop.ShapeProp, if run
    if meta is not None and hasattr(meta, "shape") and len(meta.shape) > 1:
        c = int(meta.shape[1])
    elif node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, _CONV):
            c = mod.out_channels
        elif isinstance(mod, _BN):
            c = mod.num_features
        elif isinstance(mod, (nn.Identity, nn.ReLU, nn.ReLU6) + _MAXPOOL + _AVGPOOL) and node.args:
            c = _channels(gm, node.args[0], memo) if isinstance(node.args[0], fx.Node) else None
    elif node.op == "call_function" and node.target in _CAT:
        parts = _channel_cat_parts(node)
        if parts is not None and all(isinstance(p, fx.Node) for p in parts):
            counts = [_channels(gm, p, memo) for p in parts]
            c = None if any(x is None for x in counts) else sum(counts)
    memo[node] = c
    return c
