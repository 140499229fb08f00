"""The optional C store agrees with the Python one, stays memory-safe when Python code runs
inside it, and CI always builds it."""

from __future__ import annotations

import asyncio
import gc
import math
import os
import subprocess
import sys
import tarfile
import textwrap
import weakref
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearcache import NearCache
from nearcache._core import store as _store
from nearcache._core.store import MISSING, L1Store
from tests.clock import FakeClock

try:
    from nearcache._core import _speedups as speedups
except ImportError:  # pragma: no cover - no compiler where the package was installed
    if os.environ.get("CI"):
        raise  # CI must build it: a silent fallback would leave the C path untested
    pytest.skip("the C accelerator is not built", allow_module_level=True)


def test_ci_builds_the_accelerator() -> None:
    """When built, the C accelerator is used unless the pure-Python pass asks otherwise (a
    stale in-place build fails here: rebuild with `pip install -e .`)."""
    assert speedups.API == _store._API
    if os.environ.get("NEARCACHE_PURE_PYTHON"):
        assert not _store.ACCELERATED
        assert _store.HIT_PATH == "pure Python"
    else:
        assert _store.ACCELERATED
        assert _store.HIT_PATH == "C accelerator"
    cache = NearCache()
    assert cache.stats().l1_store == _store.HIT_PATH
    cache.close()


@pytest.mark.skipif(
    bool(os.environ.get("NEARCACHE_PURE_PYTHON")), reason="built once, in the main pass"
)
def test_the_sdist_and_its_wheel_carry_and_compile_the_accelerator(tmp_path: Path) -> None:
    """`python -m build` makes an sdist holding _speedups.c and, from that sdist, a wheel
    holding the compiled extension; installed (unpacked, in an interpreter that sees nothing
    else), the wheel runs the C store and its stats say so."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(tmp_path / "dist"), str(root)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with tarfile.open(sdist) as archive:
        assert any(n.endswith("src/nearcache/_core/_speedups.c") for n in archive.getnames())
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert any(n.startswith("nearcache/_core/_speedups.") and n.endswith(".so") for n in names)
        archive.extractall(tmp_path / "site")  # noqa: S202 - the wheel we just built
    probe = (
        "import nearcache, nearcache._core.store as s;"
        "print(nearcache.__file__);"
        "print(s.ACCELERATED, nearcache.NearCache().stats().l1_store)"
    )
    env = {k: v for k, v in os.environ.items() if k != "NEARCACHE_PURE_PYTHON"}
    env["PYTHONPATH"] = str(tmp_path / "site")
    shown = subprocess.run(
        [sys.executable, "-S", "-c", probe],  # -S: no site-packages, no editable install
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    ).stdout.splitlines()
    assert shown[0].startswith(str(tmp_path / "site"))
    assert shown[1] == "True C accelerator"


# -- differential: the same operations on both tables give the same results -------------------

KEYS = ["a", "b", 1, b"c"]
REGIONS = [None, "r", "q"]
TTLS = [None, 0.5, 2.0, 10.0]
SLIDINGS = [None, 0.0, 1.0]

key_st = st.sampled_from(KEYS)
region_st = st.sampled_from(REGIONS)
operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("set"),
            key_st,
            region_st,
            st.sampled_from(TTLS),
            st.sampled_from(SLIDINGS),
            st.booleans(),  # a value the cycle collector tracks (a list) or not (a str)
            st.sampled_from([None, -math.inf]),  # stored: now, or received from a peer
        ),
        st.tuples(st.just("get"), key_st, region_st),
        st.tuples(st.just("aget"), key_st, region_st),
        st.tuples(st.just("remove"), key_st, region_st),
        st.tuples(st.just("clear_region"), region_st),
        st.tuples(st.just("clear")),
        st.tuples(st.just("touch"), key_st, region_st, st.sampled_from(TTLS)),
        st.tuples(st.just("advance"), st.floats(0, 3)),
        st.tuples(st.just("reserve"), key_st, region_st),
        st.tuples(
            st.just("commit"), st.integers(0, 5), st.sampled_from(TTLS), st.sampled_from(SLIDINGS)
        ),
        st.tuples(st.just("release"), st.integers(0, 5)),
        st.tuples(st.just("confirm"), st.floats(-3, 3)),
        st.tuples(st.just("suspend"), st.floats(-3, 3)),
        st.tuples(st.just("repair")),
    ),
    max_size=40,
)
configs = st.tuples(
    st.sampled_from([math.inf, 2.0]),  # max_staleness: local, or networked
    st.sampled_from([None, 5.0]),  # default ttl
    st.sampled_from([None, 1.5]),  # default sliding
    st.sampled_from([3.0, 3600.0]),  # max_age
)


def _store_with(
    table: type, clock: FakeClock, config: tuple[Any, ...], max_entries: int
) -> L1Store:
    max_staleness, ttl, sliding, max_age = config
    saved = _store._Table
    _store._Table = table
    try:
        return L1Store(
            clock=clock,
            max_entries=max_entries,
            ttl=ttl,
            sliding=sliding,
            max_age=max_age,
            max_staleness=max_staleness,
        )
    finally:
        _store._Table = saved


def _run(store: L1Store, clock: FakeClock, ops: list[tuple[Any, ...]]) -> Iterator[object]:
    """Apply ``ops``, yielding each one's result."""
    reservations: list[Any] = []
    for i, op in enumerate(ops):
        kind = op[0]
        if kind == "set":
            _, key, region, ttl, sliding, tracked, stored = op
            value: object = [i] if tracked else f"v{i}"
            yield store.set(key, value, region, ttl=ttl, sliding=sliding, stored=stored)
        elif kind == "get":
            yield store.get(op[1], MISSING, op[2])
        elif kind == "aget":
            yield asyncio.run(_await(store.aget(op[1], MISSING, op[2])))
        elif kind == "remove":
            yield store.remove(op[1], op[2])
        elif kind == "clear_region":
            yield store.clear_region(op[1])
        elif kind == "clear":
            yield store.clear()
        elif kind == "advance":
            clock.advance(op[1])
        elif kind == "touch":
            yield store.touch(op[1], op[2], ttl=op[3])
        elif kind == "reserve":
            reservations.append(store.reserve(op[1], op[2]))
        elif kind == "commit":
            if op[1] < len(reservations):
                yield store.commit(reservations[op[1]], f"loaded{i}", ttl=op[2], sliding=op[3])
        elif kind == "release":
            if op[1] < len(reservations):
                yield store.release(reservations[op[1]])
        elif kind == "confirm":
            yield store.confirm(clock.now + op[1])
        elif kind == "suspend":
            yield store.suspend(clock.now + op[1])
        else:
            yield store.repair()


