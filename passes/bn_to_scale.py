"""BN-to-scale: the first half of OREPA's block linearization (arXiv 2204.00826, Sec. 3.2).

A BatchNorm inside a branch of a multi-branch block is not linear while training (it
divides by batch statistics), so the branches cannot be merged on the kernel. This
pass replaces every such **branch-level BN** by a learnable per-channel affine map
(an :class:`~repcompiler.algebra.Affine` leaf, itself an ``nn.Module``):

``x -> x * scale + bias``

* ``scaling="vector"``: ``scale`` is a learnable ``[C]`` vector (the paper's choice: it
  keeps the branches' optimization diverse, which is what the BN was good for);
* ``scaling="scalar"``: one learnable number per branch;
* ``scaling="fixed"``: the scale stays at its initial value (a buffer: 1 with
  ``init="default"``, the BN's eval factor with ``"from_bn"``);
* ``scaling="none"``: no learnable scale.

The BN's constant shift survives as a learnable per-channel ``bias`` (it matters for a
BN in the middle of a branch, e.g. DBB's ``1x1 -> BN -> kxk``; before a post-BN it is
redundant in training but keeps the eval map exact).

Initialisation (``init``):

* ``"default"``: scale 1, bias 0 (a fresh linearized block; the post-BN normalizes);
* ``"from_bn"``: the BN's eval-mode affine ``gamma / sqrt(var + eps)`` and
  ``beta - mean * gamma / sqrt(var + eps)``, so the map equals the BN in eval mode.
  With ``scaling="scalar"`` or ``"none"`` a learnable scale cannot hold a per-channel
  factor; the BN's per-channel factor is then kept as a **fixed buffer** in front of
  the learnable scalar (or alone, for ``"none"``), so the eval map is still exact.

Which BNs are branch-level is decided by the caller (:mod:`repcompiler.transforms.linearize`
selects the regions); in a selected region every BN except the one producing the
region's output (that one is the block's post-addition BN and stays a BN) is replaced.

Graph level: :class:`BnToScale` reads the regions selected for linearization,
``pipeline_state(gm).selected`` (:class:`~repcompiler.passes.find_regions.Region`
objects; see :mod:`repcompiler.passes.state`), replaces
each branch BN leaf of the region's algebra expression by its affine leaf (so a later
squeeze folds the scales) and, where the BN is a module the graph calls, swaps the
module of ``gm`` for the leaf at the **same qualified name** (the graph's
``call_module`` nodes are unchanged, so the graph still runs). BNs inside another
leaf module's lowering (e.g. DBB's BN-and-pad layer) are replaced in the expression. It records
a :class:`~repcompiler.passes.state.ScaledBN` per BN in ``pipeline_state(gm).scaled``
and ensures no selected region keeps a branch BN.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.fx as fx
from torch import nn

from .. import algebra as A
from ..blocks import SCALINGS as _SCALINGS
from ..errors import UnsupportedError, check_choice

from .base import GraphPass, PassResult
from .state import ScaledBN, live_regions, pipeline_state

__all__ = [
    "SCALINGS",
    "INITS",
    "scale_for_bn",
    "branch_bn_nodes",
    "branch_bns",
    "exit_bn",
    "iter_leaves",
    "replace_leaves",
    "BnToScale",
    "check_options",
]

log = logging.getLogger(__name__)

SCALINGS = _SCALINGS  # the blocks' options (re-exported for the passes)
INITS = ("default", "from_bn")

_BN = nn.modules.batchnorm._BatchNorm


def check_options(scaling: str, init: str) -> None:
    """Raise :class:`UnsupportedError` for an unknown ``scaling`` or ``init``."""
    check_choice("scaling", scaling, SCALINGS)
    check_choice("init", init, INITS)


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedError(
            f"{type(bn).__name__}({bn.num_features}) has track_running_stats=False: it has no eval-mode "
            "affine map to initialise a scale from"
        )
    with torch.no_grad():
        scale, shift = A.BatchNorm(bn).affine()
    return scale.detach().clone(), shift.detach().clone()


def scale_for_bn(
    bn: nn.Module,
    dims: int,
    *,
    scaling: str = "vector",
    init: str = "default",
    name: str = "",
) -> A.Expr:
    """The learnable affine leaf that replaces branch BN ``bn`` (see the module doc).

    Returns an :class:`~repcompiler.algebra.Affine` (or, for ``init="from_bn"`` with
    ``scaling="scalar"``, a fixed per-channel factor followed by a learnable scalar
    scale and bias). Tensors take ``bn``'s dtype and device.
    """
    check_options(scaling, init)
    if not isinstance(bn, _BN):
        raise UnsupportedError(f"{name or type(bn).__name__}: not a BatchNorm module ({type(bn).__name__})")
    c = int(bn.num_features)
    ref = bn.running_mean if bn.running_mean is not None else (bn.weight if bn.weight is not None else None)
    kw = {} if ref is None else {"dtype": ref.dtype, "device": ref.device}
    label = f"scale({name})" if name else "scale"
    if init == "from_bn":
        s, b = _bn_affine(bn)
    else:
        s, b = torch.ones(c, **kw), torch.zeros(c, **kw)
    bias = nn.Parameter(b)
    if scaling == "vector":
        leaf: A.Expr = A.Affine(c, dims, scale=nn.Parameter(s), shift=bias, name=label)
    elif init == "default" and scaling != "fixed":
        scale = nn.Parameter(torch.ones((), **kw)) if scaling == "scalar" else None
        leaf = A.Affine(c, dims, scale=scale, shift=bias, name=label)
    elif scaling in ("none", "fixed"):
        # fixed, or from_bn with a scale that cannot hold the BN's per-channel factor: keep it fixed
        leaf = A.Affine(c, dims, scale=s, shift=bias, name=label)
    else:
        fixed = A.Affine(c, dims, scale=s, name=f"bn_factor({name})" if name else "bn_factor")
        leaf = A.Seq(fixed, A.Affine(c, dims, scale=nn.Parameter(torch.ones((), **kw)), shift=bias, name=label))
    # parameter-free anchors must follow the BN's dtype/device too
    return leaf.to(**kw) if kw else leaf


def iter_leaves(expr: A.Expr):
    """Every leaf of an expression tree (depth first, left to right)."""
    terms = getattr(expr, "terms", None)
    if isinstance(terms, nn.ModuleList):
        for t in terms:
            yield from iter_leaves(t)
    else:
        yield expr


def exit_bn(gm: fx.GraphModule, region) -> nn.Module | None:
    """The BN module whose call produces ``region``'s output (its post-BN), if any."""
    e = region.exit
    if e.op != "call_module":
        return None
    m = gm.get_submodule(str(e.target))
    if isinstance(m, _BN) and m.running_mean is not None and m.running_var is not None:
        return m
    return None


