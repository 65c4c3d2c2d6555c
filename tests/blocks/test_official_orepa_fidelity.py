"""The official OREPA behaviour by default (JUGGHM/OREPA_CVPR2022: ``blocks.py``,
``blocks_repvgg.py``, ``models/resnet.py``, ``convnet_utils.py``), its deviations as
named options.

Initialisation (distributions against the official code's), the paper's OREPA-ResNet
block assignment, the official prior and the prior cache after ``load_state_dict``, the
Tab. 2 component switches, the branch scalings, OREPA-VGG (the official hybrid and the
fully online option)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

import repcompiler as rc
from repcompiler.blocks import ConvGeometry, OrepaAccelerator, ResidualConv, build_block, official_prior
from repcompiler.errors import UnsupportedError
from repcompiler.online.conv import HybridBlock, OnlineConv
from repcompiler.testing import check_block


def geom(cin, cout, k, s=1, groups=1):
    return ConvGeometry(cin, cout, (k, k), (s, s), ((k // 2, k // 2),) * 2, (1, 1), groups)


def assert_uniform(w: torch.Tensor, bound: float, what: str) -> None:
    """``w`` looks like U(-bound, bound): inside the bound, reaching near it, std bound/sqrt(3)."""
    w = w.detach().flatten()
    assert w.abs().max() <= bound * (1 + 1e-6), what
    assert w.abs().max() >= 0.9 * bound, what
    assert abs(w.std().item() / (bound / math.sqrt(3)) - 1) < 0.1, what


def fan_in(w: torch.Tensor) -> int:
    return math.prod(w.shape[1:])


# -- 1. initialisation ----------------------------------------------------------------------


RANDOM_KXK = {
    "origin.weight": lambda b: b.origin.weight,
    "avg.pointwise.weight": lambda b: b.avg.pointwise.weight,
    "prior.pointwise.weight": lambda b: b.prior.pointwise.weight,
    "pw_kxk.weight": lambda b: b.pw_kxk.weight,
    "pointwise.weight": lambda b: b.pointwise.weight,
    "dw_pw.depthwise.weight": lambda b: b.dw_pw.depthwise.weight,
    "dw_pw.pointwise.weight": lambda b: b.dw_pw.pointwise.weight,
}


@pytest.mark.parametrize("init,gain", [("official", math.sqrt(6)), ("repcompiler", 1.0)])
def test_kxk_random_weights_follow_the_chosen_initialisation(init, gain):
    torch.manual_seed(0)
    e = build_block("orepa", geom(64, 96, 3), weight_init=init)
    for name, get in RANDOM_KXK.items():
        w = get(e)
        assert_uniform(w, gain / math.sqrt(fan_in(w)), f"{init}: {name}")


def test_kxk_first_1x1_is_the_identity_plus_a_zero_weight():
    e = build_block("orepa", geom(16, 32, 3, groups=2))
    mixer = e.pw_kxk.pointwise
    assert isinstance(mixer, ResidualConv) and tuple(mixer.weight.shape) == (16, 8, 1, 1)
    assert torch.count_nonzero(mixer.weight) == 0
    ident = mixer.id_weight().reshape(16, 8)
    assert torch.equal(ident, torch.eye(8).repeat(2, 1))  # the grouped identity, as the official id_tensor


@pytest.mark.parametrize("groups", [8, 16])
def test_2c_wide_first_1x1_is_the_official_stacked_identity(groups):
    """groups > 4: the official code widens the first 1x1 to 2C and still starts it as
    its id_tensor (row i reads input channel i % (C/groups)); the library's earlier init
    (weight_init="repcompiler") draws it at random."""
    torch.manual_seed(0)
    C, Cg = 16, 16 // groups
    e = build_block("orepa", geom(C, C, 3, groups=groups))
    mixer = e.pw_kxk.pointwise
    assert isinstance(mixer, ResidualConv) and tuple(mixer.weight.shape) == (2 * C, Cg, 1, 1)
    assert torch.count_nonzero(mixer.weight) == 0
    official = torch.zeros(2 * C, Cg, 1, 1)
    for i in range(2 * C):  # the official code's loop
        official[i, i % Cg, 0, 0] = 1
    assert torch.equal(mixer.id_weight(), official)
    # the branch kernel at init: conv2 applied to the stacked identity (official einsum)
    w2 = e.pw_kxk.weight.detach()
    kernel = torch.einsum("gti,gothw->goihw", official.reshape(groups, 2 * Cg, Cg),
                          w2.reshape(groups, C // groups, 2 * Cg, 3, 3)).reshape(C, Cg, 3, 3)
    got = e.pw_kxk.fold(check=False).weight / e.pw_kxk.scale.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(got.detach(), kernel)
    old = build_block("orepa", geom(C, C, 3, groups=groups), weight_init="repcompiler").pw_kxk.pointwise
    assert not isinstance(old, ResidualConv) and torch.count_nonzero(old.weight) > 0


@pytest.mark.parametrize("cin,cout,groups", [(8, 32, 1), (32, 8, 1), (16, 16, 1), (16, 8, 2), (8, 16, 2)])
def test_1x1_block_is_the_official_orepa_1x1(cin, cout, groups):
    """Official ``OREPA_1x1``: weights ``kaiming_uniform_(a=1)`` (bound sqrt(3/fan_in));
    ``pw_pw`` for out > in: a learnable identity (in x in) then a random out x in 1x1;
    otherwise a random out x in 1x1 then a learnable identity (out x out)."""
    torch.manual_seed(0)
    g = ConvGeometry(cin, cout, (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), groups)
    e = build_block("orepa_1x1", g)
    first, last = e.pw_pw.parts.values()
    Cg = cin // groups
    if cout > cin:
        assert tuple(first.weight.shape) == (cin, Cg, 1, 1) and tuple(last.weight.shape) == (cout, Cg, 1, 1)
        ident, rand = first.weight, last.weight
    else:
        assert tuple(first.weight.shape) == (cout, Cg, 1, 1)
        assert tuple(last.weight.shape) == (cout, cout // groups, 1, 1)
        ident, rand = last.weight, first.weight
    rows, cols = ident.shape[:2]
    assert isinstance(ident, nn.Parameter) and torch.equal(ident.reshape(rows, cols)[:cols], torch.eye(cols))
    assert all(isinstance(p, nn.Parameter) for p in (first.weight, last.weight))
    for w in (e.origin.weight, rand):
        assert w.abs().max() <= math.sqrt(3 / fan_in(w))
    big = build_block("orepa_1x1", ConvGeometry(256, 128, (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1)))
    for w in (big.origin.weight, list(big.pw_pw.parts.values())[0].weight):
        assert_uniform(w, math.sqrt(3 / fan_in(w)), "orepa_1x1")
    # at init the branch reads every input channel (no truncated identity in front)
    k = big.pw_pw.fold(check=False).weight.reshape(128, 256)
    assert (k.abs().sum(0) > 0).all()
    old = build_block("orepa_1x1", g, weight_init="repcompiler").pw_pw.pointwise
    assert isinstance(old, ResidualConv) and tuple(old.weight.shape) == (cin, Cg, 1, 1)


def test_weight_init_is_checked():
    with pytest.raises(UnsupportedError, match="weight_init"):
        build_block("orepa", geom(4, 4, 3), weight_init="xavier")


# -- 2. the paper's OREPA-ResNet ------------------------------------------------------------


def official_assignment(model: torchvision.models.ResNet) -> dict[str, str | None]:
    """The official OREPA-ResNet: stem -> large conv, 3x3 -> OREPA, bottleneck 1x1s and
    the bottleneck's projection shortcut -> OREPA_1x1, the basic block's projection
    shortcut -> plain conv+BN (None)."""
    want: dict[str, str | None] = {"conv1": "orepa_large"}
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        for i, blk in enumerate(getattr(model, lname)):
            p = f"{lname}.{i}."
            if isinstance(blk, torchvision.models.resnet.Bottleneck):
                want.update({p + "conv1": "orepa_1x1", p + "conv2": "orepa", p + "conv3": "orepa_1x1"})
            else:
                want.update({p + "conv1": "orepa", p + "conv2": "orepa"})
            if blk.downsample is not None:  # Bottleneck: conv_bn -> OREPA_1x1; BasicBlock: ConvBN
                bottleneck = isinstance(blk, torchvision.models.resnet.Bottleneck)
                want[p + "downsample.0"] = "orepa_1x1" if bottleneck else None
    return want


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_default_policy_is_the_official_orepa_resnet(arch):
    plain = getattr(torchvision.models, arch)(num_classes=10)
    out, rep = rc.orepa_transform(plain, return_report=True)
    got = {n: (m.block if isinstance(m, OnlineConv) else None) for n, m in out.named_modules()
           if isinstance(m, (OnlineConv, nn.Conv2d))}
    assert got == official_assignment(plain)
    kept = {e.name for e in rep.by_action("kept")}
    assert kept == {n for n, b in got.items() if b is None} and all("shortcut" in e.reason for e in rep.by_action("kept"))
    for name in kept:  # the shortcut stays conv + its BN
        assert isinstance(out.get_submodule(name[:-1] + "1"), nn.BatchNorm2d)


def test_policy_all_keeps_every_1x1_and_first_conv_stem():
    out = rc.orepa_transform(torchvision.models.resnet18(num_classes=10), policy="all")
    assert out.layer2[0].downsample[0].block == "orepa_1x1" and out.conv1.block == "orepa_large"


class Residual(nn.Module):
    """A residual net with unconventional names: ``proj`` is a shortcut 1x1, ``mix`` a
    conv on the main path whose output is added (a 3x3: a basic block; a 1x1: a
    bottleneck), ``big`` a 7x7 that is not the first conv."""

    def __init__(self, mix_kernel: int = 3) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.b0 = nn.BatchNorm2d(8)
        self.big = nn.Conv2d(8, 8, 7, padding=3, bias=False)
        self.mix = nn.Conv2d(8, 16, mix_kernel, padding=mix_kernel // 2, bias=False)
        self.bm = nn.BatchNorm2d(16)
        self.proj = nn.Conv2d(8, 16, 1, bias=False)
        self.bp = nn.BatchNorm2d(16)

    def forward(self, x):
        x = F.relu(self.b0(self.c0(x)))
        return F.relu(self.bm(self.mix(F.relu(self.big(x)))) + self.bp(self.proj(x)))


def test_shortcut_found_by_the_graph_and_large_kernels_anywhere():
    torch.manual_seed(0)
    m = Residual()
    out, rep = rc.orepa_transform(m, return_report=True)
    assert isinstance(out.proj, nn.Conv2d) and out.mix.block == "orepa" and out.big.block == "orepa_large"
    assert out.c0.block == "orepa"
    bottleneck = rc.orepa_transform(Residual(mix_kernel=1))
    assert bottleneck.proj.block == "orepa_1x1" and bottleneck.mix.block == "orepa_1x1"
    old = rc.orepa_transform(m, policy="all")
    assert old.proj.block == "orepa_1x1" and old.big.block == "orepa"
    # the kept shortcut deploys with the rest, exactly
    out = out.double()
    rc.testing.randomize_module(out, torch.Generator().manual_seed(1))
    out.eval()
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    dep = rc.deploy(out)
    with torch.no_grad():
        torch.testing.assert_close(dep(x), out(x), rtol=1e-9, atol=1e-9)


def test_bad_policy_and_block_options():
    m = Residual()
    with pytest.raises(UnsupportedError, match="policy"):
        rc.orepa_transform(m, policy="official")
    with pytest.raises(UnsupportedError, match="priors"):
        rc.orepa_transform(m, block_options={"priors": None})
    with pytest.raises(UnsupportedError, match="mode"):
        rc.orepa_transform(m, block_options={"mode": "offline"})


# -- 3. the frequency prior -----------------------------------------------------------------


def test_official_prior_is_the_official_code_formula():
    for O in (6, 7, 12):
        ref = torch.zeros(O, 3, 3, dtype=torch.float64)
        half = O / 2
        for i in range(O):  # the official fre_init loop
            for h in range(3):
                for w in range(3):
                    ref[i, h, w] = (math.cos(math.pi * (h + 0.5) * (i + 1) / 3) if i < half
                                    else math.cos(math.pi * (w + 0.5) * (i + 1 - half) / 3))
        torch.testing.assert_close(official_prior(O, (3, 3), torch.float64), ref)
    zero = (official_prior(12, (3, 3)).abs().amax((1, 2)) < 1e-6).sum()
    assert zero == 2  # its known flaw: frequency 3 (mod 6) channels are all zero (the DCT default has none)
    with pytest.raises(ValueError):
        official_prior(4, (5, 5))


def test_prior_option_selects_the_pattern():
    g = geom(4, 12, 3)
    torch.testing.assert_close(build_block("orepa", g, prior="official").prior.pattern.weight.reshape(12, 3, 3),
                               official_prior(12, (3, 3)))
    dct = build_block("orepa", g).prior.pattern.weight
    assert (dct.abs().flatten(1).amax(1) > 0.1).all()
    with pytest.raises(UnsupportedError, match="3x3"):
        build_block("orepa", geom(4, 4, 5), prior="official")


def test_prior_cache_follows_load_state_dict():
    """The online kernel caches the fixed patterns; loading a state dict with another
    prior (same keys) must reach the next online forward, as it reaches deploy."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12))
    a = rc.orepa_transform(net).double()
    b = rc.orepa_transform(net, block_options={"prior": "official"}).double()
    for m in (a, b):
        rc.testing.randomize_module(m, torch.Generator().manual_seed(3))
        m.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        a(x)  # fills the cache with the DCT prior
        a.load_state_dict(b.state_dict())
        assert torch.equal(a[0].branches.prior.pattern.weight, b[0].branches.prior.pattern.weight)
        torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a(x), rc.deploy(a)(x), rtol=1e-9, atol=1e-9)
        a[0].branches.prior.pattern.weight.mul_(2.0)  # any in-place edit of the buffer is seen too
        torch.testing.assert_close(a(x), rc.deploy(a)(x), rtol=1e-9, atol=1e-9)


