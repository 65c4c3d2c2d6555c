"""Training-time blocks: what an eligible conv becomes (see :mod:`.registry`).

One way to declare a block, for users and built-ins alike: :class:`BlockConfig` with
:class:`Branch` kinds (:mod:`.config`, :mod:`.branch`), built from one set of helpers
(:mod:`.parts`) into named expressions (:mod:`.named`), optionally with a hand-written
kernel generator attached through :class:`KernelAccelerator` (:mod:`.accel`).

Built in: ``orepa``, ``orepa_1x1``, ``orepa_large``, ``orepa_vgg`` (:mod:`.orepa`,
accelerated by :mod:`.orepa_accel`), ``repvgg``,
``dbb``, ``acnet`` (:mod:`.classic`), ``qarepvgg`` (:mod:`.qarepvgg`). The frequency prior is in :mod:`.prior`.
"""

from __future__ import annotations

from .accel import KernelAccelerator
from .branch import Branch
from .classic import build_acnet, build_dbb, build_repvgg
from .config import BlockConfig
from .named import BlockExpr, BranchExpr, ResidualConv, StackExpr
from .orepa import build_orepa, build_orepa_1x1, build_orepa_large, build_orepa_vgg
from .qarepvgg import build_qarepvgg
from .orepa_accel import NestedAccelerator, Orepa1x1Accelerator, OrepaAccelerator, StackAccelerator
from .parts import MODES, SCALINGS
from .prior import dct_basis, frequency_prior, official_prior
from .registry import (
    ConvGeometry,
    available_blocks,
    build_block,
    check_geometry,
    geometry_of,
    get_block,
    register_block,
    unregister_block,
)

__all__ = [
    "ConvGeometry",
    "geometry_of",
    "register_block",
    "unregister_block",
    "get_block",
    "available_blocks",
    "build_block",
    "check_geometry",
    "BlockConfig",
    "Branch",
    "KernelAccelerator",
    "BlockExpr",
    "BranchExpr",
    "ResidualConv",
    "StackExpr",
    "OrepaAccelerator",
    "Orepa1x1Accelerator",
    "StackAccelerator",
    "NestedAccelerator",
    "build_orepa",
    "build_orepa_1x1",
    "build_orepa_large",
    "build_orepa_vgg",
    "build_repvgg",
    "build_dbb",
    "build_acnet",
    "build_qarepvgg",
    "dct_basis",
    "frequency_prior",
    "official_prior",
    "MODES",
    "SCALINGS",
]

for _name, _build in (
    ("orepa", build_orepa),
    ("orepa_1x1", build_orepa_1x1),
    ("orepa_large", build_orepa_large),
    ("orepa_vgg", build_orepa_vgg),
    ("repvgg", build_repvgg),
    ("dbb", build_dbb),
    ("acnet", build_acnet),
    ("qarepvgg", build_qarepvgg),
):
    if _name not in available_blocks():
        register_block(_name, _build)
