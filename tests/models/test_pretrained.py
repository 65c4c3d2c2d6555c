"""Pretrained models (``init="from_conv"``), frozen parameters stay
frozen, transformed models stay traceable (``torch.fx.symbolic_trace``, torchvision's
``create_feature_extractor``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import repcompiler as rc
from repcompiler.errors import RepCompilerError
from repcompiler.online.conv import OfflineBlock, OnlineConv, reparam_block_forward

from zoo_utils import build, randomize_bn, rel_err

torchvision = pytest.importorskip("torchvision")


def _randomize_convs(model: nn.Module, seed: int = 1) -> nn.Module:
    """Conv weights/biases drawn afresh (as a pretrained model's differ from init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.weight.std())
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def _pretrained_like(name: str) -> nn.Module:
    warnings.filterwarnings("ignore")
    return randomize_bn(_randomize_convs(build(name, "classification"))).eval()


# -- item 7: init="from_conv" -------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf"])
def test_from_conv_equals_the_original_in_eval_mode(name: str) -> None:
    model = _pretrained_like(name)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    train, report = rc.orepa_transform(model, init="from_conv", return_report=True)
    train.eval()
    with torch.no_grad():
        got = train(x)
        again = model(x)
    assert rel_err(again, want) == 0.0, "the user's model changed"
    assert rel_err(got, want) <= 1e-5
    transformed = report.by_action("transformed")
    assert transformed and not report.by_action("refused"), report
    assert all(e.details["init"].startswith("from_conv") and "init: from_conv" in e.reason for e in transformed)
    # the origin branch is the conv's weight itself (cosine 1), not a fresh one
    conv = dict(model.named_modules())[transformed[0].name]
    block = dict(train.named_modules())[transformed[0].name]
    assert torch.equal(block.branches.origin.weight, conv.weight)
    # the default still trains from scratch - and says so per conv
    fresh, fresh_report = rc.orepa_transform(model, return_report=True)
    with torch.no_grad():
        assert rel_err(fresh.eval()(x), want) > 0.1
    assert all(e.details["init"].startswith("fresh") for e in fresh_report.by_action("transformed"))
    # deploy of the from_conv model is the original too
    with torch.no_grad():
        assert rel_err(rc.deploy(train)(x), want) <= 1e-5


class _Biased(nn.Module):
    """Biased convs: before a BN, before a ReLU (no BN), 1x1, depthwise, a 7x7 stem."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 7, stride=2, padding=3)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.k5 = nn.Conv2d(16, 16, (5, 3), padding=(2, 1), dilation=(1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        x = torch.relu(self.bn1(self.pw(self.dw(x))))
        return self.k5(x)


def _biased(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(_randomize_convs(_Biased())).to(dtype).eval()


@pytest.mark.parametrize("block", ["orepa", "repvgg", "dbb", "acnet"])
@pytest.mark.parametrize("mode", ["online", "offline"])
@pytest.mark.parametrize("insert_bn", [None, True])
def test_from_conv_every_block_biases_and_inserted_bns(block: str, mode: str, insert_bn: bool | None) -> None:
    model = _biased()
    x = torch.randn(2, 3, 20, 20, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    train, report = rc.orepa_transform(model, block=block, mode=mode, init="from_conv", insert_bn=insert_bn,
                                       return_report=True)
    with torch.no_grad():
        got = train.eval()(x)
    assert rel_err(got, want) <= 1e-12, report
    done = {e.name: e for e in report.by_action("transformed")}
    refused = {e.name: e.reason for e in report.by_action("refused")}
    assert set(done) | set(refused) == {"stem", "dw", "pw", "k5"}
    for name, reason in refused.items():  # a block that cannot start as the conv keeps the conv
        assert "init='from_conv'" in reason and isinstance(getattr(train, name), nn.Conv2d)
    assert len(done) >= 3, report
    inserted = [e.name for e in done.values() if e.details["post_bn"] == "inserted"]
    assert bool(inserted) == bool(insert_bn), report  # from_conv inserts no BN unless asked
    # the default policy gives the 7x7 stem orepa (a stacked orepa_large cannot hold it)
    if block == "orepa":
        assert done["stem"].details["block"] == "orepa"


def test_from_conv_refuses_what_cannot_start_as_the_conv() -> None:
    model = _biased()
    x = torch.randn(1, 3, 20, 20, dtype=torch.float64)
    # no branch scale to start at zero: every conv is left as it is, with its weights
    with pytest.warns(UserWarning, match="no eligible conv"):
        train, report = rc.orepa_transform(model, init="from_conv", scaling="none", return_report=True)
    assert not report.by_action("transformed")
    assert all("scaling='none'" in e.reason for e in report.by_action("refused")), report
    assert torch.equal(train.stem.weight, model.stem.weight)
    # a stacked stem cannot hold an arbitrary 7x7 kernel
    train, report = rc.orepa_transform(model, init="from_conv", policy={"stem": "orepa_large"}, return_report=True)
    (entry,) = [e for e in report.by_action("refused") if e.name == "stem"]
    assert "not a sum of branches" in entry.reason
    with torch.no_grad():
        assert rel_err(train.eval()(x), model(x)) <= 1e-12
    with pytest.raises(RepCompilerError, match="init"):
        rc.orepa_transform(model, init="pretrained")


def test_from_conv_blocks_train_every_branch() -> None:
    """The zeroed scales get gradients at once; the other branches' parameters once they move."""
    model = _biased(torch.float32)
    train = rc.orepa_transform(model, init="from_conv").train()
    opt = torch.optim.SGD(train.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        train(torch.randn(4, 3, 20, 20)).square().mean().backward()
        if _ == 0:
            assert train.k5.branches.dw_pw.scale.grad.abs().sum() > 0
        opt.step()
    assert train.k5.branches.dw_pw.pointwise.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("insert_bn", [None, True, False])
def test_from_conv_linearizes_existing_branches_from_their_bns(insert_bn: bool | None) -> None:
    """A residual conv->BN + identity is linearized whole (init="from_bn"): still the original."""
    from cli_models import tiny_net

    plain = randomize_bn(_randomize_convs(tiny_net())).double().eval()
    train, report = rc.orepa_transform(plain, init="from_conv", insert_bn=insert_bn, return_report=True)
    assert [e.name for e in report.by_action("linearized")] == ["conv1 -> bn1 -> add"]
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(train.eval()(x), plain(x)) <= 1e-12


def test_cli_transform_weights_keeps_them(tmp_path) -> None:
    from repcompiler.cli import main
    from cli_models import tiny_net

    torch.manual_seed(3)
    plain = randomize_bn(_randomize_convs(tiny_net())).eval()
    torch.save(plain.state_dict(), tmp_path / "w.pt")
    assert main(["transform", "cli_models:tiny_net", "--weights", str(tmp_path / "w.pt"),
                 "-o", str(tmp_path / "t.pt"), "--whole-model", "-q"]) == 0
    train = torch.load(tmp_path / "t.pt", weights_only=False).eval()
    assert any(isinstance(m, OnlineConv) for m in train.modules())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert rel_err(train(x), plain(x)) <= 1e-5


# -- item 8: frozen parameters stay frozen ------------------------------------------------


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_frozen_backbone_stays_frozen() -> None:
    model = torchvision.models.resnet18()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    train = rc.orepa_transform(model)
    assert _trainable(train) == _trainable(model.fc) == 513_000
    assert [n for n, p in train.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def test_requires_grad_flags_survive_per_layer() -> None:
    model = torchvision.models.resnet18()
    model.layer1.requires_grad_(False)
    model.layer2[0].bn1.requires_grad_(False)  # a frozen BN after a trainable conv
    model.conv1.bias = nn.Parameter(torch.zeros(64))  # frozen weight, trainable bias
    model.conv1.weight.requires_grad_(False)
    train, report = rc.orepa_transform(model, init="from_conv", return_report=True)
    for name, p in train.named_parameters():
        frozen = name.startswith("layer1.") or name.startswith("layer2.0.bn1.") or name.startswith("conv1.")
        if name == "conv1.branches.bias":
            frozen = False
        assert p.requires_grad != frozen, name
    assert {e.name for e in report.by_action("transformed") if e.details["frozen"]} == \
        {"conv1"} | {f"layer1.{i}.conv{j}" for i in (0, 1) for j in (1, 2)}
    # an inserted post-BN follows its frozen conv
    frozen_conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).requires_grad_(False)
    block = rc.orepa_transform(frozen_conv)[0]
    assert block.post_bn is not None and _trainable(block) == 0


# -- item 9: transformed models stay traceable --------------------------------------------


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_symbolic_trace_of_a_transformed_model(mode: str) -> None:
    torch.manual_seed(0)
    train = rc.orepa_transform(torchvision.models.resnet18(), mode=mode, policy="all").double()  # "all": 1x1s too
    gm = torch.fx.symbolic_trace(train)
    blocks = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is reparam_block_forward]
    assert len(blocks) == sum(isinstance(m, (OnlineConv, OfflineBlock)) for m in train.modules()) == 20
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    # the traced module trains: same outputs and gradients as the eager one (train mode)
    eager = copy.deepcopy(train)
    traced = torch.fx.symbolic_trace(eager)
    out_e, out_t = eager(x), None
    out_e.square().sum().backward()
    grads_e = {n: p.grad.clone() for n, p in eager.named_parameters()}
    eager.zero_grad()
    out_t = traced(x)
    out_t.square().sum().backward()
    assert rel_err(out_t, out_e) <= 1e-12
    for n, p in eager.named_parameters():  # the traced module shares the eager one's parameters
        assert torch.allclose(p.grad, grads_e[n], rtol=1e-10, atol=1e-12), n
    assert eager.layer1[0].conv1.branches.origin.scale.grad.abs().sum() > 0 if mode == "online" else True
    with torch.no_grad():
        assert rel_err(traced.eval()(x), eager.eval()(x)) == 0.0


def test_create_feature_extractor_of_a_transformed_resnet50() -> None:
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    train = randomize_bn(rc.orepa_transform(torchvision.models.resnet50())).eval()
    nodes = {"layer1": "c2", "layer2.3.relu_2": "c3", "layer4": "c5"}
    fx_model = create_feature_extractor(train, return_nodes=nodes)
    want: dict[str, torch.Tensor] = {}
    hooks = [train.get_submodule(m).register_forward_hook(lambda _m, _i, o, k=k: want.__setitem__(k, o))
             for m, k in (("layer1", "c2"), ("layer2.3", "c3"), ("layer4", "c5"))]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        got = fx_model(x)
        train(x)  # the untransformed call path: the eager modules
    for h in hooks:
        h.remove()
    assert set(got) == {"c2", "c3", "c5"}
    for k in got:
        assert rel_err(got[k], want[k]) == 0.0, k


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_deploy_of_an_fx_traced_transformed_model(mode: str) -> None:
    """``rc.deploy(fx.symbolic_trace(orepa_transform(m)))``: the traced graph calls each block
    as ``reparam_block_forward(<get_attr>, x)``; deploy turns those calls back into module
    calls on its copy and folds every block (it left them all online before, silently), the
    user's traced module is untouched, and the outputs are equal (float64, eval, random BN)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    base = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)  # ResNet-18's structure, one block per stage
    n_convs = sum(isinstance(m, nn.Conv2d) for m in base.modules())
    train = randomize_bn(rc.orepa_transform(base, mode=mode)).double().eval()
    gm = torch.fx.symbolic_trace(train)
    code_before = gm.code
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    deployed, report = rc.deploy(gm, x, return_report=True)
    assert not any(isinstance(m, (OnlineConv, OfflineBlock)) for m in deployed.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in deployed.modules()) == n_convs == 12
    assert gm.code == code_before and any(isinstance(m, OnlineConv if mode == "online" else OfflineBlock)
                                          for m in gm.modules())
    with torch.no_grad():
        assert rel_err(deployed(x), gm(x)) <= 1e-12
    # a feature extractor (fx-built, returns a dict) deploys the same way
    from torchvision.models.feature_extraction import create_feature_extractor

    fx_model = create_feature_extractor(train, return_nodes={"layer2": "c3", "layer4": "c5"})
    dep = rc.deploy(fx_model, x)
    assert not any(isinstance(m, (OnlineConv, OfflineBlock)) for m in dep.modules())
    with torch.no_grad():
        got, want = dep(x), fx_model(x)
    assert all(rel_err(got[k], want[k]) <= 1e-12 for k in want)
    dep.train()  # the extractor's training graph (swapped in by .train()) calls the plain convs too
    assert all(n.target is not reparam_block_forward for n in dep.graph.nodes)
    dep(x)