# -- 4. the component switches (Tab. 2) -----------------------------------------------------

FULL = ("origin", "avg", "prior", "pw_kxk", "pointwise", "dw_pw")
# the kxk block's branch switches: two Tab. 2 components (frequency prior, linear
# depthwise separable) and the 1x1 -> kxk branch (a structural option, not in Tab. 2)
SWITCHES = [({"prior": None}, "prior"), ({"depthwise_separable": False}, "dw_pw"), ({"pw_kxk": False}, "pw_kxk")]


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("switch,removed", SWITCHES)
def test_each_switch_removes_exactly_its_branch(switch, removed):
    g = geom(8, 16, 3, s=2)
    full, cut = build_block("orepa", g), build_block("orepa", g, **switch)
    assert tuple(cut.branches) == tuple(b for b in FULL if b != removed)
    assert n_params(full) - n_params(cut) == n_params(full.branches[removed])
    # the accelerator keeps matching (the missing branch enters as zeros): kernel and
    # gradients equal the generic fold's, in float64
    assert isinstance(cut.accelerator, OrepaAccelerator)
    cut.double()
    rc.testing.randomize_module(cut, torch.Generator().manual_seed(0), buffers=False)
    k1, k2 = cut.fast_fold().weight, cut.fold(check=False).weight
    torch.testing.assert_close(k1, k2, rtol=1e-12, atol=1e-12)
    params = list(cut.parameters())
    g1 = torch.autograd.grad((k1 * k1.detach().cos()).sum(), params)
    g2 = torch.autograd.grad((k2 * k2.detach().cos()).sum(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(cut(x), cut.fold(check=False).apply(x), rtol=1e-10, atol=1e-10)


def small_resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False), nn.BatchNorm2d(16))


