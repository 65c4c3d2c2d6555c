"""The kernel algebra: linear conv expressions that fold to one convolution.

Pure tensor code (no ``torch.fx``). See :mod:`.geometry` for the exactness rules,
:mod:`.kernel` for the folded form and the tensor operations, :mod:`.expr` for the
expression base class and combinators, :mod:`.leaves` and :mod:`.leaves_fixed` for the leaves,
:mod:`.simplify` for simplifying a linearized block's expression (and its fast kernel generator).

Example::

    from repcompiler.algebra import Conv, BatchNorm, Identity
    block = (Conv.from_module(conv3) >> BatchNorm(bn3)) + (Conv.from_module(conv1) >> BatchNorm(bn1)) \
        + (Identity(c, 2) >> BatchNorm(bn_id))
    assert block.exactness().exact
    plain = block.to_conv()            # one nn.Conv2d, equal to block(x) in eval mode
"""

from .expr import Concat, Exactness, Expr, Seq, Sum
from .geometry import ConvSpec, ParPlan, SeqPlan, normalize_padding, parallel, sequence
from .kernel import CONV_MODULES, CONV_TYPES, Kernel, add, compose, concat, expand_groups, spread
from .leaves import Affine, Bias, Constant, Conv, Scale, dims_of
from .leaves_fixed import AvgPool, BatchNorm, Identity, ZeroPad
from .crop import Crop
from .simplify import LinearizedSum, simplify

__all__ = [
    "Expr", "Seq", "Sum", "Concat", "Exactness",
    "Conv", "Affine", "BatchNorm", "Crop", "Scale", "Bias", "Constant", "Identity", "AvgPool", "ZeroPad", "dims_of",
    "ConvSpec", "SeqPlan", "ParPlan", "sequence", "parallel", "normalize_padding",
    "CONV_MODULES", "CONV_TYPES", "Kernel", "compose", "add", "concat", "expand_groups", "spread",
    "LinearizedSum", "simplify",
]
