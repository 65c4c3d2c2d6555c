"""Fold ``nn.BatchNorm1d`` into the ``nn.Linear`` next to it, on ``(N, C)`` features.

This module owns :class:`FoldLinearBN`, a graph pass (:func:`repcompiler.fold` runs it
on each traced unit and reports the pairs). A Linear is a convolution with no spatial dimension, but the
kernel algebra is 1-, 2- and 3-d only (:class:`repcompiler.algebra.ConvSpec` rejects
``dims=0``), so these pairs - BN -> Linear classifier heads (timm's ``NormLinear``),
Linear -> BN token layers (LeViT's ``LinearNorm``) - are folded here directly:

* ``Linear -> BN``:  ``W' = s[:, None] * W``, ``b' = s * b + t``;
* ``BN -> Linear``:  ``W' = W * s[None, :]``, ``b' = b + W @ t`` (eval-mode dropout
  or identity calls in between are allowed: timm's ``NormLinear``);

with ``(s, t)`` the BN's eval-mode affine. Both are exact for every input (there is
no border), *provided the BN normalises the Linear's feature axis*: ``BatchNorm1d``
normalises dim 1, a Linear acts on the last dim, so the BN's input must be 2-d.
That is known from shape metadata (``ShapeProp``: pass ``example_inputs``) or, without
it, from the value being produced by ``flatten(x, 1)`` (``x.flatten(1)``,
``torch.flatten(x, 1)``) directly. Between a Linear and its BN, ops that only merge
leading dims (``flatten``, ``reshape``, ``view``; LeViT's
``bn(x.flatten(0, 1)).reshape_as(x)``) are allowed when the metadata shows the last
dim unchanged; the Linear's output may also be read for its shape only.

A Linear applied **channels-last** (token mixers and MLP blocks: ``fc`` on NHWC, then
``permute(0, 3, 1, 2)`` and a ``BatchNorm2d``; ``fc`` on ``(B, N, C)`` tokens, then
``transpose(1, 2)`` and a ``BatchNorm1d``) folds the same way (``Linear -> BN``):
the permute moves the Linear's output features (its last dim) to dim 1, the dim any
BatchNorm normalises, so the BN is a per-feature affine of the Linear's output, for
every input. Only a permute / transpose / movedim that provably moves the last dim
to dim 1 (from its own dims, or the shape metadata for ``transpose(1, 2)``) and whose
value nothing else reads qualifies.

The folded Linear is installed at the Linear's qualified name and the BN's becomes
``nn.Identity`` (as :func:`repcompiler.fold` does for module-only regions), both in the
graph module and, when given, in the module the graph was traced from; every fold is
checked numerically before anything is replaced. A Linear or BN called more than once,
or whose tensors something else reads (:mod:`repcompiler.analysis.uses`, or ``pinned`` given by
the caller), is left as it is.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Mapping

import torch
import torch.fx as fx
from torch import nn

from .. import algebra as A
from ..analysis.uses import graph_pins
from .base import GraphPass, PassResult
from .state import pipeline_state

__all__ = ["FoldLinearBN", "fuse_linear_bn"]

log = logging.getLogger(__name__)

_LEADING = {"flatten", "reshape", "view"}
_AS_TEMPLATE = {"reshape_as", "view_as", "expand_as"}


@torch.no_grad()
def fuse_linear_bn(linear: nn.Linear, bn: nn.Module, bn_first: bool) -> nn.Linear:
    """A new ``nn.Linear`` equal to ``bn(linear(x))`` (or ``linear(bn(x))`` when
    ``bn_first``) on ``(N, C)`` inputs, eval-mode BN."""
    s, t = A.BatchNorm(bn, dims=1).affine()
    w = linear.weight
    b = linear.bias if linear.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    if bn_first:
        w2, b2 = w * s[None, :], b + w @ t
    else:
        w2, b2 = w * s[:, None], b * s + t
    out = nn.Linear(w.shape[1], w.shape[0], bias=True, device=w.device, dtype=w.dtype)
    out.weight.copy_(w2)
    out.bias.copy_(b2)
    return out


def _module(gm: fx.GraphModule, n: Any) -> nn.Module | None:
    if isinstance(n, fx.Node) and n.op == "call_module":
        return gm.get_submodule(str(n.target))
    return None


def _plain_linear(m: Any) -> bool:
    return (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward
            and not (m._forward_hooks or m._forward_pre_hooks))


def _plain_bn1d(m: Any) -> bool:
    return (isinstance(m, nn.BatchNorm1d) and not m.training and m.running_mean is not None
            and type(m).forward is nn.BatchNorm1d.forward and not (m._forward_hooks or m._forward_pre_hooks))


def _rank(n: fx.Node) -> int | None:
    tm = n.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return len(shape) if shape is not None else None


def _last_dim(n: fx.Node) -> int | None:
    tm = n.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return int(shape[-1]) if shape is not None and len(shape) else None


def _flattened_from_1(n: Any) -> bool:
    """``n`` is ``flatten(x, 1)`` (2-d output whatever ``x`` is)."""
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method"):
        return False
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    if name != "flatten":
        return False
    start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
    end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
    return start == 1 and end == -1


_SAME_RANK_MODULES = (nn.Linear, nn.BatchNorm1d, nn.Identity, nn.ReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Dropout)
_SAME_RANK_FUNCS = {"relu", "gelu", "silu", "sigmoid", "tanh", "hardswish", "dropout"}


def _is_2d(n: Any, gm: fx.GraphModule, depth: int = 0) -> bool:
    """``n``'s value is 2-d: by shape metadata, or it is ``flatten(x, 1)`` reached
    back through rank-preserving ops (Linear, BN1d, activations, dropout)."""
    if not isinstance(n, fx.Node) or depth > 32:
        return False
    if _rank(n) is not None:
        return _rank(n) == 2
    if _flattened_from_1(n):
        return True
    if len(n.args) < 1 or not isinstance(n.args[0], fx.Node):
        return False
    if n.op == "call_module":
        same = isinstance(gm.get_submodule(str(n.target)), _SAME_RANK_MODULES)
    else:
        name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
        same = n.op in ("call_function", "call_method") and name in _SAME_RANK_FUNCS
    return same and _is_2d(n.args[0], gm, depth + 1)


def _shape_only_use(u: fx.Node, n: fx.Node) -> bool:
    """``u`` reads only ``n``'s shape (``y.reshape_as(n)``, ``n.size()``, ``n.shape``)."""
    if u.op == "call_method" and u.target in _AS_TEMPLATE:
        return len(u.args) > 1 and u.args[0] is not n
    if u.op == "call_method" and u.target in ("size", "dim"):
        return True
    return u.op == "call_function" and getattr(u.target, "__name__", "") == "getattr" and u.args[1:2] == ("shape",)


