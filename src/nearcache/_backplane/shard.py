"""A sharded Pub/Sub subscription on one Redis Cluster node whose pongs prove ownership.

redis-py's ``ClusterPubSub`` is not used: when the channel's slot migrates, the server pushes
``sunsubscribe`` and redis-py 8.1 silently stops receiving (0 of 79 messages after a reshard
here), and its ``ping()`` is routed by the token's slot, not to the shard connection. This is
a plain connection to the slot's primary, speaking RESP3 so that any command may be sent on it
while subscribed.

Every heartbeat sends ``EXISTS <the channel's epoch key>`` and then ``PING <token>``. Replies
come in order with the pushed messages, so the pong proves, as for a standalone server, that
everything published on this node before the ping has arrived; the ``EXISTS`` just before it
proves that the node still served the channel's slot with ``cluster_state:ok`` then (a node
that lost the slot answers ``MOVED``, a migrating one ``ASK``, a minority ``CLUSTERDOWN``).
Such an error, and the ``sunsubscribe`` pushed when the slot moves, end the subscription like a
stall: the backplane locates the slot's owner again and resubscribes there.

The objects look like the redis-py ``PubSub`` the backplanes already drive: ``subscribe``,
``ping``, ``get_message`` (dicts with ``type`` / ``channel`` / ``data``), ``close``, and a
``connection`` with the socket to shut down when interrupted.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from typing import Any

import redis
import redis.asyncio

__all__ = ["AsyncShardSubscriber", "ShardLostError", "ShardSubscriber", "aclose_own"]

_CHECK = "check"
_PONG = "pong"


class ShardLostError(redis.ConnectionError):
    """The node no longer serves the channel's slot (or the cluster is down there)."""


def _push(reply: list[Any]) -> dict[str, Any]:
    kind = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    return {
        "type": kind,
        "pattern": None,
        "channel": reply[1] if len(reply) > 1 else None,
        "data": reply[2] if len(reply) > 2 else None,
    }


def _lost(exc: redis.ResponseError) -> ShardLostError:
    return ShardLostError(f"the node no longer serves the channel's slot: {exc}")


class _Replies:
    """Which reply comes next (a check or a pong), and what it means."""

    def __init__(self) -> None:
        self.pending: deque[str] = deque()

    def handle(self, reply: Any) -> dict[str, Any] | None:
        if isinstance(reply, list):
            return _push(reply)  # no command sent here has an array reply
        if not self.pending:
            return None
        if self.pending.popleft() == _PONG:
            return {"type": "pong", "pattern": None, "channel": None, "data": reply}
        return None  # the ownership check passed (its errors are raised by the parser)


class ShardSubscriber:
    """Sharded subscription on one node (threaded); see the module docstring.

    Args:
        client_kwargs: redis-py client arguments for the node (TLS, credentials, timeouts).
        check_key: a key in the channel's slot (its replay-log epoch key).
    """

    def __init__(self, client_kwargs: dict[str, Any], check_key: str) -> None:
        self.client = redis.Redis(**{**client_kwargs, "protocol": 3})
        self._check_key = check_key
        self._replies = _Replies()
        self.connection: Any = None

    def _conn(self) -> Any:
        if self.connection is None:
            self.connection = self.client.connection_pool.get_connection()
        return self.connection

    def subscribe(self, channel: str) -> None:
        """Send ``SSUBSCRIBE``; its confirmation comes through :meth:`get_message`."""
        self._conn().send_command("SSUBSCRIBE", channel)

    def ping(self, token: str) -> None:
        """Send the ownership check and a ``PING`` carrying ``token``."""
        conn = self._conn()
        conn.send_packed_command(conn.pack_commands([("EXISTS", self._check_key), ("PING", token)]))
        self._replies.pending.extend((_CHECK, _PONG))

    def get_message(self, timeout: float = 0.0) -> dict[str, Any] | None:
        """The next push or pong within ``timeout`` seconds, or None."""
        conn = self._conn()
        if not conn.can_read(timeout=timeout):
            return None
        try:
            reply = conn.read_response(push_request=True)
        except redis.ResponseError as exc:
            raise _lost(exc) from exc
        return self._replies.handle(reply)

    def close(self) -> None:
        """Close the connection."""
        connection, self.connection = self.connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.disconnect()
        self.client.close()


class AsyncShardSubscriber:
    """The asyncio flavour of :class:`ShardSubscriber` (``aclose`` instead of ``close``)."""

    def __init__(self, client_kwargs: dict[str, Any], check_key: str) -> None:
        self.client = redis.asyncio.Redis(**{**client_kwargs, "protocol": 3})
        self._check_key = check_key
        self._replies = _Replies()
        self.connection: Any = None

    async def _conn(self) -> Any:
        if self.connection is None:
            pool = self.client.connection_pool
            self.connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        return self.connection

    async def subscribe(self, channel: str) -> None:
        """See :meth:`ShardSubscriber.subscribe`."""
        await (await self._conn()).send_command("SSUBSCRIBE", channel)

    async def ping(self, token: str) -> None:
        """See :meth:`ShardSubscriber.ping`."""
        conn = await self._conn()
        await conn.send_packed_command(
            conn.pack_commands([("EXISTS", self._check_key), ("PING", token)])
        )
        self._replies.pending.extend((_CHECK, _PONG))

    async def get_message(self, timeout: float | None = 0.0) -> dict[str, Any] | None:
        """See :meth:`ShardSubscriber.get_message` (``None`` waits without limit)."""
        conn = await self._conn()
        try:
            reply = await conn.read_response(
                timeout=math.inf if timeout is None else max(timeout, 0.0), push_request=True
            )
        except redis.ResponseError as exc:
            raise _lost(exc) from exc
        if reply is None:
            return None  # the wait ran out (no reply sent here is ever nil)
        return self._replies.handle(reply)

    async def aclose(self) -> None:
        """Close the connection."""
        connection, self.connection = self.connection, None
        await aclose_own(connection, self.client)


async def aclose_own(connection: Any, client: redis.asyncio.Redis) -> None:
    """Close a subscriber's connection and its own client, whatever fails."""
    if connection is not None:
        with contextlib.suppress(Exception):
            await connection.disconnect()
    with contextlib.suppress(Exception):
        await client.aclose()
