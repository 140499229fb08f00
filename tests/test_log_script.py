"""The replay log's publish script without an EXPIRE on every publish: both keys still expire
about a week after the last publish (refreshed when the script creates either, and when the
publisher asks: on its first publish on a connection, then at most REFRESH_EVERY apart), and
a publisher's epoch candidate never creates the epoch twice, so every loss of the epoch shows
as a new one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis
import redis.asyncio

from nearcache import NearCache
from nearcache._backplane.wire import AsyncWire, Wire
from nearcache._core.codec import channel_name
from nearcache._core.log import (
    EPOCH_SCRIPT,
    PUBLISH_SCRIPT,
    REFRESH_EVERY,
    log_keys,
    publish_script_call,
)
from tests.clock import FakeClock
from tests.servers import RedisServer, wait_until

WEEK = 604_800
SHORT = 100  # an expiry the script must leave alone, far from a week
MESSAGE = b"NC-not-decoded-by-anyone"


def _publish(client: redis.Redis, wire: str, *, refresh: bool) -> list[Any]:
    keys, args = publish_script_call(wire, 100, [MESSAGE], refresh=refresh)
    return list(client.eval(PUBLISH_SCRIPT, len(keys), *keys, *args))  # type: ignore[no-untyped-call]


def _ttls(client: redis.Redis, wire: str) -> tuple[int, int]:
    log_key, epoch_key = log_keys(wire)
    return int(client.ttl(log_key)), int(client.ttl(epoch_key))


def _a_week(ttl: int) -> bool:
    return WEEK - 5 <= ttl <= WEEK


def _shorten(client: redis.Redis, wire: str) -> None:
    for key in log_keys(wire):
        assert client.expire(key, SHORT)


def test_the_first_publish_gives_both_keys_a_week_unasked(
    redis_server: RedisServer, channel: str
) -> None:
    with redis_server.client() as client:
        _publish(client, channel, refresh=False)
        log_ttl, epoch_ttl = _ttls(client, channel)
        assert _a_week(log_ttl) and _a_week(epoch_ttl), (log_ttl, epoch_ttl)


def test_a_publish_refreshes_the_expiry_only_when_asked(
    redis_server: RedisServer, channel: str
) -> None:
    with redis_server.client() as client:
        first = _publish(client, channel, refresh=True)
        _shorten(client, channel)
        second = _publish(client, channel, refresh=False)
        assert second[0] == first[0]  # the same epoch, the log appended
        assert all(0 < ttl <= SHORT for ttl in _ttls(client, channel))
        _publish(client, channel, refresh=True)
        assert all(_a_week(ttl) for ttl in _ttls(client, channel))
        assert client.xlen(log_keys(channel)[0]) == 3


def test_a_log_deleted_on_its_own_is_made_again_with_an_expiry(
    redis_server: RedisServer, channel: str
) -> None:
    """A log that went missing while the epoch stayed (deleted, evicted) is recreated by the
    next XADD; unasked, the script still gives it (and the epoch) a week."""
    log_key, _ = log_keys(channel)
    with redis_server.client() as client:
        first = _publish(client, channel, refresh=True)
        _shorten(client, channel)
        client.delete(log_key)
        again = _publish(client, channel, refresh=False)
        assert again[0] == first[0]
        assert client.xlen(log_key) == 1
        assert all(_a_week(ttl) for ttl in _ttls(client, channel))


def test_a_lost_epoch_is_made_again_with_an_expiry_and_returned(
    redis_server: RedisServer, channel: str
) -> None:
    _, epoch_key = log_keys(channel)
    with redis_server.client() as client:
        first = _publish(client, channel, refresh=True)
        _shorten(client, channel)
        client.delete(epoch_key)
        again = _publish(client, channel, refresh=False)
        assert again[0] != first[0] and client.get(epoch_key) == again[0]
        assert all(_a_week(ttl) for ttl in _ttls(client, channel))


def test_the_epoch_script_checks_every_command_the_publish_script_writes_with() -> None:
    """The ACL check at start covers what the publish script calls (GET is the epoch
    script's own first call)."""
    for command in ("SET", "XADD", "PUBLISH", "EXPIRE"):
        assert f"redis.call('{command}'" in PUBLISH_SCRIPT or f"redis.pcall('{command}'" in (
            PUBLISH_SCRIPT
        )
        assert f"{{'{command}', KEYS" in EPOCH_SCRIPT or f"{{'{command}', ARGV" in EPOCH_SCRIPT
    called = {
        part.split("'")[1]
        for part in PUBLISH_SCRIPT.replace("redis.pcall(", "redis.call(").split("redis.call(")[1:]
    }
    assert called == {"GET", "SET", "XADD", "PUBLISH", "EXPIRE"}


def test_a_publisher_asks_for_a_refresh_on_each_connection_and_then_hourly(
    redis_factory: Callable[..., RedisServer], channel: str
) -> None:
    server = redis_factory()
    clock = FakeClock(1000.0)
    with server.client() as admin, server.client() as publisher:
        wire = Wire(publisher.connection_pool, channel, 100, clock=clock)
        try:
            wire.publish([MESSAGE])
            assert all(_a_week(ttl) for ttl in _ttls(admin, channel))
            _shorten(admin, channel)
            clock.advance(REFRESH_EVERY - 1)
            wire.publish([MESSAGE])
            assert all(0 < ttl <= SHORT for ttl in _ttls(admin, channel))
            clock.advance(1)
            wire.publish([MESSAGE])  # an hour since it last asked
            assert all(_a_week(ttl) for ttl in _ttls(admin, channel))
            _shorten(admin, channel)
            wire.publish([MESSAGE])
            assert all(0 < ttl <= SHORT for ttl in _ttls(admin, channel))
            # A dropped connection: the next one asks at once, whatever the clock says.
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
            with pytest.raises(redis.ConnectionError):
                wire.publish([MESSAGE])
            wire.publish([MESSAGE])
            assert all(_a_week(ttl) for ttl in _ttls(admin, channel))
        finally:
            wire.close()


def test_a_publisher_never_makes_the_same_epoch_twice(
    redis_server: RedisServer, channel: str
) -> None:
    """The candidate a publisher sends becomes the epoch when the key is missing; once a
    reply shows it did, the next request carries a new one, so an epoch lost again comes
    back different (a subscriber sees the change)."""
    _, epoch_key = log_keys(channel)
    with redis_server.client() as admin, redis_server.client() as publisher:
        wire = Wire(publisher.connection_pool, channel, 100)
        try:
            epochs = []
            for _ in range(3):
                admin.delete(epoch_key)
                wire.publish([MESSAGE])
                epochs.append(wire.replies[-1][0])
                wire.publish([MESSAGE])  # the epoch kept: the same one
                assert wire.replies[-1][0] == epochs[-1]
            assert len(set(epochs)) == 3, epochs
        finally:
            wire.close()


def test_an_async_publisher_never_makes_the_same_epoch_twice(
    redis_server: RedisServer, channel: str
) -> None:
    _, epoch_key = log_keys(channel)

    async def scenario() -> list[bytes]:
        publisher = redis.asyncio.Redis(**redis_server.client_kwargs(retry=None))
        wire = AsyncWire(publisher.connection_pool, channel, 100)
        epochs = []
        try:
            with redis_server.client() as admin:
                for _ in range(3):
                    admin.delete(epoch_key)
                    await wire.publish([MESSAGE])
                    epochs.append(bytes(admin.get(epoch_key)))  # type: ignore[arg-type]
        finally:
            await wire.aclose()
            await publisher.aclose()
        return epochs

    assert len(set(asyncio.run(scenario()))) == 3


def test_a_request_written_behind_an_unanswered_one_never_makes_its_epoch_again(
    redis_server: RedisServer, channel: str
) -> None:
    """The asyncio wire writes a request behind one still unanswered. If the first one made
    the epoch and the epoch is lost before the second runs (here a DEL between the two, on
    the same connection), the second makes a new epoch, not the first one's again: it
    carries a new candidate."""
    _, epoch_key = log_keys(channel)
    delete = b"*2\r\n$3\r\nDEL\r\n$%d\r\n%s\r\n" % (len(epoch_key), epoch_key.encode())

    async def scenario() -> tuple[bytes, bytes]:
        publisher = redis.asyncio.Redis(**redis_server.client_kwargs(retry=None))
        wire = AsyncWire(publisher.connection_pool, channel, 100)
        try:
            with redis_server.client() as admin:
                await wire.publish([MESSAGE])  # connected, the script loaded
                admin.delete(epoch_key)
                first = wire._requests.candidate
                wire.write_nowait([MESSAGE])  # makes the epoch: ``first``
                wire._conn._writer.write(delete)  # the epoch lost again, in between
                wire._expected += 1
                assert wire.appendable
                wire.write_more_nowait([MESSAGE])
                await wire.complete()
                return first, bytes(admin.get(epoch_key))  # type: ignore[arg-type]
        finally:
            await wire.aclose()
            await publisher.aclose()

    first, epoch = asyncio.run(scenario())
    assert epoch != first


def test_a_subscriber_sees_every_loss_of_the_epoch_by_one_publisher(
    redis_server: RedisServer, channel: str
) -> None:
    """FLUSHALL twice (limited to this test's keys), the same writer publishing after each:
    the reader drops L1 both times."""
    wire = channel_name(channel)
    with (
        NearCache(redis_server.url, channel=channel, abort_connect=True) as a,
        NearCache(redis_server.url, channel=channel, abort_connect=True) as b,
        redis_server.client() as admin,
    ):
        a.remove("warm-up")
        a.flush()
        wait_until(lambda: b.stats().invalidations_received >= 1)
        for losses in (1, 2):
            b.set("k", "v")
            admin.delete(*log_keys(wire))
            a.remove(f"other-{losses}")
            a.flush()
            wait_until(lambda: b.stats().losses == losses, message=f"loss {losses}")  # noqa: B023
            assert b.get("k") is None
