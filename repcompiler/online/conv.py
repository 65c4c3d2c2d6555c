"""Online (training-time) blocks: an algebra expression squeezed into one conv per forward.

:class:`OnlineConv` holds a block's linear branches as an
:class:`~repcompiler.algebra.Expr` (the child module ``branches``: a declared block's
parameters read ``conv1.branches.prior.scale``) and an optional post-addition BatchNorm
(``post_bn``). Every forward generates one kernel from the branch parameters *inside
autograd* and runs a single convolution on the feature map; the post-BN (not linear
while training) runs on that conv's output. The kernel comes from a
:class:`~repcompiler.blocks.accel.KernelAccelerator` when one is given (or recorded on
a declared block's expression by its ``BlockConfig``) and matches the expression's
structure; otherwise from the generic ``fold()``, which stays the reference.

Kernel cache: :func:`~repcompiler.online.cache.block_kernel` decides whether a forward
generates its kernel or reuses a kept one (the detached kernel while no gradient can
flow; the step's kernel inside ``rc.accumulate``) and when a kept kernel is stale; see
:mod:`repcompiler.online.cache` for the rule and how torch.compile, torch.export, DDP and
FSDP2 see it.

Tracing: ``torch.fx.symbolic_trace`` and torchvision's ``create_feature_extractor``
see an online (or offline) block as **one call**, ``reparam_block_forward(block,
input)`` (registered with ``torch.fx.wrap``; the block is a ``get_attr`` argument), not
its kernel generation (which reads data pointers and branches on grad mode, as symbolic
tracing cannot). The traced module calls the same block, so it trains, caches and
deploys as the eager one.

Its lowering rule makes it foldable by ``deploy``/``fold`` like any conv followed by a
BN (:meth:`OnlineConv.deploy_expr`).

:class:`OfflineBlock` is the baseline the paper compares against: the same branches
run unfolded on the feature map (a BN inside every branch uses batch statistics).

:class:`HybridBlock` holds a :class:`HybridExpr`: an online part (an :class:`OnlineConv`
with its own BN: one generated kernel, one conv) plus branches that run on the feature
map, each ending in a BN, summed - OREPA-VGG as the official code trains it (the OREPA
kxk online, RepVGG's 1x1 and identity branches with their BNs). In eval mode it folds,
like the others, into one conv.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import Tensor, nn

from .. import algebra as A
from .cache import block_kernel
from ..blocks.accel import KernelAccelerator
from ..blocks.named import BlockExpr, StackExpr
from ..errors import IncompatibleError, InexactFoldError
from ..rules.base import LowerInfo
from ..rules.registry import RuleRegistry

log = logging.getLogger(__name__)

__all__ = ["OnlineConv", "OfflineBlock", "HybridExpr", "HybridBlock", "reparam_block_forward",
           "block_calls_as_modules", "register_online_rules"]


def reparam_block_forward(block: nn.Module, input: Tensor) -> Tensor:
    """``block``'s computation on ``input``: what an online/offline block's ``forward``
    calls, a leaf for ``torch.fx`` tracing (see the module docstring)."""
    return block.compute(input)


torch.fx.wrap("reparam_block_forward")


def block_calls_as_modules(model: nn.Module) -> int:
    """In every ``torch.fx.GraphModule`` inside ``model`` (``model`` included), rewrite each
    ``reparam_block_forward(<get_attr block>, x)`` call - how a model traced *after*
    ``orepa_transform`` (``fx.symbolic_trace``, a feature extractor) calls its blocks - into
    a ``call_module`` of the block, as tracing the untraced model gives. Same computation;
    the block is then a module call that ``fold``/``deploy`` can see and replace. Modifies
    ``model`` in place (callers pass their working copy); returns the number of calls
    rewritten."""
    count = 0
    for gm in model.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        # torchvision's feature extractors (DualGraphModule) keep a train and an eval graph
        # and swap them in on .train()/.eval(): rewrite every graph the module holds
        graphs = {id(g): g for g in (gm.graph, getattr(gm, "train_graph", None), getattr(gm, "eval_graph", None))
                  if isinstance(g, torch.fx.Graph)}
        changed = sum(_block_calls_in(g) for g in graphs.values())
        if changed:
            gm.recompile()
            count += changed
    return count


def _block_calls_in(graph: torch.fx.Graph) -> int:
    changed = 0
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not reparam_block_forward or n.kwargs or len(n.args) != 2:
            continue
        holder = n.args[0]
        if not isinstance(holder, torch.fx.Node) or holder.op != "get_attr":
            continue
        with graph.inserting_before(n):
            call = graph.call_module(str(holder.target), (n.args[1],))
        call.meta.update(n.meta)
        n.replace_all_uses_with(call)
        graph.erase_node(n)
        if not holder.users:
            graph.erase_node(holder)
        changed += 1
    return changed


def _deploy_expr(expr: A.Expr, post_bn: nn.Module | None) -> A.Expr:
    if post_bn is None:
        return expr
    return A.Seq(expr, A.BatchNorm(post_bn, dims=expr.spec.dims))


def _autocast_off(module: nn.Module) -> contextlib.AbstractContextManager:
    """A context disabling autocast for ``module``'s device type, if it is enabled."""
    p = next(module.parameters(), None)
    device = p.device.type if p is not None else "cpu"
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type autocast does not know
        enabled = False
    return torch.autocast(device, enabled=False) if enabled else contextlib.nullcontext()


