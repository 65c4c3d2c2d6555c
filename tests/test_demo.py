"""The demo runs end to end (small settings) and reports an exact deploy."""

from __future__ import annotations

import io
import subprocess
import sys

import torch
from torch import nn

from repcompiler import orepa_transform
from repcompiler.demo import measure_step, run_demo


def test_run_demo_small():
    buf = io.StringIO()
    res = run_demo(steps=2, batch=2, size=32, measure=False, progress=False, out=buf)
    text = buf.getvalue()
    assert "parameters: OREPA training form" in text and "deployed vs trained" in text
    assert res.params_train > res.params_plain
    assert res.deployed
    assert res.params_deployed < res.params_plain  # BN folded into the deployed convs
    assert res.params_deployed == res.params_plain_folded  # exactly the plain model's deploy form
    assert res.convs_deployed == res.convs_plain == 20
    assert res.rel_diff < 1e-5
    assert len(res.losses) == 2


def test_measure_step_sees_the_offline_cost():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 4))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 4, (16,))
    sec_p, mem_p = measure_step(plain, x, y)
    _, mem_on = measure_step(orepa_transform(plain), x, y)
    _, mem_off = measure_step(orepa_transform(plain, mode="offline"), x, y)
    assert sec_p > 0 and mem_p > 0
    assert mem_off > mem_on  # six branches' feature maps vs one


def test_demo_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "repcompiler.demo", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--steps" in proc.stdout
