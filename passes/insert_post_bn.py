"""Post-BN insertion: the second half of OREPA's block linearization.

After the branch BNs became scales (:mod:`repcompiler.passes.bn_to_scale`), the block is linear
and one BatchNorm after the branches' sum stabilizes training (the paper's ablation:
without it training diverges). This pass gives every region selected for
linearization (``pipeline_state(gm).selected``, after :class:`BnToScale` ran on it)
such a **post-BN**:

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
(``post_bn``, ``post_bn_1``, ...) and recorded as a
:class:`~repcompiler.passes.state.PostBN` in ``pipeline_state(gm).post_bns``; the
squeeze into an online conv moves it inside the online block.
"""

from __future__ import annotations

import logging
import torch
import torch.fx as fx
from torch import nn

from .. import algebra as A
from ..errors import UnsupportedError, check_choice

from .base import GraphPass, PassResult
from .bn_to_scale import INITS, BnToScale, exit_bn
from .squeeze import fresh_name
from .state import PostBN, live_regions, pipeline_state

__all__ = ["make_post_bn", "exit_bn", "InsertPostBN"]

log = logging.getLogger(__name__)

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


def _ref_tensor(gm: fx.GraphModule, region) -> torch.Tensor | None:
    if region.expr is not None:
        for t in region.expr.parameters():
            return t
    return None


class InsertPostBN(GraphPass):
    """Give each selected region a post-BN (module docstring).

    ``enabled=False`` (the paper's ablation) inserts nothing; a BN that is already the
    region's output is kept either way (it is the user's layer, not ours). Requires
    :class:`BnToScale` to have run (a post-BN stabilizes the sum of *scaled* branches);
    ensures every recorded post-BN is the BN its region's exit calls.
    """

    runs_after = (BnToScale,)

    def __init__(self, init: str = "default", enabled: bool = True) -> None:
        check_choice("init", init, INITS)
        self.init = init
        self.enabled = enabled

    def requires(self, graph_module: fx.GraphModule) -> None:
        state = pipeline_state(graph_module)
        if not state.ran(BnToScale):
            self.fail("the branch BNs must become scales first: run BnToScale before it")
        if not live_regions(graph_module, state.selected):
            self.fail("the selected regions are not regions of this graph (found on an earlier version?)")

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        state = pipeline_state(graph_module)
        record = state.post_bns
        modified = False
        for region in state.selected:
            if exit_bn(graph_module, region) is not None:
                record.append(PostBN(region, str(region.exit.target), False))
                continue
            if not self.enabled or region.expr is None:
                record.append(PostBN(region, None, False))
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
            target = fresh_name(graph_module, "post_bn")
            graph_module.add_submodule(target, bn)
            with graph_module.graph.inserting_after(old_exit):
                node = graph_module.graph.call_module(target, (old_exit,))
            old_exit.replace_all_uses_with(node, delete_user_cb=lambda u: u is not node)
            node.meta = {k: v for k, v in old_exit.meta.items() if k in ("nn_module_stack", "tensor_meta")}
            region.nodes.append(node)
            region.exit = node
            for other in state.selected:  # a block fed by this one now reads the post-BN
                if other.entry is old_exit:
                    other.entry = node
            region.expr = A.Seq(region.expr, A.BatchNorm(bn, dims=spec.dims, name=target))
            record.append(PostBN(region, target, True))
            modified = True
            log.debug("region %s: post-BN %s inserted", region.name, target)
        return PassResult(graph_module, modified)

    def ensures(self, graph_module: fx.GraphModule) -> None:
        for post in pipeline_state(graph_module).post_bns:
            if post.target is None:
                continue
            e = post.region.exit
            if e.op != "call_module" or str(e.target) != post.target or exit_bn(graph_module, post.region) is None:
                self.fail(f"region {post.region.name}: its exit is not the post-BN {post.target}")
