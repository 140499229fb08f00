"""``AsyncNearCache``: the asyncio driver over :class:`nearcache._core.cache.CacheCore`.

Everything runs on the event loop that first uses the cache: the listener and sender are
tasks, the core needs no lock, and nothing blocks the loop. A hit never suspends.

Closing never trusts one cancel to arrive (see ``nearcache._cancellation``): the sender
checks the state on every turn, and :meth:`AsyncNearCache.aclose` cancels until it is done.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from nearcache._cached import AsyncCached
from nearcache._cancellation import STOP_GRACE, Signal, stop_task, wait_event
from nearcache._core.cache import (
    PLAIN_KEY_TYPES,
    Batch,
    CacheCore,
    CacheStats,
    check_key,
    check_region,
    check_ttl,
    snapshot,
)
from nearcache._core.codec import Invalidation, Kind
from nearcache._core.l2 import L2Options
from nearcache._core.sharing import new_sharing
from nearcache._core.store import MISSING, Reservation
from nearcache._drivers.common import (
    CLOSED,
    CacheCommon,
    CacheState,
    ClosedStore,
    ListenerCommon,
)
from nearcache._exceptions import (
    FlushTimeoutError,
    PublishRefusedError,
    SerializationError,
)
from nearcache._typing import AsyncBackplane, Clock, Serializer

if TYPE_CHECKING:
    from nearcache._l2.aioredis import AsyncRedisL2

__all__ = ["AsyncNearCache"]

log = logging.getLogger("nearcache")
T = TypeVar("T")
_CLOSED = CLOSED  # the hot paths compare with a module constant (see common.CLOSED)


class AsyncNearCache(CacheCommon):
    """The asyncio twin of :class:`~nearcache.NearCache`: same arguments, same method names,
    as coroutines (``aclose`` instead of ``close``; ``async with``; async factories).

    The backplane starts on first use (or ``await cache.start()`` / ``async with``); with
    ``abortConnect=True`` that first use raises :class:`~nearcache.BackplaneUnavailableError`
    when Redis cannot be reached.

    Example::

        async with AsyncNearCache("redis://127.0.0.1:6379/0", channel="shop") as cache:
            product = await cache.get_or_set("42", load_product, region="products")
    """

    def __init__(
        self,
        connection: str | None = None,
        *,
        channel: str = "default",
        backplane: AsyncBackplane | None = None,
        max_entries: int = 100_000,
        ttl: float | None = None,
        sliding: float | None = None,
        max_age: float = 3600.0,
        max_staleness: float = 2.0,
        heartbeat_interval: float | None = None,
        max_pending: int = 100_000,
        secret: str | bytes | Mapping[str, str | bytes] | None = None,
        abort_connect: bool | None = None,
        replay_log: int = 10_000,
        reconcile_interval: float = 5.0,
        clock: Clock = time.monotonic,
        l2: bool = False,
        propagate: Literal["invalidate", "update"] = "invalidate",
        serializer: Serializer | None = None,
        l2_ttl: float | None = None,
        l2_max_bytes: int = L2Options.l2_max_bytes,
        l2_lease_ttl: float = L2Options.l2_lease_ttl,
        l2_lease_wait: float = L2Options.l2_lease_wait,
        l2_timeout: float = L2Options.l2_timeout,
        update_max_bytes: int = L2Options.update_max_bytes,
    ) -> None:
        self._configure(
            connection,
            channel,
            backplane,
            max_entries=max_entries,
            ttl=ttl,
            sliding=sliding,
            max_age=max_age,
            max_staleness=max_staleness,
            heartbeat_interval=heartbeat_interval,
            max_pending=max_pending,
            secret=secret,
            abort_connect=abort_connect,
            replay_log=replay_log,
            reconcile_interval=reconcile_interval,
            clock=clock,
            l2=l2,
            propagate=propagate,
            serializer=serializer,
            l2_ttl=l2_ttl,
            l2_max_bytes=l2_max_bytes,
            l2_lease_ttl=l2_lease_ttl,
            l2_lease_wait=l2_lease_wait,
            l2_timeout=l2_timeout,
            update_max_bytes=update_max_bytes,
        )
        sharing = new_sharing(
            self._sharing_options,
            max_age=self._options.max_age,
            default_ttl=self._options.ttl,
            secrets=self._options.secrets,
            clock=clock,
        )
        self._l2: AsyncRedisL2 | None = None
        if self._settings is not None:
            from nearcache._backplane.aioredis import AsyncRedisBackplane

            self._backplane = backplane = AsyncRedisBackplane(
                self._settings,
                self._channel,
                clock=clock,
                heartbeat=self._options.heartbeat,
                heartbeat_timeout=max(self._options.heartbeat * 2, 0.05),
                log_length=self._options.replay_log,
                reconcile=self._options.reconcile_interval,
            )
            if sharing is not None:
                from nearcache._l2.aioredis import AsyncRedisL2

                self._l2 = AsyncRedisL2(
                    self._settings,
                    self._channel,
                    sharing,
                    clock=clock,
                    log_length=self._options.replay_log,
                    usable=self._l2_usable,
                    backplane=self._backplane,
                    current=self._l2_current,
                )
        self._core = CacheCore(
            self._options,
            clock=clock,
            instance_id=os.urandom(16),
            networked=backplane is not None,
            sharing=sharing,
            channel=self._channel,
        )
        self._store: Any = self._core.store
        # The hit path: an awaitable that completes at once, from the store's reader.
        self.get = self._store.aget  # type: ignore[method-assign]
        self._started = backplane is None
        self._start_lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None
        self._progress: Signal | None = None  # batches delivered or refused, or closed
        self._sender: asyncio.Task[None] | None = None
        # A batch a caller wrote to Redis itself, whose reply the sender reads; and whether a
        # batch is in flight, which keeps callers from starting another (``_backplane/wire.py``).
        self._written: tuple[Batch, list[bytes]] | None = None
        self._publishing = False
        # The messages of the batch callers wrote, while callers may write more of it behind
        # (AsyncWire.write_more_nowait): they join it, and the sender sends them all again
        # should it retry.
        self._growing: list[bytes] | None = None
        self._direct = sharing is None and hasattr(backplane, "write_nowait")
        self._grows = self._direct and hasattr(backplane, "write_more_nowait")
        # Set once a call to aclose() has begun; set() when it has finished.
        self._closer: asyncio.Event | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect the backplane (idempotent; every other method calls it when needed)."""
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            self._check_open()
            backplane = self._backplane
            assert backplane is not None
            self._wake = asyncio.Event()
            self._progress = Signal()
            await backplane.start(_Listener(self))
            self._sender = asyncio.get_running_loop().create_task(
                self._send_loop(), name=f"nearcache-sender:{self._channel}"
            )
            self._started = True
            if self._outbox_waiting():
                self._wake.set()
            if self._abort_connect:
                error = self._start_error(await backplane.wait_connected(self._connect_timeout()))
                if error is not None:
                    await self.aclose(timeout=0)
                    raise error

    def _outbox_waiting(self) -> bool:
        return self._core.outbox.waiting > 0

    async def aclose(self, timeout: float = 1.0) -> None:
        """Deliver what is queued (waiting at most ``timeout`` seconds), then stop.

        Returns within ``timeout`` + 4 x ``STOP_GRACE`` (2 s) seconds whatever Redis and the
        connections are doing; afterwards no task and no connection of this cache remains.
        If this call is cancelled (or a timeout around it expires), the tasks are cancelled
        and the connections aborted before the cancel propagates. A second call waits for
        the first one to finish.
        """
        if self._closer is not None:
            await wait_event(self._closer, timeout + 4 * STOP_GRACE)
            return
        self._closer = asyncio.Event()
        try:
            await self._shut_down(timeout)
        finally:
            self._closer.set()

    async def _shut_down(self, timeout: float) -> None:
        sender = self._sender
        try:
            if self._started and self._backplane is not None and timeout > 0:
                try:
                    await self.flush(timeout)
                except (FlushTimeoutError, PublishRefusedError) as exc:
                    self._closing_undelivered(exc)
            self._stop_serving()
            stopped = sender is None or await stop_task(sender)
            if self._backplane is not None and self._started:
                await self._backplane.aclose()  # within 2 x STOP_GRACE
            if self._l2 is not None:
                await self._l2.aclose()
            if not stopped:
                # Its publish ignored every cancel, but the backplane has now cut the
                # connection under it: the publish fails and the loop sees CLOSED.
                assert sender is not None
                await stop_task(sender)
        except BaseException:
            # Cancelled (or failed) half-way: stop everything without waiting for anything
            # that could hang. The backplane's aclose aborts every socket first thing when
            # it is cancelled in turn, and the sender sees CLOSED on its next turn.
            self._stop_serving()
            if sender is not None:
                sender.cancel()
            if self._backplane is not None and self._started:
                await self._backplane.aclose()
            if self._l2 is not None:
                await self._l2.aclose()
            raise

    def _stop_serving(self) -> None:
        """Refuse every further call, drop L1, and wake the sender and every flush() so that
        they end."""
        if self._state is CacheState.CLOSED:
            return
        self._state = CacheState.CLOSED
        self._kick()
        if self._progress is not None:
            self._progress.notify()
        self._core.store.clear()
        self._store = ClosedStore()
        self.get = self._store.aget  # type: ignore[method-assign]

    async def __aenter__(self) -> AsyncNearCache:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- reads ----------------------------------------------------------------------------

    async def get(self, key: Hashable, default: Any = None, region: str | None = None) -> Any:
        """Return the cached value of ``key`` in ``region``, or ``default`` on a miss."""
        return self._store.get(key, default, region)

    async def get_or_set(
        self,
        key: Hashable,
        factory: Callable[[], Awaitable[T] | T],
        *,
        region: str | None = None,
        ttl: float | None = None,
        sliding: float | None = None,
    ) -> T:
        """Return the cached value, or run ``factory()`` once (awaiting it if it returns an
        awaitable), cache and return its result. See :meth:`NearCache.get_or_set`."""
        # Checked before the lookup: a hit must not let a bad key through (1.0 == 1).
        if type(key) not in PLAIN_KEY_TYPES or (region is not None and type(region) is not str):
            check_key(key, region)
        value = self._store.get(key, MISSING, region)
        if value is not MISSING:
            return value  # type: ignore[no-any-return]
        self._check_open()
        if not self._started:
            await self.start()
        store, flights = self._core.store, self._core.flights
        while True:
            joined = flights.joinable(key, region)
            if joined is None:
                break
            if joined.wake is None:
                joined.wake = asyncio.get_running_loop().create_future()
            future: asyncio.Future[Any] = joined.wake
            # asyncio.wait raises CancelledError only when this task is cancelled, and returns
            # when the load's task was. (Behind a shield both raise, and a waiter cancelled
            # together with its loader, by gather or a TaskGroup, took the loader's
            # cancellation for the whole story and ran the factory again.)
            await asyncio.wait((future,))
            if not future.cancelled():
                return future.result()  # type: ignore[no-any-return]
            # The task running the load was cancelled, not this one: load again.
            value = store.peek(key, MISSING, region)
            if value is not MISSING:
                return value  # type: ignore[no-any-return]
        flight = flights.start(key, region)
        # Not while an own write of the key is unpublished: L2 may predate it.
        from_l2 = (
            self._l2 is not None
            and self._l2.reads
            and not self._core.own_write_pending(region, key)
        )
        dropped = self._core.take_dropped(region, key)
        try:
            if from_l2:
                result, ttl = await self._l2_load(
                    key, region, factory, ttl, flight.reservation, dropped
                )
            else:
                result = factory()
                if inspect.isawaitable(result):
                    result = await result
        except BaseException as exc:
            flights.failed(flight)
            future = flight.wake
            if future is not None:
                if isinstance(exc, asyncio.CancelledError):
                    future.cancel()  # waiters start their own load
                elif not future.done():
                    future.set_exception(exc)
                    future.exception()  # retrieved: waiters re-raise it themselves
            raise
        flights.finished(
            flight, result, ttl=ttl, sliding=sliding, keep=self._state is CacheState.OPEN
        )
        if flight.wake is not None:
            flight.wake.set_result(result)
        return result  # type: ignore[no-any-return]

    # -- writes ---------------------------------------------------------------------------

    async def set(
        self,
        key: Hashable,
        value: object,
        *,
        region: str | None = None,
        ttl: float | None = None,
        sliding: float | None = None,
    ) -> None:
        """Cache ``value`` here and make every other instance drop its copy of ``key``. See
        :meth:`NearCache.set` for ``l2=True`` and ``propagate="update"``."""
        if region is not None or type(key) is not str or not key.isascii():
            check_key(key, region)  # (an ASCII str key of the default region always passes)
        if self._state is _CLOSED:
            self._check_open()  # raises
        if not self._started:
            await self.start()
        core = self._core
        data = None
        if core.sharing is not None:
            try:
                data = core.sharing.serialize(value, key, region)
            except SerializationError:
                await self.remove(key, region=region)  # never left stale anywhere
                raise
        if data is None:
            # CacheCore.set's plain path and Outbox.add_key, inlined as in NearCache.set.
            core.store.set(key, value, region, ttl, sliding)
            staged = core.staged
            if staged is None:
                wake = False
            else:
                wake = not staged
                staged.append((region, key))
                if len(staged) >= core.outbox.stage_max:
                    core.outbox.fold()
        else:
            wake = core.set(key, value, region, ttl, sliding, data, self._log_position())
        if wake:
            self._kick()

    async def write(
        self,
        key: Hashable,
        change: Callable[[], Awaitable[T] | T],
        *,
        region: str | None = None,
        ttl: float | None = None,
        sliding: float | None = None,
    ) -> T:
        """Run ``change()`` (awaiting it if it returns an awaitable), which writes the source
        of truth and returns the key's new value; cache and share it. See
        :meth:`NearCache.write`."""
        check_key(key, region)
        self._check_open()
        if not self._started:
            await self.start()
        since = self._log_position()
        started = self._core.outbox.accepted
        store = self._core.store
        reservation = store.reserve(key, region)
        try:
            value = change()
            if inspect.isawaitable(value):
                value = await value
            sharing = self._core.sharing
            data = sharing.serialize(value, key, region) if sharing is not None else None
        except BaseException:
            store.release(reservation)
            if self._state is CacheState.OPEN:
                await self.remove(key, region=region)
            raise
        self._check_open()
        if self._core.write(reservation, value, ttl, sliding, data, since, started):
            self._kick()
        return value

    async def remove(self, key: Hashable, *, region: str | None = None) -> None:
        """Drop ``key`` here and on every other instance."""
        check_key(key, region)
        self._check_open()
        if not self._started:
            await self.start()
        if self._core.remove(key, region):
            self._kick()

    async def remove_many(self, keys: Iterable[Hashable], *, region: str | None = None) -> None:
        """Drop several keys of ``region`` here and on every other instance, in one step."""
        ops = self._key_invalidations(keys, region)
        self._check_open()
        if not self._started:
            await self.start()
        if self._core.local_many(ops):
            self._kick()

    async def clear_region(self, region: str | None) -> None:
        """Drop every key of ``region`` here and on every other instance."""
        check_region(region)
        await self._local(Invalidation(Kind.REGION, region))

    async def clear(self) -> None:
        """Drop everything here and on every other instance."""
        await self._local(Invalidation(Kind.CLEAR))

    async def _local(self, op: Invalidation) -> None:
        self._check_open()
        if not self._started:
            await self.start()
        if self._core.local(op):
            self._kick()

    def _kick(self) -> None:
        """Invalidations wait and none waited before: with no batch in flight, write it to
        Redis from this coroutine without awaiting, then wake the sender (to read the reply,
        or to send). Behind a batch a caller wrote and whose replies are not all read yet,
        write this one too (the batch in flight grows: see ``AsyncWire``): a burst of writes
        between two awaits reaches the other instances without waiting for a round trip."""
        if self._wake is None:
            return
        if self._direct:
            backplane: Any = self._backplane
            core = self._core
            if not self._publishing:
                if backplane.writable and core.next_send() == 0:
                    taken, payloads = self._write_batch()
                    if self._grows and not taken.farewell:  # (a farewell changes the id)
                        self._growing = payloads
            elif (
                (growing := self._growing) is not None
                and backplane.appendable
                and core.outbox.waiting
            ):
                more = core.encode_batch(core.take_more_ops())
                growing.extend(more)  # first: should the write raise, the retry sends it
                backplane.write_more_nowait(more)
        self._wake.set()

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until Redis acknowledged every invalidation made so far on this instance.
        With ``l2=True`` it first waits for the L2 fills running when it was called (each
        within ``l2_timeout``): a value loaded before the call is then in L2.

        Raises :class:`~nearcache.FlushTimeoutError` after ``timeout`` seconds,
        :class:`~nearcache.PublishRefusedError` at once when Redis answers the publish with an
        error (see :meth:`NearCache.flush`), and :class:`~nearcache.CacheClosedError` if the
        cache is closed meanwhile.
        """
        self._check_open()
        outbox = self._core.outbox
        target = outbox.accepted
        deadline = self._clock() + timeout
        if self._l2 is not None:
            await self._l2.settle()  # the fills running in the background
        while outbox.delivered < target:
            self._check_open()  # closed meanwhile: nothing more will be delivered
            refused = self._flush_refused()
            if refused is not None:
                raise refused
            assert self._progress is not None
            # No await since the checks: any progress from here on sets this ticket (and a
            # flush() waiting at the same time holds its own; nobody clears a shared event).
            progress = self._progress.ticket()
            if not await wait_event(progress, deadline - self._clock()):
                raise self._flush_timeout(timeout)

    # -- introspection --------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        state = "local" if self._backplane is None else self._backplane.state.value
        return snapshot(self._core, state)

    # -- the sender task ------------------------------------------------------------------

    async def _send_loop(self) -> None:
        backplane = self._backplane
        wake, progress = self._wake, self._progress
        assert backplane is not None and wake is not None and progress is not None
        core = self._core
        while True:
            while self._written is None and (wait := core.next_send()) != 0:
                self._check_sending()
                wake.clear()
                if wait is None:
                    await wake.wait()
                else:  # until an invalidation, or this id's farewell
                    await wait_event(wake, wait)
            self._check_sending()
            written, self._written = self._written, None
            if written is not None:
                taken, payloads = written  # a caller wrote it: read the reply
            else:
                taken = core.take_ops()
                self._publishing = True
                if self._l2 is not None:
                    plans, since = core.encode_plans(taken)
                    payloads = [plan.message for plan in plans]
                else:
                    payloads = core.encode_batch(taken)
            while True:
                try:
                    if self._l2 is not None:
                        await self._l2.publish(plans, since, taken.sender)
                    elif written is not None:
                        try:
                            await backplane.complete()  # callers' writes behind it too
                        finally:
                            self._growing = None
                    else:
                        await backplane.publish(payloads)
                    break
                except Exception as exc:  # a failed publish is retried, whatever failed
                    written = None  # the retry writes the whole batch again (grown too)
                    self._check_sending()  # the failure is aclose cutting the connection
                    delay = core.publish_failed(exc)
                    progress.notify()  # flush() reports a refusal at once
                    if delay is None:
                        payloads = []  # superseded by a clear: send that instead
                        break
                    await asyncio.sleep(delay)
                    self._check_sending()
            if payloads:
                core.batch_sent(payloads, taken)
            self._publishing = False
            progress.notify()

    def _check_sending(self) -> None:
        """End the sender, as a delivered cancel would, once the cache is closed."""
        if self._state is CacheState.CLOSED:
            raise asyncio.CancelledError

    # -- added by the framework integrations (kept here, at the end, as thin methods) ----

    async def touch(
        self, key: Hashable, *, region: str | None = None, ttl: float | None = None
    ) -> bool:
        """Give the entry of ``key`` a new time to live, here only; see
        :meth:`NearCache.touch <nearcache.NearCache.touch>`."""
        check_key(key, region)
        check_ttl(ttl)
        self._check_open()
        return bool(self._core.store.touch(key, region, ttl=ttl))

    def cached(
        self,
        *,
        region: str | None = None,
        ttl: float | None = None,
        sliding: float | None = None,
        key: Callable[..., Hashable] | None = None,
    ) -> AsyncCached:
        """A decorator caching a coroutine function's results here; see
        :meth:`NearCache.cached <nearcache.NearCache.cached>` (``invalidate`` and
        ``invalidate_all`` are coroutines here)."""
        return AsyncCached(self, region=region, ttl=ttl, sliding=sliding, key=key)

    # -- values shared through the L2 and update messages (l2=True, propagate="update") ----

    async def _l2_load(
        self,
        key: Hashable,
        region: str | None,
        factory: Callable[[], Awaitable[T] | T],
        ttl: float | None,
        reservation: Reservation,
        dropped: bool = False,
    ) -> tuple[Any, float | None]:
        """The read path after a miss (see :meth:`NearCache._l2_load`)."""
        assert self._l2 is not None
        loaded = await self._l2.load(
            key,  # type: ignore[arg-type]
            region,
            factory,
            ttl,
            lambda: self._state is CacheState.OPEN,
            reservation,
            dropped,
        )
        if loaded.ttl_left is not None:
            ttl = loaded.ttl_left if ttl is None else min(ttl, loaded.ttl_left)
        if loaded.confirmed_only:
            reservation.started = -math.inf
        return loaded.value, ttl


class _Listener(ListenerCommon):
    """Receives the backplane's reports (on the loop) and applies them."""

    _cache: AsyncNearCache

    def on_message(self, payload: bytes) -> bool:
        core = self._cache._core
        valid = core.receive(payload)
        if core.received:
            core.notify()
        return valid

    def on_subscribed(self, as_of: float, complete: bool) -> None:
        self._cache._core.subscribed(as_of, complete)

    def on_loss(self, reason: str) -> None:
        self._cache._core.lost(reason)

    def on_confirmed(self, as_of: float) -> None:
        self._cache._core.confirmed(as_of)

    def on_publish_refused(self, reason: str) -> None:
        self._cache._core.publishing.refused_at_start(reason)
        if self._cache._progress is not None:
            self._cache._progress.notify()