def branch_bns(gm: fx.GraphModule, region) -> list[tuple[str, nn.Module]]:
    """The branch-level BNs of ``region``: ``(name, bn module)`` of every
    :class:`~repcompiler.algebra.BatchNorm` leaf of its expression except the BN that
    produces the region's output (the post-BN). This includes BNs inside other leaf
    modules' lowerings (e.g. DBB's BN-and-pad layer)."""
    if region.expr is None:
        return []
    post = exit_bn(gm, region)
    out, seen = [], set()
    for leaf in iter_leaves(region.expr):
        if isinstance(leaf, A.BatchNorm) and leaf.bn is not post and id(leaf.bn) not in seen:
            seen.add(id(leaf.bn))
            out.append((leaf.name, leaf.bn))
    return out


def branch_bn_nodes(gm: fx.GraphModule, region) -> list[fx.Node]:
    """The BN ``call_module`` nodes of ``region`` that are branch-level (every BN node
    of the region except one that produces the region's output)."""
    out = []
    for n in region.nodes:
        if n.op != "call_module" or n is region.exit:
            continue
        if isinstance(gm.get_submodule(str(n.target)), _BN):
            out.append(n)
    return out


def replace_leaves(expr: A.Expr, replace: Callable[[A.Expr], A.Expr | None]) -> A.Expr:
    """Rewrite an expression tree: every node for which ``replace`` returns an
    expression is swapped for it (combinators are edited in place); returns the root."""
    new = replace(expr)
    if new is not None:
        return new
    terms = getattr(expr, "terms", None)
    if isinstance(terms, nn.ModuleList):
        for i, t in enumerate(list(terms)):
            nt = replace_leaves(t, replace)
            if nt is not t:
                terms[i] = nt
    return expr


class BnToScale(GraphPass):
    """Replace the branch BNs of the regions in ``pipeline_state(gm).selected`` by
    affine leaves (see the module docstring). ``modified`` is true when a BN was
    replaced. Requires the selected regions to be regions of this graph."""

    def __init__(self, scaling: str = "vector", init: str = "default") -> None:
        check_options(scaling, init)
        self.scaling = scaling
        self.init = init

    def requires(self, graph_module: fx.GraphModule) -> None:
        if not live_regions(graph_module, pipeline_state(graph_module).selected):
            self.fail("the selected regions are not regions of this graph (found on an earlier version?)")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        state = pipeline_state(graph_module)
        modified = False
        for region in state.selected:
            swaps: dict[int, A.Expr] = {}
            targets = {id(graph_module.get_submodule(str(n.target))): str(n.target)
                       for n in branch_bn_nodes(graph_module, region)}
            for name, bn in branch_bns(graph_module, region):
                target = targets.get(id(bn))
                leaf = scale_for_bn(bn, region.dims, scaling=self.scaling, init=self.init, name=target or name)
                leaf.train(bn.training)
                if target is not None:  # a BN module called by the graph: swap it under its name
                    graph_module.set_submodule(target, leaf)
                swaps[id(bn)] = leaf
                state.scaled.append(ScaledBN(target or name, bn, leaf))
                modified = True
            if swaps:
                region.expr = replace_leaves(
                    region.expr,
                    lambda e: swaps.get(id(e.bn)) if isinstance(e, A.BatchNorm) else None,
                )
                log.debug("region %s: %d branch BN(s) -> scale", region.name, len(swaps))
        return PassResult(graph_module, modified)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        for region in pipeline_state(graph_module).selected:
            left = branch_bns(graph_module, region)
            if left:
                self.fail(f"region {region.name} still has branch BN(s) {[n for n, _ in left]}")
