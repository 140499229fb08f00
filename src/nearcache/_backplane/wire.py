"""The publishing connection: a batch written from the caller's thread, its reply read by the
sender.

Handing every batch to the sender thread (or task) before it reaches the socket costs a thread
switch, 80-180 µs with the GIL, on every invalidation's way to the other instances. When no
batch is in flight, the caller that queued an invalidation writes the batch itself, without
waiting: :meth:`Wire.write_nowait` is one non-blocking ``send`` of the request's bytes (the
socket is non-blocking at the OS level; what does not fit in its buffer is kept for the
sender). The sender then finishes the write if needed and reads the reply
(:meth:`Wire.complete`), without the cache's lock. The caller never blocks on Redis: a full
socket buffer leaves bytes for the sender, a dead connection fails only the sender's read,
and a caller never connects (only the sender does, in :meth:`Wire.publish`).

The threaded driver writes only when no batch is in flight, so at most one request is
outstanding on its connection. The asyncio driver lets callers write a few more behind it
(:class:`AsyncWire`), which join the batch in flight: a failure of any of them retries them
all in order, so a ``NOSCRIPT`` never lets a later batch overtake an earlier one for good (a
receiver that saw the later one first takes the earlier one for a gap, and repairs).
The publish script is loaded (``SCRIPT LOAD``) on every new connection before its first
``EVALSHA``.
Any failure drops the connection; the sender's retry reconnects and sends the batch again with
the same sequence numbers (a receiver applies an invalidation twice harmlessly).

TLS connections keep the sender-only path (an ``SSLSocket`` has no non-blocking write that
leaves a partial record to finish later).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from nearcache._core.log import (
    PUBLISH_SCRIPT,
    REFRESH_EVERY,
    SHARDED_PUBLISH_SCRIPT,
    log_keys,
    new_epoch,
)

__all__ = ["MAX_WRITTEN", "AsyncWire", "Requests", "Wire", "evalsha", "request"]


def _script(source: str) -> tuple[bytes, bytes]:
    """The script's SHA-1 (Redis names scripts by it) and its ``SCRIPT LOAD`` request."""
    script = source.encode()
    sha = hashlib.sha1(script).hexdigest().encode()  # noqa: S324
    return sha, b"*3\r\n$6\r\nSCRIPT\r\n$4\r\nLOAD\r\n$%d\r\n%s\r\n" % (len(script), script)


# (SHA, SCRIPT LOAD) of the publish script, by whether the channel is a cluster shard channel.
_SCRIPTS = {False: _script(PUBLISH_SCRIPT), True: _script(SHARDED_PUBLISH_SCRIPT)}


