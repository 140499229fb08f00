"""The send path (``_backplane/wire.py``): a caller writes its batch to Redis itself when no
batch is in flight, never blocking on Redis; the sender reads the reply, finishes a partial
write and retries failures."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from nearcache import AsyncNearCache, NearCache
from nearcache._backplane.wire import MAX_WRITTEN
from tests.instances import Instance
from tests.servers import RedisServer, TcpProxy, wait_until

BIG = 8192  # keys in one batch (BATCH_MAX_OPS): 32 MiB with 4 KiB keys, far past any buffer


def _big_keys() -> list[str]:
    return [f"{i:06d}" + "x" * 4096 for i in range(BIG)]


@pytest.fixture
def frozen() -> Iterator[Callable[[RedisServer], None]]:
    """Freeze a private redis-server (SIGSTOP: it reads nothing more); thawed at the end."""
    stopped: list[int] = []

    def freeze(server: RedisServer) -> None:
        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        stopped.append(server.pid)

    yield freeze
    for pid in stopped:
        os.kill(pid, signal.SIGCONT)


# With the L2 (and values in messages), callers write the L2's publish script the same way.
SHARING = [{}, {"l2": True}, {"l2": True, "propagate": "update"}]
SHARING_IDS = ["plain", "l2", "l2+update"]


@pytest.mark.parametrize("sharing", SHARING, ids=SHARING_IDS)
def test_a_callers_batch_reaches_redis_without_the_sender(
    redis_server: RedisServer, channel: str, sharing: dict[str, object]
) -> None:
    """With the sender thread kept from running (the test holds the cache's lock), a ``set``
    still reaches the other instances: the caller wrote the batch itself."""
    with (
        NearCache(redis_server.url, channel=channel, abort_connect=True, **sharing) as writer,
        NearCache(redis_server.url, channel=channel, abort_connect=True, **sharing) as reader,
    ):
        writer.set("warm", 1)
        writer.flush()  # the publishing connection is up: the next batch may go direct
        assert reader.get_or_set("k", lambda: "old") == "old"
        wait_until(lambda: reader.get("k") == "old")
        with writer._lock:  # the sender cannot take or read anything meanwhile
            writer.set("k", "new")
            wait_until(lambda: reader.get("k") != "old", 5)
        writer.flush()
        assert writer.stats().pending == 0


def test_an_async_callers_batch_reaches_redis_without_the_sender(
    redis_server: RedisServer, channel: str
) -> None:
    """An ``AsyncNearCache.set`` writes its batch before returning: another instance sees it
    while the loop is blocked (the sender task cannot have run)."""
    asyncio.run(_async_direct(redis_server, channel))


async def _async_direct(redis_server: RedisServer, channel: str) -> None:
    writer = AsyncNearCache(redis_server.url, channel=channel, abort_connect=True)
    await writer.start()
    with NearCache(redis_server.url, channel=channel, abort_connect=True) as reader:
        await writer.set("warm", 1)
        await writer.flush()
        assert reader.get_or_set("k", lambda: "old") == "old"
        wait_until(lambda: reader.get("k") == "old")
        await writer.set("k", "new")
        wait_until(lambda: reader.get("k") is None, 5)  # blocks the loop: no task runs
        await writer.flush()
    await writer.aclose()


@pytest.mark.parametrize("sharing", SHARING, ids=SHARING_IDS)
def test_a_frozen_redis_never_blocks_a_write(
    redis_factory: Callable[..., RedisServer],
    channel: str,
    frozen: Callable[[RedisServer], None],
    sharing: dict[str, object],
) -> None:
    """Redis frozen, a 32 MiB batch written directly (the socket takes a fraction, the sender
    the rest), then a thousand more writes: every call returns at once; all are delivered
    once Redis runs again."""
    server = redis_factory()
    conn = f"{server.host}:{server.port},syncTimeout=30000"
    with NearCache(
        conn, channel=channel, abort_connect=True, max_pending=20_000, **sharing
    ) as writer:
        writer.set("warm", 1)
        writer.flush()
        frozen(server)
        started = time.monotonic()
        writer.remove_many(_big_keys())
        for i in range(1000):
            writer.set(f"k{i}", i)
        took = time.monotonic() - started
        assert took < 5.0, f"writes blocked for {took:.1f}s on a frozen Redis"
        assert writer.stats().pending == BIG + 1000
        os.kill(server.pid or 0, signal.SIGCONT)
        writer.flush(timeout=60)
        assert writer.stats().invalidations_sent == BIG + 1001


def test_a_frozen_redis_never_blocks_an_async_write(
    redis_factory: Callable[..., RedisServer],
    channel: str,
    frozen: Callable[[RedisServer], None],
) -> None:
    """The asyncio twin: the transport buffers what the socket does not take, and no call
    waits for Redis; the loop stays responsive throughout."""
    asyncio.run(_async_frozen(redis_factory(), channel, frozen))


async def _async_frozen(
    server: RedisServer, channel: str, frozen: Callable[[RedisServer], None]
) -> None:
    conn = f"{server.host}:{server.port},syncTimeout=30000"
    writer = AsyncNearCache(conn, channel=channel, abort_connect=True, max_pending=20_000)
    await writer.start()
    await writer.set("warm", 1)
    await writer.flush()
    frozen(server)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    await writer.remove_many(_big_keys())
    for i in range(1000):
        await writer.set(f"k{i}", i)
    took = time.monotonic() - started
    # The loop keeps running with all that buffered for a frozen Redis: the ticker ticks
    # (polled with a deadline: a fixed 0.2 s window could hold fewer ticks on a loaded box).
    deadline = time.monotonic() + 10.0
    while ticks < 5 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    stop.set()
    await task
    assert took < 5.0, f"writes blocked for {took:.1f}s on a frozen Redis"
    assert ticks >= 5, "the loop was blocked"
    os.kill(server.pid or 0, signal.SIGCONT)
    await writer.flush(timeout=60)
    assert writer.stats().invalidations_sent == BIG + 1001
    await writer.aclose()


def test_writers_on_many_threads_keep_each_ones_order(
    redis_server: RedisServer, channel: str
) -> None:
    """Threads racing to write directly and through the sender: every invalidation arrives,
    and the receiver sees no sequence gap (batches left in order)."""
    with (
        NearCache(redis_server.url, channel=channel, abort_connect=True) as writer,
        # max_staleness=10: a GIL pause of the reader's listener behind the four writer
        # threads must not pass for a silent connection (a resubscription is not tested here)
        NearCache(
            redis_server.url, channel=channel, abort_connect=True, max_staleness=10
        ) as reader,
    ):
        writer.set("warm", 1)
        writer.flush()
        before = reader.stats()

        def work(t: int) -> None:
            for i in range(500):
                writer.set(f"t{t}:{i}", i)
                if i % 50 == 0:
                    time.sleep(0.001)

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        writer.flush()
        sent = writer.stats().invalidations_sent
        wait_until(
            lambda: (
                reader.stats().invalidations_received - before.invalidations_received >= sent - 1
            ),
            10,
        )
        assert reader.stats().sequence_gaps == before.sequence_gaps
        assert reader.stats().repairs == before.repairs


async def _async_sets_past_the_bound(
    conn: str, channel: str, server: RedisServer, freeze: Callable[[RedisServer], None]
) -> tuple[int, float]:
    writer = AsyncNearCache(conn, channel=channel, abort_connect=True, max_pending=50)
    try:
        await writer.set("warm", 1)
        await writer.flush()
        freeze(server)
        for i in range(200):
            await writer.set(f"k{i}", "new")
        degraded = writer.stats().degraded_to_clear
        os.kill(server.pid or 0, signal.SIGCONT)
        await writer.flush(timeout=30)
        return degraded, time.monotonic()
    finally:
        await writer.aclose()


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_sets_past_the_bound_on_a_frozen_redis_reach_the_fleet_as_one_clear(
    redis_factory: Callable[..., RedisServer],
    channel: str,
    frozen: Callable[[RedisServer], None],
    driver: str,
) -> None:
    """Sets staged while Redis is frozen, past ``max_pending``: the writer folds them itself,
    degrades them to one clear, and once Redis runs again the other instance (its own
    process) applies that clear: it holds none of the keys, nor the one nobody wrote."""
    server = redis_factory()
    conn = f"{server.host}:{server.port},syncTimeout=30000"
    reader = Instance(conn, channel, name="reader")
    try:
        for key in [f"k{i}" for i in range(200)] + ["untouched"]:
            assert reader.call("get_or_set", key=key, value="old") == "old"
        before = reader.call("stats")
        if driver == "sync":
            with NearCache(conn, channel=channel, abort_connect=True, max_pending=50) as writer:
                writer.set("warm", 1)
                writer.flush()
                frozen(server)
                for i in range(200):
                    writer.set(f"k{i}", "new")
                degraded = writer.stats().degraded_to_clear
                os.kill(server.pid or 0, signal.SIGCONT)
                writer.flush(timeout=30)
        else:
            degraded, _ = asyncio.run(_async_sets_past_the_bound(conn, channel, server, frozen))
        assert degraded >= 1
        assert reader.call("wait_gone", key="untouched", timeout=10.0) is not None
        for i in range(200):
            assert reader.call("get", key=f"k{i}") == {"missing": True}
        after = reader.call("stats")
        # Dropped by the clear, not by a repair after a lost subscription.
        assert (after["repairs"], after["resubscriptions"]) == (
            before["repairs"],
            before["resubscriptions"],
        )
    finally:
        reader.close()


# -- the asyncio driver: callers write behind an unanswered batch (AsyncWire) ------------------

BURST = [f"b{i}" for i in range(MAX_WRITTEN + 2)]  # past what callers may write unanswered


async def _async_burst(url: str, channel: str, reader: NearCache) -> AsyncNearCache:
    """An AsyncNearCache whose publishing connection is up, after ``reader`` cached every key
    of BURST as "old"."""
    writer = AsyncNearCache(url, channel=channel, abort_connect=True)
    await writer.start()
    await writer.set("warm", 1)
    await writer.flush()
    for key in BURST:
        assert reader.get_or_set(key, lambda: "old") == "old"
    wait_until(lambda: all(reader.get(key) == "old" for key in BURST))
    return writer


def test_async_writes_behind_an_unanswered_batch_reach_redis_at_once(
    redis_server: RedisServer, channel: str
) -> None:
    """A burst of ``set`` calls between two awaits: each of the first MAX_WRITTEN is written
    behind the one before, unanswered, and reaches the other instance while the loop is
    blocked (the sender task cannot read a reply); the rest wait for the replies."""

    async def main() -> None:
        with NearCache(redis_server.url, channel=channel, abort_connect=True) as reader:
            writer = await _async_burst(redis_server.url, channel, reader)
            for key in BURST:
                await writer.set(key, "new")  # never suspends: no other task runs
            # Blocks the loop: what reaches the reader was written by the calls above.
            wait_until(lambda: all(reader.get(key) is None for key in BURST[:MAX_WRITTEN]), 5)
            assert [reader.get(key) for key in BURST[MAX_WRITTEN:]] == ["old", "old"]
            await writer.flush()
            wait_until(lambda: all(reader.get(key) is None for key in BURST), 5)
            stats = writer.stats()
            assert (stats.pending, stats.invalidations_sent) == (0, len(BURST) + 1)
            assert reader.stats().sequence_gaps == 0
            await writer.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("fault", ["noscript", "cut"])
def test_async_writes_behind_a_failed_batch_are_retried_with_it(
    redis_server: RedisServer,
    channel: str,
    tcp_proxy: Callable[[int], TcpProxy],
    fault: str,
) -> None:
    """The first request of a burst fails (the script was flushed from Redis, or the
    connection is cut with every request unanswered): the retry sends the whole burst again,
    and every key reaches the other instance; ``flush()`` returns once all are delivered."""
    proxy = tcp_proxy(redis_server.port)
    through = f"redis://{proxy.host}:{proxy.port}/0"

    async def main() -> None:
        with NearCache(redis_server.url, channel=channel, abort_connect=True) as reader:
            writer = await _async_burst(through, channel, reader)
            if fault == "noscript":
                redis_server.client().script_flush()
            else:
                proxy.stall()  # every request of the burst is lost on the way
            for key in BURST[:MAX_WRITTEN]:
                await writer.set(key, "new")
            if fault == "cut":
                proxy.cut()
                proxy.resume()
            # (flush() reports a refusal at once: poll with a deadline, the loop running.)
            deadline = time.monotonic() + 10
            while writer.stats().pending and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await writer.flush(timeout=1)
            wait_until(lambda: all(reader.get(key) is None for key in BURST[:MAX_WRITTEN]), 5)
            stats = writer.stats()
            assert stats.publish_failures >= 1
            assert stats.pending == 0
            await writer.aclose()

    asyncio.run(main())


def test_async_close_delivers_every_write_behind_an_unanswered_batch(
    redis_server: RedisServer, channel: str
) -> None:
    """``aclose()`` right after a burst: every request of it is answered (or sent again)
    before the connection closes, and the other instance drops every key."""

    async def main() -> None:
        with NearCache(redis_server.url, channel=channel, abort_connect=True) as reader:
            writer = await _async_burst(redis_server.url, channel, reader)
            for key in BURST:
                await writer.set(key, "new")
            await writer.aclose()
            assert writer.stats().invalidations_sent == len(BURST) + 1
            wait_until(lambda: all(reader.get(key) is None for key in BURST), 5)

    asyncio.run(main())


# Runs until SCRIPT KILL (it writes nothing, so it may be killed); past busy-reply-threshold
# Redis answers every other command with BUSY.
_BUSY_SCRIPT = "while true do redis.call('TIME') end"


def _reply_arrived(writer: AsyncNearCache) -> bool:
    """Whether bytes wait unread on the writer's publishing socket (peeked at through a
    duplicate of its descriptor: the transport reads nothing while the loop is blocked)."""
    transport = writer._backplane._wire._conn._writer.transport  # type: ignore[union-attr]
    fd = transport.get_extra_info("socket").fileno()
    with socket.fromfd(fd, socket.AF_INET, socket.SOCK_STREAM) as dup:
        try:
            return bool(dup.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False


def test_async_a_refused_request_overtaken_by_the_one_behind_is_repaired(
    redis_server: RedisServer, channel: str
) -> None:
    """Redis answers ``BUSY`` to a caller's request (another client's script runs), then runs
    the request written behind it once the script is killed: the later message reaches the
    other instance first. It takes that for a gap and repairs; the writer's retry delivers
    the refused invalidation; no key is left stale, and ``flush()`` returns."""
    admin = redis_server.client()
    admin.config_set("busy-reply-threshold", 10)

    def busy() -> None:
        with contextlib.suppress(redis.ResponseError):  # "script killed"
            redis_server.client().eval(_BUSY_SCRIPT, 0)

    def refuses() -> bool:
        try:
            admin.ping()
        except redis.ResponseError as exc:
            return str(exc).startswith("BUSY")
        return False

    async def main() -> None:
        with NearCache(redis_server.url, channel=channel, abort_connect=True) as reader:
            writer = await _async_burst(redis_server.url, channel, reader)
            key, behind = BURST[0], BURST[1]
            runner = threading.Thread(target=busy)
            runner.start()
            try:
                wait_until(refuses, 10)
                # From here to the flush the loop is blocked: the sender reads no reply.
                await writer.set(key, "new")  # answered BUSY
                wait_until(lambda: _reply_arrived(writer), 10)
            finally:
                while runner.is_alive():
                    with contextlib.suppress(redis.ResponseError):  # (not running yet)
                        admin.script_kill()
                    runner.join(0.05)
            await writer.set(behind, "new")  # written behind the refused one: runs
            wait_until(lambda: reader.get(behind) is None, 5)
            assert reader.get(key) is None  # the gap's repair dropped L1
            assert reader.stats().sequence_gaps == 1
            deadline = time.monotonic() + 10  # (flush() reports a refusal at once)
            while writer.stats().pending and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await writer.flush(timeout=1)
            assert writer.stats().publish_failures >= 1
            # The retry's late messages are taken as old and applied: nothing repairs again,
            # and nothing written is served stale.
            assert reader.get_or_set(key, lambda: "reloaded") == "reloaded"
            await writer.set(key, "newer")
            await writer.flush()
            wait_until(lambda: reader.get(key) is None, 5)
            assert reader.stats().sequence_gaps == 1
            await writer.aclose()

    try:
        asyncio.run(main())
    finally:
        admin.config_set("busy-reply-threshold", 5000)
        admin.close()
