"""The L1 store: entries by region, expiry, a size bound, reservations and the staleness floor.

Pure decisions, no I/O: the clock is injected, nothing here imports ``threading``, ``asyncio``
or ``redis``. Writers must be serialized by the caller (the threaded driver holds a lock, the
asyncio driver runs on one loop); :meth:`L1Store.get` may run concurrently with one writer
because every step it takes is a single dictionary or attribute operation.

Staleness rule (docs/guarantees.md): an entry may be served at time ``now`` only while
``now <= max(entry.stored, confirmed) + max_staleness``, where ``confirmed`` is the latest
moment the backplane proved that every invalidation published before it had been applied
here. While the backplane is healthy ``confirmed`` advances with every heartbeat; when it
stops, entries age out by themselves, with no mode switch to get wrong.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["ACCELERATED", "MISSING", "L1Store", "Reservation", "StoreStats"]


class _Missing:
    """The type of :data:`MISSING`."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "nearcache.MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()
"""Returned by ``get(key, MISSING)`` on a miss, so that ``None`` can be cached."""

Region = str | None
_LOOKAHEAD = 8


class _PyEntry:
    """One cached value with its timestamps (the C accelerator keeps the same fields)."""

    __slots__ = (
        "deadline",
        "expires",
        "fast_until",
        "hits",
        "key",
        "mark",
        "region",
        "sliding",
        "stored",
        "value",
    )

    def __init__(
        self,
        key: Hashable,
        region: Region,
        value: object,
        stored: float,
        expires: float,
        deadline: float,
        sliding: float,
    ) -> None:
        self.key = key
        self.region = region
        self.value = value
        self.stored = stored  # when the value was known current (load start, or set time)
        self.expires = expires  # next expiry: sliding or absolute, whichever is first
        self.deadline = deadline  # hard limit: absolute TTL and max_age
        self.sliding = sliding  # sliding window in seconds, 0.0 when none
        # Until when a hit may skip everything but one comparison: a sliding entry never
        # may (each hit moves its expiry), any other until it expires.
        self.fast_until = -math.inf if sliding else expires
        self.hits = 0
        self.mark = 0  # hits seen by the eviction hand at its last pass


def _py_reader(
    bucket: dict[Hashable, Any],
    regions: dict[Region, dict[Hashable, Any]],
    clock: Callable[[], float],
    fresh_until: float,
    max_staleness: float,
) -> tuple[Callable[..., Any], Callable[..., Any], Callable[..., None], Callable[[], int]]:
    """The pure-Python hit path: ``get``, ``aget``, ``rebind(bucket, regions, fresh_until)``
    and ``misses()``.

    The state lives in closure cells, not in attributes: a cell read is the cheapest load
    Python has, and this path is the one the accelerator replaces where there is no
    compiler. ``rebind`` is how the writer swaps the buckets (a clear) or moves the
    staleness floor; each swap is one cell store, so a concurrent ``get`` sees the old state
    or the new one, never a mix.
    """
    misses = 0
    lookup = bucket.get  # the default region's lookup, bound once: the cheapest call there is

    def rebind(
        new_bucket: dict[Hashable, Any],
        new_regions: dict[Region, dict[Hashable, Any]],
        new_fresh_until: float,
    ) -> None:
        nonlocal lookup, regions, fresh_until
        lookup, regions, fresh_until = new_bucket.get, new_regions, new_fresh_until

    def count_misses() -> int:
        return misses

    def get_local(key: Hashable, default: Any = None, region: Region = None) -> Any:
        # A local store never goes stale (max_staleness is infinite): only expiry applies.
        nonlocal misses
        if region is None:
            entry = lookup(key)
        else:
            held = regions.get(region)
            entry = None if held is None else held.get(key)
        if entry is not None:
            now = clock()
            if now < entry.fast_until:
                entry.hits += 1
                return entry.value
            if now < entry.expires:
                entry.hits += 1
                if entry.sliding:
                    entry.expires = min(now + entry.sliding, entry.deadline)
                return entry.value
        misses += 1
        return default

    def get_networked(key: Hashable, default: Any = None, region: Region = None) -> Any:
        nonlocal misses
        if region is None:
            entry = lookup(key)
        else:
            held = regions.get(region)
            entry = None if held is None else held.get(key)
        if entry is not None:
            now = clock()
            if now < entry.fast_until and now <= fresh_until:
                entry.hits += 1
                return entry.value
            if now < entry.expires and (now <= fresh_until or now <= entry.stored + max_staleness):
                entry.hits += 1
                if entry.sliding:
                    entry.expires = min(now + entry.sliding, entry.deadline)
                return entry.value
        misses += 1
        return default

    get = get_local if max_staleness == math.inf else get_networked

    async def aget(key: Hashable, default: Any = None, region: Region = None) -> Any:
        return get(key, default, region)

    return get, aget, rebind, count_misses


