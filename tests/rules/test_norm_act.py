"""Norm-plus-activation modules (a BN and an elementwise activation in one ``forward``).

timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` / ``FrozenBatchNormAct2d`` and this
file's own fixtures written the same way: ``fold`` folds the norm into the conv
before it and keeps the activation (reported by name), ``orepa_transform`` takes the
module as the conv's existing post-BN (no second BN), ``deploy`` leaves no BN and the
plain model's parameter count with its BNs folded. A module that does something else
after its norm (not elementwise) is not taken for one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repcompiler as rc
from helpers import randomize_bn, rel_err
from repcompiler.analysis.norm_act import match_norm_act

pytestmark = pytest.mark.usefixtures("torch_single_thread")

_BN = nn.modules.batchnorm._BatchNorm


class BNSiLU(nn.BatchNorm2d):
    """A BN subclass whose forward calls F.batch_norm itself, then F.silu (timm style)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected a 4-d input")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                         self.training, self.momentum, self.eps)
        return F.silu(x)


class BNThenAct(nn.BatchNorm2d):
    """A BN subclass calling ``super().forward`` (runs BatchNorm2d's rank check), then its act."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.act = nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class BNThenPool(nn.BatchNorm2d):
    """Not a norm-plus-activation: a max-pool (not elementwise) after the norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(super().forward(x), 2)


