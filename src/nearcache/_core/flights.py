"""Stampede protection without I/O: which load a caller of ``get_or_set`` waits for.

While one caller runs the factory for a key, the others wait for its result instead of
running it again. The decisions live here, once, for both drivers; how a waiter waits (a
thread event, an asyncio future) is the driver's, kept in :attr:`Flight.wake`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

from nearcache._core.store import L1Store, Reservation

__all__ = ["Flight", "Flights"]


class Flight:
    """One load in progress for a key: its reservation in the store, how many callers joined
    it, and the driver's means of handing them its result (created by the first that joins:
    most loads have none)."""

    __slots__ = ("reservation", "waiters", "wake")

    def __init__(self, reservation: Reservation) -> None:
        self.reservation = reservation
        self.waiters = 0
        self.wake: Any = None


class Flights(Mapping[tuple[str | None, Hashable], Flight]):
    """The loads in progress of one cache, by ``(region, key)`` (a read-only mapping).
    Callers serialize every method (the threaded driver's lock, the asyncio driver's loop)."""

    def __init__(self, store: Callable[[], L1Store], clock: Callable[[], float]) -> None:
        self._store = store  # the store may be replaced (a forked child keeps its parent's)
        self._clock = clock
        self._flights: dict[tuple[str | None, Hashable], Flight] = {}

    def __getitem__(self, ident: tuple[str | None, Hashable]) -> Flight:
        return self._flights[ident]

    def __iter__(self) -> Iterator[tuple[str | None, Hashable]]:
        return iter(self._flights)

    def __len__(self) -> int:
        return len(self._flights)

    def joinable(self, key: Hashable, region: str | None) -> Flight | None:
        """The load a caller should wait for rather than load itself, or None. A load is
        joined only if nothing invalidated its key since it started and its result would be
        servable now under the staleness rule: a caller must never get a value loaded before
        a write it could have seen."""
        flight = self._flights.get((region, key))
        if flight is None:
            return None
        store = self._store()
        if not (
            store.is_current(flight.reservation)
            and store.is_fresh(flight.reservation.started, self._clock())
        ):
            return None
        flight.waiters += 1
        return flight

    def start(self, key: Hashable, region: str | None) -> Flight:
        """A caller loads ``key`` itself: reserve it (a write or invalidation meanwhile will
        keep the result out of L1) and let later callers join."""
        flight = self._flights[(region, key)] = Flight(self._store().reserve(key, region))
        return flight

    def finished(
        self,
        flight: Flight,
        value: object,
        *,
        ttl: float | None,
        sliding: float | None,
        keep: bool,
    ) -> None:
        """The load returned ``value``: cache it if ``keep`` (the cache is open) and its
        reservation still holds, and stop offering it to new callers."""
        key, region = flight.reservation.key, flight.reservation.region
        if keep:
            self._store().commit(flight.reservation, value, ttl=ttl, sliding=sliding)
        self._forget(flight, key, region)

    def failed(self, flight: Flight) -> None:
        """The load raised (or was cancelled): nothing is cached."""
        self._store().release(flight.reservation)
        self._forget(flight, flight.reservation.key, flight.reservation.region)

    def _forget(self, flight: Flight, key: Hashable, region: str | None) -> None:
        # A newer load of the same key may have taken its place: leave that one.
        if self._flights.get((region, key)) is flight:
            del self._flights[(region, key)]