class _PyTable:
    """The entries, the CLOCK ring and the hot paths (``get``, ``set``, ``remove``) in
    Python; ``_speedups.Table`` implements the same in C, and the differential tests hold
    the two to the same results. Writers are serialized by the caller (see the module doc).
    """

    def __init__(
        self,
        clock: Callable[[], float] | None,
        max_entries: int,
        ttl: float | None,
        sliding: float | None,
        max_age: float,
        max_staleness: float,
    ) -> None:
        self._clock = clock = clock or time.monotonic
        self.max_entries = max_entries
        self._ttl = ttl
        self._sliding = sliding
        self._max_age = max_age
        self.max_staleness = max_staleness
        self.default_bucket: dict[Hashable, Any] = {}
        self.regions: dict[Region, dict[Hashable, Any]] = {None: self.default_bucket}
        self.reservations: dict[tuple[Region, Hashable], Reservation] = {}
        self.ring: deque[Any] = deque()  # the CLOCK ring (entries); holds dead ones lazily
        self.count = 0
        self.sets = 0
        self.evictions = 0
        self.expirations = 0
        self.retired_hits = 0
        # Local caches never go stale; a backplane cache starts unconfirmed.
        self._fresh_until = math.inf if max_staleness == math.inf else -math.inf
        self.get, self.aget, self._rebind, self._misses = _py_reader(
            self.default_bucket, self.regions, clock, self._fresh_until, max_staleness
        )

    @property
    def fresh_until(self) -> float:
        return self._fresh_until

    @fresh_until.setter
    def fresh_until(self, value: float) -> None:
        self._fresh_until = value
        self._rebind(self.default_bucket, self.regions, value)

    @property
    def misses(self) -> int:
        return self._misses()

    def set(
        self,
        key: Hashable,
        value: object,
        region: Region = None,
        ttl: float | None = None,
        sliding: float | None = None,
        stored: float | None = None,
    ) -> None:
        if self.reservations:
            reservation = self.reservations.pop((region, key), None)
            if reservation is not None:
                reservation.cancelled = True
        self.insert(key, value, region, stored, ttl, sliding)

    def insert(
        self,
        key: Hashable,
        value: object,
        region: Region,
        stored: float | None,
        ttl: float | None,
        sliding: float | None,
    ) -> None:
        """Store an entry known current as of ``stored`` (None: now, read once)."""
        now = self._clock()
        if stored is None:
            stored = now
        ttl = self._ttl if ttl is None else ttl
        sliding = self._sliding if sliding is None else sliding
        deadline = now + self._max_age if ttl is None else now + min(ttl, self._max_age)
        expires = deadline if not sliding else min(deadline, now + sliding)
        entry = _PyEntry(key, region, value, stored, expires, deadline, sliding or 0.0)
        bucket = self.default_bucket if region is None else self.regions.get(region)
        if bucket is None:
            bucket = self.regions[region] = {}
        old = bucket.get(key)
        if old is None:
            self._sweep(now, 2)
            # Make room before inserting, so the new entry is never its own victim.
            while self.count >= self.max_entries and self.ring:
                self._evict_one(now)
            bucket = self.default_bucket if region is None else self.regions.setdefault(region, {})
            old = bucket.get(key)  # a finalizer run by an eviction may have set it meanwhile
            if old is None:
                self.count += 1
        if old is not None:
            self.retired_hits += old.hits
        bucket[key] = entry
        self.sets += 1
        self.ring.append(entry)
        if len(self.ring) > 2 * self.count + 1024:
            self._compact()

    def _compact(self) -> None:
        regions, gone = self.regions, dict[Hashable, Any]()
        self.ring = deque(e for e in self.ring if regions.get(e.region, gone).get(e.key) is e)

    def _live(self, entry: _PyEntry) -> bool:
        bucket = self.regions.get(entry.region)
        return bucket is not None and bucket.get(entry.key) is entry

    def _drop(self, entry: _PyEntry) -> None:
        bucket = self.regions[entry.region]
        del bucket[entry.key]
        if not bucket and entry.region is not None:
            del self.regions[entry.region]
        self.count -= 1
        self.retired_hits += entry.hits

    def _evict_one(self, now: float) -> None:
        ring = self.ring
        # An expired entry near the hand goes before any live one (a short look-ahead keeps
        # this O(1); the sweep frees the rest of the expired entries over time).
        for i in range(min(_LOOKAHEAD, len(ring))):
            entry = ring[i]
            if now >= entry.expires and self._live(entry):
                del ring[i]
                self._drop(entry)
                self.expirations += 1
                return
        while ring:
            entry = ring.popleft()
            if not self._live(entry):
                continue
            if entry.hits != entry.mark and now < entry.expires:
                entry.mark = entry.hits  # second chance: used since the hand last passed
                ring.append(entry)
                continue
            self._drop(entry)
            if now < entry.expires:
                self.evictions += 1
            else:
                self.expirations += 1
            return

    def _sweep(self, now: float, budget: int) -> None:
        """Drop dead and expired entries at the hand (the oldest), so that expired entries do
        not pile up with no size pressure. It stops at the first live one: moving entries past
        the hand without a pass of the eviction policy would skew it."""
        ring = self.ring
        for _ in range(min(budget, len(ring))):
            entry = ring[0]
            if not self._live(entry):
                ring.popleft()
            elif now >= entry.expires:
                ring.popleft()
                self._drop(entry)
                self.expirations += 1
            else:
                return

    def retime(self, key: Hashable, region: Region, expires: float, deadline: float) -> None:
        """Give the held entry of ``key`` new expiry times (a touch). A new entry replaces it:
        a reader may hold the old one, and the hit path of a sliding entry writes to it."""
        bucket = self.regions[region]
        old = bucket[key]
        entry = _PyEntry(key, region, old.value, old.stored, expires, deadline, old.sliding)
        entry.hits, entry.mark = old.hits, old.mark
        bucket[key] = entry
        self.ring.append(entry)
        if len(self.ring) > 2 * self.count + 1024:
            self._compact()

    def remove(self, key: Hashable, region: Region = None) -> bool:
        if self.reservations:
            reservation = self.reservations.pop((region, key), None)
            if reservation is not None:
                reservation.cancelled = True
        bucket = self.regions.get(region)
        entry = None if bucket is None else bucket.get(key)
        if entry is None:
            return False
        self._drop(entry)
        return True

    def clear_region(self, region: Region) -> int:
        bucket = self.regions.pop(region, None)
        if region is None:
            self.default_bucket = {}
            self.regions[None] = self.default_bucket
            self._rebind(self.default_bucket, self.regions, self._fresh_until)
        if not bucket:
            return 0
        self.count -= len(bucket)
        self.retired_hits += sum(e.hits for e in bucket.values())
        return len(bucket)

    def clear(self) -> int:
        held = self.count
        self.retired_hits += sum(e.hits for b in self.regions.values() for e in b.values())
        self.default_bucket = {}
        self.regions = {None: self.default_bucket}
        self._rebind(self.default_bucket, self.regions, self._fresh_until)
        self.ring = deque()
        self.count = 0
        return held


