"""Post-BN insertion: the second half of OREPA's block linearization.

After the branch BNs became scales (:mod:`repcompiler.passes.bn_to_scale`), the block is linear
and one BatchNorm after the branches' sum stabilizes training (the paper's ablation:
without it training diverges). This pass gives every region listed in
``gm.meta[META_LINEARIZE]`` such a **post-BN**:

* if the region's output is already produced by a BN (a BN after the add, as some
  ACNet variants have), that BN is the post-BN and nothing is inserted;
* otherwise a new ``nn.BatchNorm{1,2,3}d`` over the region's output channels is
  inserted as a ``call_module`` node right after the region's exit (it becomes the
  new exit; the region's expression gets it as its last term).

``init="default"``: a fresh BN (running mean 0, running var 1, weight 1, bias 0).

``init="from_bn"``: the BN is initialised to be the **identity in eval mode**
(running mean 0, running var ``1 - eps``, weight 1, bias 0), so the linearized
block's eval output at conversion time equals the original block's. In training mode
it normalizes the sum with batch statistics (the original normalized each branch
instead), so the first training forward differs from the original's, and every
training step moves its running statistics (momentum) towards the statistics of the
sum: eval outputs then drift from the original's as training proceeds, as they would
for any fine-tuning. To keep the original's eval map longer, set the BN's momentum
low or freeze it.

The inserted module is added at the top level of the graph module under a fresh name
(``post_bn``, ``post_bn_1``, ...) and recorded in ``gm.meta[META_POST_BN]`` as
``(region, target, inserted: bool)``; the squeeze into an online conv moves it inside
the online block.
"""

from __future__ import annotations

import logging
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from .. import algebra as A
from ..errors import UnsupportedError, check_choice

from .base import GraphPass, PassResult, graph_meta
from .bn_to_scale import INITS, META_LINEARIZE, exit_bn

__all__ = ["META_POST_BN", "make_post_bn", "exit_bn", "InsertPostBN"]

log = logging.getLogger(__name__)

META_POST_BN = "repcompiler.linearize.post_bn"
"""``gm.meta`` key: ``[(region, target or None, inserted), ...]`` written by :class:`InsertPostBN`."""

_BN = nn.modules.batchnorm._BatchNorm
_BN_FOR_DIMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def make_post_bn(
    channels: int,
    dims: int,
    *,
    init: str = "default",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """A new post-addition BN (see the module docstring for ``init``)."""
    check_choice("init", init, INITS)
    if dims not in _BN_FOR_DIMS:
        raise UnsupportedError(f"post-BN: dims must be 1, 2 or 3, got {dims}")
    bn = _BN_FOR_DIMS[dims](channels, dtype=dtype, device=device)
    if init == "from_bn":
        with torch.no_grad():
            bn.running_var.fill_(1.0 - bn.eps)  # eval: x / sqrt((1 - eps) + eps) == x
    return bn


def _fresh_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 1
    while hasattr(gm, name):
        name, i = f"{base}_{i}", i + 1
    return name


def _ref_tensor(gm: fx.GraphModule, region) -> torch.Tensor | None:
    if region.expr is not None:
        for t in region.expr.parameters():
            return t
    return None


class InsertPostBN(GraphPass):
    """Give each region in ``gm.meta[META_LINEARIZE]`` a post-BN (module docstring).

    ``enabled=False`` (the paper's ablation) inserts nothing; a BN that is already the
    region's output is kept either way (it is the user's layer, not ours).
    """

    def __init__(self, init: str = "default", enabled: bool = True) -> None:
        check_choice("init", init, INITS)
        self.init = init
        self.enabled = enabled

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        meta = graph_meta(graph_module)
        regions: Iterable = meta.get(META_LINEARIZE) or []
        record: list = meta.setdefault(META_POST_BN, [])
        modified = False
        for region in regions:
            if exit_bn(graph_module, region) is not None:
                record.append((region, str(region.exit.target), False))
                continue
            if not self.enabled or region.expr is None:
                record.append((region, None, False))
                continue
            spec = region.expr.spec
            ref = _ref_tensor(graph_module, region)
            bn = make_post_bn(
                spec.out_channels,
                spec.dims,
                init=self.init,
                dtype=None if ref is None else ref.dtype,
                device=None if ref is None else ref.device,
            )
            old_exit = region.exit
            bn.train(graph_module.training)
            target = _fresh_name(graph_module, "post_bn")
            graph_module.add_submodule(target, bn)
            with graph_module.graph.inserting_after(old_exit):
                node = graph_module.graph.call_module(target, (old_exit,))
            old_exit.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
            node.meta = {k: v for k, v in old_exit.meta.items() if k in ("nn_module_stack", "tensor_meta")}
            region.nodes.append(node)
            region.exit = node
            region.expr = A.Seq(region.expr, A.BatchNorm(bn, dims=spec.dims, name=target))
            record.append((region, target, True))
            modified = True
            log.debug("region %s: post-BN %s inserted", region.name, target)
        if modified:
            graph_module.graph.lint()
        return PassResult(graph_module, modified)