# Requests a caller may have written on the asyncio publishing connection before the sender
# reads their replies (AsyncWire.write_more_nowait): a burst of writes on the event loop goes
# out at once, and past these a batch waits for the replies, as one large one then.
MAX_WRITTEN = 4


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class Requests:
    """One channel's publish requests (RESP bytes) and how many replies each gets: one
    ``EVALSHA`` of the publish script (the keys and arguments of
    :func:`~nearcache._core.log.publish_script_call`), or one ``PUBLISH`` per message without
    the log; the ``SPUBLISH`` forms when ``sharded`` (a Redis Cluster shard channel).

    Everything but the epoch candidate, the refresh flag and the messages is the same in every
    request, so it is encoded once (building it per request cost more than the rest of the
    caller's write). The script is asked to refresh the keys' expiry on the first request and
    then once every :data:`~nearcache._core.log.REFRESH_EVERY` seconds. The epoch candidate is
    kept until a reply shows that it became the epoch, or until :meth:`lost` (a request whose
    reply never came may have used it): a candidate never creates an epoch twice, so a
    publisher that finds the epoch missing again always makes a new one, which subscribers
    see as a change. ``clock``: monotonic seconds (the refresh's schedule)."""

    def __init__(
        self,
        channel: str,
        log_length: int,
        sharded: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        name = channel.encode()
        self._log_length = log_length
        self._clock = clock
        self._publish = (b"*3\r\n$8\r\nSPUBLISH\r\n" if sharded else b"*3\r\n$7\r\nPUBLISH\r\n") + (
            _bulk(name)
        )
        self._sha = _SCRIPTS[sharded][0]
        log_key, epoch_key = (k.encode() for k in log_keys(channel))
        self._keys = _bulk(log_key) + _bulk(epoch_key) + _bulk(name) + _bulk(b"%d" % log_length)
        self._refreshed: float | None = None  # when a request last asked for a refresh
        self.candidate, self._text = b"", ""
        self._one = b""  # the fixed part of a one-message request (with the candidate)
        self._new_candidate()

    def build(self, payloads: Sequence[bytes]) -> tuple[bytes, int]:
        """The request publishing ``payloads`` in order, and how many replies it gets."""
        if not self._log_length:
            head = self._publish
            return b"".join([head + _bulk(p) for p in payloads]), len(payloads)
        now = self._clock()
        refreshed = self._refreshed
        if refreshed is None or now - refreshed >= REFRESH_EVERY:
            self._refreshed, flag = now, b"$1\r\n1\r\n"
        else:
            flag = b"$1\r\n0\r\n"
        if len(payloads) == 1:
            payload = payloads[0]
            return b"%s%s$%d\r\n%s\r\n" % (self._one, flag, len(payload), payload), 1
        parts = [self._fixed(len(payloads)), flag]
        parts.extend(_bulk(p) for p in payloads)
        return b"".join(parts), 1

    def answered(self, replies: list[Any]) -> None:
        """The replies of the last request were read: a candidate that became the epoch is
        used up."""
        last = replies[-1] if self._log_length and replies else None
        if isinstance(last, list) and last and last[0] in (self.candidate, self._text):
            self._new_candidate()

    def renew(self) -> None:
        """Carry a new candidate from the next request on (the one before it may still create
        the epoch with the current one)."""
        self._new_candidate()

    def lost(self) -> None:
        """The connection dropped: what its last request did is unknown (it may have created
        the epoch, or been refused), and a new connection may reach a server that lost the
        keys, so the next request refreshes and carries a new candidate."""
        self._refreshed = None
        self._new_candidate()

    def _new_candidate(self) -> None:
        self._text = new_epoch()  # a client decoding replies returns the epoch as text
        self.candidate = self._text.encode()
        self._one = self._fixed(1)

    def _fixed(self, count: int) -> bytes:
        return b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n2\r\n%s%s" % (
            9 + count,
            self._sha,
            self._keys,
            _bulk(self.candidate),
        )


def request(
    channel: str, log_length: int, payloads: Sequence[bytes], sharded: bool = False
) -> tuple[bytes, int]:
    """A one-off :meth:`Requests.build` (a fresh candidate, the expiry refreshed)."""
    return Requests(channel, log_length, sharded).build(payloads)


