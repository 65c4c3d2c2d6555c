"""orepa_transform: which convs become which blocks, post-BN handling, policies,
unsupported convs, names/state_dict/pickling, training, deploy."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import repcompiler as rc
from repcompiler.online.conv import OfflineBlock, OnlineConv
from repcompiler.explain.report import count_convs, count_params
from repcompiler.transforms.orepa import orepa_transform

from helpers import randomize_bn, rel_err


class TinyNet(nn.Module):
    """Stem 7x7, kxk + BN, 1x1 without BN, depthwise, grouped, dilated, asymmetric."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.body = nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 1), nn.ReLU(),  # no BN after: one is inserted, bias dropped
            nn.Conv2d(16, 16, 3, padding=2, dilation=2, groups=4, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16),
        )
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = self.body(x)
        return self.head(x.mean((2, 3)))


class Net1d3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 5, padding=2)
        self.b1 = nn.BatchNorm1d(6)
        self.c3 = nn.Conv3d(6, 4, 3, padding=1, bias=False)
        self.b3 = nn.BatchNorm3d(4)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))  # [N, 6, L]
        y = y.unsqueeze(-1).unsqueeze(-1).expand(-1, -1, -1, 3, 3).contiguous()
        return self.b3(self.c3(y))


def blocks_of(model):
    return {n: m.block for n, m in model.named_modules() if isinstance(m, (OnlineConv, OfflineBlock))}


def test_tinynet_default_policy_and_report():
    torch.manual_seed(0)
    model = TinyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out, report = orepa_transform(model, return_report=True)
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(out) is TinyNet
    assert blocks_of(out) == {
        "stem": "orepa_large", "body.0": "orepa", "body.3": "orepa_1x1", "body.5": "orepa",
        "body.8": "orepa", "body.11": "orepa",
    }
    # existing BNs stay where they are; a BN is inserted where none follows
    assert isinstance(out.bn0, nn.BatchNorm2d) and out.stem.post_bn is None
    assert isinstance(out.body[3].post_bn, nn.BatchNorm2d)
    assert isinstance(out.body[1], nn.BatchNorm2d) and out.body[0].post_bn is None
    assert len(report.by_action("transformed")) == 6
    assert "body.3" in str(report) and "inserted" in str(report)
    # same call signature / output shape
    x = torch.randn(2, 3, 32, 32)
    assert out(x).shape == model(x).shape
    # 1x1 conv had a bias but gets a post-BN: the block has no bias
    assert out.body[3].expr.spec.has_bias is False


def test_policies():
    model = TinyNet()
    out = orepa_transform(model, policy={"body.5": "dbb", "body.8": None, "stem": "default"})
    b = blocks_of(out)
    assert b["body.5"] == "dbb" and "body.8" not in b and b["stem"] == "orepa_large"
    assert isinstance(out.body[8], nn.Conv2d)
    out = orepa_transform(model, policy=lambda name, m: "repvgg" if m.kernel_size == (3, 3) else None)
    assert set(blocks_of(out).values()) == {"repvgg"}
    assert set(blocks_of(out)) == {"body.0", "body.5", "body.11"}
    out, rep = orepa_transform(model, policy=["stem", "body.1*"], return_report=True)
    assert "stem" not in blocks_of(out) and "body.11" not in blocks_of(out)
    assert {e.name for e in rep.by_action("kept")} == {"stem", "body.11"}
    # another block for every conv: the ones it cannot take are reported
    out, rep = orepa_transform(model, block="acnet", return_report=True)
    assert set(blocks_of(out)) == {"body.0", "body.5", "body.11", "stem"}
    refused = {e.name: e.reason for e in rep.by_action("refused")}
    assert set(refused) == {"body.3", "body.8"} and "acnet" in refused["body.3"]


def test_options_offline_scaling_post_bn():
    model = TinyNet()
    off = orepa_transform(model, mode="offline")
    assert all(isinstance(m, OfflineBlock) for m in [off.stem, off.body[0]])
    off.train()(torch.randn(2, 3, 16, 16))
    s = orepa_transform(model, scaling="scalar")
    assert s.body[0].expr.terms[0].terms[-1].scale.dim() == 0
    n = orepa_transform(model, post_bn=False)
    assert isinstance(n.bn0, nn.Identity) and isinstance(n.body[1], nn.Identity)
    assert n.body[3].post_bn is None and n.body[3].expr.spec.has_bias  # no BN: bias kept
    nb = orepa_transform(model, insert_bn=False)
    assert nb.body[3].post_bn is None and isinstance(nb.body[1], nn.BatchNorm2d)
    with pytest.raises(rc.RepCompilerError):
        orepa_transform(model, mode="sideways")
    with pytest.raises(rc.RepCompilerError):
        orepa_transform(model, block="no-such-block")


