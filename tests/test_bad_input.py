"""The bad-input catalogue: one row per bad input to an entry point (library or CLI).

Each library row states the input, the library exception expected (or ``None``: the
call succeeds and its report must say the fragment) and a message fragment, and checks
that the caller's model is unchanged (``state_dict`` values and ``requires_grad``
flags equal before and after). Each CLI row states the argv, the exit code and a
fragment of stderr, and checks that nothing was written.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import repcompiler as rc
import test_cli_models as cli_models
from repcompiler.cli import EXIT_ERROR, EXIT_INTERRUPT, EXIT_OK, EXIT_USAGE, main
from repcompiler.errors import IncompatibleError, RepCompilerError, UnsupportedError
from repcompiler.io import load_pickled_model, load_state_dict, load_weights_into, save_atomic
from repcompiler.opaque import opaque_reasons

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


def conv_bn() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                      nn.BatchNorm2d(4))
    m[1].weight.requires_grad_(False)  # a frozen parameter: its flag must survive too
    return m.eval()


class WSConv(nn.Conv2d):
    """A weight-standardized conv: a Conv2d subclass with its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.conv(y)


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": self.bn(self.conv(x))}


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(self.conv(x)))


def hooked_bn() -> nn.Module:
    m = conv_bn()
    m[1].register_forward_hook(lambda mod, inp, out: out * 2)
    return m


def with_nan() -> nn.Module:
    m = conv_bn()
    with torch.no_grad():
        m[3].weight[0, 0, 0, 0] = float("nan")
    return m


def with_inf_buffer() -> nn.Module:
    m = conv_bn()
    m[4].running_var[1] = float("inf")
    return m


def on_meta() -> nn.Module:
    return conv_bn().to("meta")


def missing_package(name: str) -> Callable[[pytest.MonkeyPatch], None]:
    def patch(mp: pytest.MonkeyPatch) -> None:
        mp.setitem(sys.modules, name, None)  # import raises ImportError

    return patch


def _out(tmp: Path, name: str) -> str:
    return os.fspath(tmp / name)


