"""``import repcompiler`` does not import ``repcompiler.testing``; ``rc.testing`` imports
it on first attribute access (in a fresh interpreter: pytest itself imports it)."""

import subprocess
import sys


def test_testing_is_imported_on_first_use_only() -> None:
    code = ("import sys, repcompiler as rc; assert 'repcompiler.testing' not in sys.modules; "
            "f = rc.testing.randomize_bn; assert 'repcompiler.testing' in sys.modules; "
            "import hypothesis  # noqa\n")
    subprocess.run([sys.executable, "-c", code], check=True)
