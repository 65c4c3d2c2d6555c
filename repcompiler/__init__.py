"""repcompiler: structural re-parameterization as a compiler pass.

Public API (see the README for a tour):

* :mod:`repcompiler.algebra` - the kernel algebra (expressions that fold to one conv).
* errors - :class:`RepCompilerError` and its subclasses.
* :func:`quant_report` - will the (deployed) model survive INT8? (:mod:`repcompiler.quant`,
  imported on first use).
"""

from __future__ import annotations

import importlib
import logging

from . import algebra
from .errors import (
    IncompatibleError,
    InexactFoldError,
    RegistrationError,
    RepCompilerError,
    RuleError,
    TraceError,
    UnsupportedError,
    VerificationError,
)

from .transforms.deploy import deploy
from .transforms.fold import fold
from .io.export import ExportResult, export
from .explain.report import FoldReport, ReportEntry, TransformReport
from .capture.tracing import trace_model, trace_units
from .rules.defaults import register_rule, lookup_rule, unregister_rule
from .blocks import available_blocks, get_block, register_block, unregister_block
from .blocks import ConvGeometry
from .online.conv import OfflineBlock, OnlineConv
from .transforms.orepa import orepa_transform
from .online.accumulate import accumulate
from .transforms.linearize import linearize, linearize_regions
from .config import BlockConfig, Branch, RuleConfig
from . import config

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

_QUANT = ("quant_report", "QuantReport", "QuantLayerRow")


def __getattr__(name: str):
    # ``repcompiler.testing`` (hypothesis strategies and checkers) is imported on first
    # use only, so ``import repcompiler`` stays light
    # (``from . import testing`` here would recurse: it looks the name up with getattr)
    if name in ("testing", "quant"):  # ``rc.quant.quantize_onnx`` without importing the subpackage first
        return importlib.import_module("." + name, __name__)
    if name in _QUANT:  # the INT8 report (torch.ao.quantization observers), imported on first use
        return getattr(importlib.import_module(".quant", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "algebra",
    "RepCompilerError",
    "IncompatibleError",
    "UnsupportedError",
    "InexactFoldError",
    "TraceError",
    "VerificationError",
    "RegistrationError",
    "RuleError",
    "fold",
    "deploy",
    "trace_model",
    "trace_units",
    "FoldReport",
    "TransformReport",
    "ReportEntry",
    "export",
    "ExportResult",
    "register_rule",
    "lookup_rule",
    "unregister_rule",
    "register_block",
    "unregister_block",
    "get_block",
    "available_blocks",
    "ConvGeometry",
    "OnlineConv",
    "OfflineBlock",
    "orepa_transform",
    "accumulate",
    "linearize",
    "linearize_regions",
    "BlockConfig",
    "RuleConfig",
    "Branch",
    "config",
    "testing",
    "quant_report",
    "QuantReport",
    "QuantLayerRow",
]
