"""The typed state passes share: :class:`PipelineState` and the records it holds.

One object per graph module, kept in ``gm.meta`` under the single key
:data:`META_STATE` (see :mod:`repcompiler.passes.base` for the design); passes read
and write its fields, never loose keys of their own. :func:`pipeline_state` returns
it (creating an empty one on first use).

Records:

* :class:`RewritePlan` - a region to replace by one module in its owner's hierarchy
  (:class:`~repcompiler.passes.rewrite_owners.RewriteOwners`), and
  :class:`FoldPlan`, one whose replacement is a plain conv, checked and folded by
  :class:`~repcompiler.passes.squeeze.SqueezeRegions`;
* :class:`Rewrite` - what the owner rewrite did with one plan (installed where, or
  refused with the error);
* :class:`ScaledBN` - a branch BN replaced by a learnable affine leaf
  (:class:`~repcompiler.passes.bn_to_scale.BnToScale`);
* :class:`PostBN` - the post-addition BN of a linearized region
  (:class:`~repcompiler.passes.insert_post_bn.InsertPostBN`);
* ``linear_bn_folds`` - the ``(linear, bn)`` pairs
  :class:`~repcompiler.passes.fold_linear_bn.FoldLinearBN` folded, and
  ``pushed_biases`` - the convs whose bias :class:`~repcompiler.passes.push_bias.PushBias`
  moved into BatchNorms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx
from torch import nn

from ..errors import RepCompilerError
from ..explain.report import TransformReport
from .regions.region import Region

__all__ = [
    "META_STATE",
    "PipelineState",
    "RewritePlan",
    "FoldPlan",
    "Rewrite",
    "ScaledBN",
    "PostBN",
    "pipeline_state",
    "set_pipeline_state",
    "live_regions",
]

META_STATE = "repcompiler.state"
"""The one ``gm.meta`` key repcompiler passes use: it holds a :class:`PipelineState`."""


@dataclass
class RewritePlan:
    """A region of a traced unit's graph to replace by one module.

    ``module`` is the replacement when it is known before the owner's graph is built
    (a folded conv); ``None`` when the owner rewrite's builder makes it on the owner's
    graph (an online conv, see :class:`~repcompiler.passes.rewrite_owners.OwnerBuilder`).
    """

    region: Region
    module: nn.Module | None = None


@dataclass
class FoldPlan(RewritePlan):
    """A foldable region and the plain conv equal to it (verified when asked)."""

    params_before: int = 0
    """Parameters of the region's modules before folding (for the report)."""

    @property
    def folded(self) -> nn.Module:
        """The plain conv equal to the region."""
        assert self.module is not None
        return self.module

    @property
    def params_after(self) -> int:
        return sum(p.numel() for p in self.folded.parameters())


@dataclass
class Rewrite:
    """What the owner rewrite did with one :class:`RewritePlan`.

    ``owner``: the module path (relative to the unit) whose ``forward`` was rewritten
    (``''``: the unit, or the graph module itself for
    :class:`~repcompiler.passes.squeeze.SqueezeRegions`), ``None`` when the region is
    made of module calls only and its modules were swapped in place. ``target``: where the replacement ``module`` was installed (relative to
    the unit; ``None`` for a region without modules: the owner's new forward calls it
    under a fresh name). ``detail``: what the builder returned for the report.
    ``error``: why the owner was left as it is (then nothing was installed).
    """

    plan: RewritePlan
    owner: str | None
    target: str | None = None
    module: nn.Module | None = None
    detail: Any = None
    error: RepCompilerError | None = None

    @property
    def applied(self) -> bool:
        return self.error is None


@dataclass
class ScaledBN:
    """A branch BN replaced by an affine leaf; ``target`` is the BN's qualified name when
    the graph calls it, else its name in the region's expression."""

    target: str
    bn: nn.Module
    leaf: nn.Module


@dataclass
class PostBN:
    """The post-BN of a linearized region: ``target`` names the BN module (``None`` when
    none was inserted and the region's output is not a BN); ``inserted`` is true for a
    BN added by the pass (false for the user's own BN after the sum)."""

    region: Region
    target: str | None
    inserted: bool


@dataclass
class PipelineState:
    """Everything passes hand to each other for one graph module.

    ``regions`` is ``None`` until :class:`~repcompiler.passes.find_regions.FindRegions`
    ran (and again after a pass rewrote the regions away); ``completed`` lists the
    names of the passes that ran on the graph, in order (their ``requires`` read it).
    """

    regions: list[Region] | None = None
    """Linear regions found by ``FindRegions``, in graph order."""
    report: TransformReport | None = None
    """Where passes record what they did (optional)."""
    selected: list[Region] = field(default_factory=list)
    """Regions chosen for linearization (read by ``BnToScale`` and ``InsertPostBN``)."""
    scaled: list[ScaledBN] = field(default_factory=list)
    post_bns: list[PostBN] = field(default_factory=list)
    plans: list[RewritePlan] = field(default_factory=list)
    """Regions to rewrite: folded by ``SqueezeRegions`` (those it did not squeeze
    itself when ``rewrite=False``), or set by the caller, for ``RewriteOwners``."""
    rewrites: list[Rewrite] = field(default_factory=list)
    """What ``RewriteOwners`` did with each plan, in the order it did it."""
    linear_bn_folds: list[tuple[str, str]] = field(default_factory=list)
    """``(linear, bn)`` module targets ``FoldLinearBN`` folded."""
    pushed_biases: list[str] = field(default_factory=list)
    """Conv targets whose bias ``PushBias`` moved into BatchNorms."""
    completed: list[str] = field(default_factory=list)

    def ran(self, pass_type: type) -> bool:
        """Whether a pass of ``pass_type`` (by class name) completed on this graph."""
        return pass_type.__name__ in self.completed


def _graph_meta(gm: fx.GraphModule) -> dict[str, Any]:
    meta = getattr(gm, "meta", None)
    if meta is None:
        meta = gm.meta = {}  # type: ignore[assignment]
    return meta


def pipeline_state(gm: fx.GraphModule) -> PipelineState:
    """The :class:`PipelineState` of ``gm`` (an empty one is stored on first use)."""
    meta = _graph_meta(gm)
    state = meta.get(META_STATE)
    if state is None:
        state = meta[META_STATE] = PipelineState()
    return state


def set_pipeline_state(gm: fx.GraphModule, state: PipelineState) -> None:
    """Make ``state`` the :class:`PipelineState` of ``gm``."""
    _graph_meta(gm)[META_STATE] = state


def live_regions(gm: fx.GraphModule, regions: list[Region]) -> bool:
    """True if every node of ``regions`` (entries, aliases, bodies) is still in ``gm``'s
    graph: the regions describe this graph, not an earlier version of it."""
    live = set(gm.graph.nodes)
    return all(n in live for r in regions for n in (*r.entry_values, *r.nodes))
