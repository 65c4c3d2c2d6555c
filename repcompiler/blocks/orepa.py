"""The OREPA blocks (arXiv 2204.00826), declared with the public ``BlockConfig`` API.

``orepa`` (any kxk, k >= 2 in some dim; 1-d/2-d/3-d; grouped, depthwise, strided,
dilated, asymmetric, any padding) - six branches, each ending in a learnable scale
(online) or a BN (offline), summed:

=============  ==============================================  ==========  ===============================
 branch         computes                                        scale init  removed by
=============  ==============================================  ==========  ===============================
 ``origin``     kxk                                             0.25
 ``avg``        1x1 -> kxk average                              0.25
 ``prior``      1x1 -> fixed frequency prior (per channel)      0.0         ``prior=None`` (Tab. 2)
 ``pw_kxk``     1x1 (identity-initialised) -> kxk               0.5         ``pw_kxk=False``
 ``pointwise``  1x1 zero-padded to kxk (centre tap)             1.0         ``pointwise=False``
 ``dw_pw``      depthwise kxk (multiplier 8) -> pointwise 1x1   0.5         ``depthwise_separable=False``
                                                                            (Tab. 2)
=============  ==============================================  ==========  ===============================

The paper's Tab. 2 components and their switches (each ablates exactly its component):
frequency prior ``prior=None``; linear depthwise separable ``depthwise_separable=False``;
"Rep 1x1" (``orepa_1x1`` for 1x1 convs) ``reparam_1x1=False`` - a policy option of
:func:`~repcompiler.transforms.orepa.orepa_transform` that leaves 1x1 convs plain; linear deep
stem ``deep_stem=False``. ``pw_kxk=False`` (the 1x1 -> kxk branch, a DBB base branch)
and ``pointwise=False`` are structural options, not Tab. 2 components.

Initialisation, ``weight_init="official"`` (default) as the official code: every random
branch weight ``kaiming_uniform_(a=0)`` (U(+-sqrt(6/fan_in))); the first 1x1 of
``pw_kxk`` is ``identity + weight`` (the weight starting at zero, so weight decay acts on
the delta) at every width: ``in_channels`` wide when ``groups <= 4``, else
``2 * in_channels`` wide with the identity stacked twice (row ``i`` reads input channel
``i % (in/groups)``). ``weight_init="repcompiler"`` (this library's own style) draws
the random weights as ``nn.Conv*d`` does (U(+-1/sqrt(fan_in)), sqrt(6) smaller) and
kaiming-initialises the 2C-wide first 1x1 instead of stacking the identity.

Conditioning: the official initialisation draws larger branch weights than
``nn.Conv*d`` (the ``pointwise`` branch of a depthwise conv has fan-in 1: U(+-sqrt(6)) at
scale 1.0), so an untrained model evaluated with BN statistics that do not match its
activations (e.g. random ones) rounds somewhat more in float32 than the plain model;
``weight_init="repcompiler"`` draws the random weights as ``nn.Conv*d`` does. The
official code initialises the same way. (Measured figures: ``docs/paper.md``.)

The prior: ``prior="dct"`` (default) is the DCT-II basis for any kernel
(:func:`~repcompiler.blocks.prior.frequency_prior`, no all-zero channel);
``prior="official"`` the official 1-d 3x3 prior (2-d 3x3 convs only; other convs are
refused); ``prior=None`` removes the branch.

``orepa_1x1`` (1x1 convs): ``origin`` 1x1 (scale 1.0) + ``pw_pw``: 1x1 -> 1x1 (scale
0.5). Official (default), as ``OREPA_1x1``: every random weight ``kaiming_uniform_(a=1)``
(U(+-sqrt(3/fan_in))); ``pw_pw`` is, for ``out > in``, a learnable ``in x in`` 1x1 that
starts as the identity, then a random ``out x in`` 1x1; otherwise a random ``out x in``
1x1, then a learnable ``out x out`` 1x1 that starts as the identity (the identity
factors are plain weights, as the official code's: weight decay pulls them toward
zero). ``weight_init="repcompiler"``: ``in``-wide ``identity + weight`` in front,
``nn.Conv*d`` init.

``orepa_large`` (the "linear deep stem", all kernel dims odd, some >= 5): stages
``stage0``, ``stage1``, ... - ``(k-1)/2`` stacked 3x3 OREPA blocks whose kernels compose
exactly (a true convolution of kernels): the first carries the padding, the last the
stride, the ones between have no padding, so the stack equals its folded kernel
everywhere, borders included. ``deep_stem=False`` (Tab. 2) builds the plain ``orepa``
block for the large kernel instead. The ``orepa`` options pass through to its stages.

``orepa_vgg`` (OREPA-VGG, the paper's Sec. 4.4). ``form="official"`` (default) as the
official ``RepVGGBlock_OREPA``: a five-branch OREPA kxk (no ``pointwise`` branch; scales
0.25/0.25/0/0.5/0.5; ``kaiming_uniform_(a=1)``; internal width ``in`` unless
``groups >= out``) **online** with its own BN, plus a 1x1 conv + BN and, when
``in == out`` and stride 1, an identity BN, both run **on the feature map**; summed (a
:class:`~repcompiler.online.conv.HybridExpr`, wrapped by the transform in a
:class:`~repcompiler.online.conv.HybridBlock`). The official block has no BN after the sum:
``orepa_transform(model, block="orepa_vgg", post_bn=False)``; with ``post_bn=True`` a BN
follows the sum (the model's own or an inserted one). Deployed: one conv.
``form="online"`` (an option, not the official form): everything folded into one
online conv per forward - branches ``orepa`` (the nested six-branch OREPA block),
``pointwise`` (1x1) and ``identity``, each ending in a scale; the nested block's own
1x1 branch duplicates ``pointwise``. In offline mode every branch ends in a BN (the
``form="online"`` declaration built offline).

Speed: the generic fold is the reference for deploy and checks. Online training uses
the accelerators attached to the declarations (:mod:`.orepa_accel`), which find the
branches by name and check their shapes; an ``orepa`` block without some of its
optional branches keeps its accelerator (the missing branches enter as zeros).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch
from torch import nn

from .. import algebra as A
from ..algebra import ConvSpec
from ..errors import check_choice
from .branch import Branch
from .config import BlockConfig
from .orepa_accel import NestedAccelerator, Orepa1x1Accelerator, OrepaAccelerator, StackAccelerator
from .prior import PRIORS, frequency_prior, official_prior

__all__ = ["orepa_config", "orepa_1x1_config", "orepa_large_config", "orepa_vgg_config", "build_orepa",
           "build_orepa_1x1", "build_orepa_large", "build_orepa_vgg", "OREPA_SCALE_INIT", "OREPA_VGG_SCALE_INIT",
           "EXPAND_RATIO", "OREPA_BRANCHES", "WEIGHT_INIT_STYLES", "VGG_FORMS"]

OREPA_BRANCHES = ("origin", "avg", "prior", "pw_kxk", "pointwise", "dw_pw")
OREPA_SCALE_INIT = (0.25, 0.25, 0.0, 0.5, 1.0, 0.5)
#: OREPA-VGG's kxk (official ``OREPA_3x3_RepVGG``): no 1x1 branch (its entry is unused)
OREPA_VGG_SCALE_INIT = (0.25, 0.25, 0.0, 0.5, 0.0, 0.5)
ORIGIN_1X1_SCALE_INIT = (1.0, 0.5)
EXPAND_RATIO = 8
#: ``weight_init`` of the OREPA blocks: the official code's initialisation (default) or
#: this library's own style (see the module docstring for the differences)
WEIGHT_INIT_STYLES = ("official", "repcompiler")


def _style(weight_init: str, block: str, official: str = "kaiming") -> str:
    check_choice("weight_init", weight_init, WEIGHT_INIT_STYLES, owner=f"block {block!r}")
    return official if weight_init == "official" else "torch"


def _prior_fn(prior: str | None) -> Callable[[ConvSpec], torch.Tensor]:
    if prior == "official":
        return lambda g: official_prior(g.in_channels, g.kernel_size)
    return lambda g: frequency_prior(g.in_channels, g.kernel_size)


def orepa_config(*, expand_ratio: int = EXPAND_RATIO, internal_channels: int | None = None,
                 scale_init: tuple[float, ...] = OREPA_SCALE_INIT, weight_init: str = "official",
                 prior: str | None = "dct", depthwise_separable: bool = True,
                 pw_kxk: bool = True, pointwise: bool = True, vgg: bool = False) -> BlockConfig:
    """The declaration of the OREPA kxk block (see the module docstring for the options).

    ``vgg=True``: OREPA-VGG's kxk as the official ``OREPA_3x3_RepVGG`` builds it
    (``kaiming_uniform_(a=1)`` weights, internal width ``in`` unless ``groups >= out``,
    then ``2 * in`` with a random first 1x1); the 1x1 branch is then left out with
    ``pointwise=False``."""
    s = tuple(scale_init)
    style = _style(weight_init, "orepa", "kaiming_a1" if vgg else "kaiming")
    check_choice("prior", prior, PRIORS, owner="block 'orepa'")

    def width(g: ConvSpec) -> int:
        if internal_channels:
            return internal_channels
        if vgg:
            return g.in_channels if g.groups < g.out_channels else 2 * g.in_channels
        return g.in_channels if g.groups <= 4 else 2 * g.in_channels

    def init(g: ConvSpec) -> str:
        if width(g) == g.in_channels:
            return "residual"
        return "residual" if style == "kaiming" else "random"

    cfg = (
        BlockConfig("orepa")
        .describe("OREPA kxk: origin, 1x1->avg, 1x1->prior, 1x1->kxk, 1x1, depthwise->pointwise")
        .requires(lambda g: not g.is_pointwise_kernel, "needs a kernel larger than 1 in some dim; use orepa_1x1")
        .weight_init(style)
        .branch(Branch.conv(), name="origin", init=s[0])
        .branch(Branch.pointwise(lambda g: g.out_channels) >> Branch.avg(), name="avg", init=s[1])
    )
    if prior == "official":
        cfg.requires(lambda g: g.dims == 2 and g.kernel_size == (3, 3),
                     "prior='official' exists for 2-d 3x3 kernels only (the official code's prior)")
    if prior is not None:
        cfg.branch(Branch.pointwise(lambda g: g.out_channels) >> Branch.fixed(_prior_fn(prior)), name="prior",
                   init=s[2])
    if pw_kxk:
        cfg.branch(Branch.pointwise(width, init=init) >> Branch.conv(), name="pw_kxk", init=s[3])
    if pointwise:
        cfg.branch(Branch.pointwise(), name="pointwise", init=s[4])
    if depthwise_separable:
        cfg.branch(Branch.depthwise(int(expand_ratio)) >> Branch.pointwise(), name="dw_pw", init=s[5])
    return cfg.accelerate(OrepaAccelerator())


def orepa_1x1_config(*, scale_init: tuple[float, float] = ORIGIN_1X1_SCALE_INIT,
                     weight_init: str = "official") -> BlockConfig:
    """OREPA's block for 1x1 convs (any stride/groups/dims; see the module docstring)."""
    style = _style(weight_init, "orepa_1x1", "kaiming_a1")
    cfg = (
        BlockConfig("orepa_1x1")
        .describe("OREPA 1x1: origin + 1x1 -> 1x1 (one factor identity-initialised)")
        .requires(lambda g: g.is_pointwise_kernel, "needs a 1x1 kernel")
        .weight_init(style)
        .branch(Branch.conv(), name="origin", init=scale_init[0])
    )
    if style == "torch":  # the "repcompiler" style: identity (+ weight) in front, always in wide
        cfg.branch(Branch.pointwise(init="residual") >> Branch.conv(), name="pw_pw", init=scale_init[1])
    else:
        # official: out > in: identity (in x in) -> random (out x in); else random (out x in) -> identity (out x out)
        cfg.branch(Branch.pointwise(init="identity") >> Branch.conv(), name="pw_pw", init=scale_init[1],
                   when=lambda g: g.out_channels > g.in_channels)
        cfg.branch(Branch.pointwise(lambda g: g.out_channels) >> Branch.pointwise(init="identity"), name="pw_pw",
                   init=scale_init[1], when=lambda g: g.out_channels <= g.in_channels)
    return cfg.accelerate(Orepa1x1Accelerator())


