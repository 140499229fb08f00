"""``NearCache``: the threaded driver over :class:`nearcache._core.cache.CacheCore`."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from nearcache._cached import Cached
from nearcache._cancellation import STOP_GRACE
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
from nearcache._core.l2 import L2Options, MessagePlan
from nearcache._core.sharing import Absent, lookup, new_sharing
from nearcache._core.store import MISSING, Reservation
from nearcache._drivers.common import (
    CLOSED,
    CacheCommon,
    CacheState,
    ClosedStore,
    ListenerCommon,
    normalize_secrets,
)
from nearcache._exceptions import (
    CacheClosedError,
    FlushTimeoutError,
    PublishRefusedError,
    SerializationError,
)
from nearcache._typing import Backplane, Clock, Serializer

if TYPE_CHECKING:
    from nearcache._l2.redis import RedisL2

__all__ = ["CacheState", "NearCache", "normalize_secrets"]

log = logging.getLogger("nearcache")
T = TypeVar("T")


_CLOSED = CLOSED  # the hot paths compare with a module constant (see common.CLOSED)


class _Outcome:
    """How the callers that joined a load get its result (``Flight.wake`` in this driver)."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: object = MISSING
        self.error: BaseException | None = None


_ClosedStore = ClosedStore


_live_caches: weakref.WeakSet[NearCache] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for cache in list(_live_caches):
        cache._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - every POSIX Python has it
    os.register_at_fork(after_in_child=_after_fork_in_child)


