"""The L2 for the threaded driver: runs the core's read path (``Sharing.load_flow``) and the
L2-aware publish script on its own Redis connections.

Every read-path command has the short ``l2_timeout``; after a failure L2 is skipped for a
while (``Breaker``), so a Redis that is down costs one timeout, not one per miss. Publishing
keeps the connection string's timeouts: it is the outbox's delivery, retried until it works.

An L2 hit whose generations are known here is a plain ``GET`` + ``PTTL`` (:class:`PlainReads`):
one pipelined request on a connection of its own, parsed with hiredis, about a third of a
redis-py command's client time and a tenth of the read script's time in Redis.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

try:
    import hiredis
except ImportError:  # pragma: no cover - redis[hiredis] brings it; redis-py parses otherwise
    hiredis = None  # type: ignore[assignment]

from nearcache._backplane.redis import make_client_kwargs, publish_error
from nearcache._backplane.wire import Wire, evalsha
from nearcache._config import RedisSettings
from nearcache._core import l2
from nearcache._core.codec import Key, Region
from nearcache._core.log import new_epoch
from nearcache._core.sharing import (
    Breaker,
    Fill,
    Get,
    Load,
    Loaded,
    Read,
    Release,
    Sharing,
    Wait,
    lookup,
)
from nearcache._exceptions import MessageError
from nearcache._typing import Clock

__all__ = ["PlainReads", "RedisL2", "l2_client_kwargs"]

_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError, MessageError)
if hiredis is not None:
    _ERRORS += (hiredis.HiredisError,)


def l2_client_kwargs(settings: RedisSettings, timeout: float) -> dict[str, Any]:
    """Client arguments for the read path: the connection string's, with ``timeout`` as the
    command and connect timeout (never longer than the string's own)."""
    kwargs = make_client_kwargs(settings)
    kwargs["socket_timeout"] = min(timeout, kwargs.get("socket_timeout") or timeout)
    kwargs["socket_connect_timeout"] = min(timeout, kwargs.get("socket_connect_timeout") or timeout)
    return kwargs


class PlainReads:
    """``GET`` and ``PTTL`` of one key, pipelined, on connections taken from ``pool`` and kept
    (a list used as a lock-free stack: each thread takes one, or opens another). The reply is
    parsed by a hiredis reader of its own, past redis-py's per-command machinery. Any failure
    drops the connection; the pool's disconnect (the client's close) closes the kept ones."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._idle: list[tuple[Any, Any]] = []
        self.closed = False

    def get(self, name: str) -> tuple[bytes | None, int]:
        """The record stored under ``name`` (None if there is none) and its PTTL in ms."""
        try:
            conn, reader = self._idle.pop()
        except IndexError:
            conn = self._pool.get_connection()
            reader = hiredis.Reader() if hiredis is not None else None
        kept = False
        try:
            raw = name.encode()
            request = b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n*2\r\n$4\r\nPTTL\r\n$%d\r\n%s\r\n" % (
                len(raw), raw, len(raw), raw,
            )  # fmt: skip
            sock = conn._sock
            if sock is None:
                raise redis.ConnectionError("the L2 connection is closed")
            if reader is None:  # pragma: no cover - without hiredis
                conn.send_packed_command([request], check_health=False)
                record, pttl = conn.read_response(), conn.read_response()
            else:
                sock.sendall(request)
                record = reader.gets()
                while record is False:
                    _feed(sock, reader)
                    record = reader.gets()
                pttl = reader.gets()
                while pttl is False:
                    _feed(sock, reader)
                    pttl = reader.gets()
            if not (record is None or isinstance(record, bytes)) or type(pttl) is not int:
                raise redis.ResponseError(f"unexpected reply to GET/PTTL: {record!r}, {pttl!r}")
            kept = not self.closed
            return record, pttl
        finally:
            if kept:
                self._idle.append((conn, reader))
            else:  # failed, or closed meanwhile: nothing may stay open
                conn.disconnect()
                self._pool.release(conn)


def _feed(sock: Any, reader: Any) -> None:
    data = sock.recv(65536)
    if not data:
        raise redis.ConnectionError("the L2 connection was closed by the server")
    reader.feed(data)


class RedisL2:
    """L2 reads, fills and the publish script for one :class:`~nearcache.NearCache`."""

    def __init__(
        self,
        settings: RedisSettings,
        channel: str,
        sharing: Sharing,
        *,
        clock: Clock,
        log_length: int,
        usable: Callable[[], bool],
    ) -> None:
        self._settings = settings
        self._channel = channel
        self._sharing = sharing
        self._clock = clock
        self._log_length = log_length
        self._usable = usable
        options = sharing.options
        # Reads go through L2 only with l2=True (propagate="update" alone only publishes here).
        self.reads = sharing.l2
        self._lease_ttl = options.l2_lease_ttl
        self._client = redis.Redis(**l2_client_kwargs(settings, options.l2_timeout))
        self._publisher = redis.Redis(**make_client_kwargs(settings))
        self._plain = PlainReads(self._client.connection_pool)
        self._read_script = self._client.register_script(l2.READ_SCRIPT)
        self._fill_script = self._client.register_script(l2.FILL_SCRIPT)
        self._release_script = self._client.register_script(l2.RELEASE_SCRIPT)
        # Publishing: a Wire of its own (one connection, the script loaded on it), so that a
        # caller can write a batch itself without blocking, as without the L2.
        self._wire = Wire(
            self._publisher.connection_pool, channel, log_length, script=l2.PUBLISH_SCRIPT
        )
        self._breaker = Breaker()
        self._breaker_lock = threading.Lock()
        self._closed = False

    # -- the read path ----------------------------------------------------------------------

    def load(
        self,
        key: Key,
        region: Region,
        factory: Callable[[], Any],
        ttl: float | None,
        is_open: Callable[[], bool],
        reservation: Any = None,
    ) -> Loaded:
        """Run the read path for one missed key: L2, lease, wait, factory, fill.
        ``reservation``: the load's claim in L1, lowered to what a plain read is current as
        of (see :class:`~nearcache._core.sharing.Get`)."""
        flow = self._sharing.load_flow(
            key,
            region,
            l2.new_token(),
            ttl,
            plain=reservation is not None,
            looking=factory is lookup,
        )
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = flow.send(send) if error is None else flow.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            error = None
            send = None
            if type(step) is Get:
                reservation.started = min(reservation.started, step.as_of)
                send = self._get(key, region)
            elif type(step) is Read:
                send = self._read(key, region, step.token)
            elif type(step) is Load:
                try:
                    send = factory()
                except BaseException as exc:  # handed to the flow: it gives the lease up
                    error = exc
            elif type(step) is Wait:
                if is_open():
                    time.sleep(step.seconds)
                    send = True
            elif type(step) is Fill:
                send = self._fill(key, region, step)
            elif type(step) is Release:
                self._run(self._release_script, [l2.value_keys(self._channel, region, key)[1]], [
                    step.token
                ])  # fmt: skip

    def _get(self, key: Key, region: Region) -> tuple[bytes | None, int] | None:
        if self._closed or not self._usable() or not self._breaker.available(self._clock()):
            return None
        try:
            found = self._plain.get(l2.value_keys(self._channel, region, key)[0])
        except _ERRORS:
            self._failed()
            return None
        self._breaker.succeeded()
        return found

    def _read(self, key: Key, region: Region, token: str) -> l2.ReadResult | None:
        if not self._usable() or not self._breaker.available(self._clock()):
            return None
        keys, args = l2.read_call(self._channel, region, key, token, self._lease_ttl)
        reply = self._run(self._read_script, keys, args)
        if reply is None:
            return None
        try:
            return l2.parse_read(reply)
        except MessageError:
            self._failed()
            return None

    def _fill(self, key: Key, region: Region, step: Fill) -> bool | None:
        keys, args = l2.fill_call(
            self._channel, region, key, step.token, step.payload, step.ttl, step.gen, step.rgen
        )
        reply = self._run(self._fill_script, keys, args)
        return None if reply is None else bool(reply)

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a read-path script; None (counted, breaker opened) if Redis failed. Once
        closed, None without a command: a load that outlived close() (its fill, its lease
        release) must not open a connection that nothing would close."""
        if self._closed:
            return None
        try:
            reply = script(keys=keys, args=args)
        except _ERRORS:
            self._failed()
            return None
        finally:
            if self._closed:  # closed while it ran: close what it may have reopened
                self._client.close()
        self._breaker.succeeded()
        return reply

    def _failed(self) -> None:
        self._sharing.stats.l2_errors += 1
        with self._breaker_lock:
            self._breaker.failed(self._clock())

    # -- the write path ---------------------------------------------------------------------

    def publish(
        self, plans: Sequence[l2.MessagePlan], since: tuple[bytes, str] | None, sender: bytes
    ) -> int:
        """Publish a batch through the L2-aware script (log, channel, L2 and generations in
        one atomic step); return the receivers of the last message. Raises BackplaneError."""
        try:
            self._wire.publish_request(self._request(plans, since, sender), 1)
        except (redis.RedisError, OSError) as exc:
            raise publish_error(exc, self._channel, self._settings.describe()) from exc
        return self._published()

    @property
    def writable(self) -> bool:
        """Whether :meth:`write_nowait` may be called now (see ``_backplane/wire.py``)."""
        return self._wire.ready and not self._closed

    def write_nowait(
        self, plans: Sequence[l2.MessagePlan], since: tuple[bytes, str] | None, sender: bytes
    ) -> None:
        """Write :meth:`publish`'s request without blocking, from the caller's thread (after
        checking :attr:`writable`); the sender then calls :meth:`complete`."""
        self._wire.write_request_nowait(self._request(plans, since, sender), 1)

    def complete(self) -> int:
        """Finish what :meth:`write_nowait` began and read its reply (in the sender); raises
        as :meth:`publish` does."""
        try:
            self._wire.complete()
        except (redis.RedisError, OSError) as exc:
            raise publish_error(exc, self._channel, self._settings.describe()) from exc
        return self._published()

    def _request(
        self, plans: Sequence[l2.MessagePlan], since: tuple[bytes, str] | None, sender: bytes
    ) -> bytes:
        keys, args = l2.publish_call(
            self._channel, self._log_length, sender, since, plans, new_epoch()
        )
        return evalsha(self._wire.sha, keys, args)

    def _published(self) -> int:
        reply = self._wire.replies[-1]
        self._sharing.stats.updates_fell_back += int(reply[3])
        return int(reply[2])

    def close(self) -> None:
        """Release the connections."""
        self._closed = True
        self._plain.closed = True
        self._wire.close()
        self._client.close()
        self._publisher.close()
