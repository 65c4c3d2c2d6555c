"""Packaging: installing repcompiler adds exactly one top-level name, and every package
of the source tree is installed (``passes/`` as ``repcompiler.passes``)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _source_packages() -> set[str]:
    found = set()
    for top, name in (("repcompiler", "repcompiler"), ("passes", "repcompiler.passes")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top)
            found.add(".".join([name, *rel.parts]))
    return found


def test_every_source_package_is_listed() -> None:
    cfg = _config()
    assert cfg["package-dir"]["repcompiler.passes"] == "passes"
    assert set(cfg["packages"]) == _source_packages()


@pytest.mark.slow
def test_wheel_has_one_top_level_name(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    wheel = next(tmp_path.glob("repcompiler-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"repcompiler"}
    assert "repcompiler/passes/find_regions.py" in names
    assert not any(n.startswith("passes/") for n in names)
