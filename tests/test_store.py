"""Unit tests of the L1 store: expiry, regions, the size bound, reservations, staleness."""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable

import pytest

from nearcache._core.store import MISSING, L1Store, StoreStats
from tests.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


def local_store(clock: FakeClock, **kwargs: object) -> L1Store:
    return L1Store(clock=clock, **kwargs)  # type: ignore[arg-type]


def networked_store(clock: FakeClock, max_staleness: float = 2.0, **kwargs: object) -> L1Store:
    return L1Store(clock=clock, max_staleness=max_staleness, **kwargs)  # type: ignore[arg-type]


# -- reads --------------------------------------------------------------------------------------


def test_get_returns_stored_value(clock: FakeClock) -> None:
    """A value that was set is returned by get."""
    store = local_store(clock)
    store.set("k", "v")
    assert store.get("k") == "v"


def test_get_miss_returns_none_by_default(clock: FakeClock) -> None:
    """A miss returns None when no default is given."""
    store = local_store(clock)
    assert store.get("absent") is None


def test_get_miss_returns_given_default(clock: FakeClock) -> None:
    """A miss returns the default passed by the caller."""
    store = local_store(clock)
    sentinel = object()
    assert store.get("absent", sentinel) is sentinel


def test_none_can_be_cached_and_told_apart_from_a_miss(clock: FakeClock) -> None:
    """A cached None is returned as None while a miss returns MISSING."""
    store = local_store(clock)
    store.set("k", None)
    assert store.get("k", MISSING) is None
    assert store.get("other", MISSING) is MISSING


def test_missing_is_a_falsy_singleton_with_a_readable_repr() -> None:
    """MISSING is one falsy object whose repr names it."""
    assert type(MISSING)() is MISSING
    assert not MISSING
    assert repr(MISSING) == "nearcache.MISSING"


def test_contains_uses_region_key_pairs(clock: FakeClock) -> None:
    """``(region, key) in store`` tells whether the key is servable in that region."""
    store = local_store(clock)
    store.set("k", 1, "r")
    assert ("r", "k") in store
    assert (None, "k") not in store


def test_set_overwrites_value(clock: FakeClock) -> None:
    """A second set of the same key replaces the value without growing the store."""
    store = local_store(clock)
    store.set("k", 1)
    store.set("k", 2)
    assert store.get("k") == 2
    assert len(store) == 1


def test_keys_and_regions_list_what_is_held(clock: FakeClock) -> None:
    """keys() lists a region's keys and regions() the regions holding entries."""
    store = local_store(clock)
    store.set("a", 1)
    store.set("b", 2, "r")
    store.set("c", 3, "r")
    assert set(store.keys()) == {"a"}
    assert set(store.keys("r")) == {"b", "c"}
    assert list(store.keys("nope")) == []
    assert set(store.regions()) == {None, "r"}


# -- expiry -------------------------------------------------------------------------------------


def test_absolute_ttl_expires_exactly_at_the_boundary(clock: FakeClock) -> None:
    """An entry with ttl T is served strictly before stored+T and not at stored+T."""
    store = local_store(clock, ttl=10.0)
    store.set("k", "v")
    clock.advance(9.5)
    assert store.get("k", MISSING) == "v"
    clock.advance(0.5)
    assert store.get("k", MISSING) is MISSING


def test_per_call_ttl_overrides_default(clock: FakeClock) -> None:
    """A ttl passed to set replaces the store's default ttl for that entry."""
    store = local_store(clock, ttl=100.0)
    store.set("short", 1, ttl=1.0)
    store.set("default", 2)
    clock.advance(1.0)
    assert store.get("short", MISSING) is MISSING
    assert store.get("default", MISSING) == 2
    clock.advance(99.0)
    assert store.get("default", MISSING) is MISSING


def test_no_ttl_means_max_age_applies(clock: FakeClock) -> None:
    """Without any ttl an entry lives exactly max_age seconds."""
    store = local_store(clock, max_age=60.0)
    store.set("k", 1)
    clock.advance(59.5)
    assert store.get("k", MISSING) == 1
    clock.advance(0.5)
    assert store.get("k", MISSING) is MISSING


