"""Shared pytest configuration (kept small and generic).

Hypothesis profiles: ``default`` (random, the settings given per test) and ``ci``
(derandomized, so CI runs are reproducible); select with ``HYPOTHESIS_PROFILE=ci``.
"""

from __future__ import annotations

import os
import sys

from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # `import helpers` from any test file

settings.register_profile("default", deadline=None)
settings.register_profile(
    "ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default"))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tests with one intra-op thread (restored afterwards).

    Many tiny convolutions are far faster single-threaded, especially on a busy
    2-core machine. Opt in with ``pytestmark = pytest.mark.usefixtures("torch_single_thread")``.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