def _implementation() -> Any:
    """The C accelerator's Table if it was built (and is current), else the Python one."""
    if os.environ.get("NEARCACHE_PURE_PYTHON"):
        return _PyTable
    try:
        from nearcache._core import _speedups
    except ImportError:  # pragma: no cover - built without a compiler
        return _PyTable
    if getattr(_speedups, "API", None) != _API:  # pragma: no cover - a stale in-place build
        return _PyTable
    return _speedups.Table


_API = 3  # bumped with every change of _speedups' interface; a stale build is not used
_Table = _implementation()

ACCELERATED: Final = _Table is not _PyTable
"""Whether the L1 hot paths run in C (``NEARCACHE_PURE_PYTHON=1`` turns it off)."""

HIT_PATH: Final = "C accelerator" if ACCELERATED else "pure Python"
"""Which implementation of the L1 store is active, as reported in the cache's stats."""


class Reservation:
    """A claim, taken before a load, that the loaded value may be stored.

    Any invalidation of the key, its region or everything that happens while the load runs
    cancels it, so a value loaded before a write never overwrites the write's invalidation.
    """

    __slots__ = ("cancelled", "key", "region", "started")

    def __init__(self, key: Hashable, region: Region, started: float) -> None:
        self.key = key
        self.region = region
        self.started = started
        self.cancelled = False


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of the L1 store's counters."""

    entries: int
    hits: int
    misses: int
    sets: int
    evictions: int
    expirations: int
    invalidations: int
    rejected_loads: int
    repairs: int


