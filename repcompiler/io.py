"""Files and model specs: safe loading, atomic writing, and ``torchvision:resnet50``-style names.

Safety rules this module enforces (the CLI and :func:`repcompiler.export` build on them):

* **State dicts** load with ``torch.load(..., weights_only=True)``: tensors and plain
  containers only, no code runs.
* **Whole pickled models** (``torch.save(model)``) execute arbitrary code when loaded;
  :func:`load_pickled_model` refuses unless ``trust_pickle=True``.
* **Every output is written atomically**: into a temporary file (or directory, for
  artifacts made of several files such as ONNX with external data) in the destination
  directory, flushed to disk, then moved into place with :func:`os.replace`. A reader
  never sees a half-written file, and a failed write leaves no file behind.

Model specs (:func:`parse_model_spec`, :func:`build_model`):

* ``torchvision:NAME``  - ``torchvision.models.get_model(NAME, weights=None, **kwargs)``;
* ``timm:NAME``         - ``timm.create_model(NAME, pretrained=False, **kwargs)`` (needs timm);
* ``package.module:factory`` - imports ``package.module`` and calls ``factory(**kwargs)``
  (``factory`` may be a dotted attribute path, e.g. ``mymodels:Nets.small``).

Pretrained weights are never downloaded; pass a state dict file instead.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import RepCompilerError, UnsupportedError

__all__ = [
    "ModelSpec",
    "parse_model_spec",
    "build_model",
    "load_model",
    "load_state_dict",
    "load_weights_into",
    "load_pickled_model",
    "atomic_path",
    "atomic_dir",
    "atomic_write_bytes",
    "save_atomic",
    "parse_shape",
    "check_output_path",
]

log = logging.getLogger(__name__)

_STATE_DICT_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "module")


# ----------------------------------------------------------------------------------
# atomic writes
# ----------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    except OSError:  # pragma: no cover - fsync unsupported on some filesystems
        pass


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # pragma: no cover
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _dest(path: str | os.PathLike[str]) -> Path:
    dest = Path(path).expanduser()
    if dest.is_dir():
        raise IsADirectoryError(f"{dest}: is a directory (give a file name)")
    if not dest.parent.exists():
        raise FileNotFoundError(f"{dest.parent}: output directory does not exist")
    return dest


def check_output_path(path: str | os.PathLike[str]) -> Path:
    """Fail early (before expensive work) if ``path`` cannot be written: its directory
    must exist and it must not be a directory. Returns the expanded path."""
    return _dest(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it onto ``path``.

    Write the whole file to the yielded path inside the ``with`` block. When the block
    exits normally the file is fsynced, given the usual permissions (``0o666 & ~umask``)
    and renamed onto ``path`` with :func:`os.replace` (atomic on POSIX and Windows, same
    filesystem). When the block raises, the temporary file is removed and ``path`` is
    left as it was.
    """
    dest = _dest(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written for {dest}")
        os.chmod(tmp, 0o666 & ~_umask())
        _fsync_file(tmp)
        os.replace(tmp, dest)
        _fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Atomic write of an artifact that may consist of several files.

    Yields a fresh temporary directory inside ``path``'s directory; write the main file
    as ``tmpdir / Path(path).name`` and any companion files (e.g. ONNX external data,
    referenced by a *relative* name) next to it. On success every companion file is
    moved into the destination directory first and the main file last, so the main
    file only appears once everything it references is complete. On failure the
    temporary directory is removed and nothing is written.
    """
    dest = _dest(path)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmpdir", dir=dest.parent))
    try:
        yield tmpdir
        main = tmpdir / dest.name
        if not main.exists():
            raise FileNotFoundError(f"{main}: nothing was written for {dest}")
        mode = 0o666 & ~_umask()
        companions = [p for p in sorted(tmpdir.rglob("*")) if p.is_file() and p != main]
        for p in companions:
            target = dest.parent / p.relative_to(tmpdir)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(p, mode)
            _fsync_file(p)
            os.replace(p, target)
        os.chmod(main, mode)
        _fsync_file(main)
        os.replace(main, dest)
        _fsync_dir(dest.parent)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the destination path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_atomic(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically (temp file in the same directory, then rename)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


# ----------------------------------------------------------------------------------
# safe loading
# ----------------------------------------------------------------------------------
def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _is_torchscript_archive(path: Path) -> bool:
    """A TorchScript (``torch.jit.save``) zip: it has ``code/`` and ``constants.pkl`` entries."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _refuse_torchscript(p: Path) -> None:
    if _is_torchscript_archive(p):
        raise RepCompilerError(
            f"{p}: is a TorchScript archive (torch.jit.save), not a state dict or an nn.Module; "
            "it cannot be transformed or folded"
        )


def load_state_dict(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a state dict with ``torch.load(..., weights_only=True)`` (no code runs).

    Accepts a plain ``{name: tensor}`` mapping, or a checkpoint that wraps one under a
    common key (``state_dict``, ``model_state_dict``, ``model``, ``net``, ``module``).
    A ``module.`` prefix on every key (``DataParallel``) is stripped.

    Raises:
        FileNotFoundError: the file does not exist.
        RepCompilerError: the file is not a state dict, or holds objects that only a
            full (unsafe) unpickling could load; the message says what to do.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    _refuse_torchscript(p)
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends
        raise RepCompilerError(
            f"{p}: cannot be loaded safely as a state dict (weights_only=True): {_first_line(e)}. "
            "If it is a whole pickled model you trust, pass it as the MODEL with --trust-pickle"
        ) from e
    if isinstance(obj, nn.Module):  # pragma: no cover - weights_only never yields modules
        return obj.state_dict()
    if not _is_tensor_dict(obj) and isinstance(obj, Mapping):
        for key in _STATE_DICT_WRAPPERS:
            if key in obj and _is_tensor_dict(obj[key]):
                log.info("%s: using the state dict stored under %r", p, key)
                obj = obj[key]
                break
    if not _is_tensor_dict(obj):
        raise RepCompilerError(f"{p}: not a state dict (expected a mapping of names to tensors, got {type(obj).__name__})")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def load_weights_into(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> nn.Module:
    """Load the state dict in ``path`` (safely) into ``model``; strict by default.

    Raises :class:`RepCompilerError` naming a few missing / unexpected / mis-shaped keys.
    """
    sd = load_state_dict(path)
    own = model.state_dict()
    bad_shape = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad_shape:
        k = bad_shape[0]
        raise RepCompilerError(
            f"{path}: {len(bad_shape)} tensor(s) do not fit {type(model).__name__}, e.g. {k!r} "
            f"has shape {tuple(sd[k].shape)} in the file, {tuple(own[k].shape)} in the model"
        )
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise RepCompilerError(
            f"{path}: state dict does not match {type(model).__name__}: " + "; ".join(parts)
            + " (was it saved from a transformed model? then transform before loading)"
        )
    model.load_state_dict(sd, strict=strict)
    return model


def load_pickled_model(
    path: str | os.PathLike[str], *, trust_pickle: bool = False, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load a whole model saved with ``torch.save(model)``.

    Unpickling runs arbitrary code from the file, so this refuses unless
    ``trust_pickle=True``. Without it, the file is probed safely (``weights_only=True``)
    so the error can tell a state dict (use it as weights) from a pickled model.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    _refuse_torchscript(p)
    if not trust_pickle:
        try:
            obj = torch.load(p, map_location=map_location, weights_only=True)
        except Exception:
            raise RepCompilerError(
                f"{p}: is a pickled object; loading it runs arbitrary code from the file. "
                "Pass --trust-pickle (trust_pickle=True) only if you trust its origin"
            ) from None
        kind = "a state dict" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise RepCompilerError(
            f"{p}: holds {kind}, not a model; name the architecture (e.g. torchvision:resnet18) "
            "and pass this file with --weights"
        )
    log.warning("unpickling %s with weights_only=False (trusted by the caller)", p)
    obj = torch.load(p, map_location=map_location, weights_only=False)
    if isinstance(obj, torch.jit.ScriptModule) or not isinstance(obj, nn.Module):
        raise RepCompilerError(f"{p}: holds a {type(obj).__name__}, not an nn.Module")
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


# ----------------------------------------------------------------------------------
# model specs
# ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: ``source`` is ``"torchvision"``, ``"timm"`` or ``"python"``."""

    source: str
    name: str
    module: str = ""

    def __str__(self) -> str:
        if self.source == "python":
            return f"{self.module}:{self.name}"
        return f"{self.source}:{self.name}"


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse ``torchvision:NAME``, ``timm:NAME`` or ``package.module:factory``.

    Raises :class:`RepCompilerError` with the accepted forms when ``spec`` is malformed.
    """
    text = spec.strip()
    prefix, sep, name = text.partition(":")
    if not sep or not prefix or not name or ":" in name:
        raise RepCompilerError(
            f"model {spec!r}: expected torchvision:NAME, timm:NAME, package.module:factory "
            "or the path of an existing model file"
        )
    if prefix in ("torchvision", "tv"):
        return ModelSpec("torchvision", name)
    if prefix == "timm":
        return ModelSpec("timm", name)
    if not all(part.isidentifier() for part in prefix.split(".")) or not all(
        part.isidentifier() for part in name.split(".")
    ):
        raise RepCompilerError(f"model {spec!r}: {prefix!r}:{name!r} is not a valid module path and factory name")
    return ModelSpec("python", name, module=prefix)


def build_model(spec: str | ModelSpec, **kwargs: Any) -> nn.Module:
    """Build the model named by ``spec`` with random weights (never downloads any).

    ``kwargs`` go to the factory (e.g. ``num_classes=10``).
    """
    ms = parse_model_spec(spec) if isinstance(spec, str) else spec
    if ms.source == "torchvision":
        import torchvision

        if "weights" in kwargs or "pretrained" in kwargs:
            raise RepCompilerError(f"{ms}: pretrained weights are not downloaded; pass a state dict with --weights")
        try:
            model = torchvision.models.get_model(ms.name, weights=None, **kwargs)
        except ValueError as e:
            raise RepCompilerError(f"{ms}: unknown torchvision model ({_first_line(e)})") from e
    elif ms.source == "timm":
        try:
            import timm
        except ImportError as e:
            raise UnsupportedError(f"{ms}: timm is not installed (pip install timm)") from e
        kwargs.pop("pretrained", None)
        try:
            model = timm.create_model(ms.name, pretrained=False, **kwargs)
        except RuntimeError as e:
            raise RepCompilerError(f"{ms}: {_first_line(e)}") from e
    else:
        try:
            mod = importlib.import_module(ms.module)
        except ImportError as e:
            raise RepCompilerError(f"{ms}: cannot import module {ms.module!r} ({_first_line(e)})") from e
        factory: Any = mod
        for attr in ms.name.split("."):
            if not hasattr(factory, attr):
                raise RepCompilerError(f"{ms}: module {ms.module!r} has no attribute {ms.name!r}")
            factory = getattr(factory, attr)
        if not callable(factory):
            raise RepCompilerError(f"{ms}: {ms.name!r} is not callable")
        model = _call(factory, kwargs, ms)
    if not isinstance(model, nn.Module):
        raise RepCompilerError(f"{ms}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def _call(factory: Callable[..., Any], kwargs: dict[str, Any], ms: ModelSpec) -> Any:
    try:
        return factory(**kwargs)
    except TypeError as e:
        raise RepCompilerError(f"{ms}: calling {ms.name}(**{kwargs}) failed: {_first_line(e)}") from e


def load_model(
    source: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    trust_pickle: bool = False,
    model_kwargs: dict[str, Any] | None = None,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
) -> nn.Module:
    """Build or load a model, then (optionally) load weights into it.

    ``source`` is an existing file (a whole pickled model; needs ``trust_pickle``) or a
    model spec (see :func:`parse_model_spec`). ``prepare`` (e.g. an OREPA transform) is
    applied *before* the weights are loaded, so a state dict saved from a transformed
    model loads into a freshly transformed one. Weights load strictly and safely.
    """
    text = os.fspath(source)
    if Path(text).expanduser().is_file():
        if model_kwargs:
            raise RepCompilerError(f"{text}: model keyword arguments only apply to a model spec, not a file")
        model = load_pickled_model(text, trust_pickle=trust_pickle)
    else:
        if any(text.endswith(s) for s in (".pt", ".pth", ".pkl", ".bin", ".ckpt")) and ":" not in text:
            raise FileNotFoundError(f"{text}: no such file")
        model = build_model(text, **(model_kwargs or {}))
    if prepare is not None:
        model = prepare(model)
    if weights is not None:
        load_weights_into(model, weights)
    return model


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; every entry >= 1."""
    parts = text.replace("x", ",").replace(" ", "").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise RepCompilerError(f"input shape {text!r}: expected integers like 1,3,224,224") from None
    if not shape or any(s < 1 for s in shape):
        raise RepCompilerError(f"input shape {text!r}: every dimension must be >= 1")
    return shape