_BN_RANKS = {nn.BatchNorm1d: 3, nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}


def _plain_bn(m: Any) -> bool:
    """A built-in BatchNorm1d/2d/3d in eval mode with running statistics, no hooks."""
    return (type(m) in _BN_RANKS and not m.training and m.running_mean is not None
            and not (m._forward_hooks or m._forward_pre_hooks))


def _int_dims(args: Any) -> list[int] | None:
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = args[0]
    return list(args) if all(isinstance(a, int) and not isinstance(a, bool) for a in args) else None


def _last_to_channels(u: fx.Node, n: fx.Node, rank: int | None) -> bool:
    """``u`` moves ``n``'s last dim to dim 1 (channels-last back to channels-first):
    ``n.permute(0, 3, 1, 2)``, ``n.transpose(1, 2)`` of a 3-d value, ``n.movedim(-1, 1)``.
    ``rank``: ``n``'s rank when known otherwise (shape metadata wins)."""
    if u.op not in ("call_function", "call_method") or not u.args or u.args[0] is not n or u.kwargs:
        return False
    name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
    rank = _rank(n) if _rank(n) is not None else rank
    rest = u.args[1:]
    if name == "permute":
        dims = _int_dims(rest)
        if dims is None or len(dims) < 2 or (rank is not None and rank != len(dims)):
            return False
        r = len(dims)
        return sorted(d % r for d in dims) == list(range(r)) and dims[1] % r == r - 1
    if name in ("transpose", "swapaxes", "movedim", "moveaxis"):
        dims = _int_dims(rest)
        if dims is None or len(dims) != 2:
            return False
        a, b = dims
        if name in ("movedim", "moveaxis"):
            return b == 1 and (a == -1 or (rank is not None and a == rank - 1))
        last = {-1} | ({rank - 1} if rank is not None else set())
        return (a == 1 and b in last) or (b == 1 and a in last)
    return False


def _bn_after_channels_last(gm: fx.GraphModule, lin: fx.Node) -> fx.Node | None:
    """The BatchNorm that normalises ``lin``'s output features after a permute moving
    them back to dim 1 (a Linear applied channels-last: ``bn(fc(x.permute(0, 2, 3,
    1)).permute(0, 3, 1, 2))``, ``bn1d(fc(tokens).transpose(1, 2))``), when nothing
    else reads the Linear's or the permute's value."""
    users = [u for u in lin.users if not _shape_only_use(u, lin)]
    if len(users) != 1:
        return None
    perm = users[0]
    after = [u for u in perm.users if not _shape_only_use(u, perm)]
    if len(after) != 1 or not _plain_bn(_module(gm, after[0])) or after[0].args[:1] != (perm,):
        return None
    bn = _module(gm, after[0])
    # the BN accepts one rank (BatchNorm1d after a permute: 3, as a 2-d value has no dim
    # 2 to move): wherever the model runs, the permuted value has it
    if not _last_to_channels(perm, lin, _BN_RANKS[type(bn)]):
        return None
    return after[0] if bn.num_features == gm.get_submodule(str(lin.target)).out_features else None


