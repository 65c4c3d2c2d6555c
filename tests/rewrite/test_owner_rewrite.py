"""RewriteOwners, the owner-module rewrite pass: pattern + reference.

Each test builds a small model (the pattern), runs the fold pipeline on its traced
unit through ``run_passes`` (``FindRegions -> SqueezeRegions(rewrite=False) ->
RewriteOwners``), compares the rewritten model with the original in float64 and checks
the rewritten code: which modules remain, which nodes a re-trace of the rewritten
owner holds, what the pipeline state records.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import randomize_bn, rel_err
from repcompiler.capture.tracing import trace_model, trace_units
from repcompiler.errors import RepCompilerError, VerificationError
from repcompiler.passes.base import PassContractError, run_passes
from repcompiler.passes.rewrite_owners import OwnerBuilder, RewriteOwners
from repcompiler.passes.squeeze import fold_passes
from repcompiler.passes.state import FoldPlan, PipelineState


def _rewrite(model: nn.Module, builder: OwnerBuilder | None = None) -> tuple[nn.Module, PipelineState]:
    """Fold ``model`` (a float64 eval copy) with the pass pipeline; return it and the state."""
    work = copy.deepcopy(model).double().eval()
    unit = trace_units(work).units[0]
    assert unit.path == ""
    state = PipelineState()
    run_passes(unit.gm, [*fold_passes(rewrite=False), RewriteOwners(unit, builder)], state=state)
    return work, state


def _same(model: nn.Module, work: nn.Module, *shape: int) -> None:
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        assert rel_err(work(x), ref(x)) < 1e-12


def _called(module: nn.Module) -> list[str]:
    return [str(n.target) for n in trace_model(module).graph.nodes if n.op == "call_module"]


def _functions(module: nn.Module) -> list[str]:
    return [getattr(n.target, "__name__", str(n.target)) for n in trace_model(module).graph.nodes
            if n.op in ("call_function", "call_method")]


class Block(nn.Module):
    """Two conv-BN branches summed in the block's own forward (its owner)."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.dense = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x) + self.one(x)

    def extra(self) -> str:
        return "a user method"


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.block = Block()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.block(self.act(self.stem(x))))


class FunctionalSum(nn.Module):
    """A region of function calls only: no module to install the conv at."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.w2 = nn.Parameter(torch.randn(4, 4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.conv2d(x, self.w1, padding=1) + F.conv2d(x, self.w2))


def test_module_only_region_swaps_modules_in_place():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()))
    work, state = _rewrite(model)
    _same(model, work, 2, 3, 6, 6)
    assert type(work) is nn.Sequential  # no forward was rewritten
    assert [type(m) for m in work] == [nn.Conv2d, nn.Identity, nn.ReLU]
    assert _called(work) == ["0", "1", "2"]  # the user's forward still calls every name
    [rw] = state.rewrites
    assert rw.applied and rw.owner is None and rw.target == "0" and rw.module is work[0]
    assert isinstance(rw.plan, FoldPlan) and state.plans == [] and state.regions is None


def test_function_call_region_rewrites_its_owner_forward():
    model = randomize_bn(Net())
    work, state = _rewrite(model)
    _same(model, work, 2, 3, 6, 6)
    block = work.block
    assert isinstance(block, Block) and type(block) is not Block  # a subclass of the user's class
    assert type(block)._repcompiler_base is Block and block.extra() == "a user method"
    assert type(work) is Net  # the stem region is module-only: the root's forward is untouched
    # the rewritten code: one conv call at the largest kernel's name, no sum left
    assert _called(block) == ["dense.0"]
    assert _functions(block) == []
    assert isinstance(block.dense[0], nn.Conv2d) and block.dense[0].bias is not None
    assert [type(m) for m in (block.dense[1], block.one[0], block.one[1])] == [nn.Identity] * 3
    by_owner = {rw.owner: rw for rw in state.rewrites}
    assert set(by_owner) == {None, "block"} and all(rw.applied for rw in state.rewrites)
    assert by_owner["block"].target == "block.dense.0" and by_owner["block"].module is block.dense[0]
    assert by_owner[None].target == "stem.0"


def test_region_without_modules_gets_a_fresh_module():
    model = FunctionalSum()
    work, state = _rewrite(model)
    _same(model, work, 1, 4, 5, 5)
    [rw] = state.rewrites
    assert rw.applied and rw.owner == "" and rw.target is None
    called = _called(work)
    assert len(called) == 1 and called[0].startswith("folded_")
    assert isinstance(work.get_submodule(called[0]), nn.Conv2d)
    assert _functions(work) == ["relu"]  # the ReLU after the region stays


def test_owner_left_as_it_is_falls_back_for_module_only_regions():
    class Refuse(OwnerBuilder):
        def check(self, unit, owner, plans):
            raise RepCompilerError("no rewrite here")

    model = randomize_bn(Net())
    work, state = _rewrite(model, Refuse())
    _same(model, work, 2, 3, 6, 6)
    assert type(work.block) is Block  # its forward stays the user's
    assert [type(m) for m in work.block.one] == [nn.Conv2d, nn.BatchNorm2d]
    refused = [rw for rw in state.rewrites if not rw.applied]
    assert [rw.owner for rw in refused] == ["block"] and "no rewrite here" in str(refused[0].error)
    assert [rw.target for rw in state.rewrites if rw.applied] == ["stem.0"]  # module-only: swapped


def test_a_builder_verification_error_is_raised():
    class Wrong(OwnerBuilder):
        def build(self, unit, og, plans):
            raise VerificationError("region differs")

    with pytest.raises(VerificationError, match="region differs"):
        _rewrite(randomize_bn(Net()), Wrong())


def test_contract_refuses_another_graph_and_stale_plans():
    model = randomize_bn(Net()).double().eval()
    unit = trace_units(model).units[0]
    state = PipelineState()
    run_passes(unit.gm, fold_passes(rewrite=False), state=state)
    with pytest.raises(PassContractError, match="own graph module"):
        run_passes(trace_model(model), [RewriteOwners(unit)], state=state)
    other = trace_units(model).units[0]
    with pytest.raises(PassContractError, match="not regions of this graph"):
        run_passes(other.gm, [RewriteOwners(other)], state=PipelineState(plans=list(state.plans)))
    assert type(model.block) is Block  # nothing was rewritten
