"""``rc.quant_report`` and ``repcompiler quant-report``: SQNR
against its closed form, flags, simulated INT8 against a direct computation, activation
ranges against hooks, the model left untouched, bad input, online blocks, geometries,
and the CLI."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import repcompiler as rc
import cli_models as models
from repcompiler.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main
from repcompiler.errors import IncompatibleError, UnsupportedError
from repcompiler.quant import QuantReport, fake_quantize_weight, quant_report
from repcompiler.testing import randomize_bn

# uniform weights in [-a, a], step delta = a / 127: SQNR = 10 log10((a^2/3) / (delta^2/12)) = 10 log10(4 * 127^2)
UNIFORM_INT8_DB = 10 * math.log10(4 * 127**2)  # 48.16 dB


def _uniform(shape: tuple[int, ...], a: torch.Tensor | float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * a


def _row(report: QuantReport, name: str):
    return next(r for r in report.rows if r.name == name)


# --------------------------------------------------------------------------- SQNR closed form
def test_sqnr_of_uniform_weights_matches_the_closed_form() -> None:
    layer = nn.Linear(1000, 1000, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(_uniform((1000, 1000), 0.37))
    report = quant_report(layer, torch.randn(4, 1000, dtype=torch.float64))
    row = report.rows[0]
    assert abs(row.sqnr_per_tensor_db - UNIFORM_INT8_DB) < 0.03
    assert abs(row.sqnr_per_channel_db - UNIFORM_INT8_DB) < 0.03
    # 4 bits: 10 log10(4 * 7^2)
    row4 = quant_report(layer, torch.randn(4, 1000, dtype=torch.float64), bits=4).rows[0]
    assert abs(row4.sqnr_per_tensor_db - 10 * math.log10(4 * 7**2)) < 0.03


def test_sqnr_per_channel_closed_form_differs_from_per_tensor() -> None:
    # channel c uniform in [-k_c d, k_c d] with d = the per-tensor step (max |w| = 127 d): per tensor the
    # noise is d^2/12 everywhere, so SQNR = 10 log10(4 mean(k_c^2)); per channel every channel has its own
    # step k_c d / 127, so 10 log10(4 * 127^2); the worst channel per tensor is 10 log10(4 k_min^2)
    k = torch.tensor([127.0, 16.0, 32.0, 64.0, 16.0, 127.0, 48.0, 100.0], dtype=torch.float64)
    d = 0.01
    layer = nn.Linear(100_000, 8, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(_uniform((8, 100_000), (k * d)[:, None]))
    row = quant_report(layer, torch.randn(2, 100_000, dtype=torch.float64)).rows[0]
    assert abs(row.sqnr_per_tensor_db - 10 * math.log10(4 * float((k**2).mean()))) < 0.05
    assert abs(row.sqnr_per_channel_db - UNIFORM_INT8_DB) < 0.05
    assert abs(row.worst_channel_sqnr_per_tensor_db - 10 * math.log10(4 * 16**2)) < 0.1
    assert row.channel_range_ratio == pytest.approx(127 / 56, rel=1e-3)  # median of k: (48 + 64) / 2


# --------------------------------------------------------------------------- flags
def _three_convs(outlier: float | None) -> nn.Sequential:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                      nn.Conv2d(16, 16, 3, padding=1))
    with torch.no_grad():
        for conv in m[::2]:
            conv.weight.uniform_(-0.1, 0.1)
            conv.bias.zero_()
        if outlier is not None:
            m[2].weight[3] *= outlier
    return m


CALIB = [torch.randn(16, 8, 10, 10, generator=torch.Generator().manual_seed(i)) for i in range(2)]


def test_flags_fire_on_an_outlier_channel_and_not_on_uniform_layers() -> None:
    uniform = quant_report(_three_convs(None), CALIB)
    assert uniform.flagged == [] and all(r.channel_range_ratio < 1.5 for r in uniform.rows)

    report = quant_report(_three_convs(40.0), CALIB)
    assert [r.name for r in report.flagged] == ["2"]
    flags = " | ".join(_row(report, "2").flags)
    assert "weight channel range ratio 40x > 10x: per-tensor INT8 crushes small channels" in flags
    assert "activation outlier" in flags and "dominates end-to-end error" in flags
    assert report.worst(1)[0].name == "2" and len(report.worst(5)) == 3
    row = _row(report, "2")
    assert row.sqnr_per_channel_db - row.sqnr_per_tensor_db > 10  # per channel rescues it
    # the thresholds are the documented keyword arguments
    lenient = quant_report(_three_convs(40.0), CALIB, channel_ratio_threshold=50, act_ratio_threshold=50,
                           dominate_share=0.9, min_sqnr_db=0)
    assert lenient.flagged == []


# --------------------------------------------------------------------------- simulated INT8 vs direct
def _fq(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x / scale), -127, 127) * scale


def _step(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """max|x| / 127, as the observers compute it (float32 range)."""
    amax = x.abs().amax() if dim is None else x.abs().flatten(1).amax(1, keepdim=True)
    return amax.float().double() / 127 if dim is None else (amax.float() / 127).double()


def test_end_to_end_and_sensitivity_match_a_direct_computation() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).double().eval()
    xs = [torch.randn(64, 16, dtype=torch.float64) for _ in range(3)]
    report = quant_report(model, xs)
    (w1, b1), (w2, b2) = [(m.weight.detach(), m.bias.detach()) for m in (model[0], model[2])]
    ys1 = [x @ w1.T + b1 for x in xs]
    ref = [torch.relu(y) @ w2.T + b2 for y in ys1]
    s1 = (max(float(y.abs().max()) for y in ys1) * torch.ones(())).float().double() / 127
    s2 = (max(float(y.abs().max()) for y in ref) * torch.ones(())).float().double() / 127

    def run(q1: torch.Tensor | None, q2: torch.Tensor | None) -> list[torch.Tensor]:
        outs = []
        for x in xs:
            h = x @ (w1 if q1 is None else q1).T + b1
            h = torch.relu(h if q1 is None else _fq(h, s1))
            y = h @ (w2 if q2 is None else q2).T + b2
            outs.append(y if q2 is None else _fq(y, s2))
        return outs

    def errors(outs: list[torch.Tensor]) -> tuple[float, float]:
        rel = math.sqrt(sum(float((o - r).square().sum()) for o, r in zip(outs, ref))
                        / sum(float(r.square().sum()) for r in ref))
        top1 = sum(int((o.argmax(1) == r.argmax(1)).sum()) for o, r in zip(outs, ref)) / (64 * 3)
        return rel, top1

    tensor_q = [_fq(w, _step(w)) for w in (w1, w2)]
    channel_q = [_fq(w, _step(w, 0)) for w in (w1, w2)]
    for mode, q in (("per_tensor", tensor_q), ("per_channel", channel_q)):
        rel, top1 = errors(run(*q))
        assert report.end_to_end[mode]["rel_l2"] == pytest.approx(rel, rel=1e-6)
        assert report.end_to_end[mode]["top1_agreement"] == pytest.approx(top1)
        assert rel > 1e-4  # the simulation did quantize
    for row, outs in zip(report.rows, (run(tensor_q[0], None), run(None, tensor_q[1]))):
        assert row.sensitivity == pytest.approx(errors(outs)[0], rel=1e-6)
    shares = [r.error_share for r in report.rows]
    assert sum(shares) == pytest.approx(1.0) and all(0 < s < 1 for s in shares)
    assert fake_quantize_weight(w2, per_channel=True).sub(channel_q[1]).abs().max() < 1e-12


# --------------------------------------------------------------------------- activation ranges, model untouched
def test_activation_ranges_equal_hooks_and_the_model_is_untouched() -> None:
    model = models.tiny_net(seed=2)
    randomize_bn(model, 0)
    model.train()
    before = copy.deepcopy(model.state_dict())
    xs = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    report = quant_report(model, xs, max_batches=2)

    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_hooks for m in model.modules())

    seen: dict[str, list[torch.Tensor]] = {}
    probe = copy.deepcopy(model).eval()
    for name, m in probe.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.register_forward_hook(lambda mod, i, o, name=name: seen.setdefault(name, []).append(o))
    with torch.no_grad():
        for x in xs[:2]:
            probe(x)
    assert [r.name for r in report.rows] == list(seen)  # call order
    for row in report.rows:
        outs = torch.cat([o.flatten() for o in seen[row.name]])
        assert row.act_min == pytest.approx(float(outs.min()), rel=1e-6)
        assert row.act_max == pytest.approx(float(outs.max()), rel=1e-6)
        assert row.calls == 2
    assert report.settings["batches"] == 2 and report.settings["samples"] == 8
    json.dumps(report.to_dict(), allow_nan=False)
    text = str(report)
    assert "stem" in text and "end to end, simulated INT8" in text and "top-1 agreement" in text


def test_online_blocks_are_reported_by_their_eval_kernel() -> None:
    model = rc.orepa_transform(models.tiny_net(seed=1))
    randomize_bn(model, 0)
    model.eval()
    x = torch.randn(4, 3, 12, 12)
    report = quant_report(model, x)
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, rc.OnlineConv)}
    assert blocks
    seen: dict[str, torch.Tensor] = {}
    hooks = [b.register_forward_hook(lambda mod, i, o, name=n: seen.setdefault(name, o)) for n, b in blocks.items()]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for name, block in blocks.items():
        row = _row(report, name)
        kernel = block.to_conv().weight.detach()
        assert row.kind.startswith("OnlineConv[") and row.weight_shape == tuple(kernel.shape)
        assert row.channel_max == pytest.approx(kernel.flatten(1).amax(1).tolist(), rel=1e-6)
        assert row.act_max == pytest.approx(float(seen[name].max()), rel=1e-5)
    # nothing inside a block is reported as a layer of its own
    assert not any(r.name.startswith(tuple(n + "." for n in blocks)) for r in report.rows)
    assert report.end_to_end["per_channel"]["rel_l2"] > 0


def test_max_layers_caps_the_sensitivity_and_says_so() -> None:
    report = quant_report(_three_convs(None), CALIB[:1], max_layers=1)
    assert [r.sensitivity is not None for r in report.rows] == [True, False, False]
    assert any("max_layers" in n for n in report.settings["notes"]) and "max_layers" in str(report)


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "make,error,needle",
    [
        (lambda: (nn.Sequential(nn.ReLU()), torch.randn(2, 3)), UnsupportedError, "no conv/linear layer"),
        (lambda: (_three_convs(None), torch.randn(2, 5, 8, 8)), IncompatibleError,
         "calibration batch 0 of shape (2, 5, 8, 8)"),
        (lambda: (_three_convs(None), []), UnsupportedError, "calibration_inputs is empty"),
        (lambda: (_three_convs(None), {"x": CALIB[0]}), UnsupportedError, "calibration_inputs must be"),
        (lambda: ("not a model", CALIB[0]), UnsupportedError, "model must be an nn.Module"),
    ],
)
def test_bad_input_raises_named_errors(make, error, needle: str) -> None:
    model, calib = make()
    with pytest.raises(error, match="quant_report") as info:
        quant_report(model, calib)
    assert needle in str(info.value)


@pytest.mark.parametrize("kwargs,needle", [
    ({"bits": 1}, "bits must be an integer in 2..16"), ({"bits": 17}, "bits must be"), ({"bits": 8.0}, "bits must"),
    ({"bits": True}, "bits must"), ({"weight_mode": "per_row"}, "weight_mode must be one of"),
    ({"per_channel_axis": 5}, "per_channel_axis=5 is out of range for Conv2d 0"),
    ({"max_batches": 0}, "max_batches must be an integer >= 1"), ({"dominate_share": -1}, "dominate_share"),
])
def test_bad_options_raise_unsupported(kwargs: dict, needle: str) -> None:
    with pytest.raises(UnsupportedError, match="quant_report") as info:
        quant_report(_three_convs(None), CALIB[0], **kwargs)
    assert needle in str(info.value)


# --------------------------------------------------------------------------- geometries
@settings(max_examples=20, deadline=None)
@given(dim=st.sampled_from([1, 2, 3]), groups=st.sampled_from(["one", "two", "depthwise"]),
       bias=st.booleans(), k=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
def test_per_channel_ranges_over_conv_geometries(dim: int, groups: str, bias: bool, k: int, seed: int) -> None:
    cin, cout = 4, 8
    g = {"one": 1, "two": 2, "depthwise": cin}[groups]
    torch.manual_seed(seed)
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dim - 1](cin, cout, k, padding=k // 2, groups=g, bias=bias).double()
    x = torch.randn(2, cin, *([5] * dim), dtype=torch.float64)
    row = quant_report(conv, x).rows[0]
    w = conv.weight.detach()
    dims = tuple(range(1, w.dim()))
    assert row.weight_shape == tuple(w.shape)
    assert row.channel_min == w.amin(dims).tolist() and row.channel_max == w.amax(dims).tolist()
    assert (row.weight_min, row.weight_max) == (float(w.min()), float(w.max()))
    y = conv(x).detach()
    assert row.act_min == pytest.approx(float(y.min()), rel=1e-6) and row.act_max == pytest.approx(float(y.max()), rel=1e-6)
    # per channel, every weight is within half a step of its channel's grid (step max|w_c| / 127)
    err = (w - fake_quantize_weight(w, per_channel=True)).abs().amax(dims)
    assert bool((err <= w.abs().amax(dims) / 254 * (1 + 1e-6)).all())
    assert math.isfinite(row.sqnr_per_tensor_db) and math.isfinite(row.sqnr_per_channel_db)
    # per_channel_axis=1 (input channels of each group) ranges over the other axes
    row1 = quant_report(conv, x, per_channel_axis=1, max_layers=0).rows[0]
    other = (0, *range(2, w.dim()))
    assert row1.channel_min == w.amin(other).tolist() and row1.channel_max == w.amax(other).tolist()


# --------------------------------------------------------------------------- CLI
TINY = "cli_models:tiny_net"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_quant_report_prints_and_writes_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    dest = tmp_path / "report.json"
    code, out, err = run(capsys, "quant-report", TINY, "--input-shape", "2,3,12,12", "--calibration", "2",
                         "--top", "2", "--json", str(dest))
    assert code == EXIT_OK, err
    assert "2 batch(es) of RANDOM inputs of shape (2, 3, 12, 12)" in out and "model: deployed" in out
    assert "end to end, simulated INT8" in out and "worst 2 layer(s) (per-tensor weights):" in out
    data = json.loads(dest.read_text())
    assert data["deployed"] and data["settings"]["batches"] == 2 and data["settings"]["weight_mode"] == "per_tensor"
    assert [r["name"] for r in data["rows"]] == ["stem", "conv1", "conv2", "fc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_cli_quant_report_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = tmp_path / "calib.pt"
    torch.save(torch.randn(6, 3, 12, 12), data)
    code, out, err = run(capsys, "quant-report", TINY, "--input-shape", "4,3,12,12", "--calibration-data", str(data),
                         "--per-channel", "--no-deploy", "-q")
    assert code == EXIT_OK, err
    assert f"2 batch(es) of 4 from {data}" in out and "RANDOM" not in out and "as given (--no-deploy)" in out
    assert "per-channel weights" in out and "SQNR t/c dB" not in out  # -q: no table
    code, out, err = run(capsys, "quant-report", "--help")
    assert code == EXIT_OK and out.startswith("usage: repcompiler quant-report ") and "--calibration-data" in out


@pytest.mark.parametrize("argv,code,needle", [
    (["--input-shape", "2,3,12,12", "--bits", "1"], EXIT_USAGE, "--bits: expected an integer in 2..16"),
    ([], EXIT_USAGE, "--input-shape"),
    (["--input-shape", "2,3,12,12", "--top", "0"], EXIT_USAGE, "--top"),
    (["--input-shape", "2,5,12,12", "--no-deploy"], EXIT_ERROR, "calibration batch 0 of shape (2, 5, 12, 12)"),
])
def test_cli_quant_report_errors(capsys: pytest.CaptureFixture[str], argv: list, code: int, needle: str) -> None:
    got, _, err = run(capsys, "quant-report", TINY, *argv)
    assert got == code and needle in err