# (id, model factory, call(model, tmp), expected exception or None, message/report fragment, monkeypatch)
ROWS: list[tuple[str, Callable[[], Any], Callable[[Any, Path], Any], type | None, str, Any]] = [
    ("fold-non-module", lambda: (lambda t: t), lambda m, d: rc.fold(m), UnsupportedError, "expects an nn.Module", None),
    ("export-non-module", lambda: (lambda t: t), lambda m, d: rc.export(m, _out(d, "m.onnx"), X),
     UnsupportedError, "expects an nn.Module", None),
    ("export-inputs-none", conv_bn, lambda m, d: rc.export(m, _out(d, "m.onnx"), None),
     UnsupportedError, "example_inputs is required", None),
    ("export-inputs-dict", conv_bn, lambda m, d: rc.export(m, _out(d, "m.onnx"), {"x": X}),
     UnsupportedError, "keyword inputs are not supported", None),
    ("fold-inputs-dict", conv_bn, lambda m, d: rc.fold(m, {"x": X}), UnsupportedError, "dict", None),
    ("linearize-inputs-dict", conv_bn, lambda m, d: rc.linearize(m, {"x": X}), UnsupportedError, "dict", None),
    ("linearize-wrong-shape", conv_bn, lambda m, d: rc.linearize(m, torch.randn(1, 5, 8, 8)),
     IncompatibleError, "does not run on example_inputs of shape (1, 5, 8, 8)", None),
    ("fold-wrong-shape", conv_bn, lambda m, d: rc.fold(m, torch.randn(1, 5, 8, 8)), UnsupportedError,
     "does not run on the given example_inputs", None),
    ("export-two-inputs-one-given", TwoInputs, lambda m, d: rc.export(m, _out(d, "m.onnx"), X),
     IncompatibleError, "does not run on example_inputs of shape (2, 3, 8, 8)", None),
    ("fold-meta", on_meta, lambda m, d: rc.fold(m), UnsupportedError, "on the meta device", None),
    ("deploy-meta", on_meta, lambda m, d: rc.deploy(m), UnsupportedError, "materialize the model first", None),
    ("export-negative-rtol", conv_bn, lambda m, d: rc.export(m, _out(d, "m.onnx"), X, rtol=-1e-4),
     UnsupportedError, "rtol must be >= 0", None),
    ("export-negative-atol", conv_bn, lambda m, d: rc.export(m, _out(d, "m.onnx"), X, atol=-1.0),
     UnsupportedError, "atol must be >= 0", None),
    ("fold-nan-weight", with_nan, lambda m, d: rc.fold(m), UnsupportedError, "non-finite weights in 1 tensor(s): 3.weight",
     None),
    ("transform-nan-weight", with_nan, lambda m, d: rc.orepa_transform(m, init="from_conv"), UnsupportedError,
     "orepa_transform: Sequential has non-finite weights in 1 tensor(s): 3.weight", None),
    ("export-inf-buffer", with_inf_buffer, lambda m, d: rc.export(m, _out(d, "m.onnx"), X), UnsupportedError,
     "4.running_var (0 NaN, 1 inf)", None),
    ("export-opset-dynamo", conv_bn, lambda m, d: rc.export(m, _out(d, "m.onnx"), X, opset=7, onnx_exporter="dynamo"),
     UnsupportedError, "cannot write opset 7", None),
    ("export-suffix-contradicts", conv_bn, lambda m, d: rc.export(m, _out(d, "m.pt2"), X, format="onnx"),
     UnsupportedError, "contradicts the suffix", None),
    ("export-opset-not-onnx", conv_bn, lambda m, d: rc.export(m, _out(d, "m.pt2"), X, opset=17),
     UnsupportedError, "opset applies only to ONNX", None),
    ("export-method-not-ts", conv_bn, lambda m, d: rc.export(m, _out(d, "m.onnx"), X, torchscript_method="script"),
     UnsupportedError, "torchscript_method only applies to TorchScript", None),
    ("export-bf16-onnx", lambda: conv_bn().bfloat16(), lambda m, d: rc.export(m, _out(d, "m.onnx"), X.bfloat16()),
     UnsupportedError, "bfloat16", None),
    ("export-missing-onnxruntime", conv_bn, lambda m, d: rc.export(m, _out(d, "m.onnx"), X), UnsupportedError,
     'pip install "repcompiler[export]"', missing_package("onnxruntime")),
    ("export-missing-onnx", conv_bn, lambda m, d: rc.export(m, _out(d, "m.onnx"), X), UnsupportedError,
     "the package 'onnx'", missing_package("onnx")),
    ("export-string-output", lambda: nn.Sequential(nn.Flatten(0)), lambda m, d: rc.export(m, _out(d, "m.onnx"), (X, 3)),
     UnsupportedError, "tensors only", None),
    ("export-missing-dir", conv_bn, lambda m, d: rc.export(m, _out(d, "no/m.onnx"), X), FileNotFoundError,
     "does not exist", None),
    ("export-dir-as-path", conv_bn, lambda m, d: rc.export(m, os.fspath(d), X), IsADirectoryError, "is a directory",
     None),
    # inputs handled by leaving the part as it is: the call succeeds and the report says why
    ("fold-no-convs", lambda: nn.Sequential(nn.ReLU()), lambda m, d: rc.fold(m, return_report=True)[1], None,
     "nothing to do", None),
    ("fold-dict-output", DictOut, lambda m, d: rc.fold(m, X, return_report=True)[1], None, "conv -> bn  chain  folded",
     None),
    ("fold-shared-conv", SharedConv, lambda m, d: rc.fold(m, X, return_report=True)[1], None, "convs 1 -> 1", None),
    ("fold-transposed-conv", lambda: nn.Sequential(nn.ConvTranspose2d(3, 3, 3), nn.BatchNorm2d(3)),
     lambda m, d: rc.fold(m, X, return_report=True)[1], None, "convs 0 -> 0", None),
    ("fold-reflect-padding", lambda: nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"),
                                                   nn.BatchNorm2d(3)),
     lambda m, d: rc.fold(m, X, return_report=True)[1], None, "padding_mode='reflect'", None),
    ("fold-bn-with-hook", hooked_bn, lambda m, d: rc.fold(m, X, return_report=True)[1], None, "has forward hooks", None),
    ("fold-conv-own-forward", lambda: nn.Sequential(WSConv(3, 4, 3), nn.BatchNorm2d(4)),
     # its forward is traced into: the standardized kernel folds with the BN, the module is removed
     lambda m, d: rc.fold(m, X, return_report=True)[1], None, "its forward was traced into and folded", None),
    ("fold-bn-untracked", lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4, track_running_stats=False)),
     lambda m, d: rc.fold(m, X, return_report=True)[1], None, "track_running_stats=False", None),
]


