"""Closing never hangs and leaves nothing behind: no task, no thread, no connection.

redis-py wraps every socket write in ``asyncio.wait_for``, which before Python 3.12 loses a
cancel landing in the iteration where the write completes; the asyncio driver must stop
anyway. The deterministic tests make aclose's cancel land exactly there; the stress loops
open, use and close caches many times with random timing against a real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
from redis.asyncio.connection import AbstractConnection

from nearcache import AsyncNearCache, CacheClosedError, NearCache
from nearcache._cancellation import STOP_GRACE
from tests.servers import RedisServer, TcpProxy, wait_until

# What aclose(timeout) promises: the flush's timeout plus four stop graces (two for the
# sender, two for the listener, each: cancel until done, then abort the sockets).
CLOSE_BOUND = 4 * STOP_GRACE
# Scheduling slack on a loaded 2-core machine.
SLACK = 0.5

needs_cancelling = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="Task.cancelling() places the cancel exactly"
)


def client_names(server: RedisServer) -> list[str]:
    """The names of the clients connected to ``server`` (CLIENT LIST)."""
    with server.client() as admin:
        return [str(c.get("name", "")) for c in admin.client_list()]


def wait_disconnected(server: RedisServer, name: str) -> None:
    """Redis sees every connection named ``name`` closed (it learns of a close a little
    after the client made it, hence the poll)."""
    wait_until(lambda: name not in client_names(server), 5.0, message=f"{name} disconnected")


def other_tasks() -> set[asyncio.Task[Any]]:
    """Every task of the running loop but the current one."""
    return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]


async def within(awaitable: Awaitable[None], bound: float, what: str) -> float:
    """Await ``awaitable`` (as a task) for at most ``bound`` seconds; fail the test naming
    ``what`` and the tasks still running if it takes longer. Returns the time it took."""
    task = asyncio.ensure_future(awaitable)
    started = time.monotonic()
    done, _ = await asyncio.wait((task,), timeout=bound)
    took = time.monotonic() - started
    if not done:
        names = sorted(t.get_name() for t in other_tasks() if t is not task)
        await _kill(other_tasks())
        pytest.fail(f"{what} still running after {bound:.2f}s; tasks: {names}")
    task.result()
    return took


async def _kill(tasks: set[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` until they end (a cancel can be lost), so a failed test cleans up."""
    for _ in range(500):
        pending = {t for t in tasks if not t.done()}
        if not pending:
            return
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=0.01)


@contextlib.contextmanager
def cancel_right_after_write(
    monkeypatch: pytest.MonkeyPatch, command: bytes, task_prefix: str
) -> Iterator[asyncio.Event]:
    """Make the next write of ``command`` by the task named ``task_prefix...`` complete in
    the very loop iteration in which that task gets cancelled.

    The write is redis-py's own; only its completion is held back until the task is
    cancelled, so the cancel reaches ``wait_for`` just as what it waits on is done, the
    window in which Python < 3.12 drops it. Yields an event set once the write went out.
    """
    real = AbstractConnection._send_packed_command
    written = asyncio.Event()
    armed = [True]

    async def held(self: AbstractConnection, packed: Any) -> None:
        await real(self, packed)
        if not armed[0] or command not in b"".join(packed):
            return
        target = next(t for t in asyncio.all_tasks() if t.get_name().startswith(task_prefix))
        armed[0] = False
        written.set()
        deadline = time.monotonic() + 10.0
        while not target.cancelling() and time.monotonic() < deadline:
            await asyncio.sleep(0)  # one loop iteration: the cancel is checked each one

    monkeypatch.setattr(AbstractConnection, "_send_packed_command", held)
    yield written


@needs_cancelling
def test_aclose_stops_a_listener_whose_cancel_was_lost(
    redis_server: RedisServer, channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose returns in bounded time, with no task and no connection left, when its cancel
    reaches the listener just as the listener's heartbeat PING write completes."""
    name = f"close-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        cache = AsyncNearCache(
            f"{redis_server.connection_string},name={name}",
            channel=channel,
            heartbeat_interval=0.05,
        )
        await cache.start()
        await cache.get_or_set("k", lambda: 1)
        with cancel_right_after_write(monkeypatch, b"PING", "nearcache-listener:") as written:
            await written.wait()
            await within(cache.aclose(), 1.0 + CLOSE_BOUND + SLACK, "aclose")
        assert not other_tasks()

    asyncio.run(main())
    wait_disconnected(redis_server, name)


