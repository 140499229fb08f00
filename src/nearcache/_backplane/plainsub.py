"""The threaded backplane's subscription on a plain TCP (or Unix socket) connection, read
past redis-py's per-message machinery.

redis-py's ``PubSub.get_message`` costs four to six system calls per message on redis-py 8.1
(a ``poll`` for readiness, another ``poll`` and a ``recv(MSG_PEEK)`` to tell a closed socket
from a pending push, then the read) and some eighty Python calls; measured here, the listener
thread spent ~70 us of CPU per message received at 2k messages/s. This subscriber keeps one
``poll`` object registered on the connection's socket and one hiredis reader: a message that
arrives costs a ``poll`` and a ``recv``, and every reply already buffered costs neither.

The connection comes from redis-py (its pool does the connecting, ``HELLO`` or ``AUTH``,
``SELECT`` and client name). Messages and subscription replies are arrays (RESP3 pushes, or
RESP2 replies in subscribed mode), turned into the dicts redis-py's ``PubSub`` returns; the
pong is RESP2's ``pong`` array or, in RESP3, ``PING``'s plain reply (the only command sent
here with a reply that is not a push). TLS connections keep redis-py's ``PubSub``: decrypted
bytes can wait inside the TLS layer, where ``poll`` does not see them.

The object looks like the redis-py ``PubSub`` the backplane drives: ``subscribe``, ``ping``,
``get_message``, ``close``, and a ``connection`` with the socket to shut down when interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import sys
from typing import Any

import redis
import redis.asyncio

from nearcache._backplane.shard import aclose_own

try:
    import hiredis
except ImportError:  # pragma: no cover - redis[hiredis] brings it
    hiredis = None  # type: ignore[assignment]

__all__ = ["AsyncPlainSubscriber", "PlainSubscriber", "usable"]

_KINDS = {
    b"message": "message",
    b"subscribe": "subscribe",
    b"unsubscribe": "unsubscribe",
    b"pong": "pong",
}
_READABLE = select.POLLIN | select.POLLPRI | select.POLLHUP | select.POLLERR


def usable(client: redis.Redis | redis.asyncio.Redis) -> bool:
    """Whether ``client``'s connections can be read by a :class:`PlainSubscriber` (or, for
    a redis.asyncio client, an :class:`AsyncPlainSubscriber`): hiredis is there (and
    ``poll``, for the threaded one), and the connection is plain TCP or a Unix socket."""
    if hiredis is None:
        return False
    pool = client.connection_pool
    if pool.connection_kwargs.get("protocol") not in (None, 2, "2", 3, "3"):
        return False
    if isinstance(client, redis.asyncio.Redis):
        return pool.connection_class in (
            redis.asyncio.Connection,
            redis.asyncio.UnixDomainSocketConnection,
        )
    return hasattr(select, "poll") and pool.connection_class in (
        redis.Connection,
        redis.UnixDomainSocketConnection,
    )


def _command(parts: tuple[str, ...]) -> bytes:
    encoded = [part.encode() for part in parts]
    return b"*%d\r\n" % len(encoded) + b"".join(
        b"$%d\r\n%s\r\n" % (len(part), part) for part in encoded
    )


def _fed(reader: Any, data: bytes) -> dict[str, Any] | None:
    """Feed what the connection delivered to ``reader``; the reply it completes, as a dict,
    or None (part of a reply: the rest comes with the next read)."""
    if not data:
        raise redis.ConnectionError("the subscriber connection was closed")
    reader.feed(data)
    reply = reader.gets()
    return None if reply is False else _message(reply)


def _message(reply: Any) -> dict[str, Any]:
    """A reply on the subscription as the dict redis-py's ``PubSub`` returns."""
    if isinstance(reply, Exception):
        raise redis.ResponseError(str(reply))
    if not isinstance(reply, list):  # RESP3: PING's reply is its token, not a push
        return {"type": "pong", "pattern": None, "channel": None, "data": reply}
    if not reply:
        raise redis.ResponseError("an empty array on the subscription")
    kind = _KINDS.get(reply[0])
    if kind is None:
        kind = reply[0].decode(errors="replace") if isinstance(reply[0], bytes) else "?"
    if kind == "pong":
        return {"type": kind, "pattern": None, "channel": None, "data": reply[1]}
    return {
        "type": kind,
        "pattern": None,
        "channel": reply[1] if len(reply) > 1 else None,
        "data": reply[2] if len(reply) > 2 else None,
    }


