"""One behavioural suite, run for both drivers over both backplanes (Redis and in-memory).

The asyncio driver runs on an event loop in a helper thread so the same test bodies drive both;
a factory that must block does so on the driver's own primitive (a thread event for the
threaded driver, an awaited asyncio event for the asyncio driver), never by blocking the loop.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from nearcache import (
    MISSING,
    AsyncMemoryBackplane,
    AsyncNearCache,
    CacheClosedError,
    MemoryBackplane,
    MemoryBroker,
    NearCache,
)
from tests.servers import RedisServer, wait_until

TIMEOUT = 10.0


class Gate:
    """A factory that reports when it started and returns only once released."""

    def __init__(self, driver: Driver, value: object = "loaded", error: Exception | None = None):
        self.driver = driver
        self.value = value
        self.error = error
        self.started = threading.Event()
        self.calls = 0
        self._release = threading.Event()
        self._async_release: asyncio.Event | None = None

    def release(self) -> None:
        self._release.set()
        if self.driver.loop is not None:
            self.driver.loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._async_release is not None:
            self._async_release.set()

    def sync_factory(self) -> object:
        self.calls += 1
        self.started.set()
        assert self._release.wait(TIMEOUT)
        if self.error:
            raise self.error
        return self.value

    async def async_factory(self) -> object:
        self.calls += 1
        if self._async_release is None:
            self._async_release = asyncio.Event()
            if self._release.is_set():
                self._async_release.set()
        self.started.set()
        await asyncio.wait_for(self._async_release.wait(), TIMEOUT)
        if self.error:
            raise self.error
        return self.value

    @property
    def factory(self) -> Callable[[], Any]:
        return self.sync_factory if self.driver.loop is None else self.async_factory


class Driver:
    """Drives NearCache directly, or AsyncNearCache on a loop thread, with one interface."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        if kind == "async":
            self.loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
            self._thread.start()

    def run(self, value: Any) -> Any:
        """The value itself, or the result of awaiting it on the loop if it is awaitable."""
        if inspect.isawaitable(value):
            assert self.loop is not None

            async def wait() -> Any:
                return await value

            return asyncio.run_coroutine_threadsafe(wait(), self.loop).result(TIMEOUT)
        return value

    def spawn(self, fn: Callable[[], Any]) -> Future[Any]:
        """Start ``fn()`` concurrently (a thread, or a task on the loop)."""
        if self.loop is not None:

            async def task() -> Any:
                return await fn()

            return asyncio.run_coroutine_threadsafe(task(), self.loop)
        future: Future[Any] = Future()

        def target() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=target, daemon=True).start()
        return future

    def make(self, **kwargs: Any) -> Any:
        cache: Any
        if self.kind == "sync":
            cache = NearCache(**kwargs)
        else:
            if isinstance(kwargs.get("backplane"), MemoryBackplane):
                bp = kwargs["backplane"]
                kwargs["backplane"] = AsyncMemoryBackplane(bp._broker, bp.channel)
            cache = AsyncNearCache(**kwargs)
            self.run(cache.start())
        return cache

    def close(self, cache: Any) -> None:
        self.run(cache.aclose() if self.kind == "async" else cache.close())

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            assert self._thread is not None
            self._thread.join(TIMEOUT)
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    d = Driver(request.param)
    yield d
    d.stop()


@pytest.fixture(params=["memory", "redis"])
def pair(request: pytest.FixtureRequest, driver: Driver, channel: str) -> Iterator[tuple[Any, Any]]:
    """Two caches on one channel."""
    if request.param == "memory":
        broker = MemoryBroker()
        caches = [driver.make(backplane=MemoryBackplane(broker, channel)) for _ in range(2)]
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        caches = [driver.make(connection=server.url, channel=channel) for _ in range(2)]
        for cache in caches:
            wait_until(lambda c=cache: c.backplane_state.value == "connected")
    yield caches[0], caches[1]
    for cache in caches:
        driver.close(cache)


def test_every_operation_propagates(driver: Driver, pair: tuple[Any, Any]) -> None:
    """set over a key, remove, clear_region and clear on A evict on B; A keeps its own write."""
    a, b = pair
    run = driver.run
    run(b.set("k", "old", region="r"))
    run(b.set("other", 1, region="s"))
    run(b.flush())  # B's own invalidations must not arrive at A after A's write below
    wait_until(lambda: a.stats().invalidations_received == 2)
    run(a.set("k", "new", region="r"))
    run(a.flush())
    wait_until(lambda: run(b.get("k", MISSING, "r")) is MISSING)
    assert run(a.get("k", None, "r")) == "new"
    assert run(b.get("other", None, "s")) == 1

    run(b.set("k", "v", region="r"))
    run(b.flush())
    run(a.remove("k", region="r"))
    run(a.flush())
    wait_until(lambda: run(b.get("k", MISSING, "r")) is MISSING)

    run(b.set("k", "v", region="r"))
    run(b.flush())
    run(a.clear_region("s"))
    run(a.flush())
    wait_until(lambda: run(b.get("other", MISSING, "s")) is MISSING)
    assert run(b.get("k", None, "r")) == "v"

    run(a.clear())
    run(a.flush())
    wait_until(lambda: run(b.get("k", MISSING, "r")) is MISSING)
    assert a.stats().invalidations_sent == 4
    assert b.stats().invalidations_received == 4
    wait_until(lambda: a.stats().own_messages == 4)