def _snapshot(model: Any) -> Any:
    if not isinstance(model, nn.Module) or any(t.is_meta for t in model.state_dict().values()):
        return None if not isinstance(model, nn.Module) else [(n, p.requires_grad) for n, p in model.named_parameters()]
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [(n, p.requires_grad) for n, p in model.named_parameters()], [m.training for m in model.modules()])


def _same(a: Any, b: Any) -> bool:
    if not isinstance(a, tuple):
        return a == b
    (sa, ga, ta), (sb, gb, tb) = a, b
    return ga == gb and ta == tb and sa.keys() == sb.keys() and all(
        torch.equal(sa[k], sb[k]) or (sa[k].isnan() == sb[k].isnan()).all() and torch.equal(
            sa[k].nan_to_num(), sb[k].nan_to_num()) for k in sa)


@pytest.mark.parametrize("case", ROWS, ids=[r[0] for r in ROWS])
def test_library_bad_input(case: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, make, call, error, fragment, patch = case
    model = make()
    before = _snapshot(model)
    if patch is not None:
        patch(monkeypatch)
    if error is None:
        report = call(model, tmp_path)
        assert fragment in str(report), str(report)
    else:
        with pytest.raises(error) as info:
            call(model, tmp_path)
        assert fragment in str(info.value), str(info.value)
        if not issubclass(error, OSError):
            assert isinstance(info.value, RepCompilerError)
        assert "Traceback" not in str(info.value)
    assert _same(before, _snapshot(model)), "the caller's model was modified"
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporaries left


def test_opaque_reasons_lists_each_with_its_reason() -> None:
    bn_hook = nn.BatchNorm2d(4)
    bn_hook.register_forward_pre_hook(lambda mod, inp: None)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), bn_hook, WSConv(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                      nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), nn.BatchNorm2d(4), nn.ReLU())
    reasons = dict(opaque_reasons(m))
    assert set(reasons) == {"1", "2", "3", "4"}  # the plain conv and BN (0, 5) lower fine
    assert "forward hooks" in reasons["1"] and "overrides forward()" in reasons["2"]
    assert "track_running_stats=False" in reasons["3"] and "circular" in reasons["4"]


