"""Atomic writes: a reader never sees a half-written file, and a failed write leaves
no file behind (and the previous one untouched).

Everything is written into a temporary file (or directory, for artifacts made of
several files such as ONNX with external data) in the destination directory, flushed
to disk, then moved into place with :func:`os.replace`. An ``OSError`` on the way
(a read-only directory, a full disk) names the **destination**, never the temporary
file.

Owns :func:`atomic_path`, :func:`atomic_dir`, :func:`atomic_write_bytes`,
:func:`save_atomic` and :func:`check_output_path`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_path", "atomic_dir", "atomic_write_bytes", "save_atomic", "check_output_path"]


@contextlib.contextmanager
def _naming(dest: Path) -> Iterator[None]:
    """Re-raise an ``OSError`` about one of ``dest``'s temporaries (``.<name>.*`` in its
    directory, or a file inside such a temporary directory) as the same error about ``dest``."""
    try:
        yield
    except OSError as e:
        name = os.path.abspath(os.fspath(e.filename)) if e.filename is not None else ""
        ours = os.path.abspath(dest.parent / f".{dest.name}.")
        if not name.startswith(ours):
            raise
        raise type(e)(e.errno, f"cannot write {dest}: {e.strerror or e}", os.fspath(dest)) from e


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
    with _naming(dest):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with _naming(dest):
            yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{tmp}: nothing was written for {dest}")
        with _naming(dest):
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
    with _naming(dest):
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmpdir", dir=dest.parent))
    try:
        with _naming(dest):
            yield tmpdir
        main = tmpdir / dest.name
        if not main.exists():
            raise FileNotFoundError(f"{main}: nothing was written for {dest}")
        _move_into_place(tmpdir, main, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _move_into_place(tmpdir: Path, main: Path, dest: Path) -> None:
    """Companions first, the main file last (see :func:`atomic_dir`)."""
    with _naming(dest):
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