def _bn_after(gm: fx.GraphModule, lin: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The BN1d that reads ``lin``'s value (directly or through leading-dim merges)
    and the merge nodes in between, when nothing else reads the value."""
    path: list[fx.Node] = []
    n = lin
    while True:
        data_users = [u for u in n.users if not _shape_only_use(u, n)]
        if len(data_users) != 1:
            return None
        u = data_users[0]
        if _plain_bn1d(_module(gm, u)):
            break
        name = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
        if u.op not in ("call_function", "call_method") or name not in _LEADING or u.args[0] is not n:
            return None
        if _last_dim(u) is None or _last_dim(u) != _last_dim(lin):
            return None
        path.append(u)
        n = u
    if not _is_2d(n, gm):
        return None
    return u, path


class FoldLinearBN(GraphPass):
    """Fold ``Linear -> BatchNorm1d`` and ``BatchNorm1d -> Linear`` pairs on ``(N, C)``
    features (see the module docstring). ``root``: the module ``gm`` was traced from
    (its submodules are replaced too). The folded ``(linear, bn)`` targets are appended
    to ``pipeline_state(gm).linear_bn_folds``."""

    def __init__(self, root: nn.Module | None = None, pinned: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.pinned = dict(pinned or {})

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        gm = graph_module
        modified = False
        # modules used other than by one call (repcompiler.analysis.uses) stay as they are
        calls = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_module")
        kept = {**graph_pins(gm), **self.pinned, **{t: "called more than once" for t, c in calls.items() if c > 1}}
        for n in list(gm.graph.nodes):
            lin = _module(gm, n)
            if not _plain_linear(lin) or len(n.args) != 1 or n.kwargs or str(n.target) in kept:
                continue
            pair = _bn_after(gm, n)
            if pair is not None:
                modified |= self._apply(gm, n, pair[0], bn_first=False, kept=kept)
                continue
            bn_node = _bn_after_channels_last(gm, n)
            if bn_node is not None:
                modified |= self._apply(gm, n, bn_node, bn_first=False, kept=kept)
                continue
            prev = n.args[0]
            while (isinstance(_module(gm, prev), (nn.Dropout, nn.Identity)) and not _module(gm, prev).training
                   and len(prev.users) == 1 and len(prev.args) == 1):
                prev = prev.args[0]  # eval-mode dropout between (timm's NormLinear)
            if (_plain_bn1d(_module(gm, prev)) and len(prev.users) == 1 and len(prev.args) == 1
                    and _is_2d(prev.args[0], gm)):
                modified |= self._apply(gm, n, prev, bn_first=True, kept=kept)
        return PassResult(gm, modified)

    def _apply(self, gm: fx.GraphModule, lin_node: fx.Node, bn_node: fx.Node, bn_first: bool,
               kept: Mapping[str, str]) -> bool:
        if str(bn_node.target) in kept:
            return False
        lin, bn = gm.get_submodule(str(lin_node.target)), gm.get_submodule(str(bn_node.target))
        fused = fuse_linear_bn(lin, bn, bn_first)  # type: ignore[arg-type]
        x = torch.randn(4, lin.in_features, generator=torch.Generator().manual_seed(0)).to(lin.weight)
        as_bn = (1,) * (_BN_RANKS.get(type(bn), 2) - 2)  # a BN2d/3d reads [N, C, 1, 1(, 1)]
        with torch.no_grad():
            want = lin(bn(x)) if bn_first else bn(lin(x).reshape(4, -1, *as_bn)).reshape(4, -1)
            got = fused(x)
        err = float((got - want).abs().max()) / (float(want.abs().max()) or 1.0)
        if not err <= 100 * torch.finfo(want.dtype).eps:
            log.warning("not folding %s/%s: check failed (relative %.3g)", lin_node.target, bn_node.target, err)
            return False
        for target, module in ((str(lin_node.target), fused), (str(bn_node.target), nn.Identity())):
            for owner in (gm, self.root):
                if owner is not None:
                    owner.set_submodule(target, module)
        pipeline_state(gm).linear_bn_folds.append((str(lin_node.target), str(bn_node.target)))
        return True