class _ReparamBlock(nn.Module):
    """What online and offline blocks share: the branches (child ``branches``, also
    readable as ``expr``), the post-BN, the block's name, and their deploy form
    (branches, then post-BN)."""

    def __init__(self, expr: A.Expr, post_bn: nn.Module | None = None, *, block: str = "") -> None:
        super().__init__()
        self.branches = expr
        self.post_bn = post_bn
        self.block = block
        # True when the conv this block replaced had no bias and ``post_bn`` was inserted:
        # the deployed conv's bias then comes from that BN, and deploy moves it into the
        # BNs downstream where it can (so the deployed model has the plain parameters)
        self.bias_from_inserted_bn = False

    @property
    def expr(self) -> A.Expr:
        """The block's expression (the ``branches`` child)."""
        return self.branches

    def deploy_expr(self) -> A.Expr:
        """The expression this block equals in eval mode (branches, then post-BN)."""
        return _deploy_expr(self.expr, self.post_bn)

    def to_conv(self) -> nn.Module:
        """A plain conv (detached) equal to this block in eval mode."""
        return self.deploy_expr().to_conv()

    def compute(self, input: Tensor) -> Tensor:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def forward(self, input: Tensor) -> Tensor:
        return reparam_block_forward(self, input)


class OnlineConv(_ReparamBlock):
    """One conv per forward, its kernel generated from ``expr``'s parameters.

    Args:
        expr: the block's branches (must fold exactly).
        post_bn: a BatchNorm run after the conv (the block's post-addition BN when
            the model had none after the original conv), or ``None``.
        block: the block's name, for reports and ``repr``.
        accelerator: a :class:`~repcompiler.blocks.accel.KernelAccelerator` for
            ``expr``; default: the one a ``BlockConfig`` recorded on the expression
            (``expr.accelerator``), if any. Used only if it ``matches(expr)``.
    """

    def __init__(self, expr: A.Expr, post_bn: nn.Module | None = None, *, block: str = "",
                 accelerator: KernelAccelerator | None = None) -> None:
        reasons = expr.exactness().reasons
        if reasons:
            raise InexactFoldError(f"online block {block or expr.label()} must fold exactly: " + "; ".join(reasons))
        super().__init__(expr, post_bn, block=block)
        self._cache: tuple[tuple, A.Kernel] | None = None
        if accelerator is None and isinstance(expr, (BlockExpr, StackExpr)):
            accelerator = expr.accelerator
        if accelerator is not None and not accelerator.matches(expr):
            log.debug("online block %s: %r does not match its structure; generic fold", block, accelerator)
            accelerator = None
        self.accelerator = accelerator

    # -- kernel generation -----------------------------------------------------------
    def generate(self) -> A.Kernel:
        """Generate the folded kernel (differentiable in the branch parameters), in the
        parameters' dtype: autocast is off while the branches are summed (the conv that
        applies the kernel still runs under it), so mixed-precision training rounds the
        finished kernel once, as it rounds a plain conv's weight."""
        with _autocast_off(self.branches):
            if self.accelerator is not None:
                return self.accelerator.generate(self.branches)
            return self.branches.fold(check=False)

    def sources(self) -> tuple[Tensor, ...]:
        """The tensors the kernel is generated from (the branch parameters and buffers)."""
        return (*self.expr.parameters(), *self.expr.buffers())

    def kernel(self) -> A.Kernel:
        """The kernel this forward applies: generated, or kept while its sources are
        unchanged (:func:`~repcompiler.online.cache.block_kernel`)."""
        return block_kernel(self, self.generate)

    def compute(self, input: Tensor) -> Tensor:
        """The block's output: one conv with the generated kernel, then the post-BN."""
        y = self.kernel().apply(input)
        return y if self.post_bn is None else self.post_bn(y)

    # -- conv-like geometry attributes (read-only), for code that inspects convs ------
    @property
    def in_channels(self) -> int:
        return self.expr.spec.in_channels

    @property
    def out_channels(self) -> int:
        return self.expr.spec.out_channels

    @property
    def groups(self) -> int:
        return self.expr.spec.groups

    @property
    def stride(self) -> tuple[int, ...]:
        return self.expr.spec.stride

    def extra_repr(self) -> str:
        try:
            desc = self.expr.spec.describe()
        except InexactFoldError:  # branches edited out of a folded form: repr must not fail
            desc = "?"
        return f"block={self.block or type(self.expr).__name__}, {desc}"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = None
        return state

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        self._cache = None
        return super()._apply(fn, recurse)

    def train(self, mode: bool = True) -> "OnlineConv":
        """As :meth:`nn.Module.train`; also drops the kept kernel, so ``model.eval()``
        after editing parameters through ``.data`` (which version counters do not see)
        regenerates the kernels."""
        self._cache = None
        return super().train(mode)


