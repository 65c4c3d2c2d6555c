"""The pass contract: GraphModule in, PassResult(graph_module, modified) out."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
from torch import nn

import fixtures_blocks as fb
import repcompiler as rc
from fixtures_blocks import RepVGGBlock, count_convs, randomize_bn
from helpers import rel_err
from repcompiler import algebra as A
from repcompiler.errors import IncompatibleError, VerificationError
from repcompiler.passes.base import GraphPass, PassContractError, PassResult, run_passes
from repcompiler.passes.state import pipeline_state
from repcompiler.passes.cleanup import Cleanup
from repcompiler.passes.find_regions import FindRegions
from repcompiler.passes.squeeze import SqueezeRegions, fold_passes
from repcompiler.explain.report import FoldReport
from repcompiler.capture.tracing import trace_model


def test_find_squeeze_cleanup_on_a_graph_module():
    block = randomize_bn(RepVGGBlock(4, 4).double()).eval()
    x = torch.randn(1, 4, 7, 7, dtype=torch.float64)
    gm = trace_model(block)
    state = pipeline_state(gm)
    state.report = FoldReport()
    res = run_passes(gm, [FindRegions()])
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


# -- the pass pipeline does what fold() does for one traced unit ------------------------------


def _entries(report):
    return sorted((e.name, e.kind, e.action, e.reason, e.params_before, e.params_after) for e in report.entries)


def _registered_twice(net: nn.Module, gm: fx.GraphModule) -> list[nn.Module]:
    """``gm``'s copies of the modules registered at more than one path of ``net``."""
    paths: dict[int, list[str]] = {}
    for name, m in net.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), []).append(name)
    in_gm = dict(gm.named_modules())
    return [in_gm[p] for ps in paths.values() if len(ps) > 1 for p in ps if p in in_gm]


def assert_pipeline_matches_fold(net: nn.Module, x: torch.Tensor, **options) -> FoldReport:
    """``fold_passes`` on ``net``'s trace and ``rc.fold(net)`` agree: same outputs (both
    equal to the original), same conv count, same report entries. Returns the report."""
    net = net.eval()
    folded, want_report = rc.fold(net, return_report=True, **options)
    gm = trace_model(copy.deepcopy(net))
    report = FoldReport()
    res = run_passes(gm, fold_passes(shared_modules=_registered_twice(net, gm), report=report, **options))
    with torch.no_grad():
        want, got_fold, got_pipe = net(x), folded(x), gm(x)
    assert rel_err(got_fold, want) < 1e-10 and rel_err(got_pipe, want) < 1e-10
    assert rel_err(got_pipe, got_fold) < 1e-12
    assert count_convs(gm) == count_convs(folded)
    # fold's model-level rows for BatchNorms left (repcompiler.explain.leftovers) come after the pipeline
    assert _entries(report) == [e for e in _entries(want_report) if e[2] != "left"]
    # every fold modifies the graph; without folds Cleanup may still drop identity calls
    assert res.modified or not report.folded
    return report


_NETS = {
    "repvgg_net": lambda: fb.RepVGGNet(widths=(4, 8), blocks=(1, 2), in_channels=3),
    "dbb_acnet_mobileone": lambda: nn.Sequential(fb.DBBBlock(3, 6), nn.ReLU(), fb.ACBlock(6, 6),
                                                 fb.MobileOneBlock(6, 6)),
    "conv_chain": lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1),
                                        nn.BatchNorm2d(8)),
}


@pytest.mark.parametrize("name", sorted(_NETS))
@pytest.mark.parametrize("merge_convs", [False, True])
def test_pipeline_folds_like_fold(name, merge_convs):
    net = randomize_bn(_NETS[name]().double(), seed=3)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    report = assert_pipeline_matches_fold(net, x, merge_convs=merge_convs)
    assert report.folded


def test_pipeline_like_fold_with_a_shared_conv_and_refusals():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = self.a  # registered twice (called once): an opaque boundary
            self.bn = nn.BatchNorm2d(4)
            self.c = nn.Conv2d(4, 4, 3, padding=1, bias=True)
            self.d = nn.Conv2d(4, 4, 3, padding=1)  # conv(bias) -> padded conv: inexact at the borders
            self.e = nn.Conv2d(4, 4, 1)
            self.bn_e = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.a(x))
            return self.d(self.c(y)) + self.bn_e(self.e(y))

    net = randomize_bn(Shared().double(), seed=4)
    report = assert_pipeline_matches_fold(net, torch.randn(1, 4, 8, 8, dtype=torch.float64), merge_convs=True)
    assert report.refused and report.folded
    assert not any(e.name.startswith("a ") for e in report.folded)  # the shared conv kept its BN apart


