"""Repair without wiping: the replay log, epochs and reconciliation, against real Redis."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import pytest

from nearcache import AsyncNearCache, NearCache
from nearcache._backplane.redis import log_keys, publish_messages
from nearcache._core.codec import Invalidation, Kind, encode
from nearcache._core.log import parse_entries
from tests.servers import RedisServer, TcpProxy, wait_until


def _connected(cache: Any) -> bool:
    return bool(cache.backplane_state.value == "connected")


def _warm_up(a: NearCache, b: NearCache) -> None:
    """Publish once so that B's cursor points into the log."""
    a.remove("warm-up")
    a.flush()
    wait_until(lambda: b.stats().invalidations_received >= 1)


def test_a_reconnect_replays_what_was_missed_and_keeps_l1(
    redis_server: RedisServer, tcp_proxy: Callable[[int], TcpProxy], channel: str
) -> None:
    """Invalidations published while B was partitioned are replayed from the log when B
    reconnects: exactly those keys are evicted and the rest of L1 stays warm."""
    proxy = tcp_proxy(redis_server.port)
    with (
        NearCache(redis_server.url, channel=channel) as a,
        NearCache(
            f"127.0.0.1:{proxy.port},connectTimeout=1000", channel=channel, max_staleness=10
        ) as b,
    ):
        wait_until(lambda: _connected(a) and _connected(b))
        _warm_up(a, b)
        for i in range(100):
            b.set(f"k{i}", i, region="r")
        b.flush()
        proxy.stall()
        for i in range(10):
            a.remove(f"k{i}", region="r")
        a.flush()
        before = b.stats()
        proxy.cut()
        proxy.resume()
        wait_until(lambda: b.stats().replays > before.replays, 15)
        assert [b.get(f"k{i}", region="r") for i in range(10)] == [None] * 10
        assert [b.get(f"k{i}", region="r") for i in range(10, 100)] == list(range(10, 100))
        after = b.stats()
        assert after.repairs == before.repairs  # no wipe
        assert after.invalidations_received == before.invalidations_received + 10


def test_a_log_trimmed_past_the_cursor_drops_l1(
    redis_server: RedisServer, tcp_proxy: Callable[[int], TcpProxy], channel: str
) -> None:
    """When more was published during the outage than the log keeps, L1 is dropped."""
    proxy = tcp_proxy(redis_server.port)
    with (
        NearCache(redis_server.url, channel=channel, replay_log=5) as a,
        NearCache(
            f"127.0.0.1:{proxy.port},connectTimeout=1000", channel=channel, max_staleness=10
        ) as b,
    ):
        wait_until(lambda: _connected(a) and _connected(b))
        _warm_up(a, b)
        b.set("survivor?", 1)
        proxy.stall()
        raw = redis_server.client()
        for i in range(300):  # one message per flush, far past MAXLEN ~ 5
            a.remove(f"gone-{i}")
            a.flush()
        assert raw.xlen(log_keys(a.channel)[0]) < 300
        raw.close()
        before = b.stats()
        proxy.cut()
        proxy.resume()
        wait_until(lambda: b.stats().resubscriptions > before.resubscriptions, 15)
        assert b.stats().repairs == before.repairs + 1
        assert b.get("survivor?") is None


def test_redis_restarted_without_its_data_changes_the_epoch(
    redis_factory: Callable[..., RedisServer], channel: str
) -> None:
    """A Redis restart that loses the log is detected by the new epoch and L1 is dropped."""
    server = redis_factory()
    with (
        NearCache(server.url, channel=channel) as a,
        NearCache(server.url, channel=channel, max_staleness=30) as b,
    ):
        wait_until(lambda: _connected(a) and _connected(b))
        _warm_up(a, b)
        b.set("k", "v")
        before = b.stats()
        server.kill()
        server.restart()
        wait_until(lambda: b.stats().resubscriptions > before.resubscriptions, 15)
        assert b.stats().replays == before.replays
        assert b.get("k") is None


