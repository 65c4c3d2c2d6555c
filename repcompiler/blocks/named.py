"""Named block expressions: what gives a transformed model readable parameter names.

A block built by :class:`~repcompiler.blocks.config.BlockConfig` is a
:class:`BlockExpr`: its branches are child modules named after what they are
(``origin``, ``prior``, ``dw_pw``, ...), so an online conv's parameters read
``layer1.0.conv1.branches.prior.scale`` or ``...branches.dw_pw.pointwise.weight``
instead of positions in an expression tree. A :class:`BranchExpr` is one branch: named
parts applied in sequence, optionally one conv whose ``weight``/``bias`` the branch
holds itself (``branches.origin.weight``), then its end: a learnable ``scale``
(online), a BatchNorm ``bn`` (offline) or nothing. :class:`ResidualConv` is a 1x1 that
starts as the (stacked) identity (``identity + weight``, the weight initialised to zero), and
:class:`StackExpr` a sequence of named stages (the linear deep stem).

They are ordinary algebra expressions (``plan``/``fold``/``forward`` as the algebra
defines them; :class:`BranchExpr` and :class:`StackExpr` are :class:`~repcompiler.algebra.Seq`,
:class:`ResidualConv` a :class:`~repcompiler.algebra.Sum`), so everything that reads
an expression - deploy's lowering rule, exactness checks, ``to_conv`` - works unchanged.
``terms`` gives the usual ordered operands; for the parts a branch holds itself it
returns leaves *viewing* the branch's own tensors (built on access, never registered).
``fold``/``forward`` read the tensors directly, so ``torch.func.functional_call`` and
``torch.compile`` see the branch's parameters.
"""

from __future__ import annotations

import keyword
from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .. import algebra as A
from ..algebra import ConvSpec
from ..errors import IncompatibleError, RegistrationError
from .parts import stacked_identity

__all__ = ["BranchExpr", "BlockExpr", "ResidualConv", "StackExpr", "HOLD", "check_name"]

HOLD = ""  #: the part name that makes a :class:`BranchExpr` hold a conv's tensors itself

_RESERVED = {"bias", "weight", "scale", "bn", "terms", "accelerator", "block"}