def test_policy_mistakes_raise_naming_the_conv():
    """An unknown block name or a junk answer is the policy's mistake: it raises (a typo
    must not silently leave a conv plain), naming the conv."""
    model = TinyNet()
    with pytest.raises(rc.RegistrationError, match=r"policy for conv 'body.5': no block named 'dbbb'"):
        orepa_transform(model, policy={"body.5": "dbbb"})
    with pytest.raises(rc.UnsupportedError, match=r"policy for conv 'stem': expected a block name.*got 3"):
        orepa_transform(model, policy=lambda name, m: 3)
    out = orepa_transform(model, policy=lambda name, m: name.startswith("body.0") or "repvgg")
    assert blocks_of(out)["body.0"] == "orepa" and blocks_of(out)["body.5"] == "repvgg"


@pytest.mark.parametrize("entry", ["orepa_transform", "deploy", "fold", "linearize"])
def test_entry_points_refuse_what_fx_cannot_trace(entry):
    fn = getattr(rc, entry)
    with pytest.raises(rc.UnsupportedError, match=f"{entry} expects an nn.Module, got function"):
        fn(lambda x: x)
    with pytest.raises(rc.UnsupportedError, match=f"{entry}: TorchScript modules cannot be traced"):
        fn(torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))))


def test_parametrized_hooked_and_uncopyable_convs():
    """A block would drop a conv's weight parametrization or forward hooks (spectral or
    weight norm, either API): such convs are refused with the reason. A model that cannot
    be deep-copied (hook-based weight_norm holds a non-leaf tensor) raises, pointing at
    inplace=True."""
    def net():
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))

    for wrap, reason in [(nn.utils.parametrizations.spectral_norm, "parametrized weight"),
                         (nn.utils.parametrizations.weight_norm, "parametrized weight"),
                         (nn.utils.spectral_norm, "forward hooks")]:
        model = net()
        wrap(model[0])
        out, rep = orepa_transform(model, return_report=True)
        refused = {e.name: e.reason for e in rep.by_action("refused")}
        assert set(refused) == {"0"} and reason in refused["0"], refused
        assert isinstance(out[0], nn.Conv2d) and isinstance(out[3], OnlineConv)
    model = net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the hook-based weight_norm
        nn.utils.weight_norm(model[0])
    with pytest.raises(rc.UnsupportedError, match="cannot copy Sequential.*inplace=True"):
        orepa_transform(model)
    same, rep = orepa_transform(model, inplace=True, return_report=True)
    assert same is model and "forward hooks" in rep.by_action("refused")[0].reason