@pytest.mark.parametrize("switch,removed", SWITCHES + [({"deep_stem": False}, "stage0")])
def test_switches_through_the_transform_deploy_exactly(switch, removed):
    torch.manual_seed(0)
    full = rc.orepa_transform(small_resnet())
    cut = rc.orepa_transform(small_resnet(), block_options=switch).double()
    names = {n.split(".")[2] for n, _ in cut.named_parameters() if ".branches." in n}
    assert removed not in names and removed in {n.split(".")[2] for n, _ in full.named_parameters() if ".branches." in n}
    if removed == "stage0":  # the stem is one plain orepa block
        assert tuple(cut[0].branches.branches) == FULL and cut[0].block == "orepa_large"
        assert n_params(cut[0]) < n_params(full[0])
    else:
        for i in (0, 3, 6):
            stages = cut[i].branches.terms if removed != "stage0" and i == 0 else [cut[i].branches]
            assert all(removed not in s.branches for s in stages)
    rc.testing.randomize_module(cut, torch.Generator().manual_seed(1))
    cut.eval()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rc.deploy(cut)(x), cut(x), rtol=1e-9, atol=1e-9)
    assert sum(isinstance(m, nn.Conv2d) for m in rc.deploy(cut).modules()) == 3


def test_rep_1x1_switch_leaves_exactly_the_1x1_convs_plain():
    """Tab. 2's "Rep 1x1" is OREPA_1x1 on the 1x1 convs: ``reparam_1x1=False`` keeps every
    1x1 conv a plain conv + BN and changes nothing else (the kxk blocks keep all their
    branches, including the 1x1 -> kxk one)."""
    from torchvision.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    plain = ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10)  # ResNet-50's structure, one block per stage
    convs_1x1 = {n for n, m in plain.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)}
    full, rep_full = rc.orepa_transform(plain, return_report=True)
    cut, rep_cut = rc.orepa_transform(plain, block_options={"reparam_1x1": False}, return_report=True)
    blocks = {e.name: e.details.get("block") for e in rep_full.entries}
    blocks_cut = {e.name: e.details.get("block") for e in rep_cut.entries}
    changed = {n for n in blocks if blocks[n] != blocks_cut[n]}
    assert changed == {n for n, b in blocks.items() if b == "orepa_1x1"} == convs_1x1 and len(changed) == 12
    assert all(blocks_cut[n] is None and isinstance(cut.get_submodule(n), nn.Conv2d) for n in changed)
    assert all("reparam_1x1=False" in e.reason for e in rep_cut.by_action("kept"))
    assert tuple(cut.layer1[0].conv2.branches.branches) == FULL
    cut = cut.double()
    rc.testing.randomize_module(cut, torch.Generator().manual_seed(1))
    cut.eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(rc.deploy(cut)(x), cut(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("options", [{}, {"prior": None}, {"depthwise_separable": False}, {"pw_kxk": False},
                                     {"prior": "official"}, {"weight_init": "repcompiler"}])
def test_check_block_on_orepa_configurations(options):
    ks = 3 if options.get("prior") == "official" else None
    check_block("orepa", max_examples=6, derandomize=True, use_deploy=False, dims=(2,), kernel_size=ks,
                options=options)


def test_check_block_on_1x1_large_and_vgg():
    check_block("orepa_1x1", max_examples=8, derandomize=True, use_deploy=False)
    check_block("orepa_large", max_examples=4, derandomize=True, use_deploy=False, kernel_size=5, dims=(2,),
                options={"deep_stem": False})
    check_block("orepa_vgg", max_examples=6, derandomize=True, use_deploy=False, dims=(2,),
                options={"form": "online"})


# -- 5. OREPA-VGG -----------------------------------------------------------------------------


def plain_vgg() -> nn.Module:
    layers, cin = [], 3
    for cout, s in ((8, 1), (8, 1), (16, 2), (16, 1)):
        layers += [nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 5))


def feature_map_convs(model: nn.Module, x: torch.Tensor) -> int:
    """The 2-d convolutions one training forward of ``model`` runs on a batch of ``x``'s
    size (kernel generation works on weights, never on a batch of feature maps)."""

    class Count(torch.overrides.TorchFunctionMode):
        n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "conv2d" and args and args[0].shape[0] == x.shape[0]:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        model(x)
    return Count.n


def test_orepa_vgg_is_the_official_hybrid():
    """Official ``RepVGGBlock_OREPA``: a five-branch OREPA kxk (no 1x1 branch; scales
    0.25/0.25/0/0.5/0.5; ``kaiming_uniform_(a=1)``) online with its own BN, plus a 1x1
    conv + BN and an identity BN on the feature map; no BN after the sum
    (``post_bn=False``). Two feature-map convs per training forward; deploys to one conv."""
    torch.manual_seed(0)
    plain = plain_vgg()
    model = rc.orepa_transform(plain, block="orepa_vgg", post_bn=False)
    blocks = [m for m in model.modules() if isinstance(m, HybridBlock)]
    assert len(blocks) == 4 and {m.block for m in blocks} == {"orepa_vgg"}
    assert not any(isinstance(m, nn.BatchNorm2d) and n.count(".") == 0 for n, m in model.named_modules())
    b = blocks[1]  # in == out, stride 1
    kxk, rest = b.branches.online, b.branches.offline
    assert isinstance(kxk, OnlineConv) and isinstance(kxk.post_bn, nn.BatchNorm2d)
    assert tuple(kxk.branches.branches) == ("origin", "avg", "prior", "pw_kxk", "dw_pw")
    assert kxk.accelerator is not None
    scales = {n: br.scale.unique().tolist() for n, br in kxk.branches.branches.items()}
    assert scales == {"origin": [0.25], "avg": [0.25], "prior": [0.0], "pw_kxk": [0.5], "dw_pw": [0.5]}
    w = kxk.branches.origin.weight
    assert_uniform(w, math.sqrt(3 / fan_in(w)), "OREPA-VGG kxk origin")
    assert tuple(rest.branches) == ("pointwise", "identity")
    assert all(isinstance(br.bn, nn.BatchNorm2d) for br in rest.branches.values())
    assert tuple(blocks[2].branches.offline.branches) == ("pointwise",)  # strided: no identity
    # training: two convs on the feature map per block (the online kxk, the 1x1 branch)
    model.train()
    x = torch.randn(8, 3, 12, 12)
    assert feature_map_convs(model, x) == 2 * len(blocks)
    # trains: every parameter gets a gradient
    y = torch.randint(0, 5, (8,))
    F.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # deploys to one conv per block, equal in float64 (eval mode, random BN statistics)
    model = model.double()
    rc.testing.randomize_module(model, torch.Generator().manual_seed(2))
    model.eval()
    dep = rc.deploy(model)
    assert sum(isinstance(m, nn.Conv2d) for m in dep.modules()) == 4
    assert not any(isinstance(m, (OnlineConv, HybridBlock)) for m in dep.modules())
    xd = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dep(xd), model(xd), rtol=1e-10, atol=1e-10)