def check_name(name: str, owner: str) -> str:
    """A part or branch name must be a Python identifier, not a keyword or reserved word."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name in _RESERVED \
            or hasattr(BlockExpr, name):
        raise RegistrationError(f"{owner}: {name!r} is not a usable name (an identifier, not one of "
                                f"{sorted(_RESERVED)} or an nn.Module attribute)")
    return name


def _hold(module: nn.Module, name: str, value: Tensor | None) -> None:
    """Parameters (and ``None``) stay parameters; other tensors become buffers."""
    if value is None or isinstance(value, nn.Parameter):
        module.register_parameter(name, value)  # type: ignore[arg-type]
    else:
        module.register_buffer(name, value)


def _diag_spec(channels: int, dims: int, bias: bool = False) -> ConvSpec:
    one = (1,) * dims
    return ConvSpec(dims, channels, channels, one, one, ((0, 0),) * dims, one, channels, bias)


def _conv_spec(weight: Tensor, bias: Tensor | None, geo: dict[str, Any]) -> ConvSpec:
    return ConvSpec(weight.dim() - 2, weight.shape[1] * geo["groups"], weight.shape[0], tuple(weight.shape[2:]),
                    geo["stride"], geo["padding"], geo["dilation"], geo["groups"], bias is not None)


def _scale_kernel(scale: Tensor, channels: int, dims: int) -> A.Kernel:
    s = scale.expand(channels) if scale.dim() == 0 else scale
    return A.Kernel(s.reshape(channels, 1, *(1,) * dims), None, _diag_spec(channels, dims))


def _chain(plans: list[tuple[ConvSpec | None, tuple[str, ...]]], labels: list[str]) -> tuple[ConvSpec | None, tuple]:
    spec, reasons = plans[0][0], list(plans[0][1])
    for (tspec, treasons), label in zip(plans[1:], labels[1:]):
        reasons += treasons
        if spec is None or tspec is None:
            return None, tuple(reasons)
        p = A.sequence(spec, tspec, "the branch so far", label)
        reasons += p.reasons
        spec = p.spec
    return spec, tuple(reasons)


class BranchExpr(A.Seq):
    """One named branch: ``parts`` (``(name, expr)`` pairs, applied in order; the name
    :data:`HOLD` makes the branch hold that :class:`~repcompiler.algebra.Conv`'s
    ``weight``/``bias`` itself), then its end: ``scale`` (a ``[C]`` or 0-d tensor,
    learnable if a parameter), ``bn`` (an ``nn.BatchNorm*d``) or neither."""

    def __init__(self, parts: Sequence[tuple[str, A.Expr]], *, scale: Tensor | None = None,
                 bn: nn.Module | None = None) -> None:
        nn.Module.__init__(self)
        if not parts:
            raise IncompatibleError("a branch needs at least one part")
        if scale is not None and bn is not None:
            raise IncompatibleError("a branch ends with a scale or a BN, not both")
        self._order: list[str] = []
        self._conv: dict[str, Any] | None = None
        for name, part in parts:
            if name == HOLD:
                if not isinstance(part, A.Conv) or self._conv is not None:
                    raise IncompatibleError("a branch holds the tensors of at most one Conv part")
                _hold(self, "weight", part.weight)
                _hold(self, "bias", part.bias)
                self._conv = dict(stride=part.stride, padding=part.padding, dilation=part.dilation,
                                  groups=part.groups, name=part.name)
            else:
                self.add_module(check_name(name, "branch part"), part)
            self._order.append(name)
        _hold(self, "scale", scale)
        self.bn = bn
        spec, _ = self.plan()
        if spec is None:
            raise IncompatibleError("the branch's parts do not compose")

    # -- structure ----------------------------------------------------------------
    @property
    def parts(self) -> dict[str, A.Expr]:
        """The parts by name (the held conv, if any, as a view under ``"conv"``)."""
        return {n or "conv": (self._held() if n == HOLD else getattr(self, n)) for n in self._order}

    @property
    def end(self) -> str:
        """``"scale"``, ``"bn"`` or ``"none"``."""
        return "scale" if self.scale is not None else "bn" if self.bn is not None else "none"

    def _held(self) -> A.Conv:
        geo = dict(self._conv)  # type: ignore[arg-type]
        return A.Conv(self.weight, self.bias, **geo)

    def _end_leaf(self) -> A.Expr | None:
        c, d = self._out()
        if self.scale is not None:
            return A.Affine(c, d, scale=self.scale, name="scale")
        if self.bn is not None:
            return A.BatchNorm(self.bn, dims=d, name="bn")
        return None

    @property
    def terms(self) -> list[A.Expr]:  # type: ignore[override]
        parts = list(self.parts.values())
        end = self._end_leaf()
        return parts + ([end] if end is not None else [])

    # -- algebra ------------------------------------------------------------------
    def _part_plans(self) -> tuple[list[tuple[ConvSpec | None, tuple[str, ...]]], list[str]]:
        plans, labels = [], []
        for n in self._order:
            if n == HOLD:
                plans.append((_conv_spec(self.weight, self.bias, self._conv), ()))  # type: ignore[arg-type]
                labels.append("conv")
            else:
                plans.append(getattr(self, n).plan())
                labels.append(n)
        return plans, labels

    def _out(self) -> tuple[int, int]:
        spec = _chain(*self._part_plans())[0]
        if spec is None:
            raise IncompatibleError("the branch's parts do not compose")
        return spec.out_channels, spec.dims

    def plan(self) -> tuple[ConvSpec | None, tuple[str, ...]]:
        plans, labels = self._part_plans()
        spec, reasons = _chain(plans, labels)
        if spec is None or (self.scale is None and self.bn is None):
            return spec, reasons
        c, d = spec.out_channels, spec.dims
        end = _diag_spec(c, d, bias=self.bn is not None)
        return _chain([(spec, reasons), (end, ())], ["", "end"])

    def fold(self, check: bool = True) -> A.Kernel:
        self._check(check)
        kernel: A.Kernel | None = None
        for n in self._order:
            if n == HOLD:
                k = A.Kernel(self.weight, self.bias, _conv_spec(self.weight, self.bias, self._conv))  # type: ignore
            else:
                k = getattr(self, n).fold(check=False)
            kernel = k if kernel is None else A.compose(kernel, k, check=False)
        assert kernel is not None
        c, d = kernel.spec.out_channels, kernel.spec.dims
        if self.scale is not None:
            kernel = A.compose(kernel, _scale_kernel(self.scale, c, d), check=False)
        elif self.bn is not None:
            kernel = A.compose(kernel, A.BatchNorm(self.bn, dims=d).fold(check=False), check=False)
        return kernel

    def forward(self, x: Tensor) -> Tensor:
        for n in self._order:
            if n == HOLD:
                x = A.Kernel(self.weight, self.bias, _conv_spec(self.weight, self.bias, self._conv)).apply(x)  # type: ignore
            else:
                x = getattr(self, n)(x)
        if self.scale is not None:
            s = self.scale
            x = x * (s if s.dim() == 0 else s.reshape(1, -1, *(1,) * (x.dim() - 2)))
        elif self.bn is not None:
            x = self.bn(x)
        return x

    def __rshift__(self, other: A.Expr) -> A.Seq:
        return A.Seq(*self.terms, other)

    def extra_repr(self) -> str:
        return f"parts={[n or 'conv' for n in self._order]}, end={self.end}"


class ResidualConv(A.Sum):
    """``id(x) + conv(x)`` for a 1x1 ``conv`` whose ``weight`` (and groups) this module
    holds: a channel mixer that starts as its fixed ``id`` part when the weight starts at
    zero (OREPA's and DBB's identity-initialised 1x1; weight decay then pulls it toward
    ``id``, not toward zero). ``id`` is
    :func:`~repcompiler.blocks.parts.stacked_identity`: the identity for a square weight
    (``out == in``), else the official code's stacked identity (row ``i`` reads input
    channel ``i % (in/groups)``; e.g. the identity twice for OREPA's 2C-wide 1x1 -> kxk)."""

    def __init__(self, weight: Tensor, groups: int = 1) -> None:
        nn.Module.__init__(self)
        if weight.shape[0] % groups or any(k != 1 for k in weight.shape[2:]):
            raise IncompatibleError(f"ResidualConv needs a 1x1 weight with out channels divisible by groups, got "
                                    f"{tuple(weight.shape)} with groups={groups}")
        _hold(self, "weight", weight)
        self.groups = int(groups)
        self.square = weight.shape[0] == weight.shape[1] * groups
        self.identity = A.Identity(weight.shape[0], weight.dim() - 2) if self.square else None

    def _conv(self) -> A.Conv:
        return A.Conv(self.weight, groups=self.groups)

    def id_weight(self) -> Tensor:
        """The fixed part as a 1x1 weight (shape and layout of :attr:`weight`)."""
        w = self.weight
        return stacked_identity(w.shape[0], w.shape[1], w.dim() - 2, dtype=w.dtype, device=w.device)

    def _id_expr(self) -> A.Expr:
        return self.identity if self.identity is not None else A.Conv(self.id_weight(), groups=self.groups)

    @property
    def terms(self) -> list[A.Expr]:  # type: ignore[override]
        return [self._conv(), self._id_expr()]

    def plan(self) -> tuple[ConvSpec | None, tuple[str, ...]]:
        return _conv_spec(self.weight, None, self._geo()), ()

    def _geo(self) -> dict[str, Any]:
        d = self.weight.dim() - 2
        return dict(stride=(1,) * d, padding=((0, 0),) * d, dilation=(1,) * d, groups=self.groups)

    def fold(self, check: bool = True) -> A.Kernel:
        spec = _conv_spec(self.weight, None, self._geo())
        if self.identity is None:
            return A.Kernel(self.weight + self.id_weight(), None, spec)
        return A.add([A.Kernel(self.weight, None, spec), self.identity.fold(check=False)], check=False)

    def forward(self, x: Tensor) -> Tensor:
        k = A.Kernel(self.weight, None, _conv_spec(self.weight, None, self._geo()))
        if self.identity is None:
            return A.Kernel(self.weight + self.id_weight(), None, k.spec).apply(x)
        return x + k.apply(x)


