"""The user-facing examples run (in-process via ``runpy``, as ``python examples/X.py``
would) and reach their own assertions: equivalence after deploy/fold, loss falling,
custom layers absorbed."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


pytestmark = pytest.mark.usefixtures("torch_single_thread")  # conftest: tiny tensors, one intra-op thread


def _run(name: str) -> None:
    runpy.run_path(os.path.join(EXAMPLES, name), run_name="__main__")


def test_custom_block_example(capsys):
    _run("custom_block.py")
    out = capsys.readouterr().out
    assert "block 'cross_dilated'" in out and "all properties held" in out
    assert "transformed" in out and "deployed kernels" in out
    assert "max relative difference deployed vs trained" in out


def test_custom_rule_example(capsys):
    _run("custom_rule.py")
    out = capsys.readouterr().out
    assert "without rules" in out and "with rules" in out
    assert "rule for ChannelAffine" in out and "rule for FrozenNorm" in out
    assert "custom layers left: none" in out


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("REPCOMPILER_RUN_SCRIPTS"),
                    reason="fresh-interpreter runs (import cost); set REPCOMPILER_RUN_SCRIPTS=1")
@pytest.mark.parametrize("name", ["custom_block.py", "custom_rule.py"])
def test_examples_as_scripts(name):
    """The same, as a user runs them, in a fresh interpreter:
    ``REPCOMPILER_RUN_SCRIPTS=1 python -m pytest tests/project/test_examples.py``."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(EXAMPLES, name)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
