"""The block registry: what an eligible conv becomes for training.

A **block** is a builder ``build(geom: ConvSpec, **options) -> Expr``: given the
geometry of the conv it replaces, it returns the training-time branches as a
kernel-algebra expression (:mod:`repcompiler.algebra`) with *fresh* parameters. The
expression must have exactly the conv's geometry: the same channels and stride and
the same output size (and window placement) for every input size; the registry
checks this on every build (:func:`build_block`).

Options every built-in block understands (a user block may ignore them; the
transform only passes the options a builder's signature accepts):

* ``mode``: ``"online"`` (linearized: a learnable scale at the end of every branch,
  no BN inside; folded to one conv each forward) or ``"offline"`` (a BatchNorm at the
  end of every branch, as DBB/RepVGG train; run unfolded).
* ``scaling``: ``"vector"`` (per output channel, the paper's default), ``"scalar"``
  or ``"none"`` (the paper's ablation). Ignored in offline mode.

A builder raises :class:`~repcompiler.errors.UnsupportedError` for a geometry it
does not handle (the transform then leaves that conv as it is and reports why).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, Sequence

from torch import nn

from .. import algebra as A
from ..algebra import ConvSpec
from ..errors import IncompatibleError, RegistrationError, UnsupportedError

__all__ = [
    "ConvGeometry",
    "geometry_of",
    "BlockBuilder",
    "register_block",
    "unregister_block",
    "get_block",
    "available_blocks",
    "build_block",
    "check_geometry",
    "accepted_options",
]

log = logging.getLogger(__name__)

Pads = tuple[tuple[int, int], ...]


def geometry_of(conv: nn.Module, *, bias: bool | None = None) -> ConvSpec:
    """The geometry of an ``nn.Conv1d/2d/3d`` (``"same"``/``"valid"`` resolved as torch
    resolves them; ``bias`` overrides whether the block needs a bias of its own)."""
    if not isinstance(conv, A.CONV_TYPES):
        raise UnsupportedError(f"{type(conv).__name__} is not an nn.Conv1d/2d/3d")
    dims = A.dims_of(conv)
    ks, dil = tuple(conv.kernel_size), tuple(conv.dilation)
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pads: Pads = ((0, 0),) * dims
        else:  # "same", as torch: the extra pixel goes to the right
            pads = tuple((d * (k - 1) // 2, d * (k - 1) - d * (k - 1) // 2) for d, k in zip(dil, ks))
    else:
        pads = A.normalize_padding(conv.padding, dims)
    return ConvSpec(dims, conv.in_channels, conv.out_channels, ks, tuple(conv.stride), pads, dil, conv.groups,
                    (conv.bias is not None) if bias is None else bool(bias))


class _GeometryConstructor(type):
    """Makes :class:`ConvGeometry` a constructor of :class:`~repcompiler.algebra.ConvSpec`
    (and ``isinstance(spec, ConvGeometry)`` true for every spec)."""

    def __call__(cls, in_channels: int, out_channels: int, kernel_size: Sequence[int],  # type: ignore[override]
                 stride: Sequence[int], padding: Pads, dilation: Sequence[int], groups: int = 1, dims: int = 2,
                 bias: bool = False) -> ConvSpec:
        return ConvSpec(dims, in_channels, out_channels, tuple(kernel_size), tuple(stride),
                        tuple((int(a), int(b)) for a, b in padding), tuple(dilation), groups, bool(bias))

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, ConvSpec)


class ConvGeometry(metaclass=_GeometryConstructor):
    """The geometry of the conv a block replaces: **a** :class:`~repcompiler.algebra.ConvSpec`
    (there is one geometry type), built with the block registry's argument order
    ``ConvGeometry(in_channels, out_channels, kernel_size, stride, padding, dilation,
    groups=1, dims=2, bias=False)``; ``ConvGeometry.from_module(conv)`` reads a conv.
    ``geom.bias`` is ``spec.has_bias``: whether the block needs a bias of its own."""

    from_module = staticmethod(geometry_of)


BlockBuilder = Callable[..., A.Expr]

_BLOCKS: dict[str, BlockBuilder] = {}


def register_block(name: str, build: BlockBuilder, *, override: bool = False) -> None:
    """Register a block builder ``build(geom, **options) -> Expr`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise RegistrationError(f"a block name must be a non-empty string, got {name!r}")
    if not callable(build):
        raise RegistrationError(f"block {name!r}: build must be callable, got {type(build).__name__}")
    if not isinstance(override, bool):
        raise RegistrationError(f"block {name!r}: override must be True or False, got {override!r}")
    if name in _BLOCKS and not override:
        raise RegistrationError(f"a block named {name!r} is already registered (pass override=True)")
    _BLOCKS[name] = build
    log.debug("registered block %s", name)


def unregister_block(name: str) -> None:
    """Remove a block (no error if absent)."""
    _BLOCKS.pop(name, None)


def get_block(name: str) -> BlockBuilder:
    """The builder registered under ``name``."""
    try:
        return _BLOCKS[name]
    except KeyError:
        raise RegistrationError(
            f"no block named {name!r}; available: {', '.join(available_blocks())}"
        ) from None


def available_blocks() -> list[str]:
    """Names of all registered blocks, sorted."""
    return sorted(_BLOCKS)


def accepted_options(build: Callable[..., Any], options: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that ``build`` accepts as keywords (all, if it takes ``**kwargs``)."""
    try:
        params = inspect.signature(build).parameters.values()
    except (TypeError, ValueError):
        return options
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return options
    names = {p.name for p in params}
    return {k: v for k, v in options.items() if k in names}


def check_geometry(expr: A.Expr, geom: ConvSpec, name: str = "block") -> None:
    """Raise :class:`IncompatibleError` unless ``expr`` has ``geom``'s geometry:
    same channels, stride, window start and output size for every input size."""
    spec = expr.spec
    want = geom.spec
    problems: list[str] = []
    if spec.dims != want.dims:
        problems.append(f"dims {spec.dims} != {want.dims}")
    if spec.in_channels != want.in_channels or spec.out_channels != want.out_channels:
        problems.append(
            f"channels {spec.in_channels}->{spec.out_channels} != {want.in_channels}->{want.out_channels}"
        )
    if spec.stride != want.stride:
        problems.append(f"stride {spec.stride} != {want.stride}")
    if not problems:
        for i in range(want.dims):
            c1 = spec.padding[i][0] + spec.padding[i][1] - spec.extent[i]
            c2 = want.padding[i][0] + want.padding[i][1] - want.extent[i]
            if c1 != c2:
                problems.append(f"output size differs in dim {i} (padding - extent {c1} vs {c2})")
    if problems:
        raise IncompatibleError(f"{name} built for {geom.describe()} has geometry {spec.describe()}: " + "; ".join(problems))


def build_block(name: str, geom: ConvSpec, **options: Any) -> A.Expr:
    """Build block ``name`` for ``geom`` (passing only the options its builder
    accepts) and check the result has the conv's geometry."""
    build = get_block(name)
    expr = build(geom, **accepted_options(build, options))
    if not isinstance(expr, A.Expr):
        raise RegistrationError(f"block {name!r} returned {type(expr).__name__}, not an algebra Expr")
    check_geometry(expr, geom, f"block {name!r}")
    return expr