class _Accelerated:
    """``fast_fold``/``has_fast_fold`` for expressions carrying an ``accelerator``."""

    accelerator: Any

    def fast_fold(self) -> A.Kernel:
        """The kernel from :attr:`accelerator` if there is one, else :meth:`fold`."""
        if self.accelerator is None:
            return self.fold(check=False)  # type: ignore[attr-defined]
        return self.accelerator.generate(self)

    @property
    def has_fast_fold(self) -> bool:
        return self.accelerator is not None


class BlockExpr(_Accelerated, A.Expr):
    """A block: named branches (``(name, BranchExpr-or-Expr)`` pairs) summed, plus an
    optional learnable ``bias`` added after the sum.

    ``accelerator`` is the :class:`~repcompiler.blocks.accel.KernelAccelerator` chosen
    for this expression when it was built (one that matched its structure) or ``None``;
    :class:`~repcompiler.online.conv.OnlineConv` generates its kernel with it.
    """

    def __init__(self, branches: Sequence[tuple[str, A.Expr]], *, bias: Tensor | None = None,
                 block: str = "") -> None:
        super().__init__()
        if not branches:
            raise IncompatibleError("a block needs at least one branch")
        self._names: list[str] = []
        for name, b in branches:
            if name in self._names:
                raise RegistrationError(f"block {block!r}: two branches named {name!r}")
            self.add_module(check_name(name, f"block {block!r}"), b)
            self._names.append(name)
        _hold(self, "bias", bias)
        self.block = block
        self.accelerator: Any = None
        self.accel_cache: Any = None  # an accelerator's per-expression cache (not pickled)
        spec, _ = self.plan()
        if spec is None:
            raise IncompatibleError(f"block {block!r}: the branches have no common folded form")

    @property
    def branches(self) -> dict[str, A.Expr]:
        """The branches by name, in declaration order."""
        return {n: getattr(self, n) for n in self._names}

    @property
    def terms(self) -> list[A.Expr]:
        return [getattr(self, n) for n in self._names]

    def __iter__(self):  # type: ignore[override]
        return iter(self.terms)

    def __len__(self) -> int:
        return len(self._names)

    def plan(self) -> tuple[ConvSpec | None, tuple[str, ...]]:
        plans = [t.plan() for t in self.terms]
        reasons = tuple(r for _, rs in plans for r in rs)
        specs = [s for s, _ in plans]
        if any(s is None for s in specs):
            return None, reasons
        p = A.parallel(specs, names=lambda: list(self._names))  # type: ignore[arg-type]
        spec = p.spec
        if spec is not None and self.bias is not None:
            spec = replace(spec, has_bias=True)
        return spec, reasons + p.reasons

    def with_bias(self, kernel: A.Kernel) -> A.Kernel:
        """``kernel`` plus this block's ``bias`` (if any)."""
        if self.bias is None:
            return kernel
        b = self.bias if kernel.bias is None else kernel.bias + self.bias
        return A.Kernel(kernel.weight, b, replace(kernel.spec, has_bias=True))

    def fold(self, check: bool = True) -> A.Kernel:
        self._check(check)
        return self.with_bias(A.add([t.fold(check=False) for t in self.terms], check=False))


    def forward(self, x: Tensor) -> Tensor:
        outs = [t(x) for t in self.terms]
        for n, o in zip(self._names[1:], outs[1:]):
            if o.shape[2:] != outs[0].shape[2:]:
                raise IncompatibleError(f"block {self.block!r}: branch {self._names[0]!r} and branch {n!r} produce "
                                        f"spatial sizes {tuple(outs[0].shape[2:])} vs {tuple(o.shape[2:])}")
        out = torch.stack(outs).sum(0) if len(outs) > 1 else outs[0]
        if self.bias is not None:
            out = out + self.bias.reshape(1, -1, *(1,) * (out.dim() - 2))
        return out

    def label(self) -> str:
        return f"{self.block or 'block'}({', '.join(self._names)})"

    def extra_repr(self) -> str:
        return f"block={self.block!r}" + (f", accelerator={type(self.accelerator).__name__}"
                                          if self.accelerator is not None else "")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["accel_cache"] = None
        return state


class StackExpr(_Accelerated, A.Seq):
    """Named stages (``stage0``, ``stage1``, ...) applied in sequence: a kernel composed
    of the stages' kernels (the linear deep stem). ``accelerator`` as :class:`BlockExpr`."""

    def __init__(self, stages: Sequence[A.Expr], *, block: str = "") -> None:
        nn.Module.__init__(self)
        if not stages:
            raise IncompatibleError("a stack needs at least one stage")
        for i, s in enumerate(stages):
            self.add_module(f"stage{i}", s)
        self._n = len(stages)
        self.block = block
        self.accelerator: Any = None
        self.plan()

    @property
    def terms(self) -> list[A.Expr]:  # type: ignore[override]
        return [getattr(self, f"stage{i}") for i in range(self._n)]

