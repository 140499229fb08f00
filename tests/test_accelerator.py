"""The optional C hit path agrees with the Python one, and CI always builds it."""

from __future__ import annotations

import asyncio
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearcache._core import store as _store
from tests.clock import FakeClock

try:
    from nearcache._core import _speedups as speedups
except ImportError:  # pragma: no cover - no compiler where the package was installed
    if os.environ.get("CI"):
        raise  # CI must build it: a silent fallback would leave the C path untested
    pytest.skip("the C accelerator is not built", allow_module_level=True)


def test_ci_builds_the_accelerator() -> None:
    """When built, the C accelerator is used unless the pure-Python pass asks otherwise."""
    if os.environ.get("NEARCACHE_PURE_PYTHON"):
        assert not _store.ACCELERATED
    else:
        assert _store.ACCELERATED


entries = st.tuples(
    st.sampled_from(["a", "b", 1]),  # key
    st.sampled_from([None, "r"]),  # region
    st.floats(0, 10),  # stored
    st.floats(0, 10),  # expires
    st.floats(0, 10),  # deadline
    st.sampled_from([0.0, 0.5, 2.0]),  # sliding
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(entries, max_size=6),
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", 1, "z"]), st.sampled_from([None, "r", "q"]), st.floats(0, 12)
        ),
        max_size=12,
    ),
    st.floats(-1, 12),
    st.sampled_from([1.0, 3.0]),
)
def test_c_and_python_readers_agree(
    stored: list[tuple[object, str | None, float, float, float, float]],
    reads: list[tuple[object, str | None, float]],
    fresh_until: float,
    max_staleness: float,
) -> None:
    """For any entries, clock readings and staleness state, both readers return the same
    values, count the same misses and leave the same hits and expiries behind."""
    results = []
    for entry_type, reader_type in (
        (_store._PyEntry, _store._PyReader),
        (speedups.Entry, speedups.Reader),
    ):
        clock = FakeClock()
        default: dict[object, object] = {}
        regions: dict[str | None, dict[object, object]] = {None: default}
        made = []
        for key, region, at, expires, deadline, sliding in stored:
            entry = entry_type(key, region, f"v-{key}-{region}", at, expires, deadline, sliding)
            regions.setdefault(region, {})[key] = entry
            made.append(entry)
        reader = reader_type(default, regions, clock, fresh_until, max_staleness)
        seen = []
        for key, region, now in reads:
            clock.now = now
            seen.append(reader.get(key, "MISS", region))
        awaited = asyncio.run(_await_all(reader, reads))
        results.append((seen, awaited, reader.misses, [(e.hits, e.expires) for e in made]))
    assert results[0] == results[1]


async def _await_all(reader: object, reads: list[tuple[object, str | None, float]]) -> list[object]:
    return [await reader.aget(key, default="MISS", region=region) for key, region, _ in reads]  # type: ignore[attr-defined]


def test_a_held_awaitable_keeps_its_value() -> None:
    """Awaitables handed out by aget are independent while held (the spare is reused only
    when nobody holds it)."""
    default = {
        "a": speedups.Entry("a", None, 1, 0.0, 1e18, 1e18, 0.0),
        "b": speedups.Entry("b", None, 2, 0.0, 1e18, 1e18, 0.0),
    }
    reader = speedups.Reader(default, {None: default}, None, float("inf"), float("inf"))

    async def main() -> list[object]:
        first, second = reader.aget("a"), reader.aget("b")
        return [await second, await first, await reader.aget("a"), await reader.aget("x", 0)]

    assert asyncio.run(main()) == [2, 1, 1, 0]


def test_bad_arguments_raise_like_python() -> None:
    """The C get checks its arguments like a Python function would."""
    reader = speedups.Reader({}, {None: {}}, None, 0.0, 1.0)
    with pytest.raises(TypeError):
        reader.get()
    with pytest.raises(TypeError):
        reader.get("k", None, None, None)
    with pytest.raises(TypeError):
        reader.get("k", nope=1)
    with pytest.raises(TypeError):
        reader.get(["unhashable"])
    assert reader.get(key="k", default=5, region="r") == 5