def test_max_age_caps_a_longer_ttl(clock: FakeClock) -> None:
    """max_age is a backstop: a ttl longer than it is cut to max_age."""
    store = local_store(clock, max_age=5.0)
    store.set("k", 1, ttl=1000.0)
    clock.advance(5.0)
    assert store.get("k", MISSING) is MISSING


def test_sliding_expiration_extends_on_hit(clock: FakeClock) -> None:
    """Each hit pushes a sliding entry's expiry to now + sliding."""
    store = local_store(clock, sliding=2.0)
    store.set("k", 1)
    for _ in range(10):
        clock.advance(1.5)
        assert store.get("k", MISSING) == 1
    clock.advance(2.0)
    assert store.get("k", MISSING) is MISSING


def test_sliding_expiration_without_hits_expires(clock: FakeClock) -> None:
    """A sliding entry that is not read expires sliding seconds after being stored."""
    store = local_store(clock, sliding=2.0)
    store.set("k", 1)
    clock.advance(2.0)
    assert store.get("k", MISSING) is MISSING


def test_sliding_never_extends_past_absolute_ttl(clock: FakeClock) -> None:
    """Hits keep a sliding entry alive only until its absolute ttl deadline."""
    store = local_store(clock, ttl=5.0, sliding=2.0)
    store.set("k", 1)
    for _ in range(4):
        clock.advance(1.0)
        assert store.get("k", MISSING) == 1
    clock.advance(0.5)  # t = 4.5: still before the absolute deadline
    assert store.get("k", MISSING) == 1
    clock.advance(0.5)  # t = 5.0: the absolute deadline, whatever the sliding window says
    assert store.get("k", MISSING) is MISSING


def test_sliding_never_extends_past_max_age(clock: FakeClock) -> None:
    """Hits keep a sliding entry with no ttl alive only until max_age."""
    store = local_store(clock, sliding=2.0, max_age=3.0)
    store.set("k", 1)
    clock.advance(1.5)
    assert store.get("k", MISSING) == 1
    clock.advance(1.0)
    assert store.get("k", MISSING) == 1
    clock.advance(0.5)
    assert store.get("k", MISSING) is MISSING


def test_per_call_sliding_overrides_default(clock: FakeClock) -> None:
    """A sliding window passed to set replaces the default; 0 disables sliding."""
    store = local_store(clock, sliding=1.0, ttl=10.0)
    store.set("long", 1, sliding=5.0)
    store.set("none", 2, sliding=0.0)
    store.set("default", 3)
    clock.advance(1.0)
    assert store.get("default", MISSING) is MISSING
    clock.advance(3.0)
    assert store.get("long", MISSING) == 1
    assert store.get("none", MISSING) == 2  # absolute ttl only
    clock.advance(6.0)
    assert store.get("none", MISSING) is MISSING


def test_expired_entry_counts_as_miss(clock: FakeClock) -> None:
    """Reading an expired entry counts a miss, not a hit."""
    store = local_store(clock, ttl=1.0)
    store.set("k", 1)
    clock.advance(1.0)
    store.get("k")
    stats = store.stats()
    assert (stats.hits, stats.misses) == (0, 1)


# -- regions ------------------------------------------------------------------------------------


def test_same_key_in_two_regions_is_independent(clock: FakeClock) -> None:
    """One key in two regions holds two values, and removing one leaves the other."""
    store = local_store(clock)
    store.set("k", "a", "ra")
    store.set("k", "b", "rb")
    store.set("k", "default")
    assert store.get("k", region="ra") == "a"
    assert store.get("k", region="rb") == "b"
    assert store.get("k") == "default"
    assert store.remove("k", "ra")
    assert store.get("k", MISSING, "ra") is MISSING
    assert store.get("k", region="rb") == "b"
    assert store.get("k") == "default"


