"""Small model factories for the export / CLI / compat tests.

Importable as ``cli_models`` (``tests/`` is on ``sys.path``, see conftest), so the
CLI can name them as ``cli_models:tiny_net``. No tests live here.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["TinyNet", "tiny_net", "TinyResNet", "tiny_resnet", "TwoInOut", "two_in_out", "TraceSensitive", "trace_sensitive", "not_a_module", "FixedBatch"]


class TinyNet(nn.Module):
    """conv-BN-ReLU stem, a residual conv-BN pair, a 1x1 conv-BN, pooling, linear head."""

    def __init__(self, num_classes: int = 4, width: int = 8, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 1, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(y)) + y)
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def tiny_net(num_classes: int = 4, width: int = 8, seed: int = 0) -> TinyNet:
    """A :class:`TinyNet` with deterministic weights and randomized BN statistics."""
    torch.manual_seed(seed)
    m = TinyNet(num_classes, width)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):
                c = bn.num_features
                bn.running_mean.copy_(0.5 * torch.randn(c, generator=g))
                bn.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
                bn.weight.copy_(0.5 + torch.rand(c, generator=g))
                bn.bias.copy_(0.5 * torch.randn(c, generator=g))
    return m


class TwoInOut(nn.Module):
    """Two inputs, a tuple of two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(2, 4, 1)

    def forward(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        u = self.bn(self.a(x))
        return u + self.b(z), u.mean((2, 3))


def two_in_out() -> TwoInOut:
    torch.manual_seed(0)
    return TwoInOut()


class TraceSensitive(nn.Module):
    """Computes something else while being traced/exported: exported artifacts are wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
            y = y + 1.0
        return y


def trace_sensitive() -> TraceSensitive:
    torch.manual_seed(0)
    return TraceSensitive()


def not_a_module() -> int:
    return 3


class FixedBatch(nn.Module):
    """Hard-codes a batch of 2 (``reshape(2, -1)``): cannot have a dynamic batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x).reshape(2, -1)


class TinyResNet(nn.Module):
    """A stem and one residual block whose shortcut is a strided 1x1 conv + BN (a ResNet
    projection: the paper policy keeps it plain, ``policy="all"`` transforms it)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(2 * width)
        self.conv2 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.downsample = nn.Sequential(nn.Conv2d(width, 2 * width, 1, stride=2, bias=False), nn.BatchNorm2d(2 * width))
        self.fc = nn.Linear(2 * width, 4)

    def forward(self, x: Tensor) -> Tensor:
        y = self.stem(x)
        z = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(y)))))
        y = torch.relu(z + self.downsample(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def tiny_resnet() -> TinyResNet:
    torch.manual_seed(0)
    return TinyResNet()
