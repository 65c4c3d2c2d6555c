"""Safe loading, atomic writing and model specs (repcompiler.io)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

import cli_models as models
from repcompiler.errors import RepCompilerError, UnsupportedError
from repcompiler.io import (
    ModelSpec,
    atomic_dir,
    atomic_path,
    atomic_write_bytes,
    build_model,
    check_output_path,
    load_model,
    load_pickled_model,
    load_state_dict,
    load_weights_into,
    parse_model_spec,
    parse_shape,
    save_atomic,
)

_MARKER = Path(os.environ.get("TMPDIR", "/tmp")) / "repcompiler_test_io_pwned"


class _Evil:
    """Unpickling this runs code (creates a marker file): a stand-in for a malicious file."""

    def __reduce__(self):
        return (os.system, (f"touch {_MARKER}",))


def _leftovers(d: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


# --------------------------------------------------------------------------- atomic
def test_atomic_path_replaces_and_cleans(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with atomic_path(dest) as tmp:
        assert tmp.parent == tmp_path and tmp != dest
        tmp.write_bytes(b"new")
        assert dest.read_bytes() == b"old"  # not visible before the block ends
    assert dest.read_bytes() == b"new"
    assert _leftovers(tmp_path, {"out.bin"}) == []
    mode = dest.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not mkstemp's 0600


def test_atomic_path_failure_keeps_old_file(tmp_path: Path) -> None:
    dest = tmp_path / "out.bin"
    dest.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash while writing")
    assert dest.read_bytes() == b"old"
    assert _leftovers(tmp_path, {"out.bin"}) == []


def test_atomic_write_new_file_failure_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "model.pt"

    class Unpicklable:
        def __reduce__(self):
            raise TypeError("cannot pickle this")

    with pytest.raises(Exception):
        save_atomic({"w": torch.ones(2), "x": Unpicklable()}, dest)
    assert list(tmp_path.iterdir()) == []
    atomic_write_bytes(dest, b"abc")
    assert dest.read_bytes() == b"abc"


def test_atomic_dir_moves_companions_first(tmp_path: Path) -> None:
    dest = tmp_path / "m.onnx"
    with atomic_dir(dest) as d:
        (d / "m.onnx").write_bytes(b"graph")
        (d / "m.onnx.data").write_bytes(b"weights")
    assert dest.read_bytes() == b"graph"
    assert (tmp_path / "m.onnx.data").read_bytes() == b"weights"
    assert _leftovers(tmp_path, {"m.onnx", "m.onnx.data"}) == []
    with pytest.raises(ValueError):
        with atomic_dir(dest) as d:
            (d / "m.onnx").write_bytes(b"broken")
            raise ValueError("export failed")
    assert dest.read_bytes() == b"graph"
    assert _leftovers(tmp_path, {"m.onnx", "m.onnx.data"}) == []
    with pytest.raises(FileNotFoundError):  # nothing written under the main name
        with atomic_dir(tmp_path / "other.onnx") as d:
            (d / "wrong_name.onnx").write_bytes(b"x")
    assert not (tmp_path / "other.onnx").exists() and not (tmp_path / "wrong_name.onnx").exists()


def test_output_path_checks(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        check_output_path(tmp_path / "missing_dir" / "x.pt")
    with pytest.raises(IsADirectoryError):
        check_output_path(tmp_path)
    assert check_output_path(tmp_path / "x.pt") == tmp_path / "x.pt"


# --------------------------------------------------------------------------- loading
def test_state_dict_roundtrip_wrapped_and_prefixed(tmp_path: Path) -> None:
    m = models.tiny_net(seed=1)
    sd = m.state_dict()
    for i, obj in enumerate([sd, {"state_dict": sd, "epoch": 3}, {f"module.{k}": v for k, v in sd.items()}]):
        f = tmp_path / f"w{i}.pt"
        save_atomic(obj, f)
        fresh = load_weights_into(models.tiny_net(seed=2), f)
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, sd[k]), k


def test_state_dict_load_is_safe(tmp_path: Path) -> None:
    f = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "payload": _Evil()}, f)
    _MARKER.unlink(missing_ok=True)
    with pytest.raises(RepCompilerError, match="cannot be loaded safely"):
        load_state_dict(f)
    with pytest.raises(RepCompilerError, match="--trust-pickle"):
        load_pickled_model(f)
    assert not _MARKER.exists(), "a state-dict load executed code from the file"


def test_state_dict_mismatch_messages(tmp_path: Path) -> None:
    f = tmp_path / "w.pt"
    save_atomic(models.tiny_net(width=8).state_dict(), f)
    with pytest.raises(RepCompilerError, match="shape"):
        load_weights_into(models.tiny_net(width=4), f)
    sd = models.tiny_net().state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    save_atomic(sd, f)
    with pytest.raises(RepCompilerError, match="1 missing .*fc.bias.*1 unexpected .*extra.weight"):
        load_weights_into(models.tiny_net(), f)
    save_atomic([1, 2, 3], f)
    with pytest.raises(RepCompilerError, match="not a state dict"):
        load_state_dict(f)
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "nope.pt")


def test_pickled_model_needs_trust(tmp_path: Path) -> None:
    m = models.tiny_net(seed=3).eval()
    f = tmp_path / "whole.pt"
    save_atomic(m, f)
    with pytest.raises(RepCompilerError, match="--trust-pickle"):
        load_pickled_model(f)
    with pytest.raises(RepCompilerError, match="--trust-pickle"):
        load_model(os.fspath(f))
    loaded = load_model(os.fspath(f), trust_pickle=True)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded.eval()(x), m(x))
    sd_file = tmp_path / "sd.pt"
    save_atomic(m.state_dict(), sd_file)
    with pytest.raises(RepCompilerError, match="--weights"):  # a state dict given as the model
        load_pickled_model(sd_file)
    save_atomic(3, f)
    with pytest.raises(RepCompilerError, match="not an nn.Module"):
        load_pickled_model(f, trust_pickle=True)


def test_torchscript_archive_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "m.ts"
    torch.jit.save(torch.jit.trace(models.tiny_net().eval(), torch.randn(1, 3, 8, 8)), f)
    with pytest.raises(RepCompilerError, match="TorchScript archive"):
        load_state_dict(f)
    with pytest.raises(RepCompilerError, match="TorchScript archive"):
        load_pickled_model(f, trust_pickle=True)


# --------------------------------------------------------------------------- specs
def test_parse_model_spec() -> None:
    assert parse_model_spec("torchvision:resnet50") == ModelSpec("torchvision", "resnet50")
    assert parse_model_spec("timm:repvgg_a0") == ModelSpec("timm", "repvgg_a0")
    assert parse_model_spec("pkg.mod:make.net") == ModelSpec("python", "make.net", module="pkg.mod")
    assert str(parse_model_spec("pkg.mod:factory")) == "pkg.mod:factory"
    for bad in ["resnet50", "torchvision:", ":x", "a:b:c", "1pkg:f", "pkg:f-g"]:
        with pytest.raises(RepCompilerError):
            parse_model_spec(bad)


def test_build_model_sources() -> None:
    m = build_model("torchvision:resnet18", num_classes=7)
    assert m.fc.out_features == 7
    net = build_model("cli_models:tiny_net", width=4)
    assert isinstance(net, models.TinyNet) and net.stem.out_channels == 4
    assert isinstance(build_model("cli_models:TinyNet"), models.TinyNet)  # a class is a factory
    with pytest.raises(RepCompilerError, match="unknown torchvision model"):
        build_model("torchvision:no_such_net")
    with pytest.raises(RepCompilerError, match="not an nn.Module"):
        build_model("cli_models:not_a_module")
    with pytest.raises(RepCompilerError, match="no attribute"):
        build_model("cli_models:missing")
    with pytest.raises(RepCompilerError, match="cannot import"):
        build_model("no_such_pkg_xyz.mod:f")
    with pytest.raises(RepCompilerError, match="failed"):
        build_model("cli_models:tiny_net", bogus=1)
    with pytest.raises(RepCompilerError, match="pretrained"):
        build_model("torchvision:resnet18", weights="DEFAULT")


def test_build_timm_model_never_pretrained() -> None:
    timm = pytest.importorskip("timm")
    m = build_model("timm:repvgg_a0", pretrained=True, num_classes=3)  # pretrained is forced off
    assert isinstance(m, nn.Module) and m.get_classifier().out_features == 3
    assert timm is not None


def test_load_model_prepare_runs_before_weights(tmp_path: Path) -> None:
    order: list[str] = []

    def prepare(m: nn.Module) -> nn.Module:
        order.append("prepare")
        m.extra = nn.Linear(1, 1)  # the state dict below only fits the prepared model
        return m

    src = prepare(models.tiny_net(seed=5))
    f = tmp_path / "prepared.pt"
    save_atomic(src.state_dict(), f)
    order.clear()
    m = load_model("cli_models:tiny_net", weights=f, prepare=prepare)
    assert order == ["prepare"] and torch.equal(m.extra.weight, src.extra.weight)
    with pytest.raises(FileNotFoundError):
        load_model("missing_model.pt")


def test_parse_shape() -> None:
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_shape("2x3x8x8") == (2, 3, 8, 8)
    for bad in ["", "a,b", "1,0,3", "-1,3"]:
        with pytest.raises(RepCompilerError):
            parse_shape(bad)


def test_unsupported_error_is_a_repcompiler_error() -> None:
    assert issubclass(UnsupportedError, RepCompilerError)
    assert pickle.loads(pickle.dumps(ModelSpec("timm", "x"))) == ModelSpec("timm", "x")
