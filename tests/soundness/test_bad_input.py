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
import cli_models as cli_models
from repcompiler.cli import EXIT_ERROR, EXIT_INTERRUPT, EXIT_OK, EXIT_USAGE, main
from repcompiler.errors import IncompatibleError, RepCompilerError, UnsupportedError
from repcompiler.io import load_pickled_model, load_state_dict, load_weights_into, save_atomic
from repcompiler.explain.opaque import opaque_reasons

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


def lazy_conv() -> nn.Module:
    """An uninitialised ``LazyConv2d`` (no weight shape until the first forward)."""
    return nn.Sequential(nn.LazyConv2d(4, 3, padding=1), nn.BatchNorm2d(4)).eval()


def bn_var(value: float, eps: float | None = None) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        m = conv_bn()
        m[4].running_var[2] = value
        if eps is not None:
            m[4].eps = eps
        return m

    return make


def overflowing() -> nn.Module:
    """Finite weights whose conv -> BN overflows float32 to inf on any input."""
    m = conv_bn()
    with torch.no_grad():
        m[3].weight.mul_(1e36)
        m[4].running_var.fill_(1e-30)
    return m


class ReturnsNone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> None:
        self.conv(x)


class _Leaf(nn.Module):
    pass


def _expect_registered(call: Callable[[], Any]) -> Callable[[Any, Path], Any]:
    """Run a registration that must fail (nothing is registered by the row)."""
    return lambda m, d: call()