# --------------------------------------------------------------------------- files
def _write_files(d: Path) -> dict[str, Path]:
    files = {"random": d / "random.pt", "truncated": d / "trunc.pt", "foreign": d / "foreign.pt",
             "pickled": d / "model.pt"}
    files["random"].write_bytes(bytes(range(256)) * 8)
    torch.save(conv_bn().state_dict(), d / "full.pt")
    data = (d / "full.pt").read_bytes()
    files["truncated"].write_bytes(data[: len(data) // 2])
    (d / "full.pt").unlink()
    torch.save(nn.Linear(3, 3).state_dict(), files["foreign"])
    torch.save(conv_bn(), files["pickled"])
    return files


@pytest.mark.parametrize("kind,call,fragment", [
    ("random", lambda p: load_state_dict(p), "is not a torch checkpoint"),
    ("truncated", lambda p: load_state_dict(p), "damaged torch checkpoint"),
    ("foreign", lambda p: load_weights_into(conv_bn(), p), "does not match Sequential"),
    ("pickled", lambda p: load_state_dict(p), "pass it as the MODEL with --trust-pickle"),
    ("pickled", lambda p: load_pickled_model(p), "Pass --trust-pickle"),
    ("random", lambda p: load_pickled_model(p), "is not a torch checkpoint"),
])
def test_weight_files(tmp_path: Path, kind: str, call: Callable[[Path], Any], fragment: str) -> None:
    path = _write_files(tmp_path)[kind]
    with pytest.raises(RepCompilerError) as info:
        call(path)
    assert fragment in str(info.value), str(info.value)
    if kind != "pickled":  # never suggest unpickling a file that is not a checkpoint
        assert "trust" not in str(info.value) and "weights_only=False" not in str(info.value)


def test_failed_write_names_the_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only directory (simulated: tests may run as root) fails naming the destination."""
    import tempfile

    def refuse(*args: Any, prefix: str = "", suffix: str = "", dir: Any = None) -> Any:
        raise PermissionError(13, "Permission denied", os.path.join(dir, f"{prefix}x1y2z3{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    dest = tmp_path / "x.pt"
    for write in (lambda: save_atomic({"a": torch.ones(1)}, dest),
                  lambda: rc.export(conv_bn(), tmp_path / "m.onnx", X)):
        with pytest.raises(PermissionError) as info:
            write()
        assert ".tmp" not in str(info.value) and "x1y2z3" not in str(info.value)
        assert info.value.filename in (os.fspath(dest), os.fspath(tmp_path / "m.onnx"))
        assert "cannot write" in str(info.value)
    code = main(["transform", "test_cli_models:tiny_net", "-o", os.fspath(dest), "-q"])
    assert code == EXIT_ERROR
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the CLI
TINY = "test_cli_models:tiny_net"


@pytest.mark.parametrize("argv,code,fragment", [
    (["export", TINY, "--input-shape", "2,x", "-o", "{tmp}/x.onnx"], EXIT_USAGE, "argument --input-shape"),
    (["export", TINY, "--input-shape", "2,0", "-o", "{tmp}/x.onnx"], EXIT_USAGE, "must be >= 1"),
    (["export", TINY, "--model-kwargs", "{bad", "-o", "{tmp}/x.onnx"], EXIT_USAGE, "argument --model-kwargs"),
    (["export", TINY, "--model-kwargs", "[1]", "-o", "{tmp}/x.onnx"], EXIT_USAGE, "expected a JSON object"),
    (["deploy", TINY, "--policy", "{}", "--skip", "a", "-o", "{tmp}/x.pt"], EXIT_USAGE, "not allowed with"),
    (["export", TINY, "--weights", "{tmp}/random.pt", "-o", "{tmp}/x.onnx"], EXIT_ERROR, "is not a torch checkpoint"),
    (["export", TINY, "--weights", "{tmp}/trunc.pt", "-o", "{tmp}/x.onnx"], EXIT_ERROR, "damaged torch checkpoint"),
    (["export", TINY, "--weights", "{tmp}/foreign.pt", "-o", "{tmp}/x.onnx"], EXIT_ERROR, "does not match"),
    (["export", "{tmp}/model.pt", "-o", "{tmp}/x.onnx"], EXIT_ERROR, "--trust-pickle"),
    (["export", TINY, "-o", "{tmp}/x.pt2", "--format", "onnx"], EXIT_ERROR, "contradicts the suffix"),
    (["export", TINY, "-o", "{tmp}/x.pt2", "--opset", "17"], EXIT_ERROR, "opset applies only to ONNX"),
    (["export", TINY, "-o", "{tmp}/x.onnx", "--rtol", "-1"], EXIT_ERROR, "rtol must be >= 0"),
    (["export", TINY, "-o", "{tmp}/no/x.onnx"], EXIT_ERROR, "does not exist"),
])
def test_cli_bad_input(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list, code: int, fragment: str) -> None:
    _write_files(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    got = main([a.replace("{tmp}", os.fspath(tmp_path)) for a in argv] + ["-q"])
    _, err = capsys.readouterr()
    assert got == code and fragment in err, err
    assert "Traceback" not in err
    if code == EXIT_ERROR:
        assert len([ln for ln in err.splitlines() if ln.startswith("repcompiler: error:")]) == 1, err
        if "checkpoint" in fragment:
            assert "trust" not in err and "weights_only=False" not in err
    else:
        assert err.startswith(f"usage: repcompiler {argv[0]}")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written


def test_cli_fold_help_names_fold(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fold", "--help"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("usage: repcompiler fold ")


def test_cli_interrupt_exits_130(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_models, "tiny_net", interrupted)
    assert main(["deploy", TINY, "-o", os.fspath(tmp_path / "x.pt"), "-q"]) == EXIT_INTERRUPT
    assert capsys.readouterr().err == "repcompiler: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_progress_only_on_a_terminal_and_bench_is_never_silent(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    """stderr captured (not a terminal): no bar; ``bench --quick`` prints a line per form
    instead, and its header states the options used."""
    assert main(["deploy", TINY, "-o", os.fspath(tmp_path / "x.pt")]) == EXIT_OK
    err = capsys.readouterr().err
    assert "\r" not in err and "%|" not in err and "stage" not in err
    argv = ["bench", "--quick", "--model", TINY, "--batch-size", "2", "--image-size", "16", "--steps", "1",
            "--warmup", "0", "--seed", "5"]
    assert main(argv) == EXIT_OK
    out, err = capsys.readouterr()
    assert [ln.split(" (")[0] for ln in err.splitlines()] == ["bench: plain", "bench: orepa online",
                                                             "bench: orepa offline"]
    assert "\r" not in err
    head = out.splitlines()[0]
    for part in [TINY, "block orepa", "batch 2", "16x16", "median of 1 after 0 warm-up", "seed 5"]:
        assert part in head, head
    assert main(argv + ["-q"]) == EXIT_OK and capsys.readouterr().err == ""
