"""Online (training-time) blocks: an algebra expression squeezed into one conv per forward.

:class:`OnlineConv` holds the block's linear branches as an
:class:`~repcompiler.algebra.Expr` and an optional post-addition BatchNorm. Every
forward folds the expression into one kernel *inside autograd* and runs a single
convolution on the feature map; the post-BN (which is not linear while training)
runs on that conv's output. Its lowering rule makes it foldable by ``deploy``/``fold``
like any conv followed by a BN.

:class:`OfflineBlock` is the baseline the paper compares against: the same branches
run unfolded on the feature map (BN inside every branch uses batch statistics).
"""

from __future__ import annotations

from torch import Tensor, nn

from . import algebra as A
from .errors import InexactFoldError
from .rules import LowerInfo, register_rule

__all__ = ["OnlineConv", "OfflineBlock"]


class OnlineConv(nn.Module):
    """One conv per forward, its kernel generated from ``expr``'s parameters."""

    def __init__(self, expr: A.Expr, post_bn: nn.Module | None = None) -> None:
        super().__init__()
        reasons = expr.exactness().reasons
        if reasons:
            raise InexactFoldError("an online block must fold exactly: " + "; ".join(reasons))
        self.expr = expr
        self.post_bn = post_bn

    def kernel(self) -> A.Kernel:
        """The current folded kernel (differentiable in the branch parameters)."""
        return self.expr.fold(check=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.kernel().apply(x)
        return y if self.post_bn is None else self.post_bn(y)

    def deploy_expr(self) -> A.Expr:
        """The expression this block equals in eval mode (branches, then post-BN)."""
        if self.post_bn is None:
            return self.expr
        return A.Seq(self.expr, A.BatchNorm(self.post_bn, dims=self.expr.spec.dims))


class OfflineBlock(nn.Module):
    """The branches run on the feature map (DBB/RepVGG-style training)."""

    def __init__(self, expr: A.Expr, post_bn: nn.Module | None = None) -> None:
        super().__init__()
        self.expr = expr
        self.post_bn = post_bn

    def forward(self, x: Tensor) -> Tensor:
        y = self.expr(x)
        return y if self.post_bn is None else self.post_bn(y)

    def deploy_expr(self) -> A.Expr:
        if self.post_bn is None:
            return self.expr
        return A.Seq(self.expr, A.BatchNorm(self.post_bn, dims=self.expr.spec.dims))


def _lower_block(m: nn.Module, info: LowerInfo) -> A.Expr:
    return m.deploy_expr()


register_rule(OnlineConv, _lower_block)
register_rule(OfflineBlock, _lower_block)