# every public entry point, every argument: a bad value raises the library's error naming
# the argument (or the module/tensor) and what to do; never a raw torch/fx/pathlib error
ENTRY_ROWS: list[tuple[str, Callable[[], Any], Callable[[Any, Path], Any], type, str]] = [
    # the model: lazy modules, BatchNorm statistics no eval BN can use, TorchScript
    *[(f"{name}-lazy", lazy_conv, call, UnsupportedError, "lazy module(s) with uninitialised parameters: 0 (LazyConv2d)")
      for name, call in [("fold", lambda m, d: rc.fold(m)), ("deploy", lambda m, d: rc.deploy(m)),
                         ("linearize", lambda m, d: rc.linearize(m)),
                         ("transform", lambda m, d: rc.orepa_transform(m)),
                         ("export", lambda m, d: rc.export(m, _out(d, "m.onnx"), X)),
                         ("quant-report", lambda m, d: rc.quant_report(m, X))]],
    ("fold-negative-running-var", bn_var(-0.5), lambda m, d: rc.fold(m, X), UnsupportedError,
     "4.running_var[2] = -0.5 is negative"),
    ("deploy-negative-running-var", bn_var(-0.5), lambda m, d: rc.deploy(m), UnsupportedError,
     "4.running_var[2] = -0.5 is negative"),
    ("fold-zero-var-eps-0", bn_var(0.0, eps=0.0), lambda m, d: rc.fold(m), UnsupportedError,
     "4.running_var[2] = 0 with eps=0: var + eps is 0"),
    ("linearize-zero-var-eps-0", bn_var(0.0, eps=0.0), lambda m, d: rc.linearize(m, init="from_bn"),
     UnsupportedError, "4.running_var[2] = 0 with eps=0"),
    ("fold-overflow", overflowing, lambda m, d: rc.fold(m), rc.VerificationError,
     "region 3 -> 4: the original modules give NaN/inf on a random input"),
    ("fold-torchscript", lambda: torch.jit.script(conv_bn()), lambda m, d: rc.fold(m), UnsupportedError,
     "TorchScript modules cannot be traced"),
    # fold / deploy options
    ("fold-rules-dict", conv_bn, lambda m, d: rc.fold(m, rules={}), UnsupportedError,
     "fold: rules must be a RuleRegistry (or None for the global one), got dict"),
    ("deploy-rules-int", conv_bn, lambda m, d: rc.deploy(m, rules=3), UnsupportedError, "deploy: rules must be a"),
    ("fold-inplace-str", conv_bn, lambda m, d: rc.fold(m, inplace="no"), UnsupportedError,
     "fold: inplace must be True or False, got 'no'"),
    ("fold-verify-int", conv_bn, lambda m, d: rc.fold(m, verify=0), UnsupportedError, "verify must be True or False"),
    ("deploy-merge-convs-str", conv_bn, lambda m, d: rc.deploy(m, merge_convs="yes"), UnsupportedError,
     "deploy: merge_convs must be True or False"),
    ("fold-report-none", conv_bn, lambda m, d: rc.fold(m, return_report=None), UnsupportedError,
     "return_report must be True or False"),
    ("fold-inputs-int", conv_bn, lambda m, d: rc.fold(m, 3), UnsupportedError,
     "example_inputs must be a tensor or a tuple"),
    # linearize / linearize_regions
    ("linearize-post-bn-str", conv_bn, lambda m, d: rc.linearize(m, post_bn="no"), UnsupportedError,
     "linearize: post_bn must be True or False"),
    ("linearize-rules-dict", conv_bn, lambda m, d: rc.linearize(m, rules={}), UnsupportedError, "rules must be a"),
    ("linearize-init", conv_bn, lambda m, d: rc.linearize(m, init="bn"), UnsupportedError, "init must be one of"),
    ("linearize-nan", with_nan, lambda m, d: rc.linearize(m), UnsupportedError, "non-finite weights"),
    ("linearize-regions-non-module", lambda: 3, lambda m, d: rc.linearize_regions(m), UnsupportedError,
     "linearize_regions expects an nn.Module, got int"),
    ("linearize-regions-mode", conv_bn, lambda m, d: rc.linearize_regions(m, mode="train"), UnsupportedError,
     "mode must be one of"),
    ("linearize-regions-verify-str", conv_bn, lambda m, d: rc.linearize_regions(m, verify="yes"), UnsupportedError,
     "verify must be True or False"),
    # orepa_transform
    ("transform-prior-3", conv_bn, lambda m, d: rc.orepa_transform(m, block_options={"prior": 3}), UnsupportedError,
     "prior must be one of ('dct', 'official', None), got 3"),
    ("transform-weight-init-bad", conv_bn, lambda m, d: rc.orepa_transform(m, block_options={"weight_init": "x"}),
     UnsupportedError, "weight_init must be one of"),
    ("transform-bool-option-str", conv_bn,
     lambda m, d: rc.orepa_transform(m, block_options={"depthwise_separable": "no"}), UnsupportedError,
     "block_options['depthwise_separable'] must be True or False"),
    ("transform-options-list", conv_bn, lambda m, d: rc.orepa_transform(m, block_options=[("prior", None)]),
     UnsupportedError, "block_options must be a dict, got list"),
    ("transform-insert-bn-str", conv_bn, lambda m, d: rc.orepa_transform(m, insert_bn="no"), UnsupportedError,
     "insert_bn must be True, False or None, got 'no'"),
    ("transform-post-bn-int", conv_bn, lambda m, d: rc.orepa_transform(m, post_bn=0), UnsupportedError,
     "post_bn must be True or False"),
    ("transform-inplace-str", conv_bn, lambda m, d: rc.orepa_transform(m, inplace="no"), UnsupportedError,
     "inplace must be True or False"),
    ("transform-block-int", conv_bn, lambda m, d: rc.orepa_transform(m, block=3), rc.RegistrationError,
     "no block named 3"),
    ("transform-policy-int", conv_bn, lambda m, d: rc.orepa_transform(m, policy=3), UnsupportedError,
     "policy must be"),
    ("transform-init", conv_bn, lambda m, d: rc.orepa_transform(m, init="conv"), UnsupportedError,
     "init must be one of"),
    # export
    ("export-path-int", conv_bn, lambda m, d: rc.export(m, 3, X), UnsupportedError,
     "export: path must be a str or an os.PathLike, got int"),
    ("export-path-bytes", conv_bn, lambda m, d: rc.export(m, os.fsencode(_out(d, "m.onnx")), X), UnsupportedError,
     "decode a bytes path first"),
    ("export-path-empty", conv_bn, lambda m, d: rc.export(m, "", X), UnsupportedError, "export: path is empty"),
    ("export-format-int", conv_bn, lambda m, d: rc.export(m, _out(d, "m.onnx"), X, format=3), UnsupportedError,
     "format must be a string"),
    ("export-deploy-str", conv_bn, lambda m, d: rc.export(m, _out(d, "m.onnx"), X, deploy="no"), UnsupportedError,
     "export: deploy must be True or False"),
    ("export-optimize-str", conv_bn, lambda m, d: rc.export(m, _out(d, "m.onnx"), X, onnx_optimize="no"),
     UnsupportedError, "onnx_optimize must be True, False or None"),
    ("export-float64-onnx", lambda: conv_bn().double(), lambda m, d: rc.export(m, _out(d, "m.onnx"), X.double()),
     UnsupportedError, "no float64 Conv kernel"),
    ("export-returns-none", ReturnsNone, lambda m, d: rc.export(m, _out(d, "m.onnx"), X), UnsupportedError,
     "ReturnsNone returns no tensor (its output is NoneType)"),
    ("export-rtol-str", conv_bn, lambda m, d: rc.export(m, _out(d, "m.onnx"), X, rtol="1e-4"), UnsupportedError,
     "rtol must be a number"),
    # quant_report, accumulate, tracing
    ("quant-report-bits-str", conv_bn, lambda m, d: rc.quant_report(m, X, bits="8"), UnsupportedError,
     "bits must be an integer"),
    ("quant-report-inputs-none", conv_bn, lambda m, d: rc.quant_report(m, None), UnsupportedError,
     "calibration_inputs must be"),
    ("accumulate-non-module", lambda: 3, lambda m, d: rc.accumulate(m), UnsupportedError,
     "model must be an nn.Module"),
    ("trace-model-non-module", lambda: 3, lambda m, d: rc.trace_model(m), rc.TraceError,
     "trace_model expects an nn.Module"),
    ("trace-model-rules", conv_bn, lambda m, d: rc.trace_model(m, rules={}), UnsupportedError,
     "trace_model: rules must be a RuleRegistry"),
    ("trace-model-leaves-int", conv_bn, lambda m, d: rc.trace_model(m, extra_leaves=3), rc.TraceError,
     "extra_leaves must be a list or tuple of nn.Module subclasses"),
    ("trace-units-non-module", lambda: 3, lambda m, d: rc.trace_units(m), rc.TraceError,
     "trace_units expects an nn.Module"),
    # registration
    ("register-rule-not-callable", lambda: None, _expect_registered(lambda: rc.register_rule(_Leaf, 3)),
     rc.RegistrationError, "must be callable"),
    ("register-rule-override-str", lambda: None,
     _expect_registered(lambda: rc.register_rule(_Leaf, lambda m: None, override="no")), rc.RegistrationError,
     "override must be True or False"),
    ("register-rule-target-str", lambda: None, _expect_registered(lambda: rc.register_rule("Conv2d", lambda m: None)),
     rc.RegistrationError, "rule target must be a module type or a function"),
    ("register-block-override-str", lambda: None,
     _expect_registered(lambda: rc.register_block("bad_row_block", lambda g: None, override="no")),
     rc.RegistrationError, "override must be True or False"),
    ("register-block-empty-name", lambda: None, _expect_registered(lambda: rc.register_block("", lambda g: None)),
     rc.RegistrationError, "non-empty string"),
    ("register-block-duplicate", lambda: None, _expect_registered(lambda: rc.register_block("orepa", lambda g: None)),
     rc.RegistrationError, "already registered (pass override=True)"),
]


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
    if not isinstance(model, nn.Module) or any(t.is_meta or isinstance(t, nn.parameter.UninitializedTensorMixin)
                                               for t in model.state_dict().values()):
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


@pytest.mark.parametrize("case", ENTRY_ROWS, ids=[r[0] for r in ENTRY_ROWS])
def test_entry_point_bad_argument(case: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each public entry point checks its arguments up front: the library's error (one
    of its subclasses) naming the argument, the caller's model unchanged, nothing written,
    nothing registered."""
    name, make, call, error, fragment = case
    test_library_bad_input((name, make, call, error, fragment, None), tmp_path, monkeypatch)
    assert "bad_row_block" not in rc.available_blocks()
    assert rc.lookup_rule(_Leaf()) is None


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
    code = main(["transform", "cli_models:tiny_net", "-o", os.fspath(dest), "-q"])
    assert code == EXIT_ERROR
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the CLI
TINY = "cli_models:tiny_net"


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
    (["export", TINY, "-o", "{tmp}/x.onnx", "--opset", "3"], EXIT_ERROR, "opset must be an integer >= 7"),
    (["transform", TINY, "--block", "nope", "-o", "{tmp}/x.pt"], EXIT_ERROR, "no block named 'nope'"),
    (["deploy", "cli_models:not_a_module", "-o", "{tmp}/x.pt"], EXIT_ERROR, "int"),
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