def test_clear_region_drops_only_that_region(clock: FakeClock) -> None:
    """clear_region drops every key of one region and nothing else, returning the count."""
    store = local_store(clock)
    store.set("a", 1, "r")
    store.set("b", 2, "r")
    store.set("a", 3, "other")
    store.set("a", 4)
    assert store.clear_region("r") == 2
    assert store.get("a", MISSING, "r") is MISSING
    assert store.get("b", MISSING, "r") is MISSING
    assert store.get("a", region="other") == 3
    assert store.get("a") == 4
    assert len(store) == 2
    assert "r" not in store.regions()


def test_clear_region_of_default_region(clock: FakeClock) -> None:
    """clear_region(None) empties the default region only, and it stays usable."""
    store = local_store(clock)
    store.set("k", 1)
    store.set("j", 2)
    store.set("k", 3, "r")
    assert store.clear_region(None) == 2
    assert store.get("k", MISSING) is MISSING
    assert store.get("k", region="r") == 3
    assert len(store) == 1
    store.set("k", 5)
    assert store.get("k") == 5
    assert len(store) == 2


def test_clear_region_of_unknown_region_returns_zero(clock: FakeClock) -> None:
    """Clearing a region that holds nothing returns 0 and changes nothing."""
    store = local_store(clock)
    store.set("k", 1)
    assert store.clear_region("nope") == 0
    assert len(store) == 1


def test_remove_returns_whether_an_entry_was_held(clock: FakeClock) -> None:
    """remove drops one key and says whether it was there."""
    store = local_store(clock)
    store.set("k", 1)
    assert store.remove("k") is True
    assert store.remove("k") is False
    assert store.remove("k", "r") is False
    assert len(store) == 0


def test_clear_drops_everything(clock: FakeClock) -> None:
    """clear empties every region and returns how many entries were held."""
    store = local_store(clock)
    store.set("a", 1)
    store.set("b", 2, "r")
    store.set("c", 3, "s")
    assert store.clear() == 3
    assert len(store) == 0
    assert store.get("a", MISSING) is MISSING
    assert store.get("b", MISSING, "r") is MISSING
    assert store.regions() == []
    store.set("a", 9)
    assert store.get("a") == 9


# -- size bound ---------------------------------------------------------------------------------


def test_size_never_exceeds_max_entries(clock: FakeClock) -> None:
    """However many keys are set, the store never holds more than max_entries."""
    store = local_store(clock, max_entries=50)
    for i in range(1000):
        store.set(i, i, "r" if i % 3 else None)
        assert len(store) <= 50
    assert len(store) == 50
    assert store.stats().evictions == 950


def test_frequently_hit_entry_survives_eviction(clock: FakeClock) -> None:
    """CLOCK second chance: an entry read between inserts outlives unread ones."""
    store = local_store(clock, max_entries=10)
    store.set("hot", "h")
    for i in range(200):
        assert store.get("hot") == "h"
        store.set(i, i)
    assert store.get("hot", MISSING) == "h"
    assert len(store) == 10


@pytest.mark.parametrize("position", [0, 1, 2])
def test_expired_entry_is_dropped_before_a_live_one(clock: FakeClock, position: int) -> None:
    """When the store is full, an expired entry makes room before any live entry is evicted."""
    store = local_store(clock, max_entries=3)
    keys = ["a", "b", "c"]
    for i, key in enumerate(keys):
        store.set(key, key, ttl=1.0 if i == position else 100.0)
    clock.advance(2.0)
    store.set("d", "d")
    stats = store.stats()
    assert (stats.evictions, stats.expirations) == (0, 1)
    live = [k for i, k in enumerate(keys) if i != position] + ["d"]
    assert [store.get(k, MISSING) for k in live] == live


def test_ring_stays_bounded_under_overwrite_churn(clock: FakeClock) -> None:
    """100k overwrites of 10 keys keep the CLOCK ring O(entries), not O(writes)."""
    store = local_store(clock, max_entries=1000)
    for i in range(100_000):
        store.set(i % 10, i)
    assert len(store) == 10
    assert len(store._ring) <= 2 * 10 + 1025
    assert store.stats().sets == 100_000