def test_orepa_vgg_online_form_option_trains_and_deploys_to_the_plain_conv_count():
    """``form="online"`` (not the official form): everything folded into one online conv."""
    torch.manual_seed(0)
    plain = plain_vgg()
    model = rc.orepa_transform(plain, block="orepa_vgg", block_options={"form": "online"})
    blocks = [m for m in model.modules() if isinstance(m, OnlineConv)]
    assert len(blocks) == 4 and {m.block for m in blocks} == {"orepa_vgg"}
    assert tuple(blocks[1].branches.branches) == ("orepa", "pointwise", "identity")  # in == out, stride 1
    assert tuple(blocks[2].branches.branches) == ("orepa", "pointwise")  # strided: no identity
    inner = blocks[1].branches.orepa.inner
    assert tuple(inner.branches) == FULL and inner.accelerator is not None
    assert "3.branches.orepa.inner.prior.pattern.weight" in model.state_dict()
    # trains: finite losses, every parameter gets a gradient
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 5, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    # the accelerated online kernel equals the generic fold, in float64
    model = model.double()
    rc.testing.randomize_module(model, torch.Generator().manual_seed(2))
    for m in blocks:
        torch.testing.assert_close(m.branches.fast_fold().weight, m.branches.fold(check=False).weight)
    model.eval()
    dep = rc.deploy(model)
    assert sum(isinstance(m, nn.Conv2d) for m in dep.modules()) == sum(
        isinstance(m, nn.Conv2d) for m in plain.modules()) == 4
    xd = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dep(xd), model(xd), rtol=1e-9, atol=1e-9)


def test_orepa_vgg_passes_options_to_its_orepa():
    e = build_block("orepa_vgg", geom(8, 8, 3), prior=None, mode="offline")
    assert "prior" not in e.orepa.inner.branches and e.orepa.bn is not None