def evalsha(sha: bytes, keys: Sequence[str], args: Sequence[str | bytes | int]) -> bytes:
    """The RESP bytes of ``EVALSHA sha len(keys) *keys *args`` (the L2's publish script)."""
    parts = [b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n" % (3 + len(keys) + len(args), sha)]
    parts.append(_bulk(b"%d" % len(keys)))
    parts.extend(_bulk(k.encode()) for k in keys)
    parts.extend(
        _bulk(
            arg.encode() if isinstance(arg, str) else b"%d" % arg if isinstance(arg, int) else arg
        )
        for arg in args
    )
    return b"".join(parts)


def _receivers(replies: list[Any], log_length: int) -> int:
    """Subscribers that received the last message (the script's third field, or the last
    PUBLISH's count)."""
    if not replies:
        return 0
    last = replies[-1]
    return int(last[2]) if log_length else int(last)


class Wire:
    """The threaded driver's publishing connection (see the module docstring).

    ``pool``: the redis-py connection pool to take the connection from (and to give it back to
    on :meth:`close`). ``script``: another script to load on every new connection (the L2's
    publish script, whose requests its owner builds: :meth:`write_request_nowait`,
    :meth:`publish_request`; the replies are then in :attr:`replies`). ``clock``: see
    :class:`Requests`."""

    def __init__(
        self,
        pool: Any,
        channel: str,
        log_length: int,
        sharded: bool = False,
        script: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._channel = channel
        self._log_length = log_length
        self._sharded = sharded
        self._script = _script(script) if script is not None else _SCRIPTS[sharded]
        self.sha = self._script[0]
        self._requests = Requests(channel, log_length, sharded, clock)
        self.replies: list[Any] = []
        self._conn: Any = None
        self._loaded = False  # the script was loaded on this connection
        self._ready = False  # connected, plain socket, nothing outstanding: a caller may write
        self._unsent = b""  # what a caller's write left in the sender's hands
        self._expected = 0  # replies the outstanding request gets
        self._failed: OSError | None = None  # a caller's write failed: the sender reports it

    @property
    def ready(self) -> bool:
        """Whether a caller may write now (:meth:`write_nowait`)."""
        return self._ready

    def write_nowait(self, payloads: Sequence[bytes]) -> None:
        """Write the request publishing ``payloads`` without blocking (callers hold the
        driver's lock and checked :attr:`ready`); the sender then calls :meth:`complete`."""
        self.write_request_nowait(*self._requests.build(payloads))

    def write_request_nowait(self, data: bytes, expected: int) -> None:
        """:meth:`write_nowait` of a request built by the owner, which gets ``expected``
        replies."""
        self._expected = expected
        self._ready = False
        sock = self._conn._sock
        try:
            if sock is None:  # closed under the driver (close() is under way)
                raise ConnectionError("the publishing connection is closed")
            if sock.gettimeout() is None:  # a blocking socket: this one call must not block
                sent = sock.send(data, socket.MSG_DONTWAIT)
            else:  # a timeout makes the socket non-blocking at the OS level
                sent = os.write(sock.fileno(), data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._failed, sent = exc, len(data)
        self._unsent = data[sent:]

    def complete(self) -> int:
        """In the sender, without the lock: finish the caller's write, read its reply; return
        how many subscribers received the last message. Raises redis-py's errors (the
        connection is then dropped)."""
        try:
            if self._failed is not None:
                failed, self._failed = self._failed, None
                raise redis.ConnectionError(f"writing the publish failed: {failed}")
            if self._unsent:
                unsent, self._unsent = self._unsent, b""
                self._conn.send_packed_command([unsent], check_health=False)
            return self._read()
        except BaseException:
            self._drop()
            raise

    def publish(self, payloads: Sequence[bytes]) -> int:
        """In the sender: connect if needed, write the request and read its reply."""
        return self.publish_request(*self._requests.build(payloads))

    def publish_request(self, data: bytes, expected: int) -> int:
        """:meth:`publish` of a request built by the owner."""
        try:
            conn = self._connect()
            self._expected = expected
            self._ready = False
            conn.send_packed_command([data], check_health=False)
            return self._read()
        except BaseException:
            self._drop()
            raise

    def _connect(self) -> Any:
        conn = self._conn
        if conn is None:
            conn = self._conn = self._pool.get_connection()
        if conn._sock is None:
            conn.connect()
            self._loaded = False
        if not self._loaded and self._log_length:
            conn.send_packed_command([self._script[1]], check_health=False)
            conn.read_response()
            self._loaded = True
        return conn

    def _read(self) -> int:
        conn = self._conn
        replies = self.replies = [conn.read_response() for _ in range(self._expected)]
        self._expected = 0
        self._requests.answered(replies)
        # Only a plain socket lets a caller write without blocking (see the module docstring).
        self._ready = not isinstance(conn._sock, ssl.SSLSocket)
        return _receivers(replies, self._log_length)

    def _drop(self) -> None:
        self._ready, self._unsent, self._expected, self._loaded = False, b"", 0, False
        self._requests.lost()
        if self._conn is not None:
            self._conn.disconnect()

    def close(self) -> None:
        """Shut the connection down (a read blocked in the sender fails at once)."""
        self._ready = False
        conn, self._conn = self._conn, None
        if conn is not None:
            sock = getattr(conn, "_sock", None)
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            conn.disconnect()
            self._pool.release(conn)


class AsyncWire:
    """The asyncio driver's publishing connection: the caller's ``set`` writes into the
    transport (which never blocks: it buffers what the socket does not take), the sender task
    reads the reply.

    Unlike the threaded :class:`Wire`, a caller may also write behind a request still
    unanswered (:meth:`write_more_nowait`, up to :data:`MAX_WRITTEN` requests): on the event
    loop nothing runs between the sender's reads but at its awaits, so the count of replies
    to read can grow while the sender reads them, and every reply still matches its request
    (Redis answers a connection's requests in order). The sender reads them all before it
    returns, and the driver commits, retries or drops the requests as one batch. A failed
    reply (a ``NOSCRIPT``, a dropped connection) drops the connection with every later
    request unread, and the retry sends them all again, in order, with their sequence
    numbers."""

    def __init__(
        self,
        pool: Any,
        channel: str,
        log_length: int,
        sharded: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._channel = channel
        self._log_length = log_length
        self._sharded = sharded
        self._conn: Any = None
        self._loaded = False
        self._ready = False
        self._expected = 0
        self._written = 0  # requests written by callers whose replies are not all read
        self._requests = Requests(channel, log_length, sharded, clock)

    @property
    def ready(self) -> bool:
        """Whether a caller may write now (:meth:`write_nowait`)."""
        return self._ready

    @property
    def appendable(self) -> bool:
        """Whether a caller may write behind the requests outstanding
        (:meth:`write_more_nowait`): callers wrote them, and fewer than :data:`MAX_WRITTEN`."""
        return 0 < self._written < MAX_WRITTEN and self._conn._writer is not None

    def write_nowait(self, payloads: Sequence[bytes]) -> None:
        """Write the request into the transport (see :meth:`Wire.write_nowait`)."""
        data, self._expected = self._requests.build(payloads)
        self._ready = False
        writer = self._conn._writer
        if writer is not None:  # None: aborted under the driver; the sender's read fails
            writer.write(data)  # a lost connection shows in the sender's read too
            self._written = 1

    def write_more_nowait(self, payloads: Sequence[bytes]) -> None:
        """Write the request publishing ``payloads`` behind those outstanding (callers checked
        :attr:`appendable`); the sender's :meth:`complete` reads its replies too.

        It carries a new epoch candidate: if the request ahead created the epoch and the keys
        were lost before this one ran, this one makes a new epoch rather than the same one
        again (see :class:`Requests`)."""
        requests = self._requests
        if self._log_length:
            requests.renew()
        data, expected = requests.build(payloads)
        self._expected += expected
        self._written += 1
        self._conn._writer.write(data)

    async def complete(self) -> int:
        """In the sender task: read the reply of the caller's write (see
        :meth:`Wire.complete`)."""
        try:
            return await self._read()
        except BaseException:
            await self._drop()
            raise

    async def publish(self, payloads: Sequence[bytes]) -> int:
        """In the sender task: connect if needed, write the request and read its reply."""
        try:
            conn = await self._connect()
            data, self._expected = self._requests.build(payloads)
            self._ready = False
            await conn.send_packed_command([data], check_health=False)
            return await self._read()
        except BaseException:
            await self._drop()
            raise

    async def _connect(self) -> Any:
        conn = self._conn
        if conn is None:
            conn = self._conn = await self._pool.get_connection()
        if getattr(conn, "_writer", None) is None:
            await conn.connect()
            self._loaded = False
        if not self._loaded and self._log_length:
            await conn.send_packed_command([_SCRIPTS[self._sharded][1]], check_health=False)
            await conn.read_response()
            self._loaded = True
        return conn

    async def _read(self) -> int:
        conn = self._conn
        replies = []
        while self._expected:  # callers may write more meanwhile: read their replies too
            replies.append(await conn.read_response())
            self._expected -= 1
        self._written = 0
        self._requests.answered(replies)
        self._ready = conn._writer is not None
        return _receivers(replies, self._log_length)

    async def _drop(self) -> None:
        self._ready, self._expected, self._written, self._loaded = False, 0, 0, False
        self._requests.lost()
        if self._conn is not None:
            await self._conn.disconnect(nowait=True)

    async def aclose(self) -> None:
        """Disconnect and give the connection back to the pool."""
        self._ready, self._expected, self._written, self._loaded = False, 0, 0, False
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.disconnect(nowait=True)
            await self._pool.release(conn)
