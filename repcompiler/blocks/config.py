"""``BlockConfig``: the one way to declare a block, for users and the built-in blocks.

A block is declared by its named branches (:mod:`.branch`)::

    (BlockConfig("cross")
        .describe("kxk + 1xk + kx1 + 1x1 -> kxk")
        .branch(Branch.conv(), name="square")                         # the conv's own kernel
        .branch(Branch.conv(lambda g: (1, g.kernel_size[1])))         # 1xk, centred: "conv1x3"
        .branch(Branch.conv(lambda g: (g.kernel_size[0], 1)))         # kx1, centred: "conv3x1"
        .branch(Branch.pointwise(init="identity") >> Branch.conv(), init=0.5)
        .requires(lambda g: g.dims == 2, "2-d convs only")
        .register())

Built for a conv's geometry (:meth:`BlockConfig.build`) it is a
:class:`~repcompiler.blocks.named.BlockExpr` whose branches are modules named as
declared (or after what they are), so an online conv's parameters read
``conv1.branches.square.weight``, ``conv1.branches.square.scale``. Each branch ends
with a learnable scale (online; ``"vector"``, ``"scalar"`` or none following the
transform's ``scaling``) or a fresh BatchNorm (offline), initialised to its ``init``.
A learnable bias is added after the branch sum when the conv needs one.

Beyond branches: :meth:`~BlockConfig.stacked` declares a block as a sequence of other
blocks whose kernels compose (OREPA's linear deep stem), and
:meth:`~BlockConfig.accelerate` attaches a hand-written kernel generator
(:class:`~repcompiler.blocks.accel.KernelAccelerator`), used when it matches the built
structure. Everything goes through the algebra, so exactness is checked, never assumed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .. import algebra as A
from ..algebra import ConvSpec
from ..errors import RegistrationError, UnsupportedError, check_choice
from ..rewrite.names import fresh_name
from .accel import KernelAccelerator
from .branch import Branch, as_branch
from .named import BlockExpr, BranchExpr, StackExpr, check_name
from .parts import MODES, SCALINGS, WEIGHT_INITS, branch_end, weight_init_scope
from .registry import ConvGeometry, check_geometry, register_block

__all__ = ["BlockConfig", "BranchSpec", "BRANCH_ENDS"]

log = logging.getLogger(__name__)

#: how a declared branch ends: ``"default"`` (scale online / BN offline) or ``"none"``
BRANCH_ENDS = ("default", "none")

StagePlan = Callable[[ConvSpec], Sequence[tuple[ConvSpec, "BlockConfig"]]]


@dataclass
class BranchSpec:
    """One declared branch: what it computes, its name (``None``: a default from its
    kind), initial scale, whether it may be dropped, and when it applies."""

    branch: Branch
    name: str | None
    init: float
    optional: bool
    when: Callable[[ConvSpec], bool] | None
    end: str = "default"


class BlockConfig:
    """A block topology declared branch by branch; :meth:`register` makes it a block.

    Every setter returns ``self``. The builder is :meth:`build` (signature
    ``build(geom, *, mode="online", scaling="vector")``, as the block registry expects).
    """

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise RegistrationError(f"a block name must be a non-empty string, got {name!r}")
        self.name = name
        self._branches: list[BranchSpec] = []
        self._requires: list[tuple[Callable[[ConvSpec], bool], str]] = []
        self._scaling: str | None = None
        self._bias: bool | None = None
        self._stages: StagePlan | None = None
        self._accelerators: list[KernelAccelerator] = []
        self._doc = ""
        self._weight_init: str | None = None

    # -- declaration ----------------------------------------------------------------
    def branch(self, branch: Branch | str | Callable[[ConvSpec], A.Expr], *, name: str | None = None,
               init: float = 1.0, optional: bool = False,
               when: Callable[[ConvSpec], bool] | None = None, end: str = "default") -> "BlockConfig":
        """Add a branch. ``branch``: a :class:`Branch`, an alias (``"kxk"``, ``"1x1"``,
        ``"identity"``, ``"avg"``, ``"1x1>kxk"``, ``"1x1>avg"``) or a callable
        ``geom -> Expr``. ``name``: the branch's module name (a Python identifier;
        default: after its kind, e.g. ``conv3x3``, deduplicated). ``init``: its initial
        scale (online) / BN gamma (offline). ``optional``: drop the branch (instead of
        rejecting the conv) where it cannot be built, as RepVGG drops its identity.
        ``when``: build the branch only for geometries with ``when(geom)`` true.
        ``end``: ``"default"`` (a learnable scale online, a BN offline, as ``scaling``
        says) or ``"none"``: the branch ends with neither in both modes (QARepVGG's
        1x1 and identity; ``init`` then does not apply)."""
        if self._stages is not None:
            raise RegistrationError(f"block {self.name!r} is stacked; it has no branches of its own")
        if name is not None:
            check_name(name, f"block {self.name!r}")
        if when is not None and not callable(when):
            raise RegistrationError(f"block {self.name!r}: when= needs a callable predicate")
        check_choice("end", end, BRANCH_ENDS, owner=f"block {self.name!r}", error=RegistrationError)
        self._branches.append(BranchSpec(as_branch(branch), name, float(init), bool(optional), when, end))
        return self

    def requires(self, predicate: Callable[[ConvSpec], bool], reason: str) -> "BlockConfig":
        """Only convs with ``predicate(geom)`` true get this block; others are left as
        they are and the transform reports ``reason``."""
        if not callable(predicate):
            raise RegistrationError(f"block {self.name!r}: requires() needs a callable predicate")
        self._requires.append((predicate, str(reason)))
        return self

    def scaling(self, kind: str | None) -> "BlockConfig":
        """Fix the branch scaling (``"vector"``, ``"scalar"``, ``"none"``) whatever the
        transform asks for; ``None`` (the default) follows the transform's option."""
        check_choice("scaling", kind, SCALINGS, owner=f"block {self.name!r}", allow_none=True, error=RegistrationError)
        self._scaling = kind
        return self

    def bias(self, enabled: bool | None) -> "BlockConfig":
        """A learnable bias after the branch sum: ``None`` (default) exactly when the
        conv needs one (it has a bias and no BN follows), or always/never."""
        self._bias = enabled
        return self

    def weight_init(self, kind: str | None) -> "BlockConfig":
        """How fresh branch weights are drawn: ``"torch"`` (as ``nn.Conv*d``,
        U(+-1/sqrt(fan_in))), ``"kaiming"`` (``kaiming_uniform_(a=0)``, U(+-sqrt(6/fan_in)),
        the official OREPA code) or ``None`` (default: the enclosing block's style, else
        ``"torch"``). Identity/zero-initialised weights are not affected."""
        check_choice("weight_init", kind, WEIGHT_INITS, owner=f"block {self.name!r}", allow_none=True,
                     error=RegistrationError)
        self._weight_init = kind
        return self

    def describe(self, text: str) -> "BlockConfig":
        """A one-line description (shown in ``repr``)."""
        self._doc = str(text)
        return self

    def stacked(self, stages: StagePlan) -> "BlockConfig":
        """Declare the block as a sequence of blocks whose kernels compose exactly:
        ``stages(geom)`` returns ``(stage geometry, BlockConfig)`` pairs, the first
        reading the conv's input, the last producing its output (OREPA's linear deep
        stem: stacked 3x3 blocks, padding in the first, stride in the last). The
        stages are modules ``stage0``, ``stage1``, ..."""
        if self._branches:
            raise RegistrationError(f"block {self.name!r} has branches; a stacked block has none")
        if not callable(stages):
            raise RegistrationError(f"block {self.name!r}: stacked() needs a callable geom -> stages")
        self._stages = stages
        return self

    def accelerate(self, accelerator: KernelAccelerator) -> "BlockConfig":
        """Attach a hand-written kernel generator, used for built expressions it
        :meth:`~repcompiler.blocks.accel.KernelAccelerator.matches` (first match wins)."""
        if not isinstance(accelerator, KernelAccelerator):
            raise RegistrationError(f"block {self.name!r}: accelerate() needs a KernelAccelerator, "
                                    f"got {type(accelerator).__name__}")
        self._accelerators.append(accelerator)
        return self

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> "BlockConfig":
        """The declarative form::

            BlockConfig.from_dict({
                "name": "cross",
                "description": "kxk + 1x3 + 3x1 + dilated 3x3",
                "branches": [
                    "kxk",
                    {"kernel_size": (1, 3)},
                    {"kernel_size": (3, 1)},
                    {"kernel_size": 3, "dilation": 2, "init": 0.5, "name": "dilated"},
                    {"branch": "identity", "optional": True},
                ],
                "scaling": None,        # optional
            }).register()

        A branch is an alias string, a :class:`Branch`, a callable ``geom -> Expr``, or
        a dict: ``branch`` (any of those) or the :meth:`Branch.conv` keywords
        ``kernel_size``/``dilation``/``groups``, plus ``name``, ``init``, ``optional`` and ``end``."""
        known = {"name", "description", "branches", "scaling", "bias", "requires"}
        unknown = set(spec) - known
        if unknown:
            raise RegistrationError(f"BlockConfig.from_dict: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        if "name" not in spec or not spec.get("branches"):
            raise RegistrationError("BlockConfig.from_dict needs a 'name' and a non-empty 'branches' list")
        cfg = cls(spec["name"])
        if spec.get("description"):
            cfg.describe(spec["description"])
        for item in spec["branches"]:
            if isinstance(item, dict):
                item = dict(item)
                init, optional = float(item.pop("init", 1.0)), bool(item.pop("optional", False))
                name, end = item.pop("name", None), item.pop("end", "default")
                if "branch" in item:
                    b = item.pop("branch")
                else:
                    b = Branch.conv(item.pop("kernel_size", None), dilation=item.pop("dilation", 1),
                                    groups=item.pop("groups", None))
                if item:
                    raise RegistrationError(f"block {cfg.name!r}: unknown branch keys {sorted(item)}")
                cfg.branch(b, name=name, init=init, optional=optional, end=end)
            else:
                cfg.branch(item)
        if "scaling" in spec:
            cfg.scaling(spec["scaling"])
        if "bias" in spec:
            cfg.bias(spec["bias"])
        for pred, reason in spec.get("requires", ()):
            cfg.requires(pred, reason)
        return cfg

    # -- use --------------------------------------------------------------------------
    @property
    def branches(self) -> list[Branch]:
        return [b.branch for b in self._branches]

    def build(self, geom: ConvSpec, *, mode: str = "online", scaling: str = "vector") -> A.Expr:
        """Build the block for ``geom`` (fresh parameters): a
        :class:`~repcompiler.blocks.named.BlockExpr` (a
        :class:`~repcompiler.blocks.named.StackExpr` for a stacked block)."""
        with weight_init_scope(self._weight_init):
            return self._build(geom, mode, scaling)

    def _build(self, geom: ConvSpec, mode: str, scaling: str) -> A.Expr:
        check_choice("mode", mode, MODES, owner=f"block {self.name!r}")
        scaling = self._scaling or scaling
        check_choice("scaling", scaling, SCALINGS, owner=f"block {self.name!r}")
        if not self._branches and self._stages is None:
            raise RegistrationError(f"block {self.name!r} has no branches")
        for pred, reason in self._requires:
            if not pred(geom):
                raise UnsupportedError(f"block {self.name!r} does not apply to {geom.describe()}: {reason}")
        if self._stages is not None:
            stages = [cfg.build(g, mode=mode, scaling=scaling) for g, cfg in self._stages(geom)]
            return self._attach(StackExpr(stages, block=self.name), mode)
        pairs: list[tuple[str, A.Expr]] = []
        taken = {b.name for b in self._branches if b.name}
        for entry in self._branches:
            if entry.when is not None and not entry.when(geom):
                continue
            try:
                parts = entry.branch.build_parts(geom, mode, scaling)
                name = entry.name or fresh_name(entry.branch.default_name(geom), taken.__contains__, first=2)
            except UnsupportedError as exc:
                if entry.optional:
                    log.debug("block %s: optional branch %r dropped for %s (%s)", self.name, entry.branch,
                              geom.describe(), exc)
                    continue
                raise UnsupportedError(f"block {self.name!r}, branch {entry.branch!r}: {exc}") from None
            taken.add(name)
            end = branch_end(geom.out_channels, geom.dims, entry.init, mode,
                             scaling) if entry.end == "default" else {}
            pairs.append((name, BranchExpr(parts, **end)))
        if not pairs:
            raise UnsupportedError(f"block {self.name!r}: no branch applies to {geom.describe()}")
        need_bias = self._bias if self._bias is not None else geom.bias
        bias = torch.nn.Parameter(torch.zeros(geom.out_channels)) if need_bias else None
        return self._attach(BlockExpr(pairs, bias=bias, block=self.name), mode)

    def _attach(self, expr: BlockExpr | StackExpr, mode: str) -> A.Expr:
        if mode == "online":
            for acc in self._accelerators:
                if acc.matches(expr):
                    acc.prepare(expr)
                    expr.accelerator = acc
                    break
        return expr

    def __call__(self, geom: ConvSpec, *, mode: str = "online", scaling: str = "vector") -> A.Expr:
        return self.build(geom, mode=mode, scaling=scaling)

    def register(self, *, override: bool = False, validate: bool = True) -> "BlockConfig":
        """Register under :attr:`name` (raises :class:`RegistrationError` if the name is
        taken, unless ``override``). Returns ``self``.

        ``validate`` first builds the block (both modes) for a few common convs (see
        :meth:`validate`). The full proof is :meth:`check`."""
        if not self._branches and self._stages is None:
            raise RegistrationError(f"block {self.name!r} has no branches; add some with .branch(...)")
        if validate:
            self.validate()
        register_block(self.name, self.build, override=override)
        return self

    def validate(self) -> None:
        """Build the block (both modes) for 2-d 3x3 and 1x1, 1-d, 3-d, strided and
        grouped convs: a geometry the block declines (``UnsupportedError``) is fine, but
        any other error, an expression without the conv's geometry or one that does not
        fold exactly raises :class:`RegistrationError`."""

        def g(cin: int, cout: int, k: int, dims: int, s: int = 1, groups: int = 1) -> ConvSpec:
            return ConvGeometry(cin, cout, (k,) * dims, (s,) * dims, ((k // 2, k // 2),) * dims, (1,) * dims,
                                groups, dims, False)

        samples = [g(4, 4, 3, 2), g(4, 8, 1, 2), g(4, 8, 3, 2, s=2), g(4, 8, 3, 2, groups=2), g(2, 2, 5, 1),
                   g(2, 2, 3, 3)]
        for geom in samples:
            for mode in MODES:
                try:
                    expr = self.build(geom, mode=mode)
                    check_geometry(expr, geom, f"block {self.name!r}")
                    reasons = expr.exactness().reasons
                except UnsupportedError:
                    continue
                except Exception as exc:  # broad on purpose: user branch code; re-raised naming the block
                    raise RegistrationError(
                        f"block {self.name!r} failed to build for {geom.describe()} ({mode}): "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                if reasons:
                    raise RegistrationError(
                        f"block {self.name!r} does not fold exactly for {geom.describe()} ({mode}): "
                        + "; ".join(reasons)
                    )

    def __repr__(self) -> str:
        lines = [f"BlockConfig({self.name!r}{', ' + repr(self._doc) if self._doc else ''})"]
        for e in self._branches:
            lines.append(f"  + {(e.name + ': ') if e.name else ''}{e.branch!r} "
                         f"(init {e.init:g}{', optional' if e.optional else ''}"
                         f"{', no scale/BN at its end' if e.end == 'none' else ''})")
        if self._stages is not None:
            lines.append("  stacked")
        for _, reason in self._requires:
            lines.append(f"  requires: {reason}")
        for acc in self._accelerators:
            lines.append(f"  accelerated by {acc!r}")
        return "\n".join(lines)
