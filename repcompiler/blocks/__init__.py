"""Training-time blocks: what an eligible conv becomes (see :mod:`.registry`).

Built in: ``orepa``, ``orepa_1x1``, ``orepa_large`` (:mod:`.orepa`), ``repvgg``,
``dbb``, ``acnet`` (:mod:`.classic`). The frequency prior is in :mod:`.prior`.
"""

from __future__ import annotations

from ._common import MODES, SCALINGS
from .classic import build_acnet, build_dbb, build_repvgg
from .orepa import OrepaExpr, Orepa1x1Expr, OrepaLargeExpr, build_orepa, build_orepa_1x1, build_orepa_large
from .prior import dct_basis, frequency_prior
from .registry import (
    ConvGeometry,
    available_blocks,
    build_block,
    check_geometry,
    get_block,
    register_block,
    unregister_block,
)

__all__ = [
    "ConvGeometry",
    "register_block",
    "unregister_block",
    "get_block",
    "available_blocks",
    "build_block",
    "check_geometry",
    "build_orepa",
    "build_orepa_1x1",
    "build_orepa_large",
    "build_repvgg",
    "build_dbb",
    "build_acnet",
    "OrepaExpr",
    "Orepa1x1Expr",
    "OrepaLargeExpr",
    "dct_basis",
    "frequency_prior",
    "MODES",
    "SCALINGS",
]

for _name, _build in (
    ("orepa", build_orepa),
    ("orepa_1x1", build_orepa_1x1),
    ("orepa_large", build_orepa_large),
    ("repvgg", build_repvgg),
    ("dbb", build_dbb),
    ("acnet", build_acnet),
):
    if _name not in available_blocks():
        register_block(_name, _build)