class NearCache(CacheCommon):
    """An in-process cache kept consistent with every other instance on the same channel.

    Args:
        connection: a StackExchange.Redis connection string
            (``"host:6380,password=...,ssl=True,abortConnect=False"``) or a ``redis://``,
            ``rediss://`` or ``unix://`` URL. ``None``: a plain local cache, no backplane.
        channel: the logical channel; instances on the same Redis and channel stay in sync.
        backplane: a ready :class:`~nearcache.Backplane` instead of ``connection``.
        max_entries, ttl, sliding, max_age, max_staleness, heartbeat_interval, max_pending:
            see :class:`~nearcache.CacheOptions`.
        secret: sign and verify every message (a secret, or key id → secret for rotation).
        replay_log: length of the Redis log of recent messages that a reconnecting instance
            replays instead of dropping L1 (0: no log, every reconnect drops L1).
        reconcile_interval: seconds between checks of the log's tail against what this
            instance received (finds a lost last message without waiting for a later one).
        abort_connect: override the connection string's ``abortConnect``: ``True`` raises
            :class:`~nearcache.BackplaneUnavailableError` if Redis cannot be reached now.
        clock: monotonic seconds (tests inject one).

    Example::

        cache = NearCache("redis://127.0.0.1:6379/0", channel="shop")
        product = cache.get_or_set("42", lambda: db.load(42), region="products", ttl=300)
        cache.set("42", updated, region="products")   # every other instance drops its copy
    """

    def __init__(
        self,
        connection: str | None = None,
        *,
        channel: str = "default",
        backplane: Backplane | None = None,
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
        self._init_runtime()
        _live_caches.add(self)
        if self._backplane is not None:
            self._start_backplane()

    # -- lifecycle ------------------------------------------------------------------------

    def _init_runtime(self) -> None:
        """Everything that belongs to one process (rebuilt in a forked child)."""
        networked = self._settings is not None or self._backplane is not None
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        options = self._options
        sharing = new_sharing(
            self._sharing_options,
            max_age=options.max_age,
            default_ttl=options.ttl,
            secrets=options.secrets,
            clock=self._clock,
        )
        self._core = CacheCore(
            options,
            clock=self._clock,
            instance_id=os.urandom(16),
            networked=networked,
            sharing=sharing,
            channel=self._channel,
        )
        self._store: Any = self._core.store
        # The hit path: the store's reader itself (C when built), no Python frame between.
        self.get = self._store.get  # type: ignore[method-assign]
        self._sender: threading.Thread | None = None
        # A batch a caller wrote to Redis itself, whose reply the sender reads; and whether a
        # batch is in flight (taken and not yet acknowledged), which keeps callers from
        # writing another.
        self._written: tuple[Batch, list[bytes]] | None = None
        self._l2_plans: tuple[list[MessagePlan], tuple[bytes, str] | None] | None = None
        self._publishing = False
        if self._settings is not None:
            from nearcache._backplane.redis import RedisBackplane

            self._backplane = RedisBackplane(
                self._settings,
                self._channel,
                clock=self._clock,
                heartbeat=self._options.heartbeat,
                heartbeat_timeout=max(self._options.heartbeat * 2, 0.05),
                log_length=self._options.replay_log,
                reconcile=self._options.reconcile_interval,
            )
        self._l2: RedisL2 | None = None
        # Callers write batches themselves only through a backplane that can (the Redis one);
        # with sharing, through the L2's publishing connection (_l2_plans: what they wrote).
        self._direct = hasattr(self._backplane, "write_nowait")
        if self._settings is not None and sharing is not None:
            from nearcache._l2.redis import RedisL2

            self._l2 = RedisL2(
                self._settings,
                self._channel,
                sharing,
                clock=self._clock,
                log_length=options.replay_log,
                usable=self._l2_usable,
                backplane=self._backplane,
                current=self._l2_current,
            )

    def _start_backplane(self, *, in_child: bool = False) -> None:
        backplane = self._backplane
        assert backplane is not None
        backplane.start(_Listener(self))
        self._sender = threading.Thread(
            target=self._send_loop, name=f"nearcache-sender:{self._channel}", daemon=True
        )
        self._sender.start()
        if self._abort_connect and not in_child:  # never block fork() on the network
            error = self._start_error(backplane.wait_connected(self._connect_timeout()))
            if error is not None:
                self.close(timeout=0)
                raise error

    def _after_fork(self) -> None:
        """In a forked child: own locks, id, connections and threads; keep the L1 contents
        (they were current at the fork) until the child's first subscription repairs them."""
        if self._state is CacheState.CLOSED:
            return
        store, listeners = self._core.store, self._core.listeners
        custom = self._settings is None
        self._init_runtime()
        self._core.store = store
        self._core.listeners = listeners
        self._store = store
        self.get = store.get  # type: ignore[method-assign]
        if self._backplane is not None and not custom:
            self._start_backplane(in_child=True)
        elif self._backplane is not None:
            # The parent's backplane object is not ours to reuse: without confirmations the
            # inherited entries age out under the staleness rule.
            store.suspend(self._clock())
            log.warning(
                "nearcache: a custom backplane is not restarted after fork; L1 will age out"
            )

    def close(self, timeout: float = 1.0) -> None:
        """Deliver what is queued (waiting at most ``timeout`` seconds), then stop.

        Invalidations still queued after ``timeout`` are reported in a warning log.
        """
        if self._state is CacheState.CLOSED:
            return
        if self._backplane is not None and timeout > 0:
            try:
                self.flush(timeout)
            except (FlushTimeoutError, PublishRefusedError) as exc:
                self._closing_undelivered(exc)
            except CacheClosedError:
                pass  # another thread's close() got there first
        with self._cond:
            self._state = CacheState.CLOSED
            self._cond.notify_all()
        sender = self._sender if self._sender is not threading.current_thread() else None
        if sender is not None:
            sender.join(timeout=STOP_GRACE)  # it ends at once, unless a publish blocks it
        if self._backplane is not None:
            self._backplane.close()  # shuts its sockets down: a blocked publish fails now
        if self._l2 is not None:
            self._l2.close()  # the same for a publish through the L2's script
        if sender is not None:
            sender.join(timeout=STOP_GRACE)
        with self._lock:
            self._core.store.clear()
            self._store = _ClosedStore()
            self.get = self._store.get  # type: ignore[method-assign]
        _live_caches.discard(self)

    def __enter__(self) -> NearCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reads ----------------------------------------------------------------------------

    def get(self, key: Hashable, default: Any = None, region: str | None = None) -> Any:
        """Return the cached value of ``key`` in ``region``, or ``default`` on a miss.

        Pass ``default=nearcache.MISSING`` to tell a cached ``None`` from a miss. (Each cache
        binds this name to its store's reader at construction, so a hit runs no Python code
        when the C accelerator is built.)
        """
        return self._store.get(key, default, region)

    def get_or_set(
        self,
        key: Hashable,
        factory: Callable[[], T],
        *,
        region: str | None = None,
        ttl: float | None = None,
        sliding: float | None = None,
    ) -> T:
        """Return the cached value, or call ``factory()`` once, cache and return its result.

        Concurrent callers for the same key wait for one factory call (its error reaches all of
        them and nothing is cached). A result is not cached if the key, its region or the
        whole cache was invalidated while the factory ran: it may predate that write.
        A key or region that cannot be cached (``1.0``, a ``memoryview``) is refused with
        ``TypeError`` even when an equal key is cached, as it is on a miss.
        """
        # Checked before the lookup: a hit must not let a bad key through (1.0 == 1).
        if type(key) not in PLAIN_KEY_TYPES or (region is not None and type(region) is not str):
            check_key(key, region)
        value = self.get(key, MISSING, region)  # the store's reader (or the closed one's)
        if value is not MISSING:
            return value  # type: ignore[no-any-return]
        flights = self._core.flights
        with self._lock:
            self._check_open()
            value = self._core.store.peek(key, MISSING, region)
            if value is not MISSING:
                return value  # type: ignore[no-any-return]
            joined = flights.joinable(key, region)
            if joined is not None and factory is lookup:
                # A lookup never waits for another caller's load: nothing is cached yet, and
                # that load's factory may need a lock the lookup is called under (Django's
                # add, incr and touch), or fail with an error that is not the lookup's.
                raise Absent
            if joined is not None:
                if joined.wake is None:
                    joined.wake = _Outcome()
                outcome: _Outcome = joined.wake
            else:
                flight = flights.start(key, region)
                # Not while an own write of the key is unpublished: L2 may predate it.
                from_l2 = (
                    self._l2 is not None
                    and self._l2.reads
                    and not self._core.own_write_pending(region, key)
                )
                dropped = self._core.take_dropped(region, key)
        if joined is not None:  # wait for the load's result
            outcome.done.wait()
            if outcome.error is not None:
                if type(outcome.error) is Absent:
                    # It only looked (see nearcache._core.sharing.lookup): load for real.
                    return self.get_or_set(key, factory, region=region, ttl=ttl, sliding=sliding)
                raise outcome.error
            return outcome.value  # type: ignore[return-value]
        try:
            if from_l2:
                value, ttl = self._l2_load(key, region, factory, ttl, flight.reservation, dropped)
            else:
                value = factory()
        except BaseException as exc:
            with self._lock:
                flights.failed(flight)
            if flight.wake is not None:  # read after failed(): no one joins any more
                flight.wake.error = exc
                flight.wake.done.set()
            raise
        with self._lock:
            flights.finished(
                flight, value, ttl=ttl, sliding=sliding, keep=self._state is CacheState.OPEN
            )
        if flight.wake is not None:
            flight.wake.value = value
            flight.wake.done.set()
        return value  # type: ignore[no-any-return]

    # -- writes ---------------------------------------------------------------------------

    def set(
        self,
        key: Hashable,
        value: object,
        *,
        region: str | None = None,
        ttl: float | None = None,
        sliding: float | None = None,
    ) -> None:
        """Cache ``value`` here and make every other instance drop its copy of ``key``.

        With ``l2=True`` the value is written to L2 too, and with ``propagate="update"`` sent
        to the other instances, in the same atomic step as the invalidation. A value the
        serializer refuses is not cached: the key is dropped everywhere (as by
        :meth:`remove`), then :class:`~nearcache.SerializationError` is raised.
        """
        if region is not None or type(key) is not str or not key.isascii():
            check_key(key, region)  # (an ASCII str key of the default region always passes)
        core = self._core
        data = None if core.sharing is None else self._serialize(key, value, region)
        lock = self._lock
        lock.acquire()  # not `with`: the context-manager protocol doubles this path's cost
        try:
            if self._state is _CLOSED:
                self._check_open()  # raises
            if data is None:
                # CacheCore.set's plain path, inlined: no Python frame but this one per set.
                core.store.set(key, value, region, ttl, sliding)
                staged = core.staged
                if staged is None:
                    wake = False
                else:
                    # Outbox.add_key, inlined: stage the key (the sender folds it in). A wake
                    # with invalidations already waiting costs one notify and is harmless.
                    wake = not staged
                    staged.append((region, key))
                    if len(staged) >= core.outbox.stage_max:
                        core.outbox.fold()
            else:
                wake = core.set(key, value, region, ttl, sliding, data, self._log_position())
            if wake:
                self._wake_sender()
        finally:
            lock.release()

    def write(
        self,
        key: Hashable,
        change: Callable[[], T],
        *,
        region: str | None = None,
        ttl: float | None = None,
        sliding: float | None = None,
    ) -> T:
        """Run ``change()``, which writes the source of truth and returns the key's new value;
        cache that value here and share it like :meth:`set`; return it.

        Unlike ``set`` after your own write, this is safe when another instance writes the
        same key at the same time: where the two could have reached the source in either
        order, the value is sent as an invalidation instead (with ``l2=True`` or
        ``propagate="update"``: the log position is taken before ``change`` runs, and the
        publish script checks every write logged since), and it is kept in this L1 only if
        nothing invalidated the key while ``change`` ran. If ``change`` raises, the key is
        dropped everywhere (the source may have changed) and the error propagates.
        """
        check_key(key, region)
        with self._lock:
            self._check_open()
            since = self._log_position()
            started = self._core.outbox.accepted
            reservation = self._core.store.reserve(key, region)
        try:
            value = change()
            data = self._serialize(key, value, region)
        except BaseException:
            with self._lock:
                self._core.store.release(reservation)
            self.remove(key, region=region)
            raise
        with self._lock:
            self._check_open()
            if self._core.write(reservation, value, ttl, sliding, data, since, started):
                self._wake_sender()
        return value

    def remove(self, key: Hashable, *, region: str | None = None) -> None:
        """Drop ``key`` here and on every other instance."""
        check_key(key, region)
        lock = self._lock
        lock.acquire()  # not `with`: the context-manager protocol doubles this path's cost
        try:
            if self._state is _CLOSED:
                self._check_open()  # raises
            if self._core.remove(key, region):
                self._wake_sender()
        finally:
            lock.release()

    def remove_many(self, keys: Iterable[Hashable], *, region: str | None = None) -> None:
        """Drop several keys of ``region`` here and on every other instance, in one step.

        Equivalent to calling :meth:`remove` for each key, at a fraction of the cost for
        bulk invalidations (e.g. after a batch update of the source of truth).
        """
        ops = self._key_invalidations(keys, region)
        with self._lock:
            self._check_open()
            if self._core.local_many(ops):
                self._wake_sender()

    def clear_region(self, region: str | None) -> None:
        """Drop every key of ``region`` here and on every other instance."""
        check_region(region)
        self._local(Invalidation(Kind.REGION, region))

    def clear(self) -> None:
        """Drop everything here and on every other instance."""
        self._local(Invalidation(Kind.CLEAR))

    def _local(self, op: Invalidation) -> None:
        with self._lock:
            self._check_open()
            if self._core.local(op):
                self._wake_sender()

    def flush(self, timeout: float = 5.0) -> None:
        """Block until Redis acknowledged every invalidation made so far on this instance.
        With ``l2=True`` it first reads the answers to the L2 fills sent without waiting on
        the L2 connections no other thread is using at that moment (each within
        ``l2_timeout``): a value this thread loaded is then in L2.

        Raises :class:`~nearcache.FlushTimeoutError` after ``timeout`` seconds, and
        :class:`~nearcache.PublishRefusedError` at once when Redis answers the publish with
        an error (an ACL without the needed commands, out of memory); either way the
        invalidations stay queued and are delivered once Redis accepts them.
        :class:`~nearcache.CacheClosedError` if the cache is closed meanwhile.
        """
        deadline = self._clock() + timeout
        if self._l2 is not None:
            self._l2.settle()  # the fills sent without waiting: their values are in L2 now
        with self._cond:
            self._check_open()
            outbox = self._core.outbox
            target = outbox.accepted
            while outbox.delivered < target:
                self._check_open()  # closed meanwhile: nothing more will be delivered
                refused = self._flush_refused()
                if refused is not None:
                    raise refused
                remaining = deadline - self._clock()
                if remaining <= 0:
                    raise self._flush_timeout(timeout)
                self._cond.wait(remaining)

    # -- introspection --------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """A snapshot of the counters."""
        with self._lock:
            state = "local" if self._backplane is None else self._backplane.state.value
            return snapshot(self._core, state)

    # -- the sender thread ----------------------------------------------------------------

    def _send_loop(self) -> None:
        backplane = self._backplane
        assert backplane is not None
        core = self._core
        while True:
            with self._cond:
                while (
                    self._written is None
                    and core.next_send() != 0
                    and self._state is CacheState.OPEN
                ):
                    self._cond.wait(core.next_send())  # an invalidation, or this id's farewell
                if self.state is CacheState.CLOSED:
                    # Closed: close() waited for delivery as long as it was told to; a new
                    # publish now could open a connection after the backplane closed.
                    return
                written, self._written = self._written, None
                if written is None:
                    taken = core.take_ops()
                    self._publishing = True
                else:
                    taken, payloads = written  # a caller wrote it: read the reply
                    if self._l2 is not None:
                        assert self._l2_plans is not None
                        (plans, since), self._l2_plans = self._l2_plans, None
            # Encoded outside the lock: writers keep going.
            if written is not None:
                pass
            elif self._l2 is not None:
                plans, since = core.encode_plans(taken)
                payloads = [plan.message for plan in plans]
            else:
                payloads = core.encode_batch(taken)
            while True:
                try:
                    if self._l2 is not None and written is not None:
                        self._l2.complete()
                    elif self._l2 is not None:
                        self._l2.publish(plans, since, taken.sender)
                    elif written is not None:
                        backplane.complete()
                    else:
                        backplane.publish(payloads)
                    break
                except Exception as exc:  # a failed publish is retried, whatever failed
                    written = None  # the retry writes the whole batch again
                    with self._cond:
                        delay = core.publish_failed(exc)
                        self._cond.notify_all()  # flush() reports a refusal at once
                        if delay is None:
                            payloads = []  # superseded by a clear: send that instead
                            break
                        if self._state is CacheState.CLOSED:
                            return
                        self._cond.wait(delay)
            with self._cond:
                if payloads:
                    core.batch_sent(payloads, taken)
                self._publishing = False
                self._cond.notify_all()

    def _wake_sender(self) -> None:
        """Invalidations wait and none waited before (the caller holds the lock): with no
        batch in flight, write it to Redis from this thread without blocking (see
        ``_backplane/wire.py``), then wake the sender to read the reply, or to send."""
        if not self._publishing and self._direct:
            backplane: Any = self._backplane
            core = self._core
            l2 = self._l2
            if l2 is not None:
                if l2.writable and core.next_send() == 0:
                    taken = core.take_ops()
                    plans, since = core.encode_plans(taken)
                    l2.write_nowait(plans, since, taken.sender)
                    self._l2_plans = (plans, since)
                    self._written = (taken, [plan.message for plan in plans])
                    self._publishing = True
            elif backplane.writable and core.next_send() == 0:
                self._write_batch()
        self._cond.notify_all()

    # -- added by the framework integrations (kept here, at the end, as thin methods) ----

    def touch(self, key: Hashable, *, region: str | None = None, ttl: float | None = None) -> bool:
        """Give the entry of ``key`` a new time to live of ``ttl`` seconds from now (``None``:
        the default), here only (expiry is local, never broadcast); return whether it was
        cached. Its value, its freshness and its ``max_age`` limit are unchanged."""
        check_key(key, region)
        check_ttl(ttl)
        with self._lock:
            self._check_open()
            return bool(self._core.store.touch(key, region, ttl=ttl))

    def cached(
        self,
        *,
        region: str | None = None,
        ttl: float | None = None,
        sliding: float | None = None,
        key: Callable[..., Hashable] | None = None,
    ) -> Cached:
        """A decorator caching a function's results here, keyed by its arguments.

        ``region`` defaults to the function's qualified name; ``key(*args, **kwargs)``
        replaces the key built from the arguments (see ``docs/decorator.md`` for the rules).
        The decorated function has ``invalidate(*args, **kwargs)`` (drops one call's entry
        on every instance) and ``invalidate_all()``.

        Example::

            @cache.cached(region="products", ttl=300)
            def product(pid: int) -> Product: ...

            product.invalidate(42)
        """
        return Cached(self, region=region, ttl=ttl, sliding=sliding, key=key)

    # -- values shared through the L2 and update messages (l2=True, propagate="update") ----

    def _l2_load(
        self,
        key: Hashable,
        region: str | None,
        factory: Callable[[], T],
        ttl: float | None,
        reservation: Reservation,
        dropped: bool = False,
    ) -> tuple[T, float | None]:
        """The read path after a miss: L2, lease, factory, fill. A value from L2 lives in L1
        no longer than it had left in L2, and one current only as of L1's confirmations is
        stored as such. ``dropped``: an invalidation dropped the key here (no plain GET)."""
        assert self._l2 is not None
        loaded = self._l2.load(
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
        return loaded.value, ttl  # type: ignore[return-value]

    def _serialize(self, key: Hashable, value: object, region: str | None) -> bytes | None:
        """The value's bytes for sharing, or None without sharing. A value the serializer
        refuses is dropped everywhere before the error is raised: never left stale."""
        sharing = self._core.sharing
        if sharing is None:
            return None
        try:
            return sharing.serialize(value, key, region)
        except SerializationError:
            self.remove(key, region=region)
            raise


class _Listener(ListenerCommon):
    """Receives the backplane's reports and applies them under the cache's lock."""

    _cache: NearCache

    def on_message(self, payload: bytes) -> bool:
        core = self._cache._core
        with self._cache._lock:
            valid = core.receive(payload)
        if core.received:
            core.notify()  # without the lock: a callback may call any method, close() too
        return valid

    def on_subscribed(self, as_of: float, complete: bool) -> None:
        cache = self._cache
        with cache._lock:
            cache._core.subscribed(as_of, complete)

    def on_loss(self, reason: str) -> None:
        cache = self._cache
        with cache._lock:
            cache._core.lost(reason)

    def on_confirmed(self, as_of: float) -> None:
        cache = self._cache
        with cache._lock:
            cache._core.confirmed(as_of)

    def on_publish_refused(self, reason: str) -> None:
        cache = self._cache
        with cache._cond:
            cache._core.publishing.refused_at_start(reason)
            cache._cond.notify_all()