class BNThenScaledByInput(nn.BatchNorm2d):
    """Not one either: the norm's output is multiplied by the input (a second data use)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x)) * x


class Net(nn.Module):
    """conv -> norm-act -> conv -> norm-act, with a residual sum."""

    def __init__(self, make) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = make(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = make(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn1(self.conv1(x))
        return self.head(y + self.bn2(self.conv2(y)))


def _timm_kinds():
    norm_act = pytest.importorskip("timm.layers.norm_act")

    def sync(c: int) -> nn.Module:
        m = norm_act.SyncBatchNormAct(c)
        m.drop, m.act = nn.Identity(), nn.SiLU()  # as timm's convert_sync_batchnorm sets them
        return m

    def frozen(c: int) -> nn.Module:
        m = norm_act.FrozenBatchNormAct2d(c, act_layer=nn.GELU)
        g = torch.Generator().manual_seed(c)
        for name in ("weight", "bias", "running_mean"):
            getattr(m, name).copy_(torch.randn(c, generator=g))
        m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        return m

    return {
        "BatchNormAct2d": lambda c: norm_act.BatchNormAct2d(c, act_layer=nn.ReLU6),
        "SyncBatchNormAct": sync,
        "FrozenBatchNormAct2d": frozen,
    }


_OWN = {"BNSiLU": BNSiLU, "BNThenAct": BNThenAct}
_ACT = {"BatchNormAct2d": "ReLU6", "SyncBatchNormAct": "SiLU", "FrozenBatchNormAct2d": "GELU", "BNSiLU": "silu",
        "BNThenAct": "Hardswish"}


def _make(kind: str):
    return _OWN[kind] if kind in _OWN else _timm_kinds()[kind]


def _net(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Net(_make(kind)).double(), 1).eval()


@pytest.mark.parametrize("kind", list(_ACT))
def test_fold_folds_the_norm_and_keeps_the_activation(kind: str) -> None:
    model = _net(kind)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    folded, report = rc.fold(model, x, return_report=True)
    assert not [n for n, m in folded.named_modules() if isinstance(m, _BN)]
    assert not [n for n, m in folded.named_modules() if n.endswith(("bn1", "bn2")) and m._buffers]
    with torch.no_grad():
        assert rel_err(folded(x), model(x)) < 1e-9
    rows = [e for e in report.entries if e.name in ("bn1", "bn2")]
    assert len(rows) == 2 and all(e.action == "folded" and _ACT[kind] in e.reason for e in rows), report
    assert rc.explain.count_convs(folded) == 3


@pytest.mark.parametrize("kind", ["BatchNormAct2d", "SyncBatchNormAct", "BNSiLU", "BNThenAct"])
def test_orepa_transform_uses_the_module_as_post_bn(kind: str) -> None:
    model = _net(kind)
    online, report = rc.orepa_transform(model, return_report=True)
    by_name = {e.name: e for e in report.entries}
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
        e = by_name[conv]
        assert e.action == "transformed" and e.details["post_bn"].startswith(f"{bn} (existing"), e
        assert _ACT[kind] in e.details["post_bn"]
        assert online.get_submodule(conv).post_bn is None  # no second BN inserted
    deployed = rc.deploy(randomize_bn(online, 2).eval())
    assert not [n for n, m in deployed.named_modules() if isinstance(m, _BN)]
    assert rc.explain.count_params(deployed) == rc.explain.count_params(rc.fold(model))
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(deployed(x), online(x)) < 1e-9


def test_post_bn_false_keeps_the_activation() -> None:
    model = _net("BNThenAct")
    online = rc.orepa_transform(model, post_bn=False)
    assert isinstance(online.bn1.act, nn.Hardswish) and not isinstance(online.bn1, _BN)
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        y = online.eval()(x)
    z = -torch.ones(1, 8, 2, 2, dtype=torch.float64)
    assert torch.equal(online.bn1(z), nn.Hardswish()(z))  # the activation alone
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("cls", [BNThenPool, BNThenScaledByInput])
def test_other_code_after_the_norm_is_not_a_norm_act(cls: type) -> None:
    assert match_norm_act(cls(4)) is None
    model = randomize_bn(Net(cls).double(), 3).eval() if cls is not BNThenPool else None
    if model is not None:  # whatever fold does with it, it stays exact
        x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
        folded = rc.fold(model, x)
        with torch.no_grad():
            assert rel_err(folded(x), model(x)) < 1e-9


def test_plain_bn_and_hooked_modules_are_not_matched() -> None:
    assert match_norm_act(nn.BatchNorm2d(4)) is None
    m = BNSiLU(4)
    m.register_forward_hook(lambda mod, i, o: o * 2)
    assert match_norm_act(m) is None


# ~10 s each on a busy 2-core machine: one in the default suite, the other two in zoo_full
_TIMM = ["efficientnet_b0", pytest.param("mobilenetv3_large_100", marks=pytest.mark.zoo_full),
         pytest.param("regnetx_002", marks=pytest.mark.zoo_full)]


@pytest.mark.parametrize("name", _TIMM)
def test_timm_model_folds_and_deploys_without_bn(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False).double(), 0).eval()
    n_bns = sum(isinstance(m, _BN) for m in model.modules())
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    folded = rc.fold(model)
    assert not [n for n, m in folded.named_modules() if isinstance(m, _BN)]
    with torch.no_grad():
        want = model(x)
        assert rel_err(folded(x), want) < 1e-9
    online, report = rc.orepa_transform(model, return_report=True)
    posts = [e.details.get("post_bn", "") for e in report.entries if e.action == "transformed"]
    existing = [p for p in posts if "(existing" in p]
    assert len(existing) >= n_bns - 5  # every transformed conv with a BN after it keeps it ...
    for e in report.entries:  # ... and no conv that has a BN gets a second one
        if e.action == "transformed" and e.details.get("post_bn") == "inserted":
            conv = model.get_submodule(e.name)
            assert not _followed_by_bn(model, e.name, conv), e
    deployed = rc.deploy(randomize_bn(online, 1).eval())
    assert not [n for n, m in deployed.named_modules() if isinstance(m, _BN)]
    assert rc.explain.count_params(deployed) == rc.explain.count_params(folded)
    with torch.no_grad():
        assert rel_err(deployed(x), online(x)) < 1e-9


def _followed_by_bn(model: nn.Module, name: str, conv: nn.Module) -> bool:
    """Whether the module registered right after ``name`` in its parent is a BN over its channels."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    names = list(parent._modules)
    i = names.index(child)
    nxt = parent._modules[names[i + 1]] if i + 1 < len(names) else None
    return isinstance(nxt, _BN) and nxt.num_features == conv.out_channels
