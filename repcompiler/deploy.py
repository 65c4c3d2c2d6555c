"""``deploy``: turn a trained model into its plain inference form.

The same machinery as :func:`repcompiler.fold`: online / offline re-parameterized
blocks (:class:`~repcompiler.online.OnlineConv`, :class:`~repcompiler.online.OfflineBlock`)
have lowering rules (``deploy_expr()``: branches, then the block's post-BN), so they
are leaves of the trace and regions like any conv. A block becomes one plain conv, a
BN that follows it (or its own ``post_bn``) folds into that conv, and every other
exact conv region of the model folds too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from . import online as _online  # noqa: F401  (registers the online blocks' rules)
from .fold import compile_folds
from .report import FoldReport
from .rules import RuleRegistry

__all__ = ["deploy"]


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
    ``merge_convs`` says (that option only concerns chains of separate convs)."""
    return compile_folds(model, example_inputs, inplace=inplace, verify=verify,
                         return_report=return_report, rules=rules, title="deploy",
                         merge_convs=merge_convs)
