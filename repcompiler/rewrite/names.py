"""Fresh names for modules and attributes added to a model.

Example::

    from repcompiler.rewrite.names import fresh_name
    target = fresh_name("post_bn", lambda n: hasattr(gm, n))   # "post_bn", else "post_bn_1", ...
"""

from __future__ import annotations

from typing import Callable

__all__ = ["fresh_name"]


def fresh_name(base: str, taken: Callable[[str], bool], *, first: int = 1) -> str:
    """``base`` when ``taken(base)`` is false, otherwise the first of ``f"{base}_{first}"``,
    ``f"{base}_{first + 1}"``, ... that is not taken."""
    if not taken(base):
        return base
    i = first
    while taken(f"{base}_{i}"):
        i += 1
    return f"{base}_{i}"