def test_none_is_cached_and_told_from_a_miss(driver: Driver, pair: tuple[Any, Any]) -> None:
    """get_or_set caches None; get with MISSING tells it from an absent key."""
    a, _ = pair
    calls: list[int] = []

    def load() -> None:
        calls.append(1)

    assert driver.run(a.get_or_set("n", load)) is None
    assert driver.run(a.get_or_set("n", load)) is None
    assert calls == [1]
    assert driver.run(a.get("n", MISSING)) is None
    assert driver.run(a.get("absent", MISSING)) is MISSING


@pytest.mark.parametrize("invalidation", ["remove", "set", "clear_region", "clear"])
def test_a_load_overlapping_an_invalidation_is_not_cached(
    driver: Driver, pair: tuple[Any, Any], invalidation: str
) -> None:
    """A value whose load overlapped an invalidation of its key, region or everything is
    returned to its caller but never cached (it may predate the write)."""
    a, b = pair
    run = driver.run
    gate = Gate(driver, value="loaded-before-write")
    load = driver.spawn(lambda: b.get_or_set("k", gate.factory, region="r"))
    assert gate.started.wait(TIMEOUT)
    before = b.stats().invalidations_received
    if invalidation == "remove":
        run(a.remove("k", region="r"))
    elif invalidation == "set":
        run(a.set("k", "written", region="r"))
    elif invalidation == "clear_region":
        run(a.clear_region("r"))
    else:
        run(a.clear())
    run(a.flush())
    wait_until(lambda: b.stats().invalidations_received > before)
    gate.release()
    assert load.result(TIMEOUT) == "loaded-before-write"
    assert run(b.get("k", MISSING, "r")) is MISSING
    assert b.stats().rejected_loads == 1
    # A later load is cached normally.
    assert run(b.get_or_set("k", lambda: "fresh", region="r")) == "fresh"
    assert run(b.get("k", None, "r")) == "fresh"


def test_an_unrelated_invalidation_does_not_cancel_a_load(
    driver: Driver, pair: tuple[Any, Any]
) -> None:
    """Invalidating another key or region while a load runs does not stop it being cached."""
    a, b = pair
    run = driver.run
    gate = Gate(driver)
    load = driver.spawn(lambda: b.get_or_set("k", gate.factory, region="r"))
    assert gate.started.wait(TIMEOUT)
    run(a.remove("k", region="other"))
    run(a.clear_region("elsewhere"))
    run(a.flush())
    wait_until(lambda: b.stats().invalidations_received == 2)
    gate.release()
    assert load.result(TIMEOUT) == "loaded"
    assert run(b.get("k", None, "r")) == "loaded"


def _wait_for_waiters(cache: Any, key: object, count: int) -> None:
    wait_until(
        lambda: (f := cache._core.flights.get((None, key))) is not None and f.waiters == count
    )


def test_stampede_runs_the_factory_once(driver: Driver, pair: tuple[Any, Any]) -> None:
    """Twenty concurrent get_or_set calls for one key run the factory once and all get its
    value."""
    _, b = pair
    gate = Gate(driver, value="once")
    first = driver.spawn(lambda: b.get_or_set("hot", gate.factory))
    assert gate.started.wait(TIMEOUT)
    others = [driver.spawn(lambda: b.get_or_set("hot", gate.factory)) for _ in range(19)]
    _wait_for_waiters(b, "hot", 19)
    gate.release()
    assert [f.result(TIMEOUT) for f in [first, *others]] == ["once"] * 20
    assert gate.calls == 1
    assert driver.run(b.get("hot")) == "once"


def test_stampede_error_reaches_every_waiter(driver: Driver, pair: tuple[Any, Any]) -> None:
    """A factory error reaches every caller waiting on that load and nothing is cached."""
    _, b = pair
    gate = Gate(driver, error=LookupError("database down"))
    first = driver.spawn(lambda: b.get_or_set("hot", gate.factory))
    assert gate.started.wait(TIMEOUT)
    others = [driver.spawn(lambda: b.get_or_set("hot", gate.factory)) for _ in range(9)]
    _wait_for_waiters(b, "hot", 9)
    gate.release()
    for future in [first, *others]:
        with pytest.raises(LookupError, match="database down"):
            future.result(TIMEOUT)
    assert gate.calls == 1
    assert driver.run(b.get("hot", MISSING)) is MISSING


