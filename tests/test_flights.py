"""Stampede protection's decisions (no I/O, a fake clock): which load a caller joins."""

from __future__ import annotations

from nearcache._core.flights import Flights
from nearcache._core.store import MISSING, L1Store
from tests.clock import FakeClock


def _flights(clock: FakeClock, max_staleness: float = 2.0) -> tuple[Flights, L1Store]:
    store = L1Store(clock=clock, max_staleness=max_staleness)
    store.confirm(clock())
    return Flights(lambda: store, clock), store


def test_a_second_caller_joins_the_load_in_progress() -> None:
    """While a load runs, a caller for the same key joins it (and is counted); another key
    or region does not."""
    clock = FakeClock(10.0)
    flights, _ = _flights(clock)
    flight = flights.start("k", "r")
    assert flights.joinable("k", "r") is flight and flight.waiters == 1
    assert flights.joinable("k", None) is None
    assert flights.joinable("other", "r") is None
    assert dict(flights) == {("r", "k"): flight}


def test_a_load_overtaken_by_an_invalidation_is_not_joined() -> None:
    """A write or invalidation of the key during the load: a new caller must load again (the
    running load may predate the write), and the old load's result is not cached."""
    clock = FakeClock(10.0)
    flights, store = _flights(clock)
    old = flights.start("k", None)
    store.remove("k")
    assert flights.joinable("k", None) is None
    new = flights.start("k", None)
    flights.finished(old, "old", ttl=None, sliding=None, keep=True)
    assert store.peek("k", MISSING) is MISSING
    assert flights.joinable("k", None) is new  # finishing the old one left the new one
    flights.finished(new, "new", ttl=None, sliding=None, keep=True)
    assert store.peek("k") == "new" and len(flights) == 0


def test_a_load_older_than_the_staleness_bound_is_not_joined() -> None:
    """Without confirmations, a load started more than max_staleness ago could return a value
    the staleness rule no longer allows: it is not joined."""
    clock = FakeClock(10.0)
    flights, _ = _flights(clock, max_staleness=2.0)
    flights.start("k", None)
    clock.advance(2.5)
    assert flights.joinable("k", None) is None


def test_a_failed_or_closed_load_caches_nothing() -> None:
    """A load that raised, or that finished after the cache closed, leaves nothing cached
    and no flight behind."""
    clock = FakeClock(10.0)
    flights, store = _flights(clock)
    failed = flights.start("a", None)
    flights.failed(failed)
    closed = flights.start("b", None)
    flights.finished(closed, "v", ttl=None, sliding=None, keep=False)
    assert store.peek("a", MISSING) is MISSING and store.peek("b", MISSING) is MISSING
    assert len(flights) == 0