def test_ring_stays_bounded_under_region_clear_churn(clock: FakeClock) -> None:
    """Entries dropped by clear_region do not pile up in the CLOCK ring."""
    store = local_store(clock, max_entries=1000)
    for i in range(50_000):
        store.set(i % 10, i, "r")
        if i % 7 == 0:
            store.clear_region("r")
    assert len(store._ring) <= 2 * len(store) + 1025


def test_sweep_drops_expired_entries_without_size_pressure(clock: FakeClock) -> None:
    """Writes reclaim expired entries over time even when the store is far from full."""
    store = local_store(clock, max_entries=100_000, ttl=1.0)
    for i in range(100):
        store.set(("old", i), i)
    clock.advance(2.0)
    for i in range(100):
        store.set(("new", i), i, ttl=100.0)
    assert len(store) == 100
    stats = store.stats()
    assert stats.expirations == 100
    assert stats.evictions == 0
    assert set(store.keys()) == {("new", i) for i in range(100)}


# -- stats --------------------------------------------------------------------------------------


def test_stats_count_every_event(clock: FakeClock) -> None:
    """Every counter of StoreStats counts its own event."""
    store = local_store(clock, max_entries=2)
    store.set("a", 1)  # sets=1
    store.get("a")  # hits=1
    store.get("a")  # hits=2
    store.get("zz")  # misses=1
    store.set("b", 2, ttl=1.0)  # sets=2
    clock.advance(1.0)
    store.get("b")  # misses=2 (expired)
    store.set("c", 3)  # sets=3; b expired is reclaimed: expirations=1
    store.set("d", 4)  # sets=4; one live entry evicted: evictions=1
    store.count_invalidation()
    store.count_invalidation()
    reservation = store.reserve("e")
    store.remove("e")
    assert store.commit(reservation, 5) is False  # rejected_loads=1
    store.repair()  # repairs=1
    assert store.stats() == StoreStats(
        entries=0,
        hits=2,
        misses=2,
        sets=4,
        evictions=1,
        expirations=1,
        invalidations=2,
        rejected_loads=1,
        repairs=1,
    )


def test_hit_count_survives_overwrite_remove_and_clear(clock: FakeClock) -> None:
    """Hits of entries that were overwritten, removed or cleared stay counted."""
    store = local_store(clock)
    store.set("a", 1)
    store.set("b", 1, "r")
    for _ in range(3):
        store.get("a")
        store.get("b", region="r")
    store.set("a", 2)
    assert store.stats().hits == 6
    store.get("a")
    store.remove("a")
    assert store.stats().hits == 7
    store.set("a", 3)
    store.get("a")
    store.clear_region("r")
    assert store.stats().hits == 8
    store.clear()
    assert store.stats().hits == 8


def test_stats_entries_tracks_len(clock: FakeClock) -> None:
    """StoreStats.entries equals len(store)."""
    store = local_store(clock)
    for i in range(5):
        store.set(i, i)
    store.remove(0)
    assert store.stats().entries == len(store) == 4


# -- reservations -------------------------------------------------------------------------------


def test_commit_stores_when_nothing_happened(clock: FakeClock) -> None:
    """A reservation nothing invalidated commits and the value is served."""
    store = local_store(clock)
    reservation = store.reserve("k", "r")
    assert store.is_current(reservation)
    assert store.commit(reservation, "loaded") is True
    assert store.get("k", region="r") == "loaded"
    assert store.stats().rejected_loads == 0


def test_commit_applies_ttl_and_sliding(clock: FakeClock) -> None:
    """commit accepts the same per-entry ttl as set."""
    store = local_store(clock)
    reservation = store.reserve("k")
    assert store.commit(reservation, 1, ttl=1.0)
    clock.advance(1.0)
    assert store.get("k", MISSING) is MISSING


@pytest.mark.parametrize(
    "invalidate",
    [
        pytest.param(lambda s: s.remove("k", "r"), id="remove"),
        pytest.param(lambda s: s.set("k", "written", "r"), id="set"),
        pytest.param(lambda s: s.clear_region("r"), id="clear_region"),
        pytest.param(lambda s: s.clear(), id="clear"),
        pytest.param(lambda s: s.repair(), id="repair"),
    ],
)
def test_invalidation_during_load_refuses_commit(
    clock: FakeClock, invalidate: Callable[[L1Store], object]
) -> None:
    """A load whose key, region or cache was invalidated meanwhile is not stored."""
    store = local_store(clock)
    reservation = store.reserve("k", "r")
    invalidate(store)
    assert not store.is_current(reservation)
    assert store.commit(reservation, "stale") is False
    assert store.get("k", MISSING, "r") != "stale"
    assert store.stats().rejected_loads == 1


