"""The two linearization passes on their own (``passes/bn_to_scale.py``,
``passes/insert_post_bn.py``), through the pass contract of ``passes/base.py``."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from repcompiler.passes.base import PassContractError, run_passes
from repcompiler.passes.bn_to_scale import BnToScale, branch_bns, scale_for_bn
from repcompiler.passes.find_regions import FindRegions
from repcompiler.passes.insert_post_bn import InsertPostBN, make_post_bn
from repcompiler.passes.state import PipelineState, PostBN, ScaledBN, pipeline_state
from repcompiler import algebra as A
from repcompiler.errors import UnsupportedError
from repcompiler.capture.tracing import trace_model

import fixtures_blocks as fb
from helpers import rel_err


def _eval(m, x):
    m.eval()
    with torch.no_grad():
        return m(x)


def test_passes_rewrite_graph_and_keep_eval_output_with_from_bn():
    net = fb.randomize_bn(nn.Sequential(fb.RepVGGBlock(8, 8), fb.ACBlock(8, 8)), seed=1).double().eval()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    want = _eval(net, x)
    gm = trace_model(net)
    run_passes(gm, [FindRegions()])
    state = pipeline_state(gm)
    regions = [r for r in state.regions if branch_bns(gm, r)]
    assert len(regions) == 2
    state.selected = regions
    res = run_passes(gm, [BnToScale("vector", "from_bn"), InsertPostBN("from_bn")])
    assert res.modified
    # BN modules became affine leaves under the same names; the graph still runs them
    assert isinstance(gm.get_submodule("0.rbr_dense.bn"), A.Affine)
    assert isinstance(gm.get_submodule("1.square_bn"), A.Affine)
    assert len(state.scaled) == 3 + 3 and all(isinstance(s, ScaledBN) for s in state.scaled)
    assert state.scaled[0].target == "0.rbr_dense.bn" and state.scaled[0].leaf is gm.get_submodule("0.rbr_dense.bn")
    # one post-BN per region, inserted as a graph node after the region
    assert [(p.region, p.target, p.inserted) for p in state.post_bns] == [
        (regions[0], "post_bn", True), (regions[1], "post_bn_1", True)]
    called = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "post_bn" in called and "post_bn_1" in called
    # from_bn: the rewritten (unfolded) graph equals the original in eval mode
    assert rel_err(_eval(gm, x), want) < 1e-12
    # and the region expressions were rewritten to match (folding them is exact)
    for r in regions:
        assert not any(isinstance(leaf, A.BatchNorm) and leaf.bn is not r.expr.terms[-1].bn
                       for leaf in r.expr.modules() if isinstance(leaf, A.BatchNorm))
        assert r.expr.exactness().exact


def test_passes_do_nothing_without_selected_regions():
    gm = trace_model(nn.Sequential(fb.RepVGGBlock(8, 8)))
    res = run_passes(gm, [BnToScale(), InsertPostBN()])
    assert not res.modified


def test_post_bn_disabled_and_existing():
    net = nn.Sequential(fb.RepVGGBlock(8, 8))
    gm = trace_model(net)
    run_passes(gm, [FindRegions()])
    state = pipeline_state(gm)
    state.selected = list(state.regions)
    run_passes(gm, [BnToScale()])
    res = run_passes(gm, [InsertPostBN(enabled=False)])
    assert not res.modified and state.post_bns == [PostBN(state.selected[0], None, False)]


def test_post_bn_of_a_region_ending_in_a_bn_is_that_bn():
    net = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    gm = trace_model(net)
    run_passes(gm, [FindRegions()])
    state = pipeline_state(gm)
    state.selected = list(state.regions)
    res = run_passes(gm, [BnToScale(), InsertPostBN()])
    assert not res.modified and state.post_bns == [PostBN(state.selected[0], "1", False)]


def test_insert_post_bn_requires_bn_to_scale():
    gm = trace_model(nn.Sequential(fb.RepVGGBlock(8, 8)))
    run_passes(gm, [FindRegions()])
    pipeline_state(gm).selected = list(pipeline_state(gm).regions)
    with pytest.raises(PassContractError, match="run BnToScale before"):
        run_passes(gm, [InsertPostBN()])
    # a schedule in the wrong order is refused before anything runs
    with pytest.raises(PassContractError, match="InsertPostBN must run after BnToScale"):
        run_passes(gm, [InsertPostBN(), BnToScale()])
    assert not pipeline_state(gm).scaled


def test_bn_to_scale_refuses_regions_of_another_graph():
    net = nn.Sequential(fb.RepVGGBlock(8, 8))
    old, new = trace_model(net), trace_model(net)
    run_passes(old, [FindRegions()])
    state = PipelineState(selected=list(pipeline_state(old).regions))
    with pytest.raises(PassContractError, match="not regions of this graph"):
        run_passes(new, [BnToScale()], state=state)
    assert isinstance(new.get_submodule("0.rbr_dense.bn"), nn.BatchNorm2d)  # untouched


def test_scale_for_bn_inits():
    bn = fb.randomize_bn(nn.BatchNorm2d(4), seed=2).eval()
    x = torch.randn(3, 4, 5, 5)
    for scaling in ("vector", "scalar", "none"):
        leaf = scale_for_bn(bn, 2, scaling=scaling, init="from_bn")
        assert rel_err(leaf(x), bn(x)) < 1e-6
        d = scale_for_bn(bn, 2, scaling=scaling)
        assert rel_err(d(x), x) == 0.0
        learnable = {n for n, _ in d.named_parameters()}
        assert learnable == ({"scale", "shift"} if scaling != "none" else {"shift"})
    with pytest.raises(UnsupportedError):
        scale_for_bn(nn.BatchNorm2d(4, track_running_stats=False), 2, init="from_bn")
    with pytest.raises(UnsupportedError):
        scale_for_bn(bn, 2, scaling="matrix")
    with pytest.raises(UnsupportedError):
        scale_for_bn(nn.Conv2d(4, 4, 1), 2)


def test_make_post_bn_identity_in_eval():
    bn = make_post_bn(6, 3, init="from_bn", dtype=torch.float64).eval()
    x = torch.randn(2, 6, 3, 3, 3, dtype=torch.float64)
    assert isinstance(bn, nn.BatchNorm3d) and rel_err(bn(x), x) < 1e-12
    fresh = make_post_bn(6, 1)
    assert isinstance(fresh, nn.BatchNorm1d) and bool((fresh.running_var == 1).all())
