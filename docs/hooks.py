"""mkdocs hook: publish the figures the benchmarks write (outside ``docs/``) with the site.

The pages link them by their repository path (``benchmarks/paper/figures/...``), so a
figure is always the one the last recorded run wrote; a missing one fails the strict build.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ("benchmarks/paper/figures",)


def on_files(files: Files, config) -> Files:
    for folder in FIGURES:
        for png in sorted((ROOT / folder).glob("*.png")):
            rel = png.relative_to(ROOT).as_posix()
            files.append(File(rel, src_dir=str(ROOT), dest_dir=config["site_dir"], use_directory_urls=config["use_directory_urls"]))
    return files
