"""What a freshly built block starts as, given the conv it replaces: its weights and its
``requires_grad`` flags.

``orepa_transform`` builds every block with fresh parameters (``init="fresh"``, the
paper's training from scratch). :func:`init_from_conv` (``init="from_conv"``) makes a
block start as exactly the conv it replaces, for fine-tuning pretrained models:

* the **origin** branch (the branch named ``origin``, else the first branch that is a
  single conv with the conv's geometry and weight shape, e.g. ``kxk`` of ``repvgg``/
  ``dbb``/``acnet``) gets the conv's weight, and its scale is 1 (offline: its BN is the
  identity in eval mode);
* every other branch contributes zero: its scale is 0 (offline: its BN's gamma and beta
  are 0). A zero scale keeps the branch trainable: the scale's gradient is the
  correlation of the kernel gradient with the branch's kernel, non-zero in general, and
  the branch's own parameters receive gradients once its scale moves (a fixed scale,
  ``scaling="fixed"``, never moves: such a block is refused);
* the block's bias (after the branch sum) is the conv's bias;
* a BatchNorm inserted after the block (``insert_bn=True``) is the identity in eval
  mode (running mean 0, variance 1, gamma ``sqrt(1 + eps)``, beta 0).

So in eval mode the block computes what the conv computed (up to the rounding of one
multiply by 1 and additions of zeros). Blocks that cannot start as the conv raise
:class:`~repcompiler.errors.UnsupportedError` with the reason (a stacked block such as
``orepa_large`` cannot hold an arbitrary kxk kernel; a block without scales or BNs at
its branch ends, ``scaling="none"``, has nothing that starts at zero, and one with fixed
scales, ``scaling="fixed"``, would keep its other branches at zero; a block without
an origin branch or a bias where the conv has one); the transform then leaves that conv
as it is and reports why - a pretrained weight is never silently replaced.

:func:`copy_frozen` carries the conv's ``requires_grad`` flags over to the block: a
block made from a frozen conv is frozen (all its branch parameters and an inserted
BN), and the block's bias follows the conv's bias.

:func:`trained_evidence` tells whether a model's weights look trained rather than freshly
initialised (``orepa_transform`` warns, naming ``init="from_conv"``, before the default
``init="fresh"`` discards them). Two signs, each far from what a fresh initialisation
gives:

* a BatchNorm whose running statistics are not the constructor's (``num_batches_tracked
  > 0``, or running mean not 0 / running variance not 1): the model has run in training
  mode or had a state dict loaded;
* a conv whose filters have very different norms. A fresh initialisation draws every
  weight of a conv independently from one zero-mean distribution (uniform, normal,
  truncated normal, or constant: zeros, dirac, orthogonal rows), so the per-output-filter
  standard deviations agree to within about ``1 / sqrt(2 * fan_in)`` relative; trained
  filters differ by many times that. A conv is counted when the coefficient of
  variation of its filters' standard deviations exceeds
  :data:`FILTER_SPREAD_LIMIT` ``/ sqrt(2 * fan_in)`` (convs with fewer than 8 filters or
  a fan-in under 16 are not judged: too few numbers).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import algebra as A
from . import BlockExpr, BranchExpr, ConvGeometry
from ..errors import UnsupportedError

__all__ = ["INITS", "init_from_conv", "copy_frozen", "identity_bn_", "trained_evidence"]

INITS = ("fresh", "from_conv")

#: A conv looks trained when the spread of its filters' standard deviations exceeds this
#: many times the spread a fresh i.i.d. initialisation gives (``1 / sqrt(2 * fan_in)``).
FILTER_SPREAD_LIMIT = 4.0

_SAME_GEOMETRY = ("dims", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")


def _same_geometry(a: A.ConvSpec, b: A.ConvSpec) -> bool:
    return all(getattr(a, f) == getattr(b, f) for f in _SAME_GEOMETRY)


def _is_origin(branch: nn.Module, conv: nn.Module, geom: A.ConvSpec) -> bool:
    """``branch`` is one conv holding its own weight, with ``conv``'s geometry and shape."""
    if not isinstance(branch, BranchExpr) or list(branch.parts) != ["conv"]:
        return False
    weight = getattr(branch, "weight", None)
    if not isinstance(weight, Tensor) or weight.shape != conv.weight.shape or branch.bias is not None:
        return False
    spec = branch.plan()[0]
    return spec is not None and _same_geometry(spec, geom)


def _origin(expr: BlockExpr, conv: nn.Module, geom: A.ConvSpec) -> str:
    names = list(expr.branches)
    candidates = (["origin"] if "origin" in names else []) + names
    for name in candidates:
        if _is_origin(expr.branches[name], conv, geom):
            return name
    raise UnsupportedError(f"block {expr.block!r} has no origin branch (one conv with the conv's geometry "
                           f"{geom.describe()} holding its own weight) to start from the conv's weight")


def identity_bn_(bn: nn.Module) -> None:
    """Make a freshly built BatchNorm the identity in eval mode (in place)."""
    with torch.no_grad():
        if bn.running_mean is not None:
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
        if bn.weight is not None:
            bn.weight.fill_(math.sqrt(1.0 + bn.eps) if bn.running_var is not None else 1.0)
            bn.bias.zero_()


