"""The demo runs end to end (small settings) and reports an exact deploy; its cost table
shows two batch sizes and the fixed + per-sample split, says what they mean, and the
measurement prints no native library noise."""

from __future__ import annotations

import io
import subprocess
import sys

import torch
from torch import nn

import pytest

import repcompiler.tools.demo as demo
from repcompiler import orepa_transform
from repcompiler.tools.demo import DemoResult, StepCost, measure_step, resolve_device, run_demo
from repcompiler.errors import UnsupportedError


def test_run_demo_small(monkeypatch, capsys):
    seen = []

    def fake_measure(model, x, y, warmup=1, repeats=1):  # the wiring; measure_step is tested below
        seen.append((x.shape[0], repeats))
        return 0.5 + 0.01 * x.shape[0], 1000 * x.shape[0], 0.01

    monkeypatch.setattr(demo, "measure_step", fake_measure)
    buf = io.StringIO()
    res = run_demo(steps=2, batch=2, size=32, repeats=2, device="cpu", progress=True, out=buf)
    text = buf.getvalue()
    err = capsys.readouterr().err  # stderr is not a terminal here (`repcompiler demo 2> file`): no bar
    assert "training OREPA" not in err and "it/s" not in err and "\r" not in err, err
    assert seen == [(2, 2), (8, 2)] * 3  # three forms at batch and 4 x batch, medians of `repeats`
    assert list(res.cost) == ["plain", "OREPA online", "OREPA offline (DBB-style)"]
    for c in res.cost.values():
        assert c.fixed == pytest.approx(0.5) and c.per_sample == pytest.approx(0.01)
    assert "batch 2" in text and "batch 8" in text and "medians of 2 or more steps per cell on cpu" in text and "~" not in text
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
    sec_p, mem_p, _ = measure_step(plain, x, y)
    _, mem_on, _ = measure_step(orepa_transform(plain, init="fresh"), x, y)
    _, mem_off, _ = measure_step(orepa_transform(plain, init="fresh", mode="offline"), x, y)
    assert sec_p > 0 and mem_p > 0
    assert mem_off > mem_on  # six branches' feature maps vs one


def test_demo_module_entry_point_help():
    proc = subprocess.run([sys.executable, "-m", "repcompiler.tools.demo", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "--steps" in proc.stdout


def test_cost_table_split_and_meaning():
    res = DemoResult(repeats=5, cost={"plain": StepCost({8: 0.10, 32: 0.34}, 300 * 2**20),
                                      "OREPA online": StepCost({8: 0.62, 32: 0.86}, 330 * 2**20)})
    c = res.cost["OREPA online"]
    assert c.per_sample == pytest.approx(0.01) and c.fixed == pytest.approx(0.54)
    text = res.table()
    row = next(line for line in text.splitlines() if line.startswith("OREPA online"))
    assert [cell.strip() for cell in row.split("|")] == ["OREPA online", "620 ms", "860 ms", "540 ms", "10.0 ms",
                                                         "330 MB"]
    flat = " ".join(text.split())
    assert "medians of 5 or more steps" in flat and "fixed cost per step" in flat


def test_measurement_prints_no_native_noise(capfd):
    """The profiler's native log lines (kineto's USDT/gpuGetDeviceCount, allocator
    warnings) do not reach the process's stderr; they go to the logger at DEBUG."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(3))
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2,))
    model(x)
    measure_step(model, x, y, repeats=2)
    err = capfd.readouterr().err
    assert "USDT" not in err and "gpuGetDeviceCount" not in err and "CPUAllocator" not in err, err


def test_device_choice():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UnsupportedError, match="device 'nonsense'"):
        resolve_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedError, match="device 'cuda'"):
            run_demo(device="cuda", steps=1, out=None)


def test_cli_forwards_device(capsys):
    from repcompiler import cli

    code = cli.main(["demo", "--device", "nonsense", "--no-measure"])
    assert code != 0 and "device 'nonsense'" in capsys.readouterr().err


def test_fit_never_goes_negative_and_says_when_the_machine_was_noisy():
    # the figures of a busy machine: the larger batch timed faster than the smaller one
    noisy = StepCost({8: 15.674, 32: 7.21}, 300 * 2**20, {8: 0.4, 32: 0.05})
    assert noisy.per_sample == 0.0 and noisy.fixed == pytest.approx((15.674 + 7.21) / 2)
    assert noisy.clamped == "per_sample" and noisy.noisy
    # superlinear (memory-bound): the line through the origin, no negative fixed part
    steep = StepCost({8: 0.10, 32: 0.60}, 1, {8: 0.01, 32: 0.01})
    assert steep.fixed == 0.0 and steep.per_sample > 0 and steep.clamped == "fixed" and not steep.noisy
    steady = StepCost({8: 0.62, 32: 0.86}, 1, {8: 0.02, 32: 0.03})
    assert not steady.noisy and steady.clamped == ""
    res = DemoResult(repeats=3, cost={"plain": steady, "OREPA online": noisy, "OREPA offline (DBB-style)": steep})
    text = res.table()
    assert "-" not in "".join(line.split("|", 1)[1] for line in text.splitlines() if "|" in line), text
    online = next(line for line in text.splitlines() if line.startswith("OREPA online"))
    assert online.split("|")[0].strip() == "OREPA online ~"
    flat = " ".join(text.split())
    assert "too busy for steady timings" in flat and "40%" in flat and "n/a*" in text
    assert "~" not in next(line for line in text.splitlines() if line.startswith("plain "))


def test_steady_times_repeat_while_the_timings_spread(monkeypatch):
    import repcompiler.tools.profiling as profiling
    from repcompiler.tools.profiling import spread, steady_times

    clock = [0.0]  # a fake clock: each step takes the time listed, whatever the machine does
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: clock[0])
    durations = iter([1.0, 2.0, 3.0] + [1.0] * 20)  # the first three spread by 50%

    def step():
        clock[0] += next(durations)

    times = steady_times(step, 0, 3, max_steps=12, limit=0.1)
    assert times[:3] == [1.0, 2.0, 3.0] and len(times) == 6 and spread(times) == 0.0  # three more were steady
    noisy = iter([1.0, 2.0, 3.0] * 20)  # never steady: up to the cap
    assert len(steady_times(lambda: clock.__setitem__(0, clock[0] + next(noisy)), 0, 3, max_steps=12)) == 12
    assert len(steady_times(lambda: None, 0, 3, limit=float("inf"))) == 3
    assert spread([1.0, 1.0, 5.0]) == 0.0 and spread([1.0, 2.0, 3.0]) == pytest.approx(0.5)
