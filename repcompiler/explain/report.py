"""Reports of what a transform did, as data and as a readable table.

A :class:`TransformReport` is a list of :class:`ReportEntry` (one per region, block or
module the transform looked at: ``name``, ``kind``, ``action``, ``reason``, parameters
before/after) plus model-level totals (convs and parameters before/after), the parts
of the model that were skipped (e.g. did not trace) and free-form notes. ``str(report)``
is a plain-text table. ``fold``/``deploy`` return a :class:`FoldReport`; other
transforms (``orepa_transform``, ``linearize``) reuse :class:`TransformReport` with
their own actions.

Conventional actions: ``"folded"`` (rewritten into one conv), ``"refused"`` (not
rewritten; ``reason`` says why), ``"kept"`` (left as is on purpose), ``"skipped"``
(not looked at, e.g. untraceable), ``"transformed"``, ``"linearized"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

from torch import nn

from ..algebra import CONV_TYPES

__all__ = ["ReportEntry", "TransformReport", "FoldReport", "count_params", "count_convs"]


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_convs(model: nn.Module) -> int:
    """Number of convolutions: ``nn.Conv1d/2d/3d`` modules (subclasses included) and
    training-time blocks (``OnlineConv``/``OfflineBlock``: one conv each, as each
    replaces one and deploys to one; modules inside a block are not counted again).
    Shared modules are counted once."""
    from ..online.conv import OfflineBlock, OnlineConv  # online builds on the blocks, which report into this module

    blocks = (OnlineConv, OfflineBlock)
    seen: set[int] = set()

    def count(m: nn.Module) -> int:
        if id(m) in seen:
            return 0
        seen.add(id(m))
        if isinstance(m, blocks):
            return 1
        return int(isinstance(m, CONV_TYPES)) + sum(count(c) for c in m.children())

    return count(model)


@dataclass
class ReportEntry:
    """One row of a report."""

    name: str
    kind: str
    action: str
    reason: str = ""
    params_before: int = 0
    params_after: int = 0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class TransformReport:
    """What a transform did (see the module docstring)."""

    title: str = "transform"
    entries: list[ReportEntry] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    convs_before: int = 0
    convs_after: int = 0
    params_before: int = 0
    params_after: int = 0
    seconds: float = 0.0

    def add(self, name: str, kind: str, action: str, reason: str = "", params_before: int = 0,
            params_after: int = 0, **details: Any) -> ReportEntry:
        """Append and return an entry."""
        e = ReportEntry(name, kind, action, reason, params_before, params_after, dict(details))
        self.entries.append(e)
        return e

    def add_region(self, region: Any, action: str, reason: str = "", params_before: int = 0,
                   params_after: int = 0, prefix: str = "") -> ReportEntry:
        """Append an entry for a :class:`passes.find_regions.Region`."""
        if not reason and action != "folded":
            reason = "; ".join(list(region.reasons) + list(getattr(region, "notes", ()))) or (
                "contains no convolution" if not region.has_conv else "")
        name = f"{prefix}{region.name}" if prefix else region.name
        return self.add(name, region.kind, action, reason, params_before, params_after,
                        ops=len(region.nodes))

    def sort_by_model(self, module_names: Iterable[str]) -> None:
        """Order the entries as their modules come in the model (``module_names``, e.g.
        ``[n for n, _ in model.named_modules()]``): by the first module an entry's name
        starts with (its longest prefix that is a module name). An entry naming no module
        stays right after the entry before it; equal positions keep their order."""
        index = {name: i for i, name in enumerate(module_names)}

        def position(entry: ReportEntry) -> int | None:
            head = entry.name.split(" ", 1)[0]
            while head:
                if head in index:
                    return index[head]
                head = head.rpartition(".")[0]
            return None

        keyed, last = [], -1
        for order, e in enumerate(self.entries):
            pos = position(e)
            last = pos if pos is not None else last
            keyed.append(((last, order), e))
        self.entries = [e for _, e in sorted(keyed, key=lambda item: item[0])]

    def by_action(self, action: str) -> list[ReportEntry]:
        return [e for e in self.entries if e.action == action]

    @property
    def folded(self) -> list[ReportEntry]:
        return self.by_action("folded")

    @property
    def refused(self) -> list[ReportEntry]:
        return self.by_action("refused")

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.action] = out.get(e.action, 0) + 1
        return out

    def summary(self) -> str:
        c = ", ".join(f"{v} {k}" for k, v in sorted(self.counts().items())) or "nothing to do"
        return (
            f"{self.title}: {len(self.entries)} entries ({c}); convs {self.convs_before} -> "
            f"{self.convs_after}; params {self.params_before:,} -> {self.params_after:,}"
            + (f"; {self.seconds:.3f}s" if self.seconds else "")
        )

    def table(self, rows: Iterable[ReportEntry] | None = None, max_rows: int = 200) -> str:
        rows = list(self.entries if rows is None else rows)
        head = ("name", "kind", "action", "params", "reason")
        data = [
            (e.name, e.kind, e.action,
             f"{e.params_before:,} -> {e.params_after:,}" if (e.params_before or e.params_after) else "",
             e.reason)
            for e in rows[:max_rows]
        ]
        widths = [min(max([len(h)] + [len(r[i]) for r in data]), 60 if i == 0 else 80) for i, h in enumerate(head)]

        def fmt(r: tuple[str, ...]) -> str:
            cells = []
            for i, (c, w) in enumerate(zip(r, widths)):
                c = c if len(c) <= w or i == len(r) - 1 else c[: w - 3] + "..."
                cells.append(c.ljust(w) if i < len(r) - 1 else c)
            return "  ".join(cells).rstrip()

        lines = [fmt(head), "  ".join("-" * w for w in widths)]
        lines += [fmt(r) for r in data]
        if len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        parts = [self.summary()]
        if self.entries:
            parts.append(self.table())
        if self.skipped:
            parts.append("skipped (not traced as a whole):")
            parts += [f"  {name}: {why}" for name, why in self.skipped]
        parts += [f"note: {n}" for n in self.notes]
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.summary()}>"


@dataclass
class FoldReport(TransformReport):
    """The report of :func:`repcompiler.fold` / :func:`repcompiler.deploy`."""

    title: str = "fold"