def _end(branch: nn.Module, name: str, block: str) -> str:
    """``"scale"`` or ``"bn"``: the end of ``branch`` that can start at zero and learn
    from there (a learnable scale, or an affine BN)."""
    if isinstance(branch, BranchExpr) and branch.end == "scale" and not isinstance(branch.scale, nn.Parameter):
        raise UnsupportedError(f"block {block!r}: branch {name!r} has a fixed scale (scaling='fixed'): started at "
                               "zero it would stay zero, so the block would train as the plain conv")
    if isinstance(branch, BranchExpr) and (branch.end == "scale" or (branch.end == "bn" and branch.bn.affine)):
        return branch.end
    raise UnsupportedError(f"block {block!r}: branch {name!r} has no scale or affine BN at its end that can "
                           "start at zero (scaling='none'?), so the block cannot start as the conv")


def init_from_conv(expr: A.Expr, conv: nn.Module) -> str:
    """Make the freshly built block ``expr`` start as ``conv`` (see the module docstring).

    Edits ``expr``'s tensors in place; returns the origin branch's name. Raises
    :class:`~repcompiler.errors.UnsupportedError` (``expr`` unchanged) where the block
    cannot start as the conv."""
    block = getattr(expr, "block", "") or type(expr).__name__
    if not isinstance(expr, BlockExpr):
        raise UnsupportedError(f"block {block!r} is not a sum of branches (e.g. a stacked stem): it cannot start "
                               "as an arbitrary conv kernel")
    geom = ConvGeometry.from_module(conv)
    origin = _origin(expr, conv, geom)
    if conv.bias is not None and expr.bias is None:
        raise UnsupportedError(f"block {block!r} has no bias to hold the conv's bias")
    branches = expr.branches
    ends = {name: _end(b, name, block) for name, b in branches.items() if name != origin}  # check, then edit
    with torch.no_grad():
        for name, end in ends.items():
            if end == "scale":
                branches[name].scale.zero_()
            else:
                branches[name].bn.weight.zero_()
                branches[name].bn.bias.zero_()
        o = branches[origin]
        o.weight.copy_(conv.weight)
        if o.end == "scale":
            o.scale.fill_(1.0)
        elif o.end == "bn":
            identity_bn_(o.bn)
        if expr.bias is not None:
            if conv.bias is not None:
                expr.bias.copy_(conv.bias)
            else:
                expr.bias.zero_()
    return origin


def copy_frozen(block: nn.Module, conv: nn.Module) -> None:
    """Give ``block`` (an online/offline block, its branches and post-BN) ``conv``'s
    ``requires_grad`` flags: every parameter follows the conv's weight, except a
    parameter named ``bias`` directly on the block's expression, which follows the
    conv's bias (if the conv has one). Only freezes: a trainable conv leaves the block
    as built."""
    weight_grad = conv.weight.requires_grad
    bias_grad = conv.bias.requires_grad if conv.bias is not None else weight_grad
    if weight_grad and bias_grad:
        return
    expr = getattr(block, "branches", None)
    own_bias = getattr(expr, "bias", None)
    for p in block.parameters():
        p.requires_grad_(bias_grad if p is own_bias else weight_grad)


def _bn_trained(bn: nn.modules.batchnorm._NormBase) -> bool:
    tracked = getattr(bn, "num_batches_tracked", None)
    if isinstance(tracked, Tensor) and not tracked.is_meta and int(tracked) > 0:
        return True
    mean, var = bn.running_mean, bn.running_var
    if mean is None or var is None or mean.is_meta or var.is_meta:
        return False
    return bool(mean.count_nonzero() > 0 or (var != 1).any())


def _filter_spread(conv: nn.Module) -> float | None:
    """The coefficient of variation of ``conv``'s per-filter standard deviations, in units
    of what an i.i.d. initialisation gives (``1 / sqrt(2 * fan_in)``); ``None`` where
    there are too few numbers to judge."""
    if torch.nn.utils.parametrize.is_parametrized(conv, "weight"):
        return None  # reading it would run the parametrization (a power iteration changes state)
    weight = getattr(conv, "weight", None)
    if not isinstance(weight, Tensor) or weight.is_meta or weight.dim() < 2:
        return None
    w = weight.detach().flatten(1).double()
    filters, fan_in = w.shape
    if filters < 8 or fan_in < 16:
        return None
    std = w.std(dim=1)
    if float(std.mean()) == 0.0:
        return None
    return float(std.std() / std.mean()) * math.sqrt(2.0 * fan_in)


def trained_evidence(model: nn.Module) -> list[str]:
    """Why ``model``'s weights look trained rather than freshly initialised (see the
    module docstring); an empty list when nothing does. Each entry names the modules."""
    bns, convs = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats and _bn_trained(m):
            bns.append(name)
        elif isinstance(m, nn.modules.conv._ConvNd):
            spread = _filter_spread(m)
            if spread is not None and spread > FILTER_SPREAD_LIMIT:
                convs.append(name)

    def names(found: list[str]) -> str:
        return ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")

    evidence = []
    if bns:
        evidence.append(f"{len(bns)} BatchNorm(s) with running statistics that are not at their initial values "
                        f"({names(bns)})")
    if convs:
        evidence.append(f"{len(convs)} conv(s) whose filters' norms differ far more than a fresh initialisation "
                        f"gives ({names(convs)})")
    return evidence
