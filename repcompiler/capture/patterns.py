"""Graph patterns of real code that capture rewrites into foldable form.

This module owns :func:`rewrite_bn_pad_borders`, run by the capture tracer
(:mod:`repcompiler.capture.python`) on every graph it traces.

**DBB's BN-and-pad layer.** The official Diverse Branch Block pads a BN's output and
then overwrites the ``p``-wide border with the BN's eval output for a zero input::

    out = F.pad(bn(x), [p] * 4)
    out[:, :, 0:p, :] = shift          # shift = beta - mean * gamma / sqrt(var + eps)
    out[:, :, -p:, :] = shift
    out[:, :, :, 0:p] = shift
    out[:, :, :, -p:] = shift

which is exactly ``bn(F.pad(x, [p] * 4))`` in eval mode, i.e. ``ZeroPad >> BatchNorm``
in the kernel algebra (the conv before it then composes with the pad exactly). The
rewrite is applied only when it is checked to be equal: the BN is an eval-mode
``_BatchNorm`` leaf whose output only the pad reads, the writes target only the pad's
output with constant keys and values computed from parameters/buffers, nothing reads
the padded tensor before the last write, and the original nodes and the rewritten form
agree numerically on random inputs of two sizes (so which pixels are written, and
with what, is checked rather than parsed from the slices). Otherwise the graph is left
as traced and the reason is returned.

**Training mode** (the decision for ``linearize``). With a BN in training mode the two
forms differ (the interior is normalised with batch statistics, the border holds the
running-statistics constant), so by default the pattern is not rewritten. But
``linearize`` replaces every branch BN by a learnable per-channel affine ``a`` (BnToScale,
initialised from the BN's running statistics with ``init="from_bn"``), and for an
affine the BN-and-pad layer *is* "zero pad, then ``a``" in both modes (its border, the
layer's output for a zero input, is ``a(0)``). So when the caller says the BNs become
affines (``scaled`` given: the tracer's ``bns_become_scales``), a training-mode BN is
accepted: the same structural checks apply, the numeric check runs with the BN in eval
mode (its running statistics are not touched), and the BN's target is appended to
``scaled``. The caller must then only use the rewritten graph where that BN does
become an affine (``linearize`` refuses to rewrite an owner where it would stay a BN).
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["rewrite_bn_pad_borders"]

log = logging.getLogger(__name__)

_BN_DIMS = {nn.BatchNorm1d: 1, nn.BatchNorm2d: 2, nn.BatchNorm3d: 3}


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    return paths[-1] if paths else "<root>"


def _const_ancestors(nodes: list[fx.Node], stop: set[fx.Node]) -> set[fx.Node] | None:
    """Every node the ``nodes`` read (``stop`` excluded), if they are all computed from
    parameters/buffers/constants only; ``None`` if one reads a graph input or a
    module call."""
    seen: set[fx.Node] = set()
    todo = [a for n in nodes for a in n.all_input_nodes if a not in stop]
    while todo:
        a = todo.pop()
        if a in seen:
            continue
        if a.op not in ("get_attr", "call_function", "call_method"):
            return None
        seen.add(a)
        todo.extend(b for b in a.all_input_nodes if b not in stop)
    return seen


def _spatial_dims(bn: nn.Module, pad: Any) -> int:
    for cls, d in _BN_DIMS.items():
        if isinstance(bn, cls):
            return d
    return max(1, len(pad) // 2)


def _match(node: fx.Node, root: nn.Module, training_ok: bool) -> tuple[fx.Node, nn.Module, list[fx.Node]] | None:
    """``(bn node, bn module, setitem nodes)`` if ``node`` is ``F.pad(bn(x))`` written
    into afterwards (structure only), else ``None``. A BN in training mode only when
    ``training_ok``."""
    if node.op != "call_function" or node.target is not F.pad or not node.args:
        return None
    y = node.args[0]
    if not isinstance(y, fx.Node) or y.op != "call_module" or len(y.users) != 1 or len(y.args) != 1 or y.kwargs:
        return None
    bn = root.get_submodule(str(y.target))
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or (bn.training and not training_ok) \
            or bn.running_mean is None:
        return None
    writes = [u for u in node.users if u.op == "call_function" and u.target is operator.setitem
              and u.args and u.args[0] is node]
    return (y, bn, writes) if writes else None


def rewrite_bn_pad_borders(graph: fx.Graph, root: nn.Module, rewrites: list[str], declined: list[str],
                           scaled: list[str] | None = None) -> int:
    """Rewrite every checked BN-and-pad border pattern of ``graph`` (whose modules live
    under ``root``) into ``bn(F.pad(x))`` (see the module docstring). Appends a line per
    rewrite to ``rewrites`` and per refused candidate (with the reason) to
    ``declined``; returns the number of rewrites. ``scaled``: the BNs become affines
    (training-mode BNs accepted; their targets are appended to it)."""
    done = 0
    order = {n: i for i, n in enumerate(graph.nodes)}
    for pad in list(graph.nodes):
        found = _match(pad, root, scaled is not None)
        if found is None:
            continue
        y, bn, writes = found
        where = _module_path(pad)
        reason = _refuse(graph, order, pad, y, bn, writes, root)
        if reason:
            declined.append(f"{where}: F.pad of {y.target} with border writes kept as traced: {reason}")
            log.info("%s", declined[-1])
            continue
        _rewrite(graph, pad, y, writes)
        if bn.training and scaled is not None:
            scaled.append(str(y.target))
        rewrites.append(f"{where}: F.pad({y.target}(x)) + border writes -> {y.target}(F.pad(x)) (checked)")
        log.debug("%s", rewrites[-1])
        done += 1
    return done


def _refuse(graph: fx.Graph, order: dict[fx.Node, int], pad: fx.Node, y: fx.Node, bn: nn.Module,
            writes: list[fx.Node], root: nn.Module) -> str:
    """Why the pattern at ``pad`` is not rewritten ('' when it is equal)."""
    mode = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("mode", "constant")
    value = pad.args[3] if len(pad.args) > 3 else pad.kwargs.get("value", None)
    amounts = pad.args[1] if len(pad.args) > 1 else pad.kwargs.get("pad")
    if mode != "constant" or (value is not None and float(value) != 0.0):
        return f"the pad is not a zero pad (mode={mode!r}, value={value!r})"
    if not isinstance(amounts, (list, tuple)) or not all(isinstance(p, int) and p >= 0 for p in amounts):
        return f"pad amounts {amounts!r} are not fixed non-negative ints"
    last = max(order[w] for w in writes)
    early = [u for u in pad.users if u not in writes and order[u] < last]
    if early:
        return f"{early[0].name} reads the padded tensor before the last border write"
    if any(pad in w.args[1:] or any(a is pad for a in w.all_input_nodes[1:]) for w in writes):
        return "a write reads the padded tensor itself"
    consts = _const_ancestors(writes, {pad})
    if consts is None:
        return "the written keys or values depend on the model's inputs"
    return _numeric_check(order, pad, y, bn, writes, consts, root, amounts)


def _numeric_check(order: dict[fx.Node, int], pad: fx.Node, y: fx.Node, bn: nn.Module, writes: list[fx.Node], consts: set[fx.Node],
                   root: nn.Module, amounts: Any) -> str:
    """Run the original nodes and ``bn(F.pad(x))`` on random inputs of two sizes."""
    nodes = sorted({y, pad, *writes, *consts}, key=order.__getitem__)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {y.args[0]: sub.placeholder("x")}  # type: ignore[index]
    for n in nodes:
        env[n] = sub.node_copy(n, lambda a: env[a])
    sub.output(env[pad])
    runner = fx.GraphModule(root, sub)
    dims = _spatial_dims(bn, amounts)
    ref_t = bn.running_var
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    training = bn.training
    for size in ((5,) * dims, tuple(6 + i for i in range(dims))):
        x = torch.randn((2, bn.num_features, *size), generator=gen).to(ref_t)
        try:
            bn.train(False)  # the eval affine (a training-mode BN: the affine it becomes)
            with torch.no_grad():
                got = runner(x)
                want = bn(F.pad(x, list(amounts)))
        except Exception as exc:  # the pattern is the model's own code (its BN, its border values)
            return f"running the pattern failed ({type(exc).__name__}: {exc})"
        finally:
            bn.train(training)
        if got.shape != want.shape:
            return f"shapes differ ({tuple(got.shape)} vs {tuple(want.shape)})"
        scale = float(want.abs().max()) or 1.0
        worst = max(worst, float((got - want).abs().max()) / scale)
    tol = 100 * torch.finfo(ref_t.dtype).eps
    if not worst <= tol:
        return (f"the written border values are not the BN's eval output for 0 "
                f"(relative difference {worst:.3g}, tolerance {tol:.3g})")
    return ""


def _rewrite(graph: fx.Graph, pad: fx.Node, y: fx.Node, writes: list[fx.Node]) -> None:
    x = y.args[0]
    with graph.inserting_before(y):
        new_pad = graph.call_function(F.pad, (x, *pad.args[1:]), dict(pad.kwargs))
    new_pad.meta = dict(pad.meta)
    y.args = (new_pad,)
    inputs = {a for w in writes for a in w.all_input_nodes if a is not pad}
    for w in reversed(writes):
        graph.erase_node(w)
    pad.replace_all_uses_with(y)
    graph.erase_node(pad)
    # values only the writes read are dead now (pure: parameter-derived constants)
    todo = list(inputs)
    while todo:
        n = todo.pop()
        if n.users or n.op not in ("get_attr", "call_function", "call_method"):
            continue
        ins = list(n.all_input_nodes)
        graph.erase_node(n)
        todo.extend(ins)
