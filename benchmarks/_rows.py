"""Result rows, summary statistics and number formatting shared by every section.

A :class:`Row` keeps one figure per repetition. Ratios are computed per repetition between
contenders measured side by side in that repetition (paired), then summarized the same way:
median, with the min-max over repetitions.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["Row", "Target", "fmt_value", "paired_ratios", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def paired_ratios(values: Sequence[float], baseline: Sequence[float]) -> list[float]:
    """``values[i] / baseline[i]`` for the repetitions both have (NaN where undefined)."""
    return [
        v / b if b and not math.isnan(b) and not math.isnan(v) else math.nan
        for v, b in zip(values, baseline, strict=False)
    ]


def _clean(values: Sequence[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``on`` ('ratio' or 'value') ``op`` ('<=' or '>=') ``limit``."""

    on: str
    op: str
    limit: float
    text: str

    def met(self, value: float, ratio: float) -> bool | None:
        subject = ratio if self.on == "ratio" else value
        if math.isnan(subject):
            return None
        return subject <= self.limit if self.op == "<=" else subject >= self.limit


@dataclass
class Row:
    """One contender's figure in one section, over the repetitions."""

    section: str
    contender: str
    metric: str
    unit: str
    samples: list[float]
    ratios: list[float] | None = None
    ratio_to: str = ""
    target: Target | None = None
    note: str = ""
    lower_is_better: bool = True
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        clean = _clean(self.samples)
        return statistics.median(clean) if clean else math.nan

    @property
    def spread(self) -> tuple[float, float]:
        clean = _clean(self.samples)
        return (min(clean), max(clean)) if clean else (math.nan, math.nan)

    @property
    def ratio(self) -> float:
        clean = _clean(self.ratios or [])
        return statistics.median(clean) if clean else math.nan

    @property
    def ratio_spread(self) -> tuple[float, float]:
        clean = _clean(self.ratios or [])
        return (min(clean), max(clean)) if clean else (math.nan, math.nan)

    @property
    def met(self) -> bool | None:
        return None if self.target is None else self.target.met(self.median, self.ratio)


def fmt_value(value: float, unit: str) -> str:
    """A compact human figure: ``183``, ``1.2k``, ``4.5M``, ``0.35``."""
    if math.isnan(value):
        return "n/a"
    if unit in ("count", "lost", "stale reads"):
        return f"{value:,.0f}"
    magnitude = abs(value)
    if magnitude >= 10_000_000:
        return f"{value / 1e6:,.1f}M"
    if magnitude >= 100_000:
        return f"{value / 1e3:,.0f}k"
    if magnitude >= 10_000:
        return f"{value / 1e3:,.1f}k"
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(value: float) -> str:
    """``3.2x``, or ``n/a``."""
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}x" if value < 10 else f"{value:.1f}x"
