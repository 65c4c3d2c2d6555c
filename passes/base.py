"""The contract every repcompiler graph pass follows, and the one pass manager.

A pass is a :class:`GraphPass`: ``call(gm) -> PassResult(graph_module, modified)``
edits a ``torch.fx.GraphModule`` (graph and/or submodules) and says honestly whether
it changed anything. ``requires(gm)`` checks the pass's preconditions before it runs,
``ensures(gm)`` its postconditions after; both raise :class:`PassContractError`. This
is ``torch.fx.passes.infra``'s interface (``PassBase``/``PassResult``/``PassManager``);
it is wrapped here because upstream marks it unstable: passes import only from this
module, so a change upstream is absorbed in one place.

**Running passes.** :func:`run_passes` (or :class:`PassManager` for a reusable
schedule) runs a list of passes with upstream's ``PassManager``:

* the order is checked before anything runs: a pass lists the pass types that must
  come before it in ``runs_after`` (e.g. ``SqueezeRegions.runs_after =
  (FindRegions,)``); a list that puts one after it raises :class:`PassContractError`
  (upstream's ``this_before_that_pass_constraint`` semantics; the list is validated,
  never silently reordered);
* each pass's ``requires`` / ``call`` / ``ensures`` run in turn; the graph is linted
  after every pass that modified it (``lint=True``) and recompiled;
* an exception a pass raises reaches the caller as itself (upstream re-wraps it in a
  bare ``Exception``; the manager unwraps it and adds the pass history as a note).

**State between passes** is one typed object, a
:class:`~repcompiler.passes.state.PipelineState`, kept in ``gm.meta`` under the single
key :data:`~repcompiler.passes.state.META_STATE` and read with
:func:`~repcompiler.passes.state.pipeline_state`. ``run_passes(gm, passes, state=...)``
installs a state the caller built (e.g. with a report sink or linearize selections)
and ``PassResult`` plus the state object are what a pipeline returns. A pass records
its class name in ``state.completed`` when it finished; ``requires`` reads it (e.g.
``InsertPostBN`` requires ``BnToScale``) and the regions' liveness (a region found on
an earlier version of the graph is refused).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager as _UpstreamPassManager
from torch.fx.passes.infra.pass_manager import pass_result_wrapper

from ..errors import RepCompilerError
from .state import META_STATE, PipelineState, pipeline_state, set_pipeline_state

__all__ = [
    "GraphPass",
    "PassResult",
    "PassManager",
    "PassContractError",
    "run_passes",
    "pipeline_state",
    "PipelineState",
    "META_STATE",
]

log = logging.getLogger(__name__)


class PassContractError(RepCompilerError):
    """A pass was scheduled or run without its preconditions (``requires``), or left
    the graph without its postconditions (``ensures``)."""


class GraphPass(PassBase):
    """Base class of repcompiler passes: implement :meth:`call`.

    Override :meth:`requires` / :meth:`ensures` for the pass's pre- and
    postconditions (raise :class:`PassContractError` via :meth:`fail`) and list the
    pass types that must run before it in ``runs_after``. Calling the pass object runs
    ``requires``, ``call`` and ``ensures``; when ``call`` modified the graph it is
    linted, and the pass is recorded in ``pipeline_state(gm).completed``.
    """

    name: str = ""
    runs_after: tuple[type[GraphPass], ...] = ()

    def call(self, graph_module: fx.GraphModule) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def requires(self, graph_module: fx.GraphModule) -> None:
        pass

    def ensures(self, graph_module: fx.GraphModule) -> None:
        pass

    def fail(self, reason: str) -> None:
        """Raise :class:`PassContractError` naming this pass."""
        raise PassContractError(f"pass {self!r}: {reason}")

    def __call__(self, graph_module: fx.GraphModule) -> PassResult:
        self.requires(graph_module)
        res = self.call(graph_module)
        if res is None:  # tolerate passes that edit in place and return nothing
            res = PassResult(graph_module, True)
        gm = res.graph_module
        if res.modified:
            gm.graph.lint()
        self.ensures(gm)
        pipeline_state(gm).completed.append(type(self).__name__)
        return res

    def __repr__(self) -> str:
        return self.name or type(self).__name__


def _order_constraint(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """Upstream constraint: may ``a`` run before ``b``? Not if ``a`` needs ``b`` first."""
    return not any(isinstance(b, t) for t in getattr(a, "runs_after", ()))


def _order_violation(passes: Sequence[Any]) -> str:
    for i, a in enumerate(passes):
        for b in passes[i + 1:]:
            if not _order_constraint(a, b):
                return f"{a!r} must run after {b!r}"
    return "invalid order"  # pragma: no cover - only called on a violation


def _lint(module: Any) -> None:
    if isinstance(module, fx.GraphModule):
        module.graph.lint()


class PassManager:
    """A validated schedule of passes, run by ``torch.fx``'s ``PassManager`` (see the
    module docstring). Plain callables ``gm -> PassResult | GraphModule | None`` are
    accepted too (upstream's ``pass_result_wrapper``)."""

    def __init__(self, passes: Sequence[GraphPass | Callable[[fx.GraphModule], Any]], *,
                 lint: bool = True) -> None:
        self.passes = [p if isinstance(p, PassBase) else pass_result_wrapper(p) for p in passes]
        self._upstream = _UpstreamPassManager(
            list(self.passes), constraints=[_order_constraint], run_checks_after_each_pass=lint
        )
        if lint:
            self._upstream.add_checks(_lint)
        try:
            self._upstream.validate_constraints()
        except RuntimeError:  # upstream reports a violated constraint this way
            raise PassContractError(f"pass schedule {self.passes!r}: {_order_violation(self.passes)}") from None

    def __call__(self, gm: fx.GraphModule, state: PipelineState | None = None) -> PassResult:
        """Run the passes on ``gm`` (with ``state`` installed, if given)."""
        if state is not None:
            set_pipeline_state(gm, state)
        try:
            res = self._upstream(gm)
        except Exception as exc:  # upstream wraps any pass error in a bare Exception: unwrap, re-raise
            cause = exc.__cause__
            if type(exc) is Exception and cause is not None:  # upstream's wrapper: unwrap
                cause.add_note(str(exc))
                raise cause from None
            raise
        log.debug("passes %r: modified=%s", self.passes, res.modified)
        return PassResult(res.graph_module, bool(res.modified))


def run_passes(
    gm: fx.GraphModule,
    passes: Sequence[GraphPass | Callable[[fx.GraphModule], Any]],
    *,
    lint: bool = True,
    state: PipelineState | None = None,
) -> PassResult:
    """Run ``passes`` in order on ``gm`` with the :class:`PassManager`; each gets the
    previous one's graph module. Returns ``PassResult(final_gm, any_modified)``.

    ``state``: a :class:`PipelineState` to install first (default: the one ``gm``
    already has, or a fresh one). ``lint``: also lint the graph before and after every
    pass (modified graphs are linted by the passes themselves).
    """
    return PassManager(passes, lint=lint)(gm, state)