def test_unsupported_and_nothing_eligible():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
        nn.ConvTranspose2d(4, 4, 2, stride=2),
        nn.Conv2d(4, 4, 3, padding=1),
    )
    out, rep = orepa_transform(model, return_report=True)
    refused = {e.name: e.reason for e in rep.by_action("refused")}
    assert "reflect" in refused["0"] and "transposed" in refused["1"]
    assert isinstance(out[0], nn.Conv2d) and isinstance(out[1], nn.ConvTranspose2d)
    assert isinstance(out[2], OnlineConv)
    only_bad = nn.Sequential(nn.Conv2d(3, 4, 3, padding_mode="circular", padding=1), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match="no eligible conv"):
        same = orepa_transform(only_bad)
    assert isinstance(same[0], nn.Conv2d)
    x = torch.randn(1, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(same(x), only_bad(x))


def test_inplace_and_1d_3d():
    model = Net1d3d()
    out = orepa_transform(model, inplace=True)
    assert out is model
    assert blocks_of(model) == {"c1": "orepa_large", "c3": "orepa"}  # first conv, k=5: a stem
    assert model.c1.expr.spec.dims == 1 and model.c3.expr.spec.dims == 3
    y = model(torch.randn(2, 3, 7))
    assert y.shape == (2, 4, 7, 3, 3)


def test_resnet18_names_state_dict_and_pickle(tmp_path):
    torch.manual_seed(0)
    plain = torchvision.models.resnet18(num_classes=10)
    # policy="all": every 1x1 (the downsample too) becomes a block, so orepa_1x1 is covered
    a = orepa_transform(plain, policy="all")
    b = orepa_transform(plain, policy="all")
    assert type(a) is torchvision.models.ResNet
    names_plain = {n for n, _ in plain.named_modules()}
    names_a = {n for n, _ in a.named_modules()}
    assert names_plain - names_a == set()  # every qualified name survives
    assert a.conv1.block == "orepa_large" and a.layer2[0].downsample[0].block == "orepa_1x1"
    assert a.layer1[0].conv1.block == "orepa"
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval()
    b.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    path = tmp_path / "model.pt"
    torch.save(a, path)
    c = torch.load(path, weights_only=False)
    with torch.no_grad():
        assert torch.equal(c(x), a(x))


def test_resnet_trains():
    """torchvision's ResNet with one BasicBlock per stage (ResNet-18's blocks, half as many:
    the same kinds of online block, half the kernel generations per step)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = orepa_transform(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)).train()
    x = torch.randn(8, 3, 32, 32)
    y = torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < 0.5 * losses[0], losses


def test_tinynet_deploy_matches():
    torch.manual_seed(0)
    plain = TinyNet()
    model = orepa_transform(plain)
    randomize_bn(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    deployed = rc.deploy(model, (x,))
    ref_plain = rc.deploy(plain.eval(), (x,))
    assert count_params(deployed) == count_params(ref_plain)
    assert count_convs(deployed) == count_convs(plain)
    assert not any(isinstance(m, (OnlineConv, OfflineBlock)) for m in deployed.modules())
    with torch.no_grad():
        assert rel_err(deployed(x), model(x)) < 1e-5
    off = orepa_transform(plain, block="dbb", mode="offline")
    randomize_bn(off)
    off.eval()
    with torch.no_grad():
        assert rel_err(rc.deploy(off, (x,))(x), off(x)) < 1e-5


ZOO = [
    ("resnet18", 64), ("resnet50", 64), ("mobilenet_v2", 64), ("efficientnet_b0", 64),
    ("regnet_y_400mf", 64), ("convnext_tiny", 64), ("vgg16_bn", 32), ("densenet121", 64),
]


@pytest.mark.zoo_full
@pytest.mark.parametrize("arch,size", ZOO)
def test_zoo_deploy(arch, size):
    """Deployed = plain parameter and conv counts exactly, with and without inserted
    post-BNs (DenseNet's convs before a concat get one: deploy moves the bias it leaves
    into the BNs downstream), eval outputs equal in float64 (the comparison is of the
    fold, not of float32 rounding, which the official initialisation's larger branch
    weights under random BN statistics make larger than the plain model's)."""
    torch.manual_seed(0)
    plain = getattr(torchvision.models, arch)(num_classes=10).eval()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    ref_plain = rc.deploy(plain, (x.float(),))
    for insert_bn in (True, False):
        model, report = orepa_transform(plain, insert_bn=insert_bn, return_report=True)
        randomize_bn(model)
        model.double().eval()
        deployed = rc.deploy(model, (x,))
        assert count_params(deployed) == count_params(ref_plain)
        assert count_convs(deployed) == count_convs(plain)
        with torch.no_grad():
            assert rel_err(deployed(x), model(x)) < 1e-9
        if not any(e.details.get("post_bn") == "inserted" for e in report.by_action("transformed")):
            break  # insert_bn=False would be the same model


def test_custom_rule_registry_decides_which_convs_are_plain():
    from repcompiler.rules import default_rules

    rules = default_rules().copy()
    conv_rule = rules.lookup(nn.Conv2d)

    def declines_wide(m, info):  # a user's rule: convs with 16 outputs are not plain convs
        return None if m.out_channels == 16 else conv_rule(m, info)

    rules.register(nn.Conv2d, declines_wide, override=True)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8))
    _, report = orepa_transform(model, rules=rules, return_report=True)
    assert [e.name for e in report.by_action("transformed")] == ["0", "6"]
    assert [e.name for e in report.by_action("refused")] == ["3"]
    assert {e.name: e.details["post_bn"] for e in report.by_action("transformed")} == {
        "0": "1 (existing)", "6": "7 (existing)"}
    # the global registry is not changed by it
    _, report = orepa_transform(model, return_report=True)
    assert [e.name for e in report.by_action("transformed")] == ["0", "3", "6"]
    with pytest.raises(rc.RepCompilerError, match="rules must be a RuleRegistry"):
        orepa_transform(model, rules={nn.Conv2d: declines_wide})
