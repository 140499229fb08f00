"""Smoke test of the benchmark harness: it runs and reports every row it promises.

Speed is never asserted here: the harness reports targets, a test only checks that it works.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import REDIS_SERVER_ENV, redis_server_binary

ROOT = Path(__file__).resolve().parent.parent

HIT_ROWS = [
    ("dict", "hit ns/op"),
    ("NearCache() local", "hit ns/op"),
    ("NearCache(redis)", "hit ns/op"),
    ("AsyncNearCache() local", "hit ns/op"),
    ("AsyncNearCache(redis)", "hit ns/op"),
    ("NearCache() local", "miss ns/op"),
    ("NearCache() local", "set ns/op"),
]
PROPAGATION_ROWS = [
    ("redis-py Pub/Sub (sync), 1 sub", "p50 latency us"),
    ("NearCache, 1 sub", "p50 latency us"),
    ("NearCache, 1 sub", "p99 latency us"),
    ("AsyncNearCache, 4 sub", "p99 latency us"),
    ("redis.asyncio Pub/Sub, 4 sub", "p99 latency us"),
]


def _table_rows(markdown: str) -> set[tuple[str, str, str]]:
    rows = set()
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0] in ("hit", "propagation"):
            rows.add((cells[0], cells[1], cells[2]))
    return rows


def test_quick_run_reports_hit_and_propagation_rows(tmp_path: Path) -> None:
    """``python -m benchmarks --quick --only hit,propagation`` exits 0, prints the table and
    writes latest.md (and latest.png when matplotlib is installed) with the expected rows."""
    binary = redis_server_binary()
    if binary is None:
        pytest.skip("redis-server not found (CI fails earlier in conftest)")
    env = {**os.environ, REDIS_SERVER_ENV: binary}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only",
            "hit,propagation",
            "--repeat",
            "1",
            "--output",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = (tmp_path / "latest.md").read_text()
    if importlib.util.find_spec("matplotlib") is not None:  # the ``bench`` extra
        assert (tmp_path / "latest.png").stat().st_size > 0
    for text in (proc.stdout, written):
        rows = _table_rows(text)
        for contender, metric in HIT_ROWS:
            assert ("hit", contender, metric) in rows, (contender, metric)
        for contender, metric in PROPAGATION_ROWS:
            assert ("propagation", contender, metric) in rows, (contender, metric)
    for line in written.splitlines():
        if line.startswith("| hit | NearCache() local | hit ns/op"):
            median = line.split("|")[4].strip()
            assert median != "n/a" and float(median.replace(",", "")) > 0
