"""The documentation is part of what the suite tests.

* Every ```` ```python ```` block of README.md and docs/**/*.md runs as written: the
  blocks of one page run in order in one namespace (a later block uses what an earlier
  one defined), in a temporary working directory. ```` ```pycon ```` blocks are doctest
  sessions: they run in the same namespace and their shown output is compared
  (``ELLIPSIS`` and ``NORMALIZE_WHITESPACE``).
* Every fence names its language, so a code block is either run or declared not to be
  python (``bash``, ``text``, ...).
* ``mkdocs build --strict`` of the site succeeds (skipped only when mkdocs and its
  plugins are not installed: ``pip install -e ".[docs]"``).
* Figures the prose quotes from recorded benchmark results equal the recorded files.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN = {"python", "pycon"}
NOT_PYTHON = {"bash", "text", "yaml", "toml", "json", "console"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass
class Block:
    lang: str
    line: int  # 1-based line of the first code line
    code: str


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, with their language and first line."""
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m or (m["fence"][0] == "`" and "`" in m["info"]):  # CommonMark: inline code, not a fence
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        lang = m["info"].strip().split(" ")[0].strip("{}.") if m["info"].strip() else ""
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not (lines[j].strip() == fence and lines[j].startswith(indent)):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        if j == len(lines):
            raise AssertionError(f"{_page_id(path)}:{i + 1}: fence never closed")
        blocks.append(Block(lang, i + 2, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def _page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name


RUNNABLE = [p for p in PAGES if any(b.lang in RUN for b in code_blocks(p))]


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_every_fence_names_its_language(page: Path) -> None:
    bad = [(b.line - 1, b.lang or "(none)") for b in code_blocks(page) if b.lang not in RUN | NOT_PYTHON]
    assert not bad, f"{_page_id(page)}: fences without a known language (line, language): {bad}"


@pytest.mark.parametrize("page", RUNNABLE, ids=_page_id)
def test_code_blocks_run(page: Path, tmp_path, monkeypatch) -> None:
    import torch

    import repcompiler as rc

    monkeypatch.chdir(tmp_path)
    blocks_before = set(rc.available_blocks())
    threads = torch.get_num_threads()
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    try:
        for block in code_blocks(page):
            where = f"{_page_id(page)}:{block.line}"
            if block.lang == "python":
                # pad so that a traceback's line numbers are the markdown file's
                code = compile("\n" * (block.line - 1) + block.code, str(page), "exec")
                exec(code, namespace)
            elif block.lang == "pycon":
                test = doctest.DocTestParser().get_doctest(block.code, {}, where, str(page), block.line - 1)
                test.globs = namespace  # get_doctest copies the globals; the page shares one namespace
                runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
                out: list[str] = []
                runner.run(test, out=out.append, clear_globs=False)
                assert runner.failures == 0, f"{where}: shown output differs\n" + "".join(out)
    finally:
        for name in set(rc.available_blocks()) - blocks_before:  # a page's own blocks
            rc.unregister_block(name)
        torch.set_num_threads(threads)


def test_collector_sees_every_kind_of_block(tmp_path) -> None:
    page = tmp_path / "p.md"
    page.write_text("text\n```python\nx = 1\n```\n\n* item\n\n    ```pycon\n    >>> x\n    1\n    ```\n"
                    "```bash\nls\n```\n```\nbare\n```\n  ```` ```python ```` is inline code\n")
    blocks = code_blocks(page)
    assert [(b.lang, b.line) for b in blocks] == [("python", 3), ("pycon", 9), ("bash", 13), ("", 16)]
    assert blocks[1].code == ">>> x\n1\n"


def test_pycon_blocks_share_the_page_namespace_and_compare_output(tmp_path, monkeypatch) -> None:
    """The runner itself: a pycon block sees the python blocks' names, and wrong shown
    output fails."""
    good, bad = tmp_path / "good.md", tmp_path / "bad.md"
    good.write_text("```python\nx = 21\n```\n```pycon\n>>> x * 2\n42\n```\n```python\nassert y == 1\n```\n"
                    .replace("```python\nassert", "```pycon\n>>> y = 1\n```\n```python\nassert"))
    bad.write_text("```python\nx = 21\n```\n```pycon\n>>> x * 2\n41\n```\n")
    test_code_blocks_run(good, tmp_path, monkeypatch)
    with pytest.raises(AssertionError, match="shown output differs"):
        test_code_blocks_run(bad, tmp_path, monkeypatch)


def test_mkdocs_build_strict(tmp_path) -> None:
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            pytest.skip(f"{module} is not installed (pip install -e \".[docs]\")")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "index.html").is_file()


# --- figures quoted in prose, checked against the recorded results ------------------------

def _json(rel: str) -> dict:
    return json.loads((ROOT / rel).read_text(encoding="utf-8"))


def _summary(rel: str, key: str) -> float:
    return _json(rel)["summary"][key]


# (page, the text as the page quotes it, the recorded value, format that gives the text).
# A page that quotes a recorded figure in its prose adds a row here; tables are better
# included from the result file itself (``--8<-- "benchmarks/results/x.md:2"``).
QUOTED = [
    ("docs/benchmarks.md", "per-sample time {} x plain",
     lambda: _summary("benchmarks/results/train_cost_paired.json", "per_sample_time_online/plain"), "{:.2f}"),
    ("docs/benchmarks.md", "{} s per step",
     lambda: _summary("benchmarks/results/train_cost_paired.json", "extra_fixed_s"), "{:.2f}"),
    ("docs/benchmarks.md", "{} samples of plain training",
     lambda: _summary("benchmarks/results/train_cost_paired.json", "fixed_online_extra_in_plain_samples"), "{:.1f}"),
    ("docs/benchmarks.md", "{}x its time",
     lambda: _json("benchmarks/results/train_cost.json")["ratios"]["b64_time_online/dbb"], "{:.2f}"),
    ("docs/benchmarks.md", "{}x its peak memory",
     lambda: _json("benchmarks/results/train_cost.json")["ratios"]["b64_mem_online/dbb"], "{:.2f}"),
    ("docs/index.md", "CPU: {}x plain at batch 8",
     lambda: next(r["online/plain"] for r in _json("benchmarks/results/train_cost_paired.json")["rows"]
                  if r["batch"] == 8), "{:.1f}"),
    ("docs/index.md", "{}x at batch 64",
     lambda: _summary("benchmarks/results/train_cost_paired.json", "b64_time_online/plain"), "{:.1f}"),
    ("docs/paper.md", "{} min as the sum of the runs' own times",
     lambda: _json("benchmarks/paper/results.json")["times_s"][
         "training (Tab. 3 + Fig. 7), sum of the runs' own times"] / 60, "{:.1f}"),
    ("docs/paper.md", "{} runs, 11 of them diverged",
     lambda: len(_json("benchmarks/paper/results.json")["runs"]), "{}"),
    ("docs/benchmarks.md", "online {} ms",
     lambda: 1000 * _json("benchmarks/results/frozen_backbone.json")["median_s"]["online"], "{:.0f}"),
    ("docs/benchmarks.md", "plain {} ms",
     lambda: 1000 * _json("benchmarks/results/frozen_backbone.json")["median_s"]["plain"], "{:.0f}"),
]


@pytest.mark.parametrize("page,text,value,fmt", QUOTED, ids=[f"{p}:{t}" for p, t, _, _ in QUOTED])
def test_quoted_figures_match_recorded_results(page, text, value, fmt) -> None:
    quoted = text.format(fmt.format(value()))
    prose = " ".join((ROOT / page).read_text(encoding="utf-8").split())  # a quote may wrap lines
    assert quoted in prose, (
        f"{page} should quote {quoted!r} (from the recorded results); the page says something else")


def test_readme_links_point_to_existing_files() -> None:
    """README.md is not part of the mkdocs build, so its relative links are checked here."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    missing = [t for t in targets if t and not (ROOT / t).exists()]
    assert targets and not missing, f"README.md links to missing files: {missing}"
