"""QARepVGG (Chu et al. 2022, "Make RepVGG Greater Again: A Quantization-aware
Approach"), declared with the public ``BlockConfig`` API. Owns the ``qarepvgg`` block.

RepVGG puts a BatchNorm at the end of each of its three branches (kxk, 1x1, identity);
folded, the identity's and the 1x1's BN scales ``gamma / sqrt(var + eps)`` multiply
into the deployed kernel per output channel and can leave a few channels with ranges
far beyond the rest, which a per-tensor INT8 scale then crushes. QARepVGG keeps the BN
on the kxk branch only:

* ``kxk``: the conv's own kernel, ending with a learnable per-channel ``scale``
  (online: the linearized BN, as every block here) or a BN (offline);
* ``pointwise``: a 1x1 conv (at the centre tap) with **no** BN and no scale;
* ``identity`` (when ``in == out``, stride 1 and symmetric 'same' padding, else
  dropped): the plain identity, no BN, no scale;

and one BN after the sum: the block's post-BN, which ``orepa_transform`` provides as for
every block (the conv's following BN, or one inserted with ``insert_bn``).

Not implemented: the paper's custom L2 regularizer on the 3x3 kernel (a weight decay
on the kxk kernel divided by its BN's scale). Training uses whatever weight decay the
user's optimizer applies to every parameter. ``init="from_conv"`` is refused for this
block (the 1x1 and identity branches have no scale that could start at zero).

Eligibility: a kernel larger than 1 in some dim (as ``repvgg``).
"""

from __future__ import annotations

from ..algebra import ConvSpec
from .branch import Branch
from .config import BlockConfig

__all__ = ["QAREPVGG", "build_qarepvgg"]


def _kxk(g: ConvSpec) -> bool:
    return not g.is_pointwise_kernel


QAREPVGG = (
    BlockConfig("qarepvgg")
    .describe("QARepVGG: kxk (+BN) + 1x1 (no BN) (+ identity, no BN); one BN after the sum")
    .requires(_kxk, "needs a kernel larger than 1 in some dim")
    .branch(Branch.conv(), name="kxk")
    .branch(Branch.pointwise(), name="pointwise", end="none")
    .branch(Branch.identity(), name="identity", optional=True, end="none")
)

build_qarepvgg = QAREPVGG.build