@needs_cancelling
def test_aclose_stops_a_sender_whose_cancel_was_lost(
    redis_server: RedisServer, channel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose returns in bounded time, with no task and no connection left, when its cancel
    reaches the sender just as the write of a publish completes."""
    name = f"close-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        cache = AsyncNearCache(f"{redis_server.connection_string},name={name}", channel=channel)
        await cache.start()
        with cancel_right_after_write(monkeypatch, b"EVALSHA", "nearcache-sender:") as written:
            await cache.set("k", 1)
            await written.wait()
            await within(cache.aclose(timeout=0), CLOSE_BOUND + SLACK, "aclose")
        assert not other_tasks()

    asyncio.run(main())
    wait_disconnected(redis_server, name)


def test_a_timed_out_aclose_leaves_nothing_running(
    redis_server: RedisServer, tcp_proxy: Callable[[int], TcpProxy], channel: str
) -> None:
    """When a timeout around aclose expires (here while it waits for a stalled Redis to
    acknowledge a write), its tasks end and its connections close anyway: no listener lives
    on, pinging."""
    proxy = tcp_proxy(redis_server.port)
    name = f"close-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        cache = AsyncNearCache(
            f"{proxy.host}:{proxy.port},name={name}", channel=channel, heartbeat_interval=0.05
        )
        await cache.start()
        assert proxy.connections == 2
        proxy.stall()
        await cache.set("k", 1)  # never acknowledged: aclose waits in its flush
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(cache.aclose(timeout=30), 0.2)
        # The cancel propagated at once, and nothing of the cache is left.
        assert not other_tasks(), sorted(t.get_name() for t in other_tasks())
        accepted = proxy.accepted
        proxy.resume()  # the closes made during the stall now reach Redis
        wait_until(lambda: proxy.connections == 0, 5.0, message="proxy connections closed")
        assert proxy.accepted == accepted  # and nothing reconnected
        with pytest.raises(CacheClosedError):
            await cache.get("k")

    asyncio.run(main())
    wait_disconnected(redis_server, name)


def test_set_while_aclose_runs(redis_server: RedisServer, channel: str) -> None:
    """A task calling set() in a loop while aclose runs gets CacheClosedError once the cache
    closed, and aclose returns with no task and no connection left."""
    name = f"close-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        cache = AsyncNearCache(f"{redis_server.connection_string},name={name}", channel=channel)
        await cache.start()
        busy = asyncio.Event()

        async def writer() -> None:
            with pytest.raises(CacheClosedError):
                for i in range(1_000_000):
                    await cache.set("k", i)
                    if i == 50:
                        busy.set()
                    await asyncio.sleep(0)

        writing = asyncio.ensure_future(writer())
        await busy.wait()
        await within(cache.aclose(), 1.0 + CLOSE_BOUND + SLACK, "aclose")
        await writing
        assert not other_tasks()

    asyncio.run(main())
    wait_disconnected(redis_server, name)


def test_aclose_called_twice_at_once(redis_server: RedisServer, channel: str) -> None:
    """A second aclose while the first runs waits for it: both return with nothing left."""

    async def main() -> None:
        cache = AsyncNearCache(redis_server.connection_string, channel=channel)
        await cache.set("k", 1)
        await asyncio.gather(cache.aclose(), cache.aclose())
        assert not other_tasks()
        await cache.aclose()  # and once closed, aclose is a no-op

    asyncio.run(main())


# -- the stress loops ----------------------------------------------------------------------

CLOSES = 120  # in CI: about 20 s; the old driver hung within the first 40 every time we ran it


def test_aclose_never_hangs_under_random_timing(redis_server: RedisServer) -> None:
    """Open, use (get, get_or_set, and set() from a concurrent task) and close an
    AsyncNearCache many times, closing at random moments (heartbeats every 10-50 ms make
    a close coincide with a PING write): every aclose returns within its bound and leaves
    no task and no connection behind."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    name = f"stress-{uuid.uuid4().hex[:8]}"
    longest = 0.0

    async def once(i: int) -> None:
        nonlocal longest
        cache = AsyncNearCache(
            f"{redis_server.connection_string},name={name}",
            channel=f"{name}-{i}",
            heartbeat_interval=rng.uniform(0.01, 0.05),
        )
        await cache.start()
        await cache.get("a")
        await cache.get_or_set("a", lambda: i)

        async def writer() -> None:
            with contextlib.suppress(CacheClosedError):
                while True:
                    await cache.set("b", rng.random())
                    await asyncio.sleep(rng.uniform(0, 0.005))

        writing = asyncio.ensure_future(writer()) if rng.random() < 0.7 else None
        await asyncio.sleep(rng.uniform(0, 0.15))
        timeout = rng.choice((0, 0.2, 1.0))
        took = await within(
            cache.aclose(timeout=timeout),
            timeout + CLOSE_BOUND + SLACK,
            f"aclose #{i} (seed {seed})",
        )
        longest = max(longest, took)
        if writing is not None:
            await writing
        assert not other_tasks(), f"close #{i} (seed {seed}) left {other_tasks()}"

    async def main() -> None:
        for i in range(CLOSES):
            await once(i)

    asyncio.run(main())
    wait_disconnected(redis_server, name)
    print(f"{CLOSES} closes (seed {seed}), the longest took {longest * 1000:.0f} ms")


def test_close_never_hangs_under_random_timing(redis_server: RedisServer) -> None:
    """The threaded twin: open, use (a thread calling set() meanwhile) and close a NearCache
    many times at random moments; every close returns within its bound and leaves no thread
    and no connection behind."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    name = f"stress-{uuid.uuid4().hex[:8]}"
    threads = set(threading.enumerate())
    longest = 0.0
    for i in range(CLOSES // 3):
        cache = NearCache(
            f"{redis_server.connection_string},name={name}",
            channel=f"{name}-{i}",
            heartbeat_interval=rng.uniform(0.01, 0.05),
        )
        cache.get("a")
        cache.get_or_set("a", lambda: 1)
        stop = threading.Event()

        def writer(cache: NearCache = cache, stop: threading.Event = stop) -> None:
            with contextlib.suppress(CacheClosedError):
                while not stop.is_set():
                    cache.set("b", rng.random())

        writing = threading.Thread(target=writer)
        writing.start()
        stop.wait(rng.uniform(0, 0.1))
        timeout = rng.choice((0, 0.2, 1.0))
        started = time.monotonic()
        cache.close(timeout=timeout)
        took = time.monotonic() - started
        stop.set()
        writing.join()
        assert took < timeout + CLOSE_BOUND + SLACK, f"close #{i} (seed {seed}): {took:.2f}s"
        assert set(threading.enumerate()) == threads, f"close #{i} (seed {seed})"
        longest = max(longest, took)
    wait_disconnected(redis_server, name)
    print(f"{CLOSES // 3} closes (seed {seed}), the longest took {longest * 1000:.0f} ms")


def test_client_list_shows_a_named_connection(redis_server: RedisServer) -> None:
    """The connection check above can fail: a named client shows in CLIENT LIST."""
    name = f"probe-{uuid.uuid4().hex[:8]}"
    client = redis.Redis(port=redis_server.port, client_name=name)
    try:
        client.ping()
        assert name in client_names(redis_server)
    finally:
        client.close()
    wait_disconnected(redis_server, name)


def test_a_flush_waiting_when_the_cache_closes_ends_at_once(
    redis_server: RedisServer, tcp_proxy: Callable[[int], TcpProxy], channel: str
) -> None:
    """A flush() waiting for a stalled Redis when another task closes the cache raises
    CacheClosedError then, instead of waiting out its own timeout."""
    proxy = tcp_proxy(redis_server.port)

    async def main() -> None:
        cache = AsyncNearCache(f"{proxy.host}:{proxy.port}", channel=channel)
        await cache.start()
        proxy.stall()
        await cache.set("k", 1)
        flushing = asyncio.ensure_future(cache.flush(timeout=60))
        await within(cache.aclose(timeout=0), CLOSE_BOUND + SLACK, "aclose")
        with pytest.raises(CacheClosedError):
            await within(flushing, SLACK, "flush")
        proxy.resume()

    asyncio.run(main())


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_close_against_a_stalled_redis_is_bounded(
    redis_server: RedisServer, tcp_proxy: Callable[[int], TcpProxy], channel: str, driver: str
) -> None:
    """With Redis silent (a publish waiting for its reply, the listener reconnecting into a
    stalled handshake), close(timeout) returns within its bound, with no thread or task
    left, rather than after the 30 s socket timeout."""
    proxy = tcp_proxy(redis_server.port)
    conn = f"{proxy.host}:{proxy.port},syncTimeout=30000"
    timeout = 0.2
    ours = {t for t in threading.enumerate() if t.name.startswith("nearcache")}

    def disconnected(cache: NearCache | AsyncNearCache) -> bool:
        return cache.backplane_state is not None and cache.backplane_state.value != "connected"

    if driver == "sync":
        cache = NearCache(conn, channel=channel, heartbeat_interval=0.05)
        cache.set("k", 1)
        cache.flush()
        proxy.stall()
        wait_until(lambda: disconnected(cache), 5.0)  # the heartbeat found the stall
        cache.set("k", 2)
        started = time.monotonic()
        cache.close(timeout=timeout)
        took = time.monotonic() - started
    else:

        async def main() -> float:
            cache = AsyncNearCache(conn, channel=channel, heartbeat_interval=0.05)
            await cache.set("k", 1)
            await cache.flush()
            proxy.stall()
            deadline = time.monotonic() + 5.0
            while not disconnected(cache) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)  # a poll of the state that lets the loop run
            assert disconnected(cache)
            await cache.set("k", 2)
            took = await within(cache.aclose(timeout), timeout + CLOSE_BOUND + SLACK, "aclose")
            assert not other_tasks()
            return took

        took = asyncio.run(main())
    assert took < timeout + CLOSE_BOUND + SLACK
    assert {t for t in threading.enumerate() if t.name.startswith("nearcache")} == ours
    proxy.resume()
    wait_until(lambda: proxy.connections == 0, 5.0, message="proxy connections closed")


def _waiting_in_flush(thread: threading.Thread) -> bool:
    """Whether ``thread`` is blocked in NearCache.flush's wait (read from its stack)."""
    frame = sys._current_frames().get(thread.ident or -1)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return "flush" in names and "wait" in names


def _in_thread(call: Callable[[], None]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_a_sync_flush_waiting_when_the_cache_closes_ends_at_once(
    redis_server: RedisServer, tcp_proxy: Callable[[int], TcpProxy], channel: str
) -> None:
    """The threaded twin: a flush() waiting for a stalled Redis when another thread closes
    the cache raises CacheClosedError then (nothing more will be delivered), instead of
    waiting out its own timeout."""
    proxy = tcp_proxy(redis_server.port)
    cache = NearCache(f"{proxy.host}:{proxy.port}", channel=channel)
    cache.set("k", 0)
    cache.flush()
    proxy.stall()
    cache.set("k", 1)
    thread, errors = _in_thread(lambda: cache.flush(timeout=60))
    wait_until(lambda: _waiting_in_flush(thread), 5.0, message="flush waiting")
    cache.close(timeout=0)
    thread.join(CLOSE_BOUND + SLACK)
    assert not thread.is_alive(), "flush still waiting after the cache closed"
    assert len(errors) == 1 and isinstance(errors[0], CacheClosedError), errors
    proxy.resume()


def test_sync_close_called_from_two_threads_at_once(
    redis_server: RedisServer, tcp_proxy: Callable[[int], TcpProxy], channel: str
) -> None:
    """A close() waiting to deliver (long timeout) ends without an error when another
    thread's close() (short timeout) closes the cache under it."""
    proxy = tcp_proxy(redis_server.port)
    cache = NearCache(f"{proxy.host}:{proxy.port}", channel=channel)
    cache.set("k", 0)
    cache.flush()
    proxy.stall()
    cache.set("k", 1)
    thread, errors = _in_thread(lambda: cache.close(timeout=60))
    wait_until(lambda: _waiting_in_flush(thread), 5.0, message="close waiting in its flush")
    cache.close(timeout=0.1)
    thread.join(CLOSE_BOUND + SLACK)
    assert not thread.is_alive(), "the first close() still waiting after the cache closed"
    assert errors == []
    proxy.resume()


def test_a_load_outliving_close_opens_no_l2_connection(redis_server: RedisServer) -> None:
    """With l2=True, a get_or_set whose factory is still running when the cache closes gets
    its value, and its L2 steps after the factory (fill, lease release) open no connection
    that would outlive the closed cache."""
    name = f"l2close-{uuid.uuid4().hex[:8]}"
    cache = NearCache(f"{redis_server.connection_string},name={name}", channel=name, l2=True)
    cache.set("x", 1)
    cache.flush()
    entered, release = threading.Event(), threading.Event()

    def factory() -> int:
        entered.set()
        release.wait(10)
        return 5

    got: list[int] = []
    thread, errors = _in_thread(lambda: got.append(cache.get_or_set("k", factory)))
    assert entered.wait(5)
    cache.close()
    wait_disconnected(redis_server, name)
    release.set()
    thread.join(5)
    assert (got, errors) == ([5], [])
    assert name not in client_names(redis_server)


def test_a_load_outliving_aclose_opens_no_l2_connection(redis_server: RedisServer) -> None:
    """The asyncio twin."""
    name = f"l2close-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        cache = AsyncNearCache(
            f"{redis_server.connection_string},name={name}", channel=name, l2=True
        )
        await cache.start()
        entered, release = asyncio.Event(), asyncio.Event()

        async def factory() -> int:
            entered.set()
            await release.wait()
            return 5

        loading = asyncio.ensure_future(cache.get_or_set("k", factory))
        await entered.wait()
        await within(cache.aclose(), 1.0 + CLOSE_BOUND + SLACK, "aclose")
        wait_disconnected(redis_server, name)
        release.set()
        assert await loading == 5
        assert not other_tasks()
        assert name not in client_names(redis_server)

    asyncio.run(main())