def test_set_during_load_keeps_the_written_value(clock: FakeClock) -> None:
    """A value written while a load runs is not overwritten by the load's older result."""
    store = local_store(clock)
    reservation = store.reserve("k")
    store.set("k", "written")
    assert store.commit(reservation, "loaded") is False
    assert store.get("k") == "written"


def test_clear_region_none_refuses_commit_in_default_region(clock: FakeClock) -> None:
    """Clearing the default region cancels a load of a default-region key."""
    store = local_store(clock)
    reservation = store.reserve("k")
    store.clear_region(None)
    assert store.commit(reservation, 1) is False
    assert store.get("k", MISSING) is MISSING


@pytest.mark.parametrize(
    "unrelated",
    [
        pytest.param(lambda s: s.remove("other", "r"), id="remove-other-key"),
        pytest.param(lambda s: s.remove("k", "other"), id="remove-same-key-other-region"),
        pytest.param(lambda s: s.set("other", 1, "r"), id="set-other-key"),
        pytest.param(lambda s: s.clear_region("other"), id="clear-other-region"),
        pytest.param(lambda s: s.clear_region(None), id="clear-default-region"),
    ],
)
def test_unrelated_invalidation_does_not_cancel(
    clock: FakeClock, unrelated: Callable[[L1Store], object]
) -> None:
    """Invalidating another key or another region leaves a reservation current."""
    store = local_store(clock)
    reservation = store.reserve("k", "r")
    unrelated(store)
    assert store.is_current(reservation)
    assert store.commit(reservation, "loaded") is True
    assert store.get("k", region="r") == "loaded"


def test_second_reserve_cancels_the_first(clock: FakeClock) -> None:
    """Only the latest reservation of a key may commit."""
    store = local_store(clock)
    first = store.reserve("k")
    second = store.reserve("k")
    assert not store.is_current(first)
    assert store.commit(first, "first") is False
    assert store.commit(second, "second") is True
    assert store.get("k") == "second"


def test_release_gives_the_reservation_up(clock: FakeClock) -> None:
    """A released reservation can no longer commit."""
    store = local_store(clock)
    reservation = store.reserve("k")
    store.release(reservation)
    assert not store.is_current(reservation)
    assert store.commit(reservation, 1) is False
    assert store.get("k", MISSING) is MISSING


def test_release_of_a_stale_reservation_leaves_the_newer_one(clock: FakeClock) -> None:
    """Releasing a superseded reservation does not cancel the one that replaced it."""
    store = local_store(clock)
    first = store.reserve("k")
    second = store.reserve("k")
    store.release(first)
    assert store.commit(second, 2) is True


def test_commit_is_single_use(clock: FakeClock) -> None:
    """A reservation commits at most once."""
    store = local_store(clock)
    reservation = store.reserve("k")
    assert store.commit(reservation, 1) is True
    assert store.commit(reservation, 2) is False
    assert store.get("k") == 1


def test_reservation_after_an_invalidation_commits(clock: FakeClock) -> None:
    """A load that starts after a region clear or a clear is not cancelled by it."""
    store = local_store(clock)
    store.clear_region("r")
    store.clear()
    reservation = store.reserve("k", "r")
    assert store.commit(reservation, 1) is True


def test_committed_entry_is_stored_as_of_reservation_start(clock: FakeClock) -> None:
    """The staleness clock of a loaded entry starts when its load started, not at commit."""
    store = networked_store(clock, max_staleness=2.0)
    start = clock.now
    reservation = store.reserve("k")
    clock.advance(1.5)
    assert store.commit(reservation, "v") is True
    clock.now = start + 2.0
    assert store.get("k", MISSING) == "v"
    clock.now = start + 2.5
    assert store.get("k", MISSING) is MISSING