async def _await(awaitable: Any) -> object:
    return await awaitable


def _state(store: L1Store) -> object:
    """Everything observable about a store, entries field by field."""
    table: Any = store._table
    entries = {
        (repr(region), repr(key)): (e.value, e.stored, e.expires, e.deadline, e.sliding, e.hits)
        for region, bucket in table.regions.items()
        for key, e in bucket.items()
    }
    return (store.stats(), len(store), sorted(map(repr, store.regions())), entries)


@settings(max_examples=400, deadline=None)
@given(operations, configs)
def test_c_and_python_stores_agree(ops: list[tuple[Any, ...]], config: tuple[Any, ...]) -> None:
    """For any sequence of reads, writes, invalidations, loads, clock moves and staleness
    changes (with no size pressure), both tables return the same results and end in the same
    state: values, timestamps, hit counts and every counter."""
    results = []
    for table in (_store._PyTable, speedups.Table):
        clock = FakeClock(1000.0)
        store = _store_with(table, clock, config, max_entries=1000)
        results.append((list(_run(store, clock, ops)), _state(store)))
    assert results[0] == results[1]


@settings(max_examples=300, deadline=None)
@given(operations, configs, st.integers(1, 4))
def test_both_stores_keep_their_guarantees_under_size_pressure(
    ops: list[tuple[Any, ...]], config: tuple[Any, ...], max_entries: int
) -> None:
    """When entries must be evicted (the two may pick different victims: an overwrite in
    place keeps its ring position), each store stays within max_entries, serves only the
    latest value written for a key, and counts the same sets."""
    sets = []
    for table in (_store._PyTable, speedups.Table):
        clock = FakeClock(1000.0)
        store = _store_with(table, clock, config, max_entries)
        latest: dict[tuple[object, object], object] = {}
        reservations: list[Any] = []
        for i, op in enumerate(ops):
            kind = op[0]
            if kind == "set":
                _, key, region, ttl, sliding, tracked, stored = op
                value: object = [i] if tracked else f"v{i}"
                store.set(key, value, region, ttl=ttl, sliding=sliding, stored=stored)
                latest[(region, key)] = value
            elif kind in ("get", "aget"):
                got = store.get(op[1], MISSING, op[2])
                assert got is MISSING or got == latest.get((op[2], op[1]), MISSING)
            elif kind == "remove":
                store.remove(op[1], op[2])
                latest.pop((op[2], op[1]), None)
            elif kind == "clear_region":
                store.clear_region(op[1])
                latest = {k: v for k, v in latest.items() if k[0] != op[1]}
            elif kind in ("clear", "repair"):
                store.clear() if kind == "clear" else store.repair()
                latest.clear()
            elif kind == "advance":
                clock.advance(op[1])
            elif kind == "touch":
                store.touch(op[1], op[2], ttl=op[3])
            elif kind == "reserve":
                reservations.append(store.reserve(op[1], op[2]))
            elif kind == "commit" and op[1] < len(reservations):
                reservation = reservations[op[1]]
                if store.commit(reservation, f"loaded{i}", ttl=op[2], sliding=op[3]):
                    latest[(reservation.region, reservation.key)] = f"loaded{i}"
            assert len(store) <= max_entries
            held = sum(len(list(store.keys(region))) for region in store.regions())
            assert held == len(store)
        sets.append(store.stats().sets)
    assert sets[0] == sets[1]


