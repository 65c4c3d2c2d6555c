"""The pass contract: GraphModule in, PassResult(graph_module, modified) out."""

from __future__ import annotations

import torch
from torch import nn

from fixtures_blocks import RepVGGBlock, count_convs, randomize_bn
from repcompiler.passes.base import GraphPass, PassResult, run_passes
from repcompiler.passes.state import PipelineState, pipeline_state
from repcompiler.passes.cleanup import Cleanup
from repcompiler.passes.find_regions import FindRegions
from repcompiler.passes.squeeze import SqueezeRegions
from repcompiler.report import FoldReport
from repcompiler.tracing import trace_model


def test_find_squeeze_cleanup_on_a_graph_module():
    block = randomize_bn(RepVGGBlock(4, 4).double()).eval()
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    gm = trace_model(block)
    state = pipeline_state(gm)
    state.report = FoldReport()
    res = FindRegions()(gm)
    assert isinstance(res, PassResult) and res.modified is False
    assert len(state.regions) == 1 and state.regions[0].foldable
    gm, modified = run_passes(gm, [SqueezeRegions(), Cleanup(delete_unused_submodules=True)])
    assert modified
    assert count_convs(gm) == 1 and torch.allclose(gm(x), block(x), rtol=1e-10, atol=1e-10)
    assert pipeline_state(gm) is state and state.report.counts() == {"folded": 1}
    assert state.completed == ["FindRegions", "SqueezeRegions", "Cleanup"]
    assert count_convs(block) == 2  # the traced module's containers were not edited
    again = run_passes(gm, [FindRegions(), SqueezeRegions(), Cleanup()])
    assert again.modified is False


def test_a_user_pass_follows_the_contract():
    class CountNodes(GraphPass):
        def __init__(self):
            self.seen = 0

        def call(self, gm):
            self.seen = len(gm.graph.nodes)
            return PassResult(gm, False)

    p = CountNodes()
    gm = trace_model(nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU()))
    out = run_passes(gm, [p])
    assert p.seen == 4 and out.graph_module is gm and not out.modified
