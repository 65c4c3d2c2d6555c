"""RepVGG, DBB and ACNet, declared with the public ``BlockConfig`` API: linearized
(online) or as their papers train them (offline: a BN at the end of every branch, DBB's
inner BNs included).

Eligibility (the block raises :class:`~repcompiler.errors.UnsupportedError` otherwise)
and branch names:

* ``repvgg`` (RepVGG, Ding et al. 2021): a kernel larger than 1 in some dim. Branches
  ``kxk``, ``pointwise`` (1x1 at the centre tap) and ``identity`` when ``in == out``,
  stride 1 and the conv is symmetric "same".
* ``dbb`` (Diverse Branch Block, Ding et al. 2021): a kernel larger than 1 in some
  dim. Branches ``kxk``; ``pointwise`` (if ``groups < out``); ``avg`` (1x1 -> kxk
  average; just the average when ``groups == out``, which needs ``in == out``);
  ``pw_kxk`` (1x1, identity-initialised with width ``in`` if ``groups < out``, else
  random with width ``2*in``, -> kxk). Offline, the inner BNs pad with their bias as
  DBB's ``BNAndPadLayer`` does (``ZeroPad -> BN -> kxk without padding``), so the
  offline block also folds exactly.
* ``acnet`` (ACNet, Ding et al. 2019): 2-d or 3-d convs with every kernel dim > 1.
  Branches ``kxk`` and, per spatial dim ``i``, ``line{i}``: a centred kernel spanning
  dim ``i`` only (``line0`` is kx1 and ``line1`` 1xk in 2-d).

Every branch ends with a scale initialised to 1 (online) or a BN (offline).
"""

from __future__ import annotations

from ..algebra import ConvSpec
from .branch import Branch
from .config import BlockConfig

__all__ = ["REPVGG", "DBB", "ACNET", "build_repvgg", "build_dbb", "build_acnet"]


def _kxk(g: ConvSpec) -> bool:
    return not g.is_pointwise_kernel


_NEED_KXK = "needs a kernel larger than 1 in some dim"

REPVGG = (
    BlockConfig("repvgg")
    .describe("RepVGG: kxk + 1x1 (+ identity)")
    .requires(_kxk, _NEED_KXK)
    .branch(Branch.conv(), name="kxk")
    .branch(Branch.pointwise(), name="pointwise")
    .branch(Branch.identity(), name="identity", optional=True)
)


def _narrow(g: ConvSpec) -> bool:
    return g.groups < g.out_channels


DBB = (
    BlockConfig("dbb")
    .describe("DBB: kxk, 1x1, 1x1 -> avg, 1x1 -> kxk")
    .requires(_kxk, _NEED_KXK)
    .requires(lambda g: _narrow(g) or g.in_channels == g.out_channels,
              "groups == out_channels needs in == out for the average branch")
    .branch(Branch.conv(), name="kxk")
    .branch(Branch.pointwise(), name="pointwise", when=_narrow)
    .branch(Branch.pointwise(lambda g: g.out_channels, inner_bn=True) >> Branch.avg(), name="avg", when=_narrow)
    .branch(Branch.avg(), name="avg", when=lambda g: not _narrow(g))
    .branch(Branch.pointwise(lambda g: g.in_channels if _narrow(g) else 2 * g.in_channels,
                             init=lambda g: "residual" if _narrow(g) else "random", inner_bn=True)
            >> Branch.conv(), name="pw_kxk")
)


def _line(i: int):  # noqa: ANN202 - a kernel-size callable
    return lambda g: tuple(k if j == i else 1 for j, k in enumerate(g.kernel_size))


ACNET = (
    BlockConfig("acnet")
    .describe("ACNet: kxk + one centred line kernel per spatial dim")
    .requires(lambda g: g.dims >= 2 and all(k >= 2 for k in g.kernel_size),
              "needs a 2-d/3-d conv with every kernel dim > 1")
    .branch(Branch.conv(), name="kxk")
    .branch(Branch.conv(_line(0)), name="line0")
    .branch(Branch.conv(_line(1)), name="line1", when=lambda g: g.dims > 1)
    .branch(Branch.conv(_line(2)), name="line2", when=lambda g: g.dims > 2)
)

build_repvgg = REPVGG.build
build_dbb = DBB.build
build_acnet = ACNET.build