def test_redis_restarted_with_its_data_still_drops_l1(
    redis_factory: Callable[..., RedisServer], channel: str
) -> None:
    """Even when the log and epoch survive a restart (AOF), the restarted server may have come
    back with an older copy lacking entries this instance never got: L1 is dropped."""
    server = redis_factory(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    with (
        NearCache(server.url, channel=channel) as a,
        NearCache(server.url, channel=channel, max_staleness=30) as b,
    ):
        wait_until(lambda: _connected(a) and _connected(b))
        _warm_up(a, b)
        b.set("kept", "v")
        before = b.stats()
        server.kill()
        server.restart()
        wait_until(lambda: b.stats().resubscriptions > before.resubscriptions, 15)
        assert b.get("kept") is None
        assert b.stats().repairs == before.repairs + 1
        assert b.stats().replays == before.replays


def test_flushall_is_detected_by_the_next_message(redis_server: RedisServer, channel: str) -> None:
    """FLUSHALL deletes the log; the next message carries a new epoch and L1 is dropped."""
    with (
        NearCache(redis_server.url, channel=channel) as a,
        NearCache(redis_server.url, channel=channel) as b,
    ):
        wait_until(lambda: _connected(a) and _connected(b))
        _warm_up(a, b)
        b.set("k", "v")
        raw = redis_server.client()
        raw.delete(*log_keys(a.channel))  # FLUSHALL limited to this test's keys
        raw.close()
        a.remove("other")
        a.flush()
        wait_until(lambda: b.stats().losses == 1)
        assert b.get("k") is None


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_reconciliation_finds_a_lost_last_message(
    redis_server: RedisServer, channel: str, driver: str
) -> None:
    """A message that reached the log but never the subscriber (nothing follows it) is found
    by the periodic reconciliation and replayed: only its key is evicted."""
    kwargs: dict[str, Any] = {"channel": channel, "reconcile_interval": 0.2}

    async def scenario() -> None:
        async def run(value: Any) -> Any:
            return await value if inspect.isawaitable(value) else value

        a = NearCache(redis_server.url, **kwargs)
        b: Any = (
            NearCache(redis_server.url, **kwargs)
            if driver == "sync"
            else AsyncNearCache(redis_server.url, **kwargs)
        )
        if driver == "async":
            await b.start()
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while not (_connected(a) and _connected(b)):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            a.remove("warm-up")
            a.flush()
            while b.stats().invalidations_received < 1:
                await asyncio.sleep(0.01)
            await run(b.set("lost", 1))
            await run(b.set("kept", 2))
            await run(b.flush())  # the lost message must be the log's last
            raw = redis_server.client()
            lost = encode(b"L" * 16, 1, [Invalidation(Kind.KEY, None, "lost")])
            raw.xadd(log_keys(b.channel)[0], {"m": lost})  # logged, never published
            raw.close()
            while await run(b.get("lost")) is not None:
                assert asyncio.get_running_loop().time() < deadline + 10
                await asyncio.sleep(0.01)
            assert await run(b.get("kept")) == 2
            assert b.stats().losses == 0
            assert b.stats().repairs == 1  # only the first subscription's
        finally:
            a.close()
            await run(b.close() if driver == "sync" else b.aclose())

    asyncio.run(scenario())


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_forgery_rejected_live_is_counted_once_when_reconciled(
    redis_server: RedisServer, channel: str, driver: str
) -> None:
    """An unsigned message published through the log to signed instances is rejected live
    and, being the log's last entry, met again by reconciliation: it is counted once, moves
    nothing but the cursor (along the log), and a genuine message still applies with no loss
    and no gap (issue 8: the same forgery used to be counted twice)."""
    kwargs: dict[str, Any] = {"channel": channel, "reconcile_interval": 0.2, "secret": "s"}

    async def scenario() -> None:
        async def run(value: Any) -> Any:
            return await value if inspect.isawaitable(value) else value

        async def until(condition: Callable[[], bool]) -> None:
            deadline = asyncio.get_running_loop().time() + 10
            while not condition():
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)

        a = NearCache(redis_server.url, **kwargs)
        b: Any = (
            NearCache(redis_server.url, **kwargs)
            if driver == "sync"
            else AsyncNearCache(redis_server.url, **kwargs)
        )
        if driver == "async":
            await b.start()
        try:
            await until(lambda: _connected(a) and _connected(b))
            a.remove("warm-up")
            a.flush()
            await until(lambda: b.stats().invalidations_received == 1)
            await run(b.set("k", 1))
            await run(b.flush())  # the forgery must be the log's last entry
            raw = redis_server.client()
            forged = encode(b"F" * 16, 1, [Invalidation(Kind.KEY, None, "k")])
            publish_messages(raw, b.channel, [forged], 10_000)
            forged_id = parse_entries(raw.xrevrange(log_keys(b.channel)[0], count=1))[0][0]
            raw.close()
            cursor = b._backplane._subscription.cursor
            await until(lambda: cursor.last == forged_id)  # reconciliation went past it
            assert b.stats().malformed_messages == 1
            assert await run(b.get("k")) == 1
            a.remove("k")
            a.flush()
            await until(lambda: b.stats().invalidations_received == 2)
            stats = b.stats()
            assert (stats.losses, stats.sequence_gaps, stats.repairs) == (0, 0, 1)
        finally:
            a.close()
            await run(b.close() if driver == "sync" else b.aclose())

    asyncio.run(scenario())


def test_a_forgery_replayed_after_a_reconnect_is_counted_once_and_changes_nothing(
    redis_server: RedisServer, tcp_proxy: Callable[[int], TcpProxy], channel: str
) -> None:
    """A forged entry logged while B was partitioned is replayed with the genuine ones when B
    reconnects: counted once, L1 kept, and the genuine sender's next message is no gap."""
    proxy = tcp_proxy(redis_server.port)
    with (
        NearCache(redis_server.url, channel=channel, secret="s") as a,
        NearCache(
            f"127.0.0.1:{proxy.port},connectTimeout=1000",
            channel=channel,
            max_staleness=10,
            secret="s",
        ) as b,
    ):
        wait_until(lambda: _connected(a) and _connected(b))
        _warm_up(a, b)
        b.set("kept", 1)
        proxy.stall()
        raw = redis_server.client()
        # Signed with the wrong secret, naming A as its sender with a far higher sequence.
        forged = encode(
            bytes.fromhex(a.instance_id),
            1000,
            [Invalidation(Kind.CLEAR)],
            signing_key=("k1", b"wrong"),
        )
        publish_messages(raw, b.channel, [forged], 10_000)
        raw.close()
        a.remove("gone")
        a.flush()
        before = b.stats()
        proxy.cut()
        proxy.resume()
        wait_until(lambda: b.stats().replays > before.replays, 15)
        after = b.stats()
        assert after.malformed_messages == before.malformed_messages + 1
        assert after.repairs == before.repairs
        assert b.get("kept") == 1
        a.remove("next")
        a.flush()
        wait_until(lambda: b.stats().invalidations_received == after.invalidations_received + 1)
        assert b.stats().sequence_gaps == 0
        assert b.stats().malformed_messages == after.malformed_messages