def orepa_large_config(*, internal_channels: int | None = None, deep_stem: bool = True,
                       **orepa_options: Any) -> BlockConfig:
    """The linear deep stem for a large odd kernel (e.g. a 7x7 stem conv):
    ``(k-1)/2`` stacked 3x3 OREPA blocks (per dim: 3 while that dim still grows, else
    1), padding in the first, stride in the last. ``deep_stem=False``: the plain
    ``orepa`` block instead (the paper's Tab. 2 ablation)."""
    kxk = orepa_config(**orepa_options)
    if not deep_stem:
        return kxk
    one = orepa_1x1_config(weight_init=orepa_options.get("weight_init", "official"))

    def stages(geom: ConvSpec) -> list[tuple[ConvSpec, BlockConfig]]:
        ks, d = geom.kernel_size, geom.dims
        n, m = (max(ks) - 1) // 2, internal_channels or geom.out_channels
        out = []
        for i in range(n):
            sub = tuple(3 if i < (k - 1) // 2 else 1 for k in ks)
            first, last = i == 0, i == n - 1
            sg = ConvSpec(d, geom.in_channels if first else m, geom.out_channels if last else m, sub,
                          geom.stride if last else (1,) * d, geom.padding if first else ((0, 0),) * d,
                          geom.dilation, geom.groups, geom.bias and last)
            out.append((sg, one if all(k == 1 for k in sub) else kxk))
        return out

    return (
        BlockConfig("orepa_large")
        .describe("OREPA linear deep stem: stacked 3x3 OREPA blocks composed into one large kernel")
        .requires(lambda g: all(k % 2 for k in g.kernel_size) and max(g.kernel_size) >= 5,
                  "needs odd kernel sizes with some k >= 5")
        .requires(lambda g: (internal_channels or g.out_channels) % g.groups == 0,
                  "the internal channels must be divisible by groups")
        .stacked(stages)
        .accelerate(StackAccelerator())
    )


def orepa_vgg_config(**orepa_options: Any) -> BlockConfig:
    """OREPA-VGG in its fully online form (``form="online"`` of :func:`build_orepa_vgg`):
    RepVGG's kxk branch replaced by an OREPA kxk block, every branch ending in a scale,
    all folded into one kernel per forward (see the module docstring);
    ``orepa_options`` configure the nested OREPA block."""
    return (
        BlockConfig("orepa_vgg")
        .describe("OREPA-VGG: OREPA kxk + 1x1 (+ identity)")
        .requires(lambda g: not g.is_pointwise_kernel, "needs a kernel larger than 1 in some dim")
        .branch(Branch.block(orepa_config(**orepa_options)), name="orepa")
        .branch(Branch.pointwise(), name="pointwise")
        .branch(Branch.identity(), name="identity", optional=True)
        .accelerate(NestedAccelerator())
    )


#: the forms of ``orepa_vgg``: the official hybrid (default) or everything online
VGG_FORMS = ("official", "online")


def _vgg_feature_map_branches() -> BlockConfig:
    """RepVGG's 1x1 conv + BN and identity BN, run on the feature map (built offline)."""
    return (
        BlockConfig("orepa_vgg")
        .describe("OREPA-VGG's feature-map branches: 1x1 conv + BN, identity BN")
        .bias(False)
        .branch(Branch.pointwise(), name="pointwise")
        .branch(Branch.identity(), name="identity", optional=True)
    )


def build_orepa(geom: ConvSpec, *, mode: str = "online", scaling: str = "vector", expand_ratio: int = EXPAND_RATIO,
                internal_channels: int | None = None, scale_init: tuple[float, ...] = OREPA_SCALE_INIT,
                weight_init: str = "official", prior: str | None = "dct", depthwise_separable: bool = True,
                pw_kxk: bool = True) -> A.Expr:
    """The OREPA block for a kxk conv (the registered ``orepa`` builder)."""
    cfg = orepa_config(expand_ratio=expand_ratio, internal_channels=internal_channels, scale_init=scale_init,
                       weight_init=weight_init, prior=prior, depthwise_separable=depthwise_separable, pw_kxk=pw_kxk)
    return cfg.build(geom, mode=mode, scaling=scaling)


def build_orepa_1x1(geom: ConvSpec, *, mode: str = "online", scaling: str = "vector",
                    scale_init: tuple[float, float] = ORIGIN_1X1_SCALE_INIT, weight_init: str = "official") -> A.Expr:
    """The registered ``orepa_1x1`` builder."""
    return orepa_1x1_config(scale_init=scale_init, weight_init=weight_init).build(geom, mode=mode, scaling=scaling)


def build_orepa_large(geom: ConvSpec, *, mode: str = "online", scaling: str = "vector",
                      internal_channels: int | None = None, deep_stem: bool = True, expand_ratio: int = EXPAND_RATIO,
                      weight_init: str = "official", prior: str | None = "dct", depthwise_separable: bool = True,
                      pw_kxk: bool = True) -> A.Expr:
    """The registered ``orepa_large`` builder (``deep_stem=False``: the plain ``orepa`` block)."""
    cfg = orepa_large_config(internal_channels=internal_channels, deep_stem=deep_stem, expand_ratio=expand_ratio,
                             weight_init=weight_init, prior=prior, depthwise_separable=depthwise_separable,
                             pw_kxk=pw_kxk)
    return cfg.build(geom, mode=mode, scaling=scaling)


def build_orepa_vgg(geom: ConvSpec, *, mode: str = "online", scaling: str = "vector", form: str = "official",
                    expand_ratio: int = EXPAND_RATIO, weight_init: str = "official", prior: str | None = "dct",
                    depthwise_separable: bool = True, pw_kxk: bool = True) -> A.Expr:
    """The registered ``orepa_vgg`` builder.

    ``form="official"`` (default), online mode: a
    :class:`~repcompiler.online.conv.HybridExpr` - the five-branch OREPA kxk (no 1x1 branch;
    scales 0.25/0.25/0/0.5/0.5; ``kaiming_uniform_(a=1)``) online with its own BN, plus
    a 1x1 conv + BN and (``in == out``, stride 1) an identity BN run on the feature map;
    the transform wraps it in a :class:`~repcompiler.online.conv.HybridBlock`.
    ``form="online"``: :func:`orepa_vgg_config` (everything folded into one online conv,
    the nested OREPA block with its own 1x1 branch). Offline mode: every branch on the
    feature map, a BN ending each (the ``form="online"`` declaration built offline)."""
    check_choice("form", form, VGG_FORMS, owner="block 'orepa_vgg'")
    if form == "online" or mode == "offline":
        cfg = orepa_vgg_config(expand_ratio=expand_ratio, weight_init=weight_init, prior=prior,
                               depthwise_separable=depthwise_separable, pw_kxk=pw_kxk)
        return cfg.build(geom, mode=mode, scaling=scaling)
    from ..online.conv import HybridExpr, OnlineConv  # online imports the blocks package

    kxk = orepa_config(expand_ratio=expand_ratio, scale_init=OREPA_VGG_SCALE_INIT, weight_init=weight_init,
                       prior=prior, depthwise_separable=depthwise_separable, pw_kxk=pw_kxk, pointwise=False,
                       vgg=True).bias(False).build(replace(geom, has_bias=False), mode="online", scaling=scaling)
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[geom.dims](geom.out_channels)
    rest = _vgg_feature_map_branches().build(geom, mode="offline")
    return HybridExpr(OnlineConv(kxk, bn, block="orepa"), rest, block="orepa_vgg")
