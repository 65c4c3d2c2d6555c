"""torch.compile of a whole training step (forward, backward, optimizer step) of an
online model runs and matches eager training (float32, a few SGD steps).

Compiling takes well over 30 s on a 2-core CPU, so this is in the ``zoo_full`` run
(``python -m pytest -m zoo_full tests/online/test_compile_step.py``)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repcompiler as rc

from helpers import rel_err

pytestmark = pytest.mark.zoo_full


def test_compiled_training_step_matches_eager():
    torch.manual_seed(0)
    # a 7x7 stem (the paper policy's stacked-kernel stem block, with a one-hot placement)
    plain = nn.Sequential(nn.Conv2d(3, 8, 7, padding=3), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    eager = rc.orepa_transform(plain)
    model = copy.deepcopy(eager)

    def make_step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)

        def step(x, y):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        return step

    compiled, reference = torch.compile(make_step(model)), make_step(eager)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 5, (4,), generator=g)
        lc, le = compiled(x, y), reference(x, y)
        assert rel_err(lc, le) < 1e-4
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        assert rel_err(p, q) < 1e-4, name
    for a, b in zip(model.buffers(), eager.buffers()):
        assert rel_err(a.float(), b.float()) < 1e-4