# -- the C table's own behaviour ------------------------------------------------------------------


def _c_store(**kwargs: Any) -> L1Store:
    return _store_with(speedups.Table, FakeClock(1000.0), (math.inf, None, None, 3600.0), 100)


def test_entries_untracked_by_the_collector_only_when_nothing_they_hold_is_tracked() -> None:
    """Strings, numbers, bytes, None and untracked tuples make the small untracked entry;
    anything the collector tracks makes a tracked one, and a sliding window a sliding one."""
    store = _c_store()
    table: Any = store._table
    plain = ("a", 1)
    gc.collect()  # the collector untracks a tuple of atoms on its first pass
    assert not gc.is_tracked(plain)
    cases: list[tuple[object, object, str]] = [
        ("s", "text", "AtomicEntry"),
        (1, 2.5, "AtomicEntry"),
        (b"b", None, "AtomicEntry"),
        ("t", plain, "AtomicEntry"),
        ("u", ("a", [1]), "Entry"),
        ("l", [1], "Entry"),
        ("o", object(), "AtomicEntry"),  # a plain object() holds nothing
        ("f", lambda: None, "Entry"),
    ]
    for key, value, kind in cases:
        store.set(key, value)
        assert type(table.default_bucket[key]).__name__ == kind, key
    store.set("w", "text", sliding=2.0)
    assert type(table.default_bucket["w"]).__name__ == "SlidingEntry"


def test_an_overwrite_changes_the_entry_kind_when_it_must() -> None:
    """Overwriting a value with one of another kind replaces the entry; with one of the same
    kind it updates it in place; either way the store holds one entry and serves the new
    value."""
    store = _c_store()
    table: Any = store._table
    store.set("k", "text")
    first = table.default_bucket["k"]
    store.set("k", "other")
    assert table.default_bucket["k"] is first  # in place
    store.set("k", [1])
    assert type(table.default_bucket["k"]).__name__ == "Entry"
    store.set("k", "text", sliding=1.0)
    assert type(table.default_bucket["k"]).__name__ == "SlidingEntry"
    store.set("k", "plain")  # a sliding entry takes a non-sliding value in place
    assert store.get("k") == "plain"
    assert table.default_bucket["k"].sliding == 0.0
    assert len(store) == 1
    assert store.stats().sets == 5


def test_a_cycle_through_a_cached_value_is_collected() -> None:
    """A value that refers back to its cache is freed with it (tracked entries take part in
    cycle collection)."""

    class Value:
        store: L1Store

    store = _c_store()
    value = Value()
    value.store = store
    store.set("k", value)
    alive = weakref.ref(value)
    del store, value
    gc.collect()
    assert alive() is None


def test_a_held_awaitable_keeps_its_value() -> None:
    """Awaitables handed out by aget are independent while held (the spare is reused only
    when nobody holds it)."""
    store = _c_store()
    store.set("a", 1)
    store.set("b", 2)

    async def main() -> list[object]:
        first, second = store.aget("a"), store.aget("b")
        return [await second, await first, await store.aget("a"), await store.aget("x", 0)]

    assert asyncio.run(main()) == [2, 1, 1, 0]


