"""Section ``memory``: bytes per cached entry beyond the value and the key.

In a fresh process, 100k keys are built first and one small value is shared by every entry,
so neither is counted (the value is a tuple of a string and an int; a second NearCache row
stores a list instead, which the cycle collector tracks); :mod:`tracemalloc` then measures
what inserting the 100k entries allocates and keeps (after a full collection). ``--quick``
uses 20k entries. A networked NearCache keeps the same L1 store as a local one, so only the
local one is measured: filling a networked one would publish 100k invalidations under
tracemalloc. Rust-backed caches (cachebox, theine) allocate outside Python's allocator,
which tracemalloc cannot see, so they are not measured.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

from benchmarks._env import Env, Options
from benchmarks._procs import Control, run_in_child
from benchmarks._rows import Row, Target, paired_ratios

__all__ = ["run"]

NAME = "memory"
N = 100_000
TRACKED = "NearCache (tracked value)"


def _factories() -> dict[str, Callable[[], tuple[Any, Callable[[Any, Any], Any], Any]]]:
    """name -> () -> (cache, set(key, value), close or None)."""

    def plain_dict() -> tuple[Any, Any, Any]:
        d: dict[Any, Any] = {}
        return d, d.__setitem__, None

    def nearcache_local() -> tuple[Any, Any, Any]:
        from nearcache import NearCache

        c = NearCache(max_entries=2 * N)
        return c, c.set, c.close

    def lru() -> tuple[Any, Any, Any]:
        import cachetools

        c = cachetools.LRUCache(maxsize=2 * N)
        return c, c.__setitem__, None

    def ttl() -> tuple[Any, Any, Any]:
        import cachetools

        c = cachetools.TTLCache(maxsize=2 * N, ttl=3600)
        return c, c.__setitem__, None

    return {
        "dict": plain_dict,
        "NearCache": nearcache_local,
        "cachetools.LRUCache": lru,
        "cachetools.TTLCache": ttl,
    }


def _measure_one(make: Callable[[], tuple[Any, Any, Any]], keys: list[str], value: Any) -> float:
    _, set_, close = make()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for k in keys:
            set_(k, value)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    if close is not None:
        close()
    return (after - before) / len(keys)


def _worker(control: Control, reps: int, n: int) -> dict[str, Any]:
    keys = [f"key:{i:07d}" for i in range(n)]
    value = ("a shared small value", 42)
    # nearcache's C store keeps an entry whose key and value the cycle collector cannot see
    # through (strings, numbers, bytes, untracked tuples like `value`) in a smaller object
    # than one holding a tracked value (a list, an instance): measure both.
    tracked = ["a shared small value", 42]
    notes = []
    factories = _factories()
    try:
        import cachetools  # noqa: F401
    except ImportError:
        notes.append("cachetools not installed: skipped")
        factories = {k: v for k, v in factories.items() if not k.startswith("cachetools")}
    out: dict[str, list[float]] = {}
    for _ in range(reps):
        for name, make in factories.items():
            out.setdefault(name, []).append(_measure_one(make, keys, value))
        out.setdefault(TRACKED, []).append(_measure_one(factories["NearCache"], keys, tracked))
    return {"bytes": out, "notes": notes}


def run(options: Options, env: Env) -> list[Row]:
    """Measure and return the section's rows."""
    reps = options.reps(default=1, quick=1)  # tracemalloc counts are deterministic
    n = 20_000 if options.quick else N
    env.log(f"memory: {reps} repetition(s) of {n} entries per contender")
    result = run_in_child(_worker, reps, n, timeout=300)
    env.notes.extend(f"memory: {n}" for n in result["notes"])
    per: dict[str, list[float]] = result["bytes"]
    rows = []
    base = per.get("cachetools.LRUCache")
    for name, values in per.items():
        row = Row(NAME, name, "bytes/entry", "bytes", values, note=f"{n:,} entries")
        if base is not None and name != "cachetools.LRUCache":
            row.ratios, row.ratio_to = paired_ratios(values, base), "cachetools.LRUCache"
            if name.startswith("NearCache"):
                row.target = Target("ratio", "<=", 1.0, "<= 1x cachetools.LRUCache")
        rows.append(row)
    env.notes.append(
        "memory: cachebox and theine allocate natively, invisible to tracemalloc: not measured"
    )
    return rows
