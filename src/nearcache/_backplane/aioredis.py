"""The Redis Pub/Sub backplane for the asyncio driver: the ``_redis`` design as tasks.

A listener task owns the subscriber connection, pings on it every ``heartbeat`` seconds, treats
a missing pong as a stall, replays from the log after every new subscription and reconciles
with the log's tail; see the ``_redis`` module for why this proves delivery.

Stopping never trusts one cancel (see ``nearcache._cancellation``): every loop of the listener
checks ``_closing``, :meth:`AsyncRedisBackplane.aclose` cancels until the task is done, and
then aborts every socket, so it returns in bounded time whatever the connections are doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from nearcache._backplane.redis import REPLAY_PAGE
from nearcache._cancellation import stop_task, wait_event
from nearcache._config import RedisSettings
from nearcache._core.heartbeat import Heartbeat, Receiver, StalledError
from nearcache._core.log import (
    EPOCH_SCRIPT,
    PUBLISH_SCRIPT,
    Cursor,
    EntryId,
    log_keys,
    new_epoch,
    parse_entries,
    publish_script_call,
    reconcile,
)
from nearcache._exceptions import BackplaneError
from nearcache._typing import BackplaneListener, BackplaneState, Clock

__all__ = ["AsyncRedisBackplane", "abort_connections"]

log = logging.getLogger("nearcache")
_RECONNECT_MIN = 0.05
_RECONNECT_MAX = 1.0  # below typical staleness bounds: L1 recovers soon after Redis


def abort_connections(*clients: aioredis.Redis) -> None:
    """Close every socket of these clients now, without waiting (see
    ``AsyncRedisBackplane._abort_connections``; the L2's clients use it too)."""
    for client in clients:
        pool = client.connection_pool
        connections = [
            *getattr(pool, "_available_connections", ()),
            *getattr(pool, "_in_use_connections", ()),
        ]
        for connection in connections:
            writer = getattr(connection, "_writer", None)
            if writer is not None:
                writer.transport.abort()
                close = getattr(connection, "_close", None)
                if close is not None:
                    close()  # forget the aborted streams: no "unclosed" warning later


class AsyncRedisBackplane:
    """Redis Pub/Sub backplane for asyncio (a listener task per instance)."""

    def __init__(
        self,
        settings: RedisSettings,
        channel: str,
        *,
        clock: Clock,
        heartbeat: float,
        heartbeat_timeout: float,
        log_length: int = 10_000,
        reconcile: float = 5.0,
    ) -> None:
        self._settings = settings
        self._channel = channel
        self._clock = clock
        self._heartbeat = heartbeat
        self._heartbeat_timeout = heartbeat_timeout
        kwargs = settings.redis_kwargs()
        kwargs["retry"] = Retry(NoBackoff(), 0)
        kwargs["health_check_interval"] = 0
        self._publisher = aioredis.Redis(**kwargs)
        self._subscriber_client = aioredis.Redis(**kwargs)
        self._state = BackplaneState.IDLE
        self._connected: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._listener: BackplaneListener | None = None
        self._closing = False
        self._log_length = log_length
        self._reconcile = reconcile
        self._log_key, self._epoch_key = log_keys(channel)
        self._publish_script = self._publisher.register_script(PUBLISH_SCRIPT)
        self._epoch_script = self._publisher.register_script(EPOCH_SCRIPT)
        self._cursor = Cursor()
        self.last_error: str | None = None

    @property
    def channel(self) -> str:
        """The full channel name on the wire."""
        return self._channel

    @property
    def state(self) -> BackplaneState:
        """The current state."""
        return self._state

    def _set_state(self, state: BackplaneState, reason: str | None = None) -> None:
        if self._state is BackplaneState.CLOSED or self._state is state:
            return
        self._state = state
        assert self._connected is not None
        if state is BackplaneState.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
        if self._listener is not None:
            self._listener.on_state(state, reason)

    async def start(self, listener: BackplaneListener) -> None:
        """Start the listener task."""
        self._listener = listener
        self._connected = asyncio.Event()
        self._set_state(BackplaneState.CONNECTING)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"nearcache-listener:{self._channel}"
        )

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until subscribed or ``timeout`` seconds passed."""
        assert self._connected is not None
        return await wait_event(self._connected, timeout)

    async def publish(self, payloads: Sequence[bytes]) -> int:
        """Log and publish every payload in one round trip; return the last receiver count."""
        try:
            if self._log_length:
                keys, args = publish_script_call(self._channel, self._log_length, payloads)
                return int((await self._publish_script(keys=keys, args=args))[2])
            if len(payloads) == 1:
                return int(await self._publisher.publish(self._channel, payloads[0]))
            async with self._publisher.pipeline(transaction=False) as pipe:
                for payload in payloads:
                    pipe.publish(self._channel, payload)
                counts = await pipe.execute()
            return int(counts[-1]) if counts else 0
        except (redis.RedisError, OSError) as exc:
            raise BackplaneError(
                f"publish to channel {self._channel!r} on {self._settings.describe()} failed: {exc}"
            ) from exc

    def log_position(self) -> tuple[bytes, str] | None:
        """The replay log position this subscriber has applied (``Cursor.position``)."""
        return self._cursor.position()

    async def aclose(self) -> None:
        """Stop the listener task and close both connections, within ``2 * STOP_GRACE``
        seconds whatever they are doing.

        If this call is cancelled, every socket is aborted before the cancel propagates, and
        the listener task, which sees ``_closing``, ends on its own within a loop iteration.
        """
        try:
            self._closing = True
            task = self._task
            if task is not None and not await stop_task(task):
                # It ignored every cancel for STOP_GRACE seconds (it sits in a read whose
                # cancel was lost): cut its sockets so that read fails and it sees _closing.
                self._abort_connections()
                await stop_task(task)
        finally:
            self._state = BackplaneState.CLOSED
            self._abort_connections()
        # The sockets are already closed: this only settles redis-py's own bookkeeping.
        await self._publisher.aclose()
        await self._subscriber_client.aclose()

    def _abort_connections(self) -> None:
        """Close every socket of both clients now, without waiting (safe when cancelled).

        redis-py has no public way to do this: its ``aclose`` waits for each socket to flush,
        which a stalled connection never does. So this reaches into its connection pool (the
        attribute names hold from redis-py 5.0 to 8.1, and tests/test_shutdown.py checks with
        CLIENT LIST that no connection is left); with another layout it does nothing, and the
        ``aclose`` calls after it close the connections the ordinary way.
        """
        abort_connections(self._publisher, self._subscriber_client)

    def _check_closing(self) -> None:
        """Stop the listener task, as a delivered cancel would, once ``aclose`` began."""
        if self._closing:
            raise asyncio.CancelledError

    async def _run(self) -> None:
        delay = _RECONNECT_MIN
        listener = self._listener
        assert listener is not None
        while True:
            self._check_closing()
            pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=False)
            try:
                as_of = await self._subscribe(pubsub)
                complete = await self._resync(listener)
                self._check_closing()
                listener.on_subscribed(as_of, complete)
                self._set_state(BackplaneState.CONNECTED)
                delay = _RECONNECT_MIN
                await self._listen(pubsub, listener)
            except Exception as exc:  # any failure ends this subscription, never the listener
                self._check_closing()  # the failure is aclose cutting the socket: just stop
                if not isinstance(exc, (redis.RedisError, OSError, StalledError, ValueError)):
                    log.exception("nearcache: unexpected error in the listener; resubscribing")
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._set_state(BackplaneState.DISCONNECTED, self.last_error)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            # Full jitter keeps a fleet that lost Redis together from reconnecting in lockstep.
            await asyncio.sleep(random.uniform(_RECONNECT_MIN, delay))
            delay = min(delay * 2, _RECONNECT_MAX)

    async def _subscribe(self, pubsub: Any) -> float:
        sent = self._clock()
        timeout = self._settings.connect_timeout
        # No wait_for around this (it could lose aclose's cancel): connecting is bounded by
        # the connect timeout and every write and reply by the socket timeout.
        await pubsub.subscribe(self._channel)
        deadline = sent + timeout
        while True:
            self._check_closing()
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise StalledError(f"no subscribe confirmation within {timeout}s")
            message = await pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "subscribe":
                return sent

    async def _resync(self, listener: BackplaneListener) -> bool:
        """After subscribing: replay from the log what was missed (see ``_redis``)."""
        if not self._log_length:
            return False
        epoch = await self._epoch_script(keys=[self._epoch_key], args=[new_epoch()])
        cursor = self._cursor
        entries = None
        if cursor.last is not None and cursor.epoch == epoch:
            entries = await self._read_log(cursor.last)
        server = await self._server_id()
        replay = cursor.plan(epoch, entries, server)
        if replay is None:
            tail = parse_entries(await self._publisher.xrevrange(self._log_key, count=1))
            cursor.reset(epoch, tail[0][0] if tail else None, server)
            return False
        for message in replay:
            listener.on_message(message)
        return True

    async def _server_id(self) -> str | None:
        """Redis's run id (it changes on every restart), or None if INFO is not allowed."""
        try:
            info = await self._publisher.info("server")
        except redis.ResponseError:
            return None
        run_id = info.get("run_id")
        return str(run_id) if run_id else None

    async def _read_log(self, start: EntryId) -> list[tuple[EntryId, bytes]] | None:
        """The log's entries from ``start`` (inclusive) to its end, or None if too many."""
        entries: list[tuple[EntryId, bytes]] = []
        low = str(start)
        while True:
            self._check_closing()
            page = parse_entries(
                await self._publisher.xrange(self._log_key, min=low, count=REPLAY_PAGE)
            )
            entries.extend(page)
            if len(page) < REPLAY_PAGE:
                return entries
            if len(entries) > self._log_length * 2:
                return None
            low = "(" + str(entries[-1][0])

    async def _log_tail(self) -> tuple[bytes, EntryId | None]:
        async with self._publisher.pipeline(transaction=False) as pipe:
            pipe.get(self._epoch_key)
            pipe.xrevrange(self._log_key, count=1)
            epoch, tail = await pipe.execute()
        entries = parse_entries(tail)
        return epoch or b"", entries[0][0] if entries else None

    async def _reconcile_now(
        self, tail: tuple[bytes, EntryId | None], listener: BackplaneListener
    ) -> None:
        entries: list[tuple[EntryId, bytes]] | None = None
        if tail[1] is not None and self._cursor.last is not None and tail[1] > self._cursor.last:
            entries = await self._read_log(self._cursor.last)
        replay = reconcile(self._cursor, tail, lambda _start: entries)
        if replay is None:
            listener.on_loss("reconciliation: the log holds messages this instance never got")
            return
        for message in replay:
            listener.on_message(message)

    async def _listen(self, pubsub: Any, listener: BackplaneListener) -> None:
        heartbeat = Heartbeat(self._heartbeat, self._heartbeat_timeout, self._clock())
        receiver = Receiver(listener, self._cursor, heartbeat)
        next_reconcile = self._clock() + self._reconcile
        checking: tuple[bytes, EntryId | None] | None = None
        while True:
            self._check_closing()
            now = self._clock()
            token = heartbeat.due(now)
            if token is not None:
                if self._log_length and checking is None and now >= next_reconcile:
                    checking = await self._log_tail()
                    next_reconcile = now + self._reconcile
                await pubsub.ping(token)
            message = await pubsub.get_message(timeout=heartbeat.wait(now))
            if message is not None and receiver.handle(message) and checking is not None:
                await self._reconcile_now(checking, listener)
                checking = None