# -- the staleness floor ------------------------------------------------------------------------


def test_unconfirmed_entry_is_servable_until_stored_plus_max_staleness(clock: FakeClock) -> None:
    """Before any confirmation an entry is served only until stored + max_staleness."""
    store = networked_store(clock, max_staleness=2.0)
    assert store.fresh_until == -math.inf
    store.set("k", 1)
    clock.advance(2.0)
    assert store.get("k", MISSING) == 1
    clock.advance(0.25)
    assert store.get("k", MISSING) is MISSING
    assert len(store) == 1  # held, but not servable


def test_confirm_extends_service_until_confirmed_plus_max_staleness(clock: FakeClock) -> None:
    """confirm(t) makes every entry servable until t + max_staleness."""
    store = networked_store(clock, max_staleness=2.0)
    store.set("k", 1)
    clock.advance(1.5)
    store.confirm(clock.now)
    assert store.fresh_until == clock.now + 2.0
    clock.advance(2.0)
    assert store.get("k", MISSING) == 1
    clock.advance(0.25)
    assert store.get("k", MISSING) is MISSING


def test_heartbeats_keep_entries_servable(clock: FakeClock) -> None:
    """While confirmations keep coming, entries are served for as long as they live."""
    store = networked_store(clock, max_staleness=2.0)
    store.set("k", 1)
    for _ in range(100):
        clock.advance(0.5)
        store.confirm(clock.now - 0.25)
        assert store.get("k", MISSING) == 1


def test_confirm_never_moves_backwards(clock: FakeClock) -> None:
    """An older confirmation arriving late does not shorten the freshness window."""
    store = networked_store(clock, max_staleness=2.0)
    store.confirm(clock.now + 1.0)
    store.confirm(clock.now)
    assert store.fresh_until == clock.now + 3.0


def test_after_confirmations_stop_entries_age_out_by_their_own_time(clock: FakeClock) -> None:
    """Once confirmations stop, old entries stop at confirmed + S but later ones at stored + S."""
    store = networked_store(clock, max_staleness=2.0)
    t0 = clock.now
    store.set("old", 1)
    store.confirm(t0 + 1.0)  # fresh until t0 + 3
    clock.now = t0 + 2.5
    store.set("new", 2)  # servable until t0 + 4.5
    clock.now = t0 + 3.0
    assert store.get("old", MISSING) == 1
    clock.now = t0 + 3.5
    assert store.get("old", MISSING) is MISSING
    assert store.get("new", MISSING) == 2
    clock.now = t0 + 4.5
    assert store.get("new", MISSING) == 2
    clock.now = t0 + 4.75
    assert store.get("new", MISSING) is MISSING


def test_repair_clears_and_cancels_loads(clock: FakeClock) -> None:
    """repair drops every entry, cancels loads in flight and counts a repair."""
    store = networked_store(clock, max_staleness=2.0)
    store.set("a", 1)
    store.set("b", 2, "r")
    reservation = store.reserve("c")
    assert store.repair() == 2
    assert len(store) == 0
    assert store.commit(reservation, 3) is False
    assert store.stats().repairs == 1


def test_repair_as_of_confirms_from_the_new_subscription(clock: FakeClock) -> None:
    """repair(as_of) makes the store fresh until as_of + max_staleness."""
    store = networked_store(clock, max_staleness=2.0)
    store.set("a", 1)
    store.repair(as_of=clock.now)
    assert store.fresh_until == clock.now + 2.0
    assert store.get("a", MISSING) is MISSING
    assert store.stats().repairs == 1


def test_local_store_never_goes_stale(clock: FakeClock) -> None:
    """With max_staleness=inf (no backplane) entries are served until they expire."""
    store = local_store(clock, max_age=math.inf)
    assert store.fresh_until == math.inf
    store.set("k", 1)
    clock.advance(1e9)
    assert store.get("k", MISSING) == 1
    store.repair(as_of=clock.now)
    assert store.fresh_until == math.inf


