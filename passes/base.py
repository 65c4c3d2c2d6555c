"""The contract every repcompiler graph pass follows.

A pass is a small object with ``call(gm) -> PassResult``: it takes a
``torch.fx.GraphModule``, edits it (graph and/or submodules) and returns
``PassResult(graph_module, modified)``, saying honestly whether it changed anything.
This is ``torch.fx.passes.infra``'s interface (``PassBase``/``PassResult``/
``PassManager``); we wrap it here because that module is marked unstable, so passes
import only from :mod:`repcompiler.passes.base` and a change upstream is absorbed in one place.

Shared state between passes (regions found, the report being written) lives in the
graph module's ``meta`` dict under keys starting with ``"repcompiler."`` (see
:data:`META_REGIONS`, :data:`META_REPORT`); a pass documents which keys it reads and
writes.

Writing a pass::

    from repcompiler.passes.base import GraphPass, PassResult

    class DropIdentity(GraphPass):
        '''Remove calls to nn.Identity.'''
        def call(self, gm):
            ...
            return PassResult(gm, modified)

    gm, modified = run_passes(gm, [FindRegions(), SqueezeRegions(), Cleanup()])
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch.fx as fx

__all__ = ["GraphPass", "PassResult", "run_passes", "META_REGIONS", "META_REPORT", "graph_meta"]

log = logging.getLogger(__name__)

META_REGIONS = "repcompiler.regions"
"""``gm.meta`` key: the list of :class:`passes.find_regions.Region` found in the graph."""
META_REPORT = "repcompiler.report"
"""``gm.meta`` key: a :class:`repcompiler.report.TransformReport` passes append entries to."""

try:  # the upstream interface, if present
    from torch.fx.passes.infra.pass_base import PassBase as _PassBase
    from torch.fx.passes.infra.pass_base import PassResult as _PassResult
except ImportError:  # pragma: no cover - torch without fx.passes.infra
    _PassBase = object  # type: ignore[assignment,misc]
    _PassResult = None  # type: ignore[assignment]

if _PassResult is not None:
    PassResult = _PassResult
else:  # pragma: no cover
    from collections import namedtuple

    PassResult = namedtuple("PassResult", ["graph_module", "modified"])  # type: ignore[misc]


class GraphPass(_PassBase):  # type: ignore[misc,valid-type]
    """Base class of repcompiler passes: implement :meth:`call`.

    ``requires``/``ensures`` (pre/post-condition hooks) default to doing nothing;
    calling the pass object runs ``requires``, ``call`` and ``ensures`` in turn.
    """

    name: str = ""

    def call(self, graph_module: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def requires(self, graph_module: fx.GraphModule) -> None:
        pass

    def ensures(self, graph_module: fx.GraphModule) -> None:
        pass

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        self.requires(graph_module)
        res = self.call(graph_module)
        if res is None:  # tolerate passes that edit in place and return nothing
            res = PassResult(graph_module, True)
        self.ensures(res.graph_module)
        return res

    def __repr__(self) -> str:
        return self.name or type(self).__name__


def graph_meta(gm: fx.GraphModule) -> dict[str, Any]:
    """The ``meta`` dict of a graph module (created if missing)."""
    meta = getattr(gm, "meta", None)
    if meta is None:
        meta = {}
        gm.meta = meta  # type: ignore[assignment]
    return meta


def run_passes(
    gm: fx.GraphModule,
    passes: Sequence[GraphPass | Callable[[fx.GraphModule], Any]],
    *,
    lint: bool = True,
) -> PassResult:
    """Run ``passes`` in order; each gets the previous one's graph module.

    Returns ``PassResult(final_gm, any_modified)``. With ``lint``, the graph is
    linted and the module recompiled after every pass that modified it.
    """
    modified = False
    for p in passes:
        res = p(gm)
        if res is None:
            res = PassResult(gm, True)
        gm = res.graph_module
        if res.modified:
            modified = True
            if lint:
                gm.graph.lint()
                gm.recompile()
        log.debug("pass %r: modified=%s", p, res.modified)
    return PassResult(gm, modified)
