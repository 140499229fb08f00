"""The sharded subscription (nearcache._backplane.shard) on a real cluster: messages and
pongs in order, and every way the node stops being in charge ends the subscription."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from nearcache._backplane.cluster import node_kwargs
from nearcache._backplane.shard import AsyncShardSubscriber, ShardLostError, ShardSubscriber
from nearcache._config import Endpoint, parse_connection_string
from tests.servers import RedisServer, wait_until
from tests.topologies import ClusterTopology, key_slot


def _channel() -> str:
    return "{nearcache:v1:shard-" + uuid.uuid4().hex[:8] + "}"


def _kwargs(cluster: ClusterTopology, node: RedisServer) -> dict[str, Any]:
    settings = parse_connection_string(cluster.connection_string(node))
    return node_kwargs(settings, Endpoint(*cluster.address(node)))


def _next(subscriber: ShardSubscriber, kind: str) -> dict[str, Any]:
    def arrived() -> dict[str, Any] | None:
        message = subscriber.get_message(timeout=0.1)
        return message if message is not None and message["type"] == kind else None

    found: dict[str, Any] = wait_until(arrived, 5, message=kind)
    return found


def test_messages_then_the_pong_in_order(redis_cluster: ClusterTopology) -> None:
    """A message published before the ping arrives before its pong."""
    channel = _channel()
    owner = redis_cluster.owner(key_slot(channel))
    subscriber = ShardSubscriber(_kwargs(redis_cluster, owner), channel + ":epoch")
    try:
        subscriber.subscribe(channel)
        _next(subscriber, "ssubscribe")
        with redis_cluster.node_client(owner) as client:
            client.execute_command("SPUBLISH", channel, "m1")
        subscriber.ping("7")
        assert subscriber.get_message(timeout=5)["data"] == b"m1"  # type: ignore[index]
        assert _next(subscriber, "pong")["data"] == b"7"
    finally:
        subscriber.close()


def test_a_slot_move_ends_the_subscription(redis_cluster: ClusterTopology) -> None:
    """The slot moving away pushes sunsubscribe; the old owner refuses the next check and
    a new subscription there (MOVED)."""
    channel = _channel()
    slot = key_slot(channel)
    owner = redis_cluster.owner(slot)
    subscriber = ShardSubscriber(_kwargs(redis_cluster, owner), channel + ":epoch")
    try:
        subscriber.subscribe(channel)
        _next(subscriber, "ssubscribe")
        redis_cluster.move_slot(slot)
        _next(subscriber, "sunsubscribe")
        subscriber.ping("1")
        with pytest.raises(ShardLostError, match="no longer serves"):
            subscriber.get_message(timeout=5)
    finally:
        subscriber.close()
    again = ShardSubscriber(_kwargs(redis_cluster, owner), channel + ":epoch")
    try:
        again.subscribe(channel)
        with pytest.raises(ShardLostError):
            again.get_message(timeout=5)
    finally:
        again.close()


def test_a_minority_owner_fails_the_check(redis_cluster: ClusterTopology) -> None:
    """Once the owner is alone in a minority, the check before the pong answers CLUSTERDOWN:
    its pongs no longer count."""
    channel = _channel()
    owner = redis_cluster.owner(key_slot(channel))
    subscriber = ShardSubscriber(_kwargs(redis_cluster, owner), channel + ":epoch")
    try:
        subscriber.subscribe(channel)
        _next(subscriber, "ssubscribe")
        redis_cluster.isolate_minority(owner)
        wait_until(lambda: redis_cluster.cluster_state(owner) == "fail", 10)
        subscriber.ping("1")
        with pytest.raises(ShardLostError, match=r"(?i)down"):
            subscriber.get_message(timeout=5)
    finally:
        subscriber.close()


def test_async_shard_subscriber(redis_cluster: ClusterTopology) -> None:
    """The asyncio flavour: message, pong, and sunsubscribe after a slot move."""
    channel = _channel()
    slot = key_slot(channel)
    owner = redis_cluster.owner(slot)

    async def next_of(subscriber: AsyncShardSubscriber, kind: str) -> dict[str, Any]:
        async def find() -> dict[str, Any]:
            while True:
                message = await subscriber.get_message(timeout=0.1)
                if message is not None and message["type"] == kind:
                    return message

        return await asyncio.wait_for(find(), 5)

    async def main() -> None:
        subscriber = AsyncShardSubscriber(_kwargs(redis_cluster, owner), channel + ":epoch")
        try:
            await subscriber.subscribe(channel)
            await next_of(subscriber, "ssubscribe")
            with redis_cluster.node_client(owner) as client:
                client.execute_command("SPUBLISH", channel, "m1")
            await subscriber.ping("3")
            assert (await next_of(subscriber, "smessage"))["data"] == b"m1"
            assert (await next_of(subscriber, "pong"))["data"] == b"3"
            await asyncio.to_thread(redis_cluster.move_slot, slot)
            await next_of(subscriber, "sunsubscribe")
            await subscriber.ping("4")
            with pytest.raises(ShardLostError):
                await subscriber.get_message(timeout=5)
        finally:
            await subscriber.aclose()

    asyncio.run(main())
