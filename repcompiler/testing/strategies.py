"""Hypothesis plumbing of the checks: the conv-geometry strategy and how examples run.

Owns :func:`conv_geometries` (public), :func:`hypothesis_module` (hypothesis, a dev
dependency, imported only when a check runs), :func:`settings_for` and
:func:`run_examples`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from ..blocks.registry import ConvGeometry
from ..errors import RepCompilerError, UnsupportedError

__all__ = ["conv_geometries", "hypothesis_module", "settings_for", "run_examples"]

_MAX_KERNEL = {1: 5, 2: 4, 3: 3}


def hypothesis_module() -> Any:
    """The ``hypothesis`` package; a clear error naming the install command without it."""
    try:
        import hypothesis
    except ImportError as exc:  # pragma: no cover - dev dependency
        raise RepCompilerError(
            "repcompiler.testing needs hypothesis (pip install hypothesis, or repcompiler[dev])"
        ) from exc
    return hypothesis


def conv_geometries(
    dims: Sequence[int] = (1, 2, 3),
    *,
    max_channels: int = 8,
    max_kernel: int | None = None,
    kernel_size: int | Sequence[int] | None = None,
    bias: bool | None = None,
) -> Any:
    """A hypothesis strategy of :class:`~repcompiler.blocks.ConvGeometry`: kernels up
    to ``max_kernel`` (default 5/4/3 for 1/2/3-d; square kernels favoured, asymmetric
    and even ones included), stride 1-2, dilation 1-2, 'same', 'valid', symmetric and
    asymmetric padding, groups (grouped and depthwise), channels up to
    ``max_channels``, with or without a bias (``bias`` fixes it). ``kernel_size``
    fixes the kernel (an int for every dim, or a per-dim tuple, which fixes ``dims``)."""
    st = hypothesis_module().strategies
    dims = tuple(dims)
    if not dims or any(d not in (1, 2, 3) for d in dims):
        raise UnsupportedError(f"dims must be a non-empty subset of (1, 2, 3), got {dims}")

    @st.composite
    def geoms(draw: Any) -> ConvGeometry:
        if kernel_size is not None and not isinstance(kernel_size, int):
            ks = tuple(int(k) for k in kernel_size)
            d = len(ks)
        else:
            d = draw(st.sampled_from(dims))
            kmax = max_kernel or _MAX_KERNEL[d]
            k0 = draw(st.integers(1, kmax))
            if kernel_size is not None:
                ks = (int(kernel_size),) * d
            elif draw(st.integers(0, 3)) == 0:
                ks = tuple(draw(st.integers(1, kmax)) for _ in range(d))
            else:
                ks = (k0,) * d
        stride = (1,) * d if draw(st.integers(0, 2)) else tuple(draw(st.integers(1, 2)) for _ in range(d))
        dil = (1,) * d if draw(st.integers(0, 3)) else tuple(draw(st.integers(1, 2)) for _ in range(d))
        ext = tuple(di * (k - 1) for di, k in zip(dil, ks))
        pmode = draw(st.sampled_from(["same", "same", "valid", "sym", "pairs"]))
        if pmode == "same":
            pads = tuple((e // 2, e - e // 2) for e in ext)
        elif pmode == "valid":
            pads = ((0, 0),) * d
        elif pmode == "sym":
            pads = tuple((p, p) for p in (draw(st.integers(0, e // 2 + 1)) for e in ext))
        else:
            pads = tuple((draw(st.integers(0, e + 1)), draw(st.integers(0, e + 1))) for e in ext)
        gmode = draw(st.sampled_from(["dense", "dense", "grouped", "depthwise"]))
        if gmode == "depthwise":
            c = draw(st.integers(1, max(1, max_channels // 2)))
            groups, cin, cout = c, c, c * draw(st.integers(1, 2))
        else:
            groups = 1 if gmode == "dense" else draw(st.integers(1, 3))
            per = max(1, max_channels // groups)
            cin = groups * draw(st.integers(1, max(1, min(per, 4))))
            cout = groups * draw(st.integers(1, max(1, min(per, 4))))
        b = draw(st.booleans()) if bias is None else bool(bias)
        return ConvGeometry(cin, cout, ks, stride, pads, dil, groups, d, b)

    return geoms()


def settings_for(max_examples: int, derandomize: bool, shrink: bool) -> Any:
    """Hypothesis settings of a check: no deadline, no database, one failure reported."""
    hyp = hypothesis_module()
    phases = [hyp.Phase.explicit, hyp.Phase.reuse, hyp.Phase.generate]
    if shrink:
        phases.append(hyp.Phase.shrink)
    return hyp.settings(
        max_examples=int(max_examples),
        deadline=None,
        database=None,
        derandomize=derandomize,
        phases=phases,
        print_blob=False,
        report_multiple_bugs=False,  # one CheckFailure, not an ExceptionGroup
        suppress_health_check=list(hyp.HealthCheck),
    )


def run_examples(body: Callable[[Any], None], max_examples: int, derandomize: bool, shrink: bool) -> None:
    """Run ``body(data)`` under hypothesis. The tensors are tiny, so torch runs on one
    thread meanwhile (intra-op threads only add overhead here, and under CPU
    contention their spin-waits cost ~1000x; the setting is restored after)."""
    hyp = hypothesis_module()

    @settings_for(max_examples, derandomize, shrink)
    @hyp.given(hyp.strategies.data())
    def run(data: Any) -> None:
        body(data)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run()
    finally:
        torch.set_num_threads(threads)