def test_stale_read_does_not_slide_the_entry(clock: FakeClock) -> None:
    """A read refused for staleness counts as a miss and does not extend sliding expiry."""
    store = networked_store(clock, max_staleness=1.0, sliding=10.0)
    store.set("k", 1)
    clock.advance(2.0)
    assert store.get("k", MISSING) is MISSING
    store.confirm(clock.now)
    assert store.get("k", MISSING) == 1
    assert store.stats().misses == 1


# -- regressions: each fails until its bug is fixed ---------------------------------------------


def test_region_generations_do_not_grow_without_bound(clock: FakeClock) -> None:
    """Clearing many distinct, empty regions with no load in flight keeps memory bounded."""
    store = networked_store(clock)
    for i in range(10_000):
        store.clear_region(f"tenant-{i}")  # e.g. REGION invalidations from other instances
    assert len(getattr(store, "_region_gens", {})) <= 1024


@pytest.mark.parametrize("max_entries", [1, 3, 100])
def test_value_just_set_survives_its_own_insertion(clock: FakeClock, max_entries: int) -> None:
    """In a full store whose entries were all read, a value just set is served by the next get."""
    store = local_store(clock, max_entries=max_entries)
    for i in range(3 * max_entries + 3):
        store.set(i, i)
        assert store.get(i, MISSING) == i, f"key {i} was evicted by its own set"
        assert len(store) <= max_entries


# -- one writer, concurrent readers ---------------------------------------------------------------


@pytest.mark.parametrize("clock_kind", ["monotonic", "python"])
def test_gets_concurrent_with_one_writer_see_only_written_values(clock_kind: str) -> None:
    """Readers racing one writer (overwrites of every kind of entry, removes, region clears,
    clears, evictions) only ever get a value written for the key they asked, or a miss; with
    a Python clock the readers also switch threads between the lookup and the checks."""
    clock: Callable[[], float] = time.monotonic
    if clock_kind == "python":

        def clock() -> float:
            return time.monotonic()

    store = L1Store(clock=clock, max_entries=64, max_staleness=30.0)
    store.confirm(time.monotonic())
    keys = [f"k{i}" for i in range(100)]
    done = threading.Event()
    wrong: list[object] = []

    def read() -> None:
        while not done.is_set():
            for key in keys:
                for region in (None, "r"):
                    got = store.get(key, MISSING, region)
                    if got is MISSING:
                        continue
                    if isinstance(got, str):
                        if not got.startswith(f"{region}/{key}/"):
                            wrong.append(got)
                    elif got[0] != (region, key):
                        wrong.append(got)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    readers = [threading.Thread(target=read) for _ in range(2)]
    try:
        for reader in readers:
            reader.start()
        for i in range(20_000):
            key, region = keys[i % 100], None if i % 3 else "r"
            if i % 97 == 0:
                store.clear_region(region)
            elif i % 499 == 0:
                store.clear()
            elif i % 13 == 0:
                store.remove(key, region)
            else:
                # str, list and sliding values: in-place overwrites and replacements in C
                value: object = f"{region}/{key}/{i}" if i % 2 else [(region, key), i]
                store.set(key, value, region, sliding=5.0 if i % 5 == 0 else None)
    finally:
        done.set()
        for reader in readers:
            reader.join()
        sys.setswitchinterval(interval)
    assert wrong == []
    assert len(store) <= 64


def test_touch_keeps_a_received_value(clock: FakeClock) -> None:
    """A value received in an update message is stored as current only as of a confirmation
    (``stored=-inf``); touch() counted max_age from that -inf, returned True and left the
    entry expired."""
    store = networked_store(clock, max_age=100.0)
    store.confirm(clock() + 1000)
    store.set("k", "v", stored=-math.inf)
    assert store.touch("k", ttl=10) is True
    assert store.get("k", MISSING) == "v"
    clock.advance(11)
    assert store.get("k", MISSING) is MISSING  # the new ttl applies
    store.set("j", "v", stored=-math.inf)
    assert store.touch("j", ttl=1000) is True
    clock.advance(150)
    assert store.get("j", MISSING) is MISSING  # never past max_age from when it came