def test_a_caller_after_an_invalidation_does_not_join_the_older_load(
    driver: Driver, pair: tuple[Any, Any]
) -> None:
    """A caller arriving after the key was invalidated starts its own load instead of taking a
    value that was loaded before the write."""
    a, b = pair
    run = driver.run
    old = Gate(driver, value="before-write")
    first = driver.spawn(lambda: b.get_or_set("k", old.factory))
    assert old.started.wait(TIMEOUT)
    run(a.remove("k"))
    run(a.flush())
    wait_until(lambda: b.stats().invalidations_received == 1)
    assert run(b.get_or_set("k", lambda: "after-write")) == "after-write"
    old.release()
    assert first.result(TIMEOUT) == "before-write"
    assert run(b.get("k")) == "after-write"


def test_a_closed_cache_refuses_use(driver: Driver, pair: tuple[Any, Any]) -> None:
    """Every call on a closed cache raises CacheClosedError; closing twice is harmless."""
    a, _ = pair
    driver.close(a)
    driver.close(a)
    with pytest.raises(CacheClosedError):
        driver.run(a.get("k"))
    with pytest.raises(CacheClosedError):
        driver.run(a.set("k", 1))
    with pytest.raises(CacheClosedError):
        driver.run(a.remove("k"))


def test_keys_that_cannot_travel_are_refused(driver: Driver, pair: tuple[Any, Any]) -> None:
    """Keys must be str, bytes or int and regions str or None; anything else is a TypeError
    naming the type."""
    a, _ = pair
    with pytest.raises(TypeError, match="tuple"):
        driver.run(a.set(("a", 1), 1))
    with pytest.raises(TypeError, match="int"):
        driver.run(a.set("k", 1, region=5))
    for key in ("s", b"b", 7, -12345678901234567890):
        driver.run(a.set(key, key))
        assert driver.run(a.get(key)) == key


def test_remove_many_propagates_every_key(driver: Driver, pair: tuple[Any, Any]) -> None:
    """remove_many drops every key here and on the other instance, like remove per key."""
    a, b = pair
    run = driver.run
    for i in range(300):
        run(b.set(f"k{i}", i, region="r"))
    run(b.flush())
    wait_until(lambda: a.stats().invalidations_received == 300)
    run(a.set("k0", "a's own", region="r"))
    run(a.remove_many([f"k{i}" for i in range(300)], region="r"))
    run(a.flush())
    # 300 or 301 operations arrive: the set of k0 may coalesce with its remove in the outbox.
    wait_until(lambda: all(run(b.get(f"k{i}", MISSING, "r")) is MISSING for i in range(300)))
    assert b.stats().invalidations_received >= 300
    assert run(a.get("k0", MISSING, "r")) is MISSING
    with pytest.raises(TypeError):
        run(a.remove_many([("bad", "key")]))


def test_on_invalidation_reports_what_others_invalidate(
    driver: Driver, pair: tuple[Any, Any]
) -> None:
    """on_invalidation callbacks see every invalidation received from another instance, after
    it was applied; a failing callback is counted and never stops invalidations."""
    from nearcache import Invalidation, Kind

    a, b = pair
    run = driver.run
    seen: list[tuple[Invalidation, object]] = []
    b.on_invalidation(lambda op: seen.append((op, b._store.peek("k", None, "r"))))
    unregister = b.on_invalidation(lambda op: 1 / 0)
    run(b.set("k", "v", region="r"))
    run(a.remove("k", region="r"))
    run(a.clear_region("s"))
    run(a.flush())
    wait_until(lambda: len(seen) == 2)
    assert seen == [
        (Invalidation(Kind.KEY, "r", "k"), None),
        (Invalidation(Kind.REGION, "s"), None),
    ]
    assert b.stats().listener_errors == 2
    unregister()
    run(a.clear())
    run(a.flush())
    wait_until(lambda: len(seen) == 3)
    assert b.stats().listener_errors == 2
    assert a.stats().listener_errors == 0


def test_an_idle_sender_says_farewell_and_goes_on_under_a_new_id(
    driver: Driver, pair: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After SENDER_IDLE without publishing, A says farewell (an empty message) and takes a
    new id; B sees no gap, keeps its L1, and A's next invalidation reaches it."""
    from nearcache._core import cache as core_module

    monkeypatch.setattr(core_module, "SENDER_IDLE", 0.2)
    a, b = pair
    run = driver.run
    run(a.remove("warm-up"))
    run(a.flush())
    wait_until(lambda: b.stats().invalidations_received == 1)
    first_id = a.instance_id
    run(b.set("kept", 1))
    run(b.flush())
    wait_until(lambda: a.instance_id != first_id)  # the farewell was acknowledged
    wait_until(lambda: b.stats().messages_received == 2)  # ...and received
    run(b.set("k", "v"))
    run(a.remove("k"))
    run(a.flush())
    wait_until(lambda: run(b.get("k", MISSING)) is MISSING)
    assert run(b.get("kept")) == 1
    stats = b.stats()
    assert (stats.sequence_gaps, stats.invalidations_received) == (0, 2)