class L1Store:
    """The in-process cache of one instance.

    Args:
        clock: seconds from a monotonic clock (``time.monotonic`` in production).
        max_entries: the size bound; past it the least recently useful entry is evicted
            (CLOCK, an LRU approximation whose hit path only bumps a counter).
        ttl: default absolute time to live in seconds (``None``: only ``max_age`` applies).
        sliding: default sliding expiration in seconds (``None``: none).
        max_age: a hard limit on every entry's age, the backstop for anything missed.
        max_staleness: how long an entry may be served after the backplane last proved it
            current; ``math.inf`` for a local cache with no backplane.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        max_entries: int = 100_000,
        ttl: float | None = None,
        sliding: float | None = None,
        max_age: float = 3600.0,
        max_staleness: float = math.inf,
    ) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max_age = max_age
        self._max_staleness = max_staleness
        self._table = self._reader = _Table(
            # The C table reads CLOCK_MONOTONIC itself, which is time.monotonic on Linux.
            None if clock is time.monotonic and sys.platform.startswith("linux") else clock,
            max_entries,
            ttl,
            sliding,
            max_age,
            max_staleness,
        )
        # The hot paths: the table's own methods, with no Python frame in between.
        self.get = self._table.get  # type: ignore[method-assign]
        self.aget = self._table.aget  # type: ignore[method-assign]
        self.set = self._table.set  # type: ignore[method-assign]
        self.remove = self._table.remove  # type: ignore[method-assign]
        self._reservations: dict[tuple[Region, Hashable], Reservation] = self._table.reservations
        self._invalidations = 0
        self._rejected_loads = 0
        self._repairs = 0

    # -- reads ------------------------------------------------------------------------------

    def get(self, key: Hashable, default: Any = None, region: Region = None) -> Any:
        """Return the value of ``key`` in ``region``, or ``default`` when it is not servable.

        (Each store replaces this method with its table's, C or Python, at construction.)
        """
        return self._table.get(key, default, region)

    async def aget(self, key: Hashable, default: Any = None, region: Region = None) -> Any:
        """:meth:`get` as an awaitable that never suspends."""
        return self._table.get(key, default, region)

    @property
    def _fresh_until(self) -> float:
        return float(self._table.fresh_until)

    @_fresh_until.setter
    def _fresh_until(self, value: float) -> None:
        self._table.fresh_until = value

    @property
    def _ring(self) -> Any:
        return self._table.ring

    def peek(self, key: Hashable, default: Any = None, region: Region = None) -> Any:
        """Like :meth:`get` but counts nothing (for re-checks of a read already counted)."""
        bucket = self._table.regions.get(region)
        entry = None if bucket is None else bucket.get(key)
        if entry is None:
            return default
        now = self._clock()
        if now < entry.expires and self.is_fresh(entry.stored, now):
            return entry.value
        return default

    def is_fresh(self, stored: float, now: float) -> bool:
        """Whether something known current at ``stored`` may still be served at ``now``
        under the staleness rule."""
        return now <= self._fresh_until or now <= stored + self._max_staleness

    def __len__(self) -> int:
        return int(self._table.count)

    def __contains__(self, item: tuple[Region, Hashable]) -> bool:
        region, key = item
        return self.get(key, MISSING, region) is not MISSING

    def keys(self, region: Region = None) -> Iterator[Hashable]:
        """The keys currently held in ``region`` (servable or not)."""
        return iter(list(self._table.regions.get(region, {})))

    def regions(self) -> list[Region]:
        """The regions that currently hold entries."""
        return [r for r, bucket in self._table.regions.items() if bucket]

    @property
    def fresh_until(self) -> float:
        """Until when entries may be served without their own freshness (see module doc)."""
        return self._fresh_until

    def stats(self) -> StoreStats:
        """A snapshot of the counters."""
        table = self._table
        live_hits = sum(e.hits for bucket in table.regions.values() for e in bucket.values())
        return StoreStats(
            entries=table.count,
            hits=table.retired_hits + live_hits,
            misses=table.misses,
            sets=table.sets,
            evictions=table.evictions,
            expirations=table.expirations,
            invalidations=self._invalidations,
            rejected_loads=self._rejected_loads,
            repairs=self._repairs,
        )

    # -- writes -----------------------------------------------------------------------------

    def set(
        self,
        key: Hashable,
        value: object,
        region: Region = None,
        ttl: float | None = None,
        sliding: float | None = None,
        stored: float | None = None,
    ) -> None:
        """Store ``value``; a load of the same key that is in flight will not overwrite it.

        ``stored``: when the value was known current (default: now). A value received from
        another instance passes ``-inf``: it is then served only as long as confirmations
        keep arriving, i.e. as of the confirmation that preceded it (see docs/guarantees.md).

        (Each store replaces this method with its table's, C or Python, at construction.)
        """
        self._table.set(key, value, region, ttl, sliding, stored)

    def remove(self, key: Hashable, region: Region = None) -> bool:
        """Drop one key; cancel a load of it in flight. Return whether an entry was held.

        (Each store replaces this method with its table's, C or Python, at construction.)
        """
        return bool(self._table.remove(key, region))

    def clear_region(self, region: Region) -> int:
        """Drop every key of ``region`` in O(1) (plus freeing); return how many were held."""
        # Cancel the loads in flight in this region (few: one per key being loaded).
        doomed = [ident for ident in self._reservations if ident[0] == region]
        for ident in doomed:
            self._reservations.pop(ident).cancelled = True
        return int(self._table.clear_region(region))

    def clear(self) -> int:
        """Drop everything and cancel every load in flight; return how many were held."""
        for reservation in self._reservations.values():
            reservation.cancelled = True
        self._reservations.clear()
        return int(self._table.clear())

    def touch(self, key: Hashable, region: Region = None, *, ttl: float | None = None) -> bool:
        """Give a servable entry a new time to live of ``ttl`` seconds from now (``None``: the
        default ttl), keeping its value, its freshness and its ``max_age`` limit (counted from
        when the value was known current); return whether one was held."""
        bucket = self._table.regions.get(region)
        entry = None if bucket is None else bucket.get(key)
        if entry is None:
            return False
        now = self._clock()
        if not (now < entry.expires and self.is_fresh(entry.stored, now)):
            return False
        ttl = self._ttl if ttl is None else ttl
        # A received value (stored -inf: current as of a confirmation) keeps the max_age limit
        # it was stored with.
        limit = entry.stored + self._max_age if entry.stored != -math.inf else entry.deadline
        deadline = limit if ttl is None else min(now + ttl, limit)
        expires = min(deadline, now + entry.sliding) if entry.sliding else deadline
        self._table.retime(key, region, expires, deadline)
        return True

    def count_invalidation(self, count: int = 1) -> None:
        """Count invalidations applied on behalf of another instance."""
        self._invalidations += count

    # -- the load-vs-invalidate race --------------------------------------------------------

    def reserve(self, key: Hashable, region: Region = None) -> Reservation:
        """Claim the right to store the result of a load of ``key`` that starts now."""
        reservation = Reservation(key, region, self._clock())
        previous = self._reservations.get((region, key))
        if previous is not None:
            previous.cancelled = True
        self._reservations[(region, key)] = reservation
        return reservation

    def is_current(self, reservation: Reservation) -> bool:
        """Whether nothing has invalidated the reservation's key since it was taken."""
        return not reservation.cancelled

    def commit(
        self,
        reservation: Reservation,
        value: object,
        *,
        ttl: float | None = None,
        sliding: float | None = None,
    ) -> bool:
        """Store a loaded value if its reservation still holds; return whether it was stored.

        The entry counts as current from when the load *started*: anything the load read is
        at least that fresh, and nothing later is known.
        """
        key, region = reservation.key, reservation.region
        if self._reservations.get((region, key)) is reservation:
            del self._reservations[(region, key)]
        if not self.is_current(reservation):
            self._rejected_loads += 1
            return False
        reservation.cancelled = True  # single use
        self._table.insert(key, value, region, reservation.started, ttl, sliding)
        return True

    def release(self, reservation: Reservation) -> None:
        """Give a reservation up (the load failed)."""
        key, region = reservation.key, reservation.region
        if self._reservations.get((region, key)) is reservation:
            del self._reservations[(region, key)]
        reservation.cancelled = True

    # -- the staleness floor ----------------------------------------------------------------

    def confirm(self, as_of: float) -> None:
        """The backplane proved every invalidation published before ``as_of`` was applied."""
        fresh_until = as_of + self._max_staleness
        self._fresh_until = max(self._fresh_until, fresh_until)

    def suspend(self, as_of: float) -> None:
        """No confirmation after ``as_of`` can be trusted (e.g. in a forked child whose
        backplane is gone): entries age out under the staleness rule from then on."""
        self._fresh_until = min(self._fresh_until, as_of + self._max_staleness)

    def repair(self, as_of: float | None = None) -> int:
        """Messages may have been lost: drop what could be stale, locally, and cancel loads in
        flight. With ``as_of`` (a new subscription is up from then), confirm from ``as_of``.
        Return how many entries were dropped."""
        self._repairs += 1
        dropped = self.clear()
        if as_of is not None:
            self._fresh_until = as_of + self._max_staleness
        return dropped