class OfflineBlock(_ReparamBlock):
    """The branches run on the feature map (DBB/RepVGG-style training)."""

    def compute(self, input: Tensor) -> Tensor:
        """The block's output: every branch on the feature map, summed, then the post-BN."""
        y = self.expr(input)
        return y if self.post_bn is None else self.post_bn(y)

    def extra_repr(self) -> str:
        return f"block={self.block or type(self.expr).__name__}, offline"


class HybridExpr(A.Expr):
    """``online(x) + offline(x)``: an :class:`OnlineConv` (its generated kernel, one conv,
    its post-BN) and an expression whose branches run on the feature map (e.g. a
    :class:`~repcompiler.blocks.named.BlockExpr` built in offline mode: a BN ending each
    branch). ``fold`` (eval mode) is the online part's deploy form plus the offline
    part's fold: one kernel."""

    def __init__(self, online: OnlineConv, offline: A.Expr, *, block: str = "") -> None:
        super().__init__()
        self.online = online
        self.offline = offline
        self.block = block
        if self.plan()[0] is None:
            raise IncompatibleError(f"block {block!r}: the online and offline parts have no common folded form: "
                                    + "; ".join(self.plan()[1]))

    @property
    def terms(self) -> list[A.Expr]:
        """The online part's deploy expression and the offline part."""
        return [self.online.deploy_expr(), self.offline]

    def plan(self) -> tuple[Any, tuple[str, ...]]:
        plans = [t.plan() for t in self.terms]
        reasons = tuple(r for _, rs in plans for r in rs)
        if any(spec is None for spec, _ in plans):
            return None, reasons
        p = A.parallel([spec for spec, _ in plans], names=lambda: ["online", "offline"])
        return p.spec, reasons + p.reasons

    def fold(self, check: bool = True) -> A.Kernel:
        self._check(check)
        return A.add([t.fold(check=False) for t in self.terms], check=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.online(x) + self.offline(x)

    def label(self) -> str:
        return f"{self.block or 'hybrid'}(online + offline)"


class HybridBlock(OfflineBlock):
    """A block whose ``expr`` is a :class:`HybridExpr`: its online part generates one
    kernel per forward, its other branches run on the feature map; the sum, then the
    post-BN (if any). Deploys to one conv like the other blocks."""

    def extra_repr(self) -> str:
        return f"block={self.block or type(self.expr).__name__}, hybrid (online kxk + feature-map branches)"


def _lower_block(m: nn.Module, info: LowerInfo) -> A.Expr:
    return m.deploy_expr()


def register_online_rules(registry: RuleRegistry) -> None:
    """Register the rule of the training blocks (their deploy expression) into ``registry``."""
    registry.register(OnlineConv, _lower_block, override=True)
    registry.register(OfflineBlock, _lower_block, override=True)