class PlainSubscriber:
    """``SUBSCRIBE`` on one connection of ``client``'s pool, read with hiredis directly."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.connection: Any = None
        self._reader = hiredis.Reader(protocolError=redis.exceptions.InvalidResponse)
        self._sock: socket.socket | None = None
        self._poll = select.poll()

    def _socket(self) -> socket.socket:
        sock = self._sock
        if sock is None:
            self.connection = self.client.connection_pool.get_connection()
            sock = self.connection._sock
            if sock is None:  # pragma: no cover - the pool hands out connected connections
                raise redis.ConnectionError("the subscriber connection is closed")
            self._poll.register(sock, _READABLE)
            self._sock = sock
        return sock

    def _send(self, *parts: str) -> None:
        # Through redis-py (bounded by the socket timeout): only SUBSCRIBE and the pings.
        self._socket()
        self.connection.send_packed_command([_command(parts)], check_health=False)

    def subscribe(self, channel: str) -> None:
        """Send ``SUBSCRIBE``; its confirmation comes through :meth:`get_message`."""
        self._send("SUBSCRIBE", channel)

    def ping(self, token: str) -> None:
        """Send ``PING token``; its pong comes through :meth:`get_message`, in order with the
        messages published before it."""
        self._send("PING", token)

    def get_message(self, timeout: float = 0.0) -> dict[str, Any] | None:
        """The next message, subscription reply or pong within ``timeout`` seconds, or None.
        Raises ``redis.ConnectionError`` when the server closed the connection (or it was shut
        down), ``redis.ResponseError`` for an error reply."""
        reader = self._reader
        reply = reader.gets()
        if reply is False:
            sock = self._socket()
            if not self._poll.poll(max(timeout, 0.0) * 1000.0):
                return None
            try:
                data = sock.recv(65536)
            except BlockingIOError:  # readable, then not (spurious wake-up): nothing yet
                return None
            return _fed(reader, data)
        return _message(reply)

    def close(self) -> None:
        """Close the connection."""
        connection, self.connection = self.connection, None
        self._sock = None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.disconnect()
            with contextlib.suppress(Exception):
                self.client.connection_pool.release(connection)


class AsyncPlainSubscriber:
    """The asyncio flavour of :class:`PlainSubscriber`, on a client of its own (made from
    ``client_kwargs``, as the shard subscriber's): it reads the connection's stream and feeds
    its own hiredis reader, past redis.asyncio's per-message machinery."""

    def __init__(self, client_kwargs: dict[str, Any]) -> None:
        self.client = redis.asyncio.Redis(**client_kwargs)
        self.connection: Any = None
        self._reader = hiredis.Reader(protocolError=redis.exceptions.InvalidResponse)

    async def _conn(self) -> Any:
        if self.connection is None:
            pool = self.client.connection_pool
            self.connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        return self.connection

    async def _send(self, *parts: str) -> None:
        # Through redis-py (bounded by the socket timeout): only SUBSCRIBE and the pings.
        conn = await self._conn()
        await conn.send_packed_command([_command(parts)], check_health=False)

    async def subscribe(self, channel: str) -> None:
        """See :meth:`PlainSubscriber.subscribe`."""
        await self._send("SUBSCRIBE", channel)

    async def ping(self, token: str) -> None:
        """See :meth:`PlainSubscriber.ping`."""
        await self._send("PING", token)

    async def get_message(self, timeout: float | None = 0.0) -> dict[str, Any] | None:
        """See :meth:`PlainSubscriber.get_message` (``None`` waits without limit)."""
        reader = self._reader
        reply = reader.gets()
        if reply is False:
            stream = (await self._conn())._reader
            if stream is None:  # pragma: no cover - the pool hands out connected connections
                raise redis.ConnectionError("the subscriber connection is closed")
            try:
                data = await _read(stream, timeout)
            except _WaitRanOut:
                return None
            return _fed(reader, data)
        return _message(reply)

    async def aclose(self) -> None:
        """Close the connection."""
        connection, self.connection = self.connection, None
        await aclose_own(connection, self.client)


class _WaitRanOut(Exception):
    """The wait for the subscription's next bytes ran out (not a failure of the connection,
    whose own timeouts stay errors)."""


if sys.version_info >= (3, 11):

    async def _read(stream: asyncio.StreamReader, timeout: float | None) -> bytes:
        """What the stream has, waiting at most ``timeout`` seconds (_WaitRanOut after)."""
        if timeout is None:
            return await stream.read(65536)
        try:
            async with asyncio.timeout(max(timeout, 0.0)) as wait:
                return await stream.read(65536)
        except TimeoutError:
            if wait.expired():
                raise _WaitRanOut from None
            raise  # the transport's own (ETIMEDOUT): the connection is dead

else:  # pragma: no cover - Python 3.10

    async def _read(stream: asyncio.StreamReader, timeout: float | None) -> bytes:
        """What the stream has, waiting at most ``timeout`` seconds (_WaitRanOut after)."""
        if timeout is None:
            return await stream.read(65536)
        try:
            return await asyncio.wait_for(stream.read(65536), max(timeout, 0.0))
        except asyncio.TimeoutError:  # on 3.10 not the builtin TimeoutError (ETIMEDOUT)
            raise _WaitRanOut from None
