"""``deploy``: turn a trained model into its plain inference form.

The same machinery as :func:`repcompiler.fold`: online / offline re-parameterized
blocks (:class:`~repcompiler.online.conv.OnlineConv`, :class:`~repcompiler.online.conv.OfflineBlock`)
have lowering rules (``deploy_expr()``: branches, then the block's post-BN), so they
are leaves of the trace and regions like any conv. A block becomes one plain conv, a
BN that follows it (or its own ``post_bn``) folds into that conv, and every other
exact conv region of the model folds too.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ..analysis.inputs import as_inputs, check_model
from ..analysis.isolation import isolated_call, propagate_shapes
from ..errors import TraceError
from .fold import compile_folds
from ..passes.base import run_passes
from ..passes.push_bias import PushBias
from ..passes.state import PipelineState
from ..explain.report import FoldReport
from ..rules.registry import RuleRegistry
from ..capture.tracing import trace_model
from ..rewrite.verify import compare_outputs

__all__ = ["deploy"]

log = logging.getLogger(__name__)


def deploy(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    inplace: bool = False,
    verify: bool = True,
    return_report: bool = False,
    rules: RuleRegistry | None = None,
    merge_convs: bool = False,
) -> nn.Module | tuple[nn.Module, FoldReport]:
    """Plain deploy form of ``model`` (eval mode): every online/offline block and every
    exact conv region becomes one ``nn.ConvNd``. Arguments as :func:`repcompiler.fold`.

    An online block is one node of the graph, so it always becomes one conv, whatever
    ``merge_convs`` says (that option only concerns chains of separate convs).

    A block whose post-BN was inserted (``orepa_transform(insert_bn=True)``) where the
    original conv had no bias deploys with a bias the plain model does not have; when the
    whole deployed model traces and every use of that conv's output reaches BatchNorms
    (through concatenations, pooling without padding), the bias moves into those BNs'
    running means (:class:`passes.push_bias.PushBias`, exact), so DenseNet-style models
    deploy with exactly the plain parameter count. With ``example_inputs`` and ``verify``
    the whole model is checked before and after that step."""
    check_model(model, "deploy")
    names = [n for n, m in model.named_modules() if getattr(m, "bias_from_inserted_bn", False)]
    out = compile_folds(model, example_inputs, inplace=inplace, verify=verify,
                        return_report=return_report, rules=rules, title="deploy",
                        merge_convs=merge_convs)
    if names:
        _push_inserted_biases(out[0] if return_report else out, names, example_inputs, verify)
    return out


def _push_inserted_biases(deployed: nn.Module, names: list[str], example_inputs: Any, verify: bool) -> None:
    """Move the biases of the convs ``names`` of ``deployed`` into the BatchNorms their
    outputs reach (:class:`PushBias` on the traced deployed model); with
    ``example_inputs`` and ``verify`` the model's output is checked before and after."""
    try:
        gm = trace_model(deployed)
    except TraceError as exc:
        log.info("deploy: inserted post-BN biases kept (%s)", exc)
        return
    inputs = as_inputs(example_inputs, "deploy")
    want = None
    if inputs is not None:  # channel counts for concatenations, and the reference output
        want = propagate_shapes(gm, inputs)
    state = PipelineState()
    run_passes(gm, [PushBias(names)], state=state)
    log.info("deploy: moved %d inserted post-BN biases into downstream BatchNorms", len(state.pushed_biases))
    if verify and want is not None and state.pushed_biases:
        compare_outputs(want, isolated_call(deployed, inputs), type(deployed).__name__,
                        "deployed model after moving inserted post-BN biases into BatchNorms")
