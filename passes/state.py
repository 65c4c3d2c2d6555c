"""The typed state passes share: :class:`PipelineState` and the records it holds.

One object per graph module, kept in ``gm.meta`` under the single key
:data:`META_STATE` (see :mod:`repcompiler.passes.base` for the design); passes read
and write its fields, never loose keys of their own. :func:`pipeline_state` returns
it (creating an empty one on first use).

Records:

* :class:`FoldPlan` - a region checked and folded into a plain conv, waiting to be
  squeezed into the graph (:class:`~repcompiler.passes.squeeze.SqueezeRegions`);
* :class:`ScaledBN` - a branch BN replaced by a learnable affine leaf
  (:class:`~repcompiler.passes.bn_to_scale.BnToScale`);
* :class:`PostBN` - the post-addition BN of a linearized region
  (:class:`~repcompiler.passes.insert_post_bn.InsertPostBN`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch.fx as fx
from torch import nn

from ..explain.report import TransformReport
from .regions.region import Region

__all__ = [
    "META_STATE",
    "PipelineState",
    "FoldPlan",
    "ScaledBN",
    "PostBN",
    "pipeline_state",
    "live_regions",
    "LEGACY_META_SELECTED",
    "LEGACY_META_POST_BN",
]

META_STATE = "repcompiler.state"
"""The one ``gm.meta`` key repcompiler passes use: it holds a :class:`PipelineState`."""


@dataclass
class FoldPlan:
    """A foldable region and the plain conv equal to it (verified when asked)."""

    region: Region
    folded: nn.Module
    params_before: int
    """Parameters of the region's modules before folding (for the report)."""

    @property
    def params_after(self) -> int:
        return sum(p.numel() for p in self.folded.parameters())


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

    def __iter__(self) -> Iterator[object]:
        # transition: repcompiler.linearize unpacks ``(region, target, inserted)``
        # until it reads the fields (remove with LEGACY_META_POST_BN)
        return iter((self.region, self.target, self.inserted))


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
    plans: list[FoldPlan] = field(default_factory=list)
    """Regions folded by ``SqueezeRegions`` (those it did not squeeze itself when
    ``rewrite=False``, for an owner-module rewrite to apply)."""
    completed: list[str] = field(default_factory=list)

    def ran(self, pass_type: type) -> bool:
        """Whether a pass of ``pass_type`` (by class name) completed on this graph."""
        return pass_type.__name__ in self.completed


LEGACY_META_SELECTED = "repcompiler.transforms.linearize.regions"
"""Transition only: the key :mod:`repcompiler.transforms.linearize` stores its selected regions
under before it sets ``PipelineState.selected``; :func:`pipeline_state` moves them into
the state. Remove (with :data:`LEGACY_META_POST_BN`) once linearize uses the state."""
LEGACY_META_POST_BN = "repcompiler.transforms.linearize.post_bn"
"""Transition only: ``InsertPostBN`` also exposes ``PipelineState.post_bns`` (the same
list) under this key for :mod:`repcompiler.transforms.linearize`'s current reader."""


def pipeline_state(gm: fx.GraphModule) -> PipelineState:
    """The :class:`PipelineState` of ``gm`` (an empty one is stored on first use)."""
    meta = getattr(gm, "meta", None)
    if meta is None:
        meta = gm.meta = {}  # type: ignore[assignment]
    state = meta.get(META_STATE)
    if state is None:
        state = meta[META_STATE] = PipelineState()
    legacy = meta.pop(LEGACY_META_SELECTED, None)
    if legacy is not None:
        state.selected = list(legacy)
    return state


def live_regions(gm: fx.GraphModule, regions: list[Region]) -> bool:
    """True if every node of ``regions`` (entries, aliases, bodies) is still in ``gm``'s
    graph: the regions describe this graph, not an earlier version of it."""
    live = set(gm.graph.nodes)
    return all(n in live for r in regions for n in (*r.entry_values, *r.nodes))
