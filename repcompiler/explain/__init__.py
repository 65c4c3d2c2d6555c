"""Explain: reports of what a transform did (:mod:`.report`) and why a module was left
alone (:mod:`.leftovers` for BatchNorms still there after a fold, :mod:`.opaque` for
modules the rules know but could not fold)."""

from .report import FoldReport, ReportEntry, TransformReport, count_convs, count_params

__all__ = ["FoldReport", "ReportEntry", "TransformReport", "count_convs", "count_params"]
