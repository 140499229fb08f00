"""The threaded backplane's own subscriber (``nearcache._backplane.plainsub``) against a real
Redis: what it returns for every kind of reply, in RESP2 and RESP3, and how it fails."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from nearcache import NearCache
from nearcache._backplane import plainsub
from nearcache._backplane.plainsub import PlainSubscriber
from tests.servers import RedisServer, wait_until


def _next(sub: PlainSubscriber, timeout: float = 5.0) -> dict[str, Any]:
    """The next message (get_message returns None while a reply is incomplete)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = sub.get_message(timeout=0.1)
        if message is not None:
            return message
    raise AssertionError("no message")


@pytest.fixture(params=[2, 3])
def subscriber(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Any]:
    client = redis.Redis(port=redis_server.port, protocol=request.param)
    assert plainsub.usable(client)
    sub = PlainSubscriber(client)
    yield sub
    sub.close()
    client.close()


def test_subscribe_messages_and_pongs_in_order(
    subscriber: PlainSubscriber, redis_server: RedisServer, channel: str
) -> None:
    """The subscription's confirmation, then messages and the pong in the order sent; a
    message larger than one read (200 kB) comes whole."""
    subscriber.subscribe(channel)
    assert _next(subscriber) == {
        "type": "subscribe",
        "pattern": None,
        "channel": channel.encode(),
        "data": 1,
    }
    assert subscriber.get_message(timeout=0.0) is None  # nothing more yet
    big = bytes(range(256)) * 800
    with redis.Redis(port=redis_server.port) as publisher:
        assert publisher.publish(channel, b"first") == 1
        assert publisher.publish(channel, big) == 1
        subscriber.ping("token-1")
        publisher.publish(channel, b"after the ping")
    got = [_next(subscriber) for _ in range(4)]
    assert [(m["type"], m["data"]) for m in got] == [
        ("message", b"first"),
        ("message", big),
        ("pong", b"token-1"),
        ("message", b"after the ping"),
    ]


def test_a_connection_closed_by_the_server_raises(
    subscriber: PlainSubscriber, redis_server: RedisServer, channel: str
) -> None:
    subscriber.subscribe(channel)
    _next(subscriber)
    with redis.Redis(port=redis_server.port) as admin:
        assert admin.client_kill_filter(_type="pubsub") >= 1
    with pytest.raises(redis.ConnectionError):
        _next(subscriber)


def test_an_error_reply_raises_a_response_error(subscriber: PlainSubscriber) -> None:
    subscriber._send("SUBSCRIBE")  # wrong number of arguments
    with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
        _next(subscriber)


def test_a_socket_shut_down_by_another_thread_wakes_a_blocked_read(
    subscriber: PlainSubscriber, channel: str
) -> None:
    """What close() does to a listener blocked in get_message: the read fails at once."""
    import socket

    subscriber.subscribe(channel)
    _next(subscriber)
    failed: list[BaseException] = []

    def read() -> None:
        try:
            subscriber.get_message(timeout=30.0)
        except Exception as exc:
            failed.append(exc)

    reader = threading.Thread(target=read)
    started = time.monotonic()
    reader.start()
    subscriber.connection._sock.shutdown(socket.SHUT_RDWR)
    reader.join(10)
    assert not reader.is_alive() and time.monotonic() - started < 10
    assert len(failed) == 1 and isinstance(failed[0], (redis.ConnectionError, OSError))


def test_tls_connections_keep_redis_pys_pubsub() -> None:
    client = redis.Redis(port=6379, ssl=True)
    assert not plainsub.usable(client)
    client.close()


def test_a_cache_on_a_plain_connection_subscribes_with_it(
    redis_server: RedisServer, channel: str
) -> None:
    a = NearCache(redis_server.url, channel=channel)
    b = NearCache(redis_server.url, channel=channel)
    try:
        assert isinstance(a._backplane._pubsub, PlainSubscriber)  # type: ignore[union-attr]
        a.set("k", 1)
        b.set("k", 2)
        b.flush()
        wait_until(lambda: a.get("k") is None)
        assert a.stats().messages_received >= 1
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_the_asyncio_subscriber_returns_the_same_in_order(
    redis_server: RedisServer, channel: str, protocol: int
) -> None:
    """AsyncPlainSubscriber: confirmation, messages (one larger than a read) and the pong in
    order; a wait that runs out is None; a connection the server closes raises."""
    import asyncio

    big = bytes(range(256)) * 800

    async def next_message(sub: plainsub.AsyncPlainSubscriber) -> dict[str, Any]:
        for _ in range(100):
            message = await sub.get_message(timeout=0.1)
            if message is not None:
                return message
        raise AssertionError("no message")

    async def main() -> None:
        sub = plainsub.AsyncPlainSubscriber({"port": redis_server.port, "protocol": protocol})
        assert plainsub.usable(sub.client)
        try:
            await sub.subscribe(channel)
            assert (await next_message(sub))["type"] == "subscribe"
            assert await sub.get_message(timeout=0.01) is None
            with redis.Redis(port=redis_server.port) as publisher:
                publisher.publish(channel, b"first")
                publisher.publish(channel, big)
                await sub.ping("token-2")
                publisher.publish(channel, b"after the ping")
            got = [await next_message(sub) for _ in range(4)]
            assert [(m["type"], m["data"]) for m in got] == [
                ("message", b"first"),
                ("message", big),
                ("pong", b"token-2"),
                ("message", b"after the ping"),
            ]
            with redis.Redis(port=redis_server.port) as admin:
                assert admin.client_kill_filter(_type="pubsub") >= 1
            with pytest.raises(redis.ConnectionError):
                await next_message(sub)
        finally:
            await sub.aclose()

    asyncio.run(main())


def test_an_asyncio_cache_on_a_plain_connection_subscribes_with_it(
    redis_server: RedisServer, channel: str
) -> None:
    import asyncio

    from nearcache import AsyncNearCache

    async def main() -> None:
        a = AsyncNearCache(redis_server.url, channel=channel)
        b = AsyncNearCache(redis_server.url, channel=channel)
        await a.start()
        await b.start()
        try:
            assert isinstance(a._backplane._pubsub, plainsub.AsyncPlainSubscriber)  # type: ignore[union-attr]
            await a.set("k", 1)
            await b.set("k", 2)
            await b.flush()
            for _ in range(500):
                if await a.get("k") is None:
                    break
                await asyncio.sleep(0.01)
            assert await a.get("k") is None
        finally:
            await a.aclose()
            await b.aclose()

    asyncio.run(main())
