"""Progress over the named stages of a long call (export, the CLI commands, ``bench``).

Owns :class:`Stages`: a tqdm bar on stderr, drawn **only when stderr is a terminal**
(never into a log file or a pipe). A caller that must not be silent for long even
without a terminal (``repcompiler bench --quick``) passes ``lines=True``: off a
terminal each stage then prints one plain line on stderr instead of a bar.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["Stages", "stderr_is_terminal"]


def stderr_is_terminal() -> bool:
    """Whether ``sys.stderr`` (as it is now) is an interactive terminal."""
    isatty = getattr(sys.stderr, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Stages:
    """Progress over ``stages`` (a bar of ``len(stages)`` steps, or ``total`` steps).

    ``start(name)`` names the stage running, ``done(n)`` advances. Disabled entirely
    with ``enabled=False`` (``-q``)."""

    def __init__(self, desc: str, stages: Sequence[str] = (), *, enabled: bool = True, lines: bool = False,
                 total: int | None = None, unit: str = "stage") -> None:
        self.desc = desc
        self._bar: Any = None
        self._lines = enabled and lines and not stderr_is_terminal()
        if enabled and stderr_is_terminal():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total if total is not None else len(stages), desc=desc, unit=unit, leave=False,
                             file=sys.stderr)

    def start(self, name: str) -> None:
        """Show that stage ``name`` is running."""
        if self._bar is not None:
            self._bar.set_postfix_str(name)
        elif self._lines:
            sys.stderr.write(f"{self.desc}: {name}\n")
            sys.stderr.flush()

    def done(self, n: int = 1) -> None:
        """Advance by ``n`` steps."""
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Stages":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