def test_squeeze_without_rewrite_leaves_verified_plans():
    block = randomize_bn(RepVGGBlock(4, 4).double()).eval()
    gm = trace_model(block)
    report = FoldReport()
    res = run_passes(gm, fold_passes(report=report, rewrite=False, prefix="layer1."))
    state = pipeline_state(gm)
    assert not res.modified and count_convs(gm) == 2 and not report.entries
    (plan,) = state.plans
    assert plan.region.name.startswith("layer1.") and plan.params_after == 4 * 4 * 9 + 4
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(torch.relu(plan.folded(x)), block(x)) < 1e-12  # the block ends in a ReLU


def test_squeeze_verifies_against_the_original_nodes():
    gm = trace_model(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)).double().eval())
    run_passes(gm, [FindRegions()])
    region = pipeline_state(gm).regions[0]
    region.expr = A.Seq(region.expr, A.Constant(2, 2, 2.0))  # a wrong lowering
    with pytest.raises(VerificationError, match="differs from the original"):
        run_passes(gm, [SqueezeRegions()])
    assert count_convs(gm) == 1 and isinstance(gm.get_submodule("1"), nn.BatchNorm2d)  # nothing rewritten
    run_passes(gm, [SqueezeRegions(verify=False)])  # unchecked: the wrong fold goes in
    assert isinstance(gm.get_submodule("1"), nn.Identity)


# -- the pass manager's contract ------------------------------------------------------------------


def test_squeeze_requires_regions_of_this_graph():
    gm = trace_model(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)).eval())
    with pytest.raises(PassContractError, match="run FindRegions"):
        run_passes(gm, [SqueezeRegions()])
    with pytest.raises(PassContractError, match="SqueezeRegions must run after FindRegions"):
        run_passes(gm, [SqueezeRegions(), FindRegions()])
    run_passes(gm, [FindRegions()])
    other = trace_model(nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2)).eval())
    with pytest.raises(PassContractError, match="earlier version of the graph"):
        run_passes(other, [SqueezeRegions()], state=pipeline_state(gm))


def test_pass_errors_reach_the_caller_as_themselves():
    class Boom(GraphPass):
        def call(self, gm):
            raise VerificationError("boom")

    gm = trace_model(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(VerificationError, match="boom") as info:
        run_passes(gm, [Cleanup(), Boom()])
    assert any("Boom" in note and "Cleanup" in note for note in getattr(info.value, "__notes__", []))


def test_ensures_catches_a_pass_that_breaks_its_promise():
    class LazyCleanup(Cleanup):
        def call(self, gm):
            return PassResult(gm, False)

    gm = trace_model(nn.Sequential(nn.Identity(), nn.Conv2d(1, 1, 1)))
    with pytest.raises(PassContractError, match="still in the graph"):
        run_passes(gm, [LazyCleanup()])
    assert run_passes(gm, [Cleanup()]).modified and not run_passes(gm, [Cleanup()]).modified


def test_plain_functions_and_lint_after_a_modifying_pass():
    def break_graph(gm):
        x = next(n for n in gm.graph.nodes if n.op == "placeholder")
        x.prepend(next(n for n in gm.graph.nodes if n.op == "call_module"))  # used before defined
        return PassResult(gm, True)

    gm = trace_model(nn.Sequential(nn.Conv2d(1, 1, 1)))
    with pytest.raises(RuntimeError, match="before it has been defined"):
        run_passes(gm, [break_graph])
    gm = trace_model(nn.Sequential(nn.Conv2d(1, 1, 1)))
    assert run_passes(gm, [lambda g: None]).modified  # upstream's pass_result_wrapper: assumed modified


def test_a_rule_that_raises_is_an_error_naming_the_rule_and_the_module():
    """A rule refuses an instance by raising a RepCompilerError (the module stays
    opaque); any other exception is a bug in the rule and reaches the caller."""
    from repcompiler.errors import RuleError
    from repcompiler.rules.defaults import default_rules

    class Twice(nn.Module):
        def forward(self, x):
            return 2 * x

    def buggy_rule(m, info):
        raise KeyError("no such weight")

    def refusing_rule(m, info):
        raise IncompatibleError("not this instance")

    model = nn.Sequential(nn.Conv2d(3, 4, 3), Twice(), nn.BatchNorm2d(4)).eval()
    rules = default_rules().copy()
    rules.register(Twice, buggy_rule)
    with pytest.raises(RuleError, match="(?s)buggy_rule.*Twice.*KeyError"):
        rc.fold(model, rules=rules)
    rules.register(Twice, refusing_rule, override=True)
    folded, report = rc.fold(model, rules=rules, return_report=True)
    assert isinstance(folded[2], nn.BatchNorm2d)  # Twice is opaque: the BN stays after it
