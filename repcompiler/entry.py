"""The model checks of every entry point, now with the other argument checks in
:mod:`repcompiler.inputs`; kept so that ``from repcompiler.entry import check_model,
copy_model`` keeps working."""

from __future__ import annotations

from .inputs import check_model, copy_model

__all__ = ["check_model", "copy_model"]
