"""What ``nearcache demo`` shows: a live table with rich, or plain log lines.

:class:`Board` keeps what is shown (per-instance counters, propagation latencies, the current
step, the checks) and renders it either as a rich ``Live`` display (a table with one row per
instance and a progress line, with the log of checks scrolling above it) or as plain,
timestamped log lines for CI and logs (``--quiet``, no terminal, or rich not installed).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = ["Board", "Check", "format_latency", "percentile"]

Stats = dict[str, Any]


@dataclass(frozen=True)
class Check:
    """One verified claim of the demo."""

    ok: bool
    text: str


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of ``values`` (``nan`` when empty)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(pct / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def format_latency(seconds: float, *, unicode: bool = True) -> str:
    """``812 µs`` or ``3.14 ms`` (``-`` for nan)."""
    if math.isnan(seconds):
        return "-"
    micros = seconds * 1e6
    if micros < 1000:
        return f"{micros:.0f} {'µs' if unicode else 'us'}"
    return f"{micros / 1000:.2f} ms"


def _can_print(stream: TextIO, text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


_STATE_STYLE = {
    "connected": "bold green",
    "connecting": "yellow",
    "disconnected": "bold red",
    "closed": "dim",
    "gone": "bold red",
}


class Board:
    """The demo's display. Thread-safe: the coordinator and its stats poller both update it.

    Args:
        names: the instance names, in display order.
        stream: where to write (stdout).
        live: a rich live display (needs rich and a terminal); otherwise plain lines.
    """

    def __init__(self, names: Sequence[str], stream: TextIO, *, live: bool) -> None:
        self.names = list(names)
        self.stats: dict[str, Stats] = {}
        self.ids: dict[str, str] = {}
        self.latencies: dict[str, list[float]] = {name: [] for name in self.names}
        self.checks: list[Check] = []
        self._stream = stream
        self._lock = threading.RLock()
        self._started = time.monotonic()
        self._step = "starting"
        self._step_started = self._started
        self._live_display: Any = None
        self._console: Any = None
        self._spinner: Any = None
        if live:
            from rich.console import Console
            from rich.spinner import Spinner

            self._console = Console(file=stream, highlight=False)
            self._spinner = Spinner("dots", style="cyan")
        self.unicode = live or _can_print(stream, "µ✔")

    @property
    def live(self) -> bool:
        """Whether the rich live display is in use."""
        return self._console is not None

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Board:
        if self._console is not None:
            from rich.live import Live

            self._live_display = Live(
                self, console=self._console, refresh_per_second=4, transient=True
            )
            self._live_display.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._step = "done"
        if self._live_display is not None:
            self._live_display.stop()
            self._live_display = None

    # -- updates ----------------------------------------------------------------------------

    def step(self, text: str) -> None:
        """The scenario moved to a new step."""
        with self._lock:
            self._step = text
            self._step_started = time.monotonic()
        self._log(f"== {text}", "bold cyan")

    def progress(self, text: str) -> None:
        """Update the progress line only (no log line)."""
        with self._lock:
            self._step = text

    def check(self, ok: bool, text: str) -> bool:
        """Record (and show) a verified claim; return ``ok``."""
        with self._lock:
            self.checks.append(Check(ok, text))
        mark = ("✔" if ok else "✘") if self.unicode else ("ok  " if ok else "FAIL")
        self._log(f"   {mark} {text}", "green" if ok else "bold red")
        return ok

    def note(self, text: str) -> None:
        """Show a line of information."""
        self._log(f"   {text}", "dim")

    def set_stats(self, name: str, stats: Stats) -> None:
        """Replace the counters shown for an instance."""
        with self._lock:
            self.stats[name] = stats

    def add_latency(self, name: str, seconds: float) -> None:
        """Record one measured propagation latency to instance ``name``."""
        with self._lock:
            self.latencies[name].append(seconds)

    def all_latencies(self) -> list[float]:
        """Every propagation latency measured, all instances together."""
        with self._lock:
            return [s for values in self.latencies.values() for s in values]

    def line(self, text: str = "", style: str | None = None) -> None:
        """Print a line of the final report."""
        if self._console is not None:
            self._console.print(text, style=style, markup=False)
        else:
            self._stream.write(text + "\n")
            self._stream.flush()

    def _log(self, text: str, style: str) -> None:
        elapsed = time.monotonic() - self._started
        stamped = f"[{elapsed:6.2f}s] {text}"
        if self._console is not None:
            # Printed above the live area, which stays at the bottom.
            self._console.print(stamped, style=style, markup=False)
        else:
            self._stream.write(stamped + "\n")
            self._stream.flush()

    # -- rendering --------------------------------------------------------------------------

    def rows(self) -> list[list[str]]:
        """The instance table as text: a header row, then one row per instance."""
        header = [
            "instance",
            "backplane",
            "entries",
            "reads",
            "L1 hits",
            "L2 hits",
            "db loads",
            "hit ratio",
            "inv sent",
            "inv recv",
            "resubs",
            "prop p50",
            "prop p99",
        ]
        rows = [header]
        with self._lock:
            for name in self.names:
                stats = self.stats.get(name, {})
                latencies = self.latencies[name]
                ident = self.ids.get(name, "")
                rows.append(
                    [
                        f"{name} {ident[:8]}".strip(),
                        str(stats.get("state", "starting")),
                        _count(stats, "entries"),
                        _count(stats, "reads"),
                        _count(stats, "hits"),
                        _count(stats, "l2_hits"),
                        _count(stats, "loads"),
                        f"{stats['hit_ratio']:.1%}" if "hit_ratio" in stats else "-",
                        _count(stats, "invalidations_sent"),
                        _count(stats, "invalidations_received"),
                        _count(stats, "resubscriptions"),
                        format_latency(percentile(latencies, 50), unicode=self.unicode),
                        format_latency(percentile(latencies, 99), unicode=self.unicode),
                    ]
                )
        return rows

    def table(self, title: str | None = None, width: int = 10_000) -> Any:
        """The instance table as a rich ``Table``: a row per instance, or, when that does not
        fit in ``width`` columns, a column per instance."""
        from rich.table import Table
        from rich.text import Text

        rows = self.rows()
        natural = sum(max(len(row[i]) for row in rows) + 3 for i in range(len(rows[0]))) + 1
        cells = [[Text(cell) for cell in row] for row in rows]
        for cell_row in cells[1:]:
            cell_row[1].stylize(_STATE_STYLE.get(cell_row[1].plain, ""))
        table = Table(title=title, title_justify="left", header_style="bold")
        if natural <= width:
            for index, heading in enumerate(rows[0]):
                table.add_column(heading, justify="left" if index < 2 else "right", no_wrap=True)
            for cell_row in cells[1:]:
                table.add_row(*cell_row)
            return table
        # Transposed: the metrics down the side, an instance per column.
        table.add_column(rows[0][0], no_wrap=True)
        for text_row in rows[1:]:
            table.add_column(text_row[0], justify="right", no_wrap=True)
        for index in range(1, len(rows[0])):
            table.add_row(cells[0][index], *(cell_row[index] for cell_row in cells[1:]))
        return table

    def plain_table(self) -> list[str]:
        """The instance table as aligned text lines."""
        rows = self.rows()
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return [
            "  ".join(
                cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i])
                for i, cell in enumerate(row)
            ).rstrip()
            for row in rows
        ]

    def print_table(self, title: str) -> None:
        """Print the instance table (rich or plain)."""
        if self._console is not None:
            self._console.print(self.table(title, self._console.width))
            return
        self.line(title)
        for text in self.plain_table():
            self.line("  " + text)

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.text import Text

        with self._lock:
            step = self._step
            in_step = time.monotonic() - self._step_started
            passed = sum(c.ok for c in self.checks)
            failed = len(self.checks) - passed
        text = Text.assemble(
            (f" {step}", "bold"),
            (f"  {in_step:4.1f}s", "dim"),
            ("   checks: ", "dim"),
            (f"{passed} passed", "green"),
        )
        if failed:
            text.append(", ", "dim")
            text.append(f"{failed} failed", "bold red")
        self._spinner.update(text=text)
        return Group(self.table(width=self._console.width), self._spinner)


def _count(stats: Stats, field: str) -> str:
    value = stats.get(field)
    return "-" if value is None else f"{value:,}"


def plain_output_reason() -> str | None:
    """Why the live display cannot be used (``None`` when it can)."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return (
            "rich is not installed: plain output (pip install 'nearcache[cli]' for the live table)"
        )
    if not sys.stdout.isatty():
        return "stdout is not a terminal: plain output"
    return None