@pytest.mark.parametrize("table", [_store._PyTable, speedups.Table])
def test_bad_arguments_raise_like_python(table: type) -> None:
    """The C methods check their arguments like the Python ones."""
    t = table(None, 10, None, None, 3600.0, math.inf)
    calls: list[tuple[str, tuple[object, ...], dict[str, object]]] = [
        ("get", (), {}),
        ("get", ("k", None, None, None), {}),
        ("get", ("k",), {"nope": 1}),
        ("get", ("k",), {"key": "k"}),
        ("get", (["unhashable"],), {}),
        ("set", ("k",), {}),
        ("set", ("k", 1, None, None, None, None, None), {}),
        ("set", ("k", 1), {"value": 2}),
        ("set", ("k", 1), {"ttl": "soon"}),
        ("remove", (), {}),
        ("remove", ("k", None, None), {}),
    ]
    for name, args, kwargs in calls:
        with pytest.raises(TypeError):
            getattr(t, name)(*args, **kwargs)
    assert t.get(key="k", default=5, region="r") == 5
    t.set(key="k", value=1, region="r", ttl=5, sliding=None)
    assert t.get("k", region="r") == 1
    assert t.remove(key="k", region="r") is True


# -- Python code running inside the C table: finalizers, hashing ------------------------------


def _run_isolated(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter with poisoned frees (a use-after-free fails
    every time, and a crash does not take pytest down)."""
    env = {k: v for k, v in os.environ.items() if k != "NEARCACHE_PURE_PYTHON"}
    env["PYTHONMALLOC"] = "debug"
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_finalizers_that_write_to_the_cache_during_its_writes_are_safe() -> None:
    """A value whose finalizer sets, removes, reads and clears the same cache, freed by an
    eviction, an overwrite, a remove, a clear_region or a clear, leaves the C table whole."""
    result = _run_isolated(
        """
        import time
        from nearcache._core import store as _store
        from nearcache._core.store import L1Store
        assert _store.ACCELERATED
        store = L1Store(clock=time.monotonic, max_entries=8)
        budget = [400]

        class Value:
            def __init__(self, i):
                self.i = i
            def __del__(self):
                if budget[0] <= 0:
                    return
                budget[0] -= 1
                i = self.i
                store.set(("f", i % 5), Value(i + 1) if i % 3 else "plain", "r" if i % 2 else None)
                store.remove(("f", (i + 2) % 5))
                store.get(("f", i % 5))
                if i % 7 == 0:
                    store.clear_region("r")
                if i % 11 == 0:
                    store.clear()

        for i in range(300):
            store.set(i % 20, Value(i), "r" if i % 4 else None)  # overwrites and evictions
            if i % 9 == 0:
                store.remove((i + 1) % 20)
            if i % 25 == 0:
                store.clear_region("r")
            assert len(store) <= 8
            held = sum(len(list(store.keys(r))) for r in store.regions())
            assert held == len(store), (held, len(store))
        store.clear()
        print("ok", len(store))
        """
    )
    assert result.returncode == 0, f"rc {result.returncode}: {result.stderr}"
    assert result.stdout.split() == ["ok", "0"]


def test_a_key_whose_hash_clears_the_cache_during_a_set_is_safe() -> None:
    """A str-subclass key whose hash clears the cache in the middle of a set, a sweep or an
    eviction (the new entry then lands in the fresh table or nowhere) leaves the count equal
    to what is held and within max_entries."""
    result = _run_isolated(
        """
        import time
        from nearcache._core import store as _store
        from nearcache._core.store import L1Store
        assert _store.ACCELERATED
        store = L1Store(clock=time.monotonic, max_entries=4)

        class Key(str):
            armed = 0
            def __hash__(self):
                if Key.armed:
                    Key.armed -= 1
                    store.clear()
                return str.__hash__(self)
            def __eq__(self, other):
                return str.__eq__(self, other)

        for round in range(30):
            for i in range(6):
                # held Key objects are hashed again by the sweep and the eviction hand
                store.set(Key(f"k{i}") if i % 3 == 0 else f"k{i}", [i], "r" if i % 2 else None)
            Key.armed = round % 4
            key = Key(f"k{round % 6}")
            store.set(key, "v", "r" if round % 2 else None)
            store.set(key, ["w"], None)
            store.remove(key)
            held = sum(len(list(store.keys(r))) for r in store.regions())
            assert held == len(store), (round, held, len(store))
            assert len(store) <= 4
        print("ok")
        """
    )
    assert result.returncode == 0, f"rc {result.returncode}: {result.stderr}"
    assert result.stdout.strip() == "ok"
