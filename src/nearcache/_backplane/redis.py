"""The Redis Pub/Sub backplane for the threaded driver.

One listener thread owns the subscriber connection. It subscribes, then pings the server on
that same connection every ``heartbeat`` seconds: Redis answers a PING in order with the
messages it pushed before, so a pong proves that every message published before the PING was
sent has been received (``on_confirmed``). A pong that does not come within
``heartbeat_timeout`` means a silent stall: the connection is dropped and a new one subscribed.

Publishing goes through the replay log (``_log``): one Lua script appends each message to a
capped stream and publishes it. After every new subscription the listener reads the log from
its cursor and replays what it missed, so L1 survives a reconnect; only when the log cannot
cover the gap (trimmed past the cursor, new epoch) is L1 dropped. Every ``reconcile`` seconds
the listener also compares the log's tail with its cursor, so a message lost while the
subscription stayed up is found without waiting for a later one. redis-py's own retries and
silent resubscription are switched off: a lost connection must never go unnoticed.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nearcache._cancellation import STOP_GRACE
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

__all__ = ["RedisBackplane", "log_keys", "make_client_kwargs", "new_epoch", "publish_messages"]

log = logging.getLogger("nearcache")
_RECONNECT_MIN = 0.05
_RECONNECT_MAX = 1.0  # below typical staleness bounds: L1 recovers soon after Redis
REPLAY_PAGE = 1000


def publish_messages(
    client: redis.Redis,
    channel: str,
    payloads: Sequence[bytes],
    log_length: int,
    script: Any = None,
) -> int:
    """Publish encoded messages in order, through the replay log unless ``log_length`` is 0,
    in one round trip; return how many subscribers received the last one. Used by the
    backplane and by operator tools, so both write the log the same way."""
    if log_length:
        if script is None:
            script = client.register_script(PUBLISH_SCRIPT)
        keys, args = publish_script_call(channel, log_length, payloads)
        return int(script(keys=keys, args=args)[2])
    if len(payloads) == 1:
        return int(client.publish(channel, payloads[0]))
    with client.pipeline(transaction=False) as pipe:
        for payload in payloads:
            pipe.publish(channel, payload)
        counts = pipe.execute()
    return int(counts[-1]) if counts else 0


def make_client_kwargs(settings: RedisSettings) -> dict[str, Any]:
    """redis-py client arguments with redis-py's own retries off (nearcache retries itself,
    and must see every disconnect)."""
    kwargs = settings.redis_kwargs()
    kwargs["retry"] = Retry(NoBackoff(), 0)
    kwargs["health_check_interval"] = 0
    return kwargs


class RedisBackplane:
    """Redis Pub/Sub backplane (blocking; a listener thread per instance).

    Args:
        settings: parsed connection settings.
        channel: the full wire channel name.
        clock: monotonic seconds.
        heartbeat: seconds between pings on the subscriber connection.
        heartbeat_timeout: seconds without a pong before the connection counts as stalled.
    """

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
        kwargs = make_client_kwargs(settings)
        self._publisher = redis.Redis(**kwargs)
        self._subscriber_client = redis.Redis(**kwargs)
        self._state = BackplaneState.IDLE
        self._state_lock = threading.Lock()
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._pubsub: Any = None
        self._thread: threading.Thread | None = None
        self._listener: BackplaneListener | None = None
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
        with self._state_lock:
            if self._state is BackplaneState.CLOSED or self._state is state:
                return
            self._state = state
        if state is BackplaneState.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
        if self._listener is not None:
            self._listener.on_state(state, reason)

    def start(self, listener: BackplaneListener) -> None:
        """Start the listener thread."""
        self._listener = listener
        self._set_state(BackplaneState.CONNECTING)
        self._thread = threading.Thread(
            target=self._run, name=f"nearcache-listener:{self._channel}", daemon=True
        )
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Block until subscribed or ``timeout`` seconds passed."""
        return self._connected.wait(timeout)

    def publish(self, payloads: Sequence[bytes]) -> int:
        """Log and publish every payload in one round trip; return the last receiver count."""
        try:
            return publish_messages(
                self._publisher, self._channel, payloads, self._log_length, self._publish_script
            )
        except (redis.RedisError, OSError) as exc:
            raise BackplaneError(
                f"publish to channel {self._channel!r} on {self._settings.describe()} failed: {exc}"
            ) from exc

    def log_position(self) -> tuple[bytes, str] | None:
        """The replay log position this subscriber has applied (``Cursor.position``)."""
        return self._cursor.position()

    def close(self) -> None:
        """Stop the listener thread and close the connections."""
        self._closing.set()
        thread = self._thread
        deadline = time.monotonic() + 2 * STOP_GRACE
        while True:
            # Again and again: a connection being opened when the first interrupt came had
            # no socket to shut down yet (the threaded twin of a lost cancel).
            self._interrupt()
            if thread is None or thread is threading.current_thread() or not thread.is_alive():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            thread.join(timeout=min(0.02, remaining))
        self._set_state(BackplaneState.CLOSED)
        with self._state_lock:
            self._state = BackplaneState.CLOSED
        self._publisher.close()
        self._subscriber_client.close()

    def _interrupt(self) -> None:
        """Wake the listener out of a blocking read by shutting its socket down.

        The pubsub only holds its connection once connected; one still in its handshake is
        found in the subscriber client's pool (redis-py's private attribute, with a default:
        without it, the listener still stops, after its socket timeout).
        """
        pubsub = self._pubsub
        pool = self._subscriber_client.connection_pool
        try:
            in_use = list(getattr(pool, "_in_use_connections", ()))
        except RuntimeError:  # the set changed while copied: close() interrupts again
            in_use = []
        for connection in [getattr(pubsub, "connection", None), *in_use]:
            sock = getattr(connection, "_sock", None)
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    # -- the listener thread ------------------------------------------------------------------

    def _run(self) -> None:
        delay = _RECONNECT_MIN
        listener = self._listener
        assert listener is not None
        while not self._closing.is_set():
            pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
            self._pubsub = pubsub
            try:
                as_of = self._subscribe(pubsub)
                listener.on_subscribed(as_of, self._resync(listener))
                self._set_state(BackplaneState.CONNECTED)
                delay = _RECONNECT_MIN
                self._listen(pubsub, listener)
            except Exception as exc:  # any failure ends this subscription, never the listener
                if self._closing.is_set():
                    break
                if not isinstance(exc, (redis.RedisError, OSError, StalledError, ValueError)):
                    log.exception("nearcache: unexpected error in the listener; resubscribing")
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._set_state(BackplaneState.DISCONNECTED, self.last_error)
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    pubsub.close()
            # Full jitter keeps a fleet that lost Redis together from reconnecting in lockstep.
            self._closing.wait(random.uniform(_RECONNECT_MIN, delay))
            delay = min(delay * 2, _RECONNECT_MAX)

    def _subscribe(self, pubsub: Any) -> float:
        """Subscribe and wait for Redis to confirm; return when the SUBSCRIBE was sent."""
        sent = self._clock()
        pubsub.subscribe(self._channel)
        deadline = sent + self._settings.connect_timeout
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise StalledError(
                    f"no subscribe confirmation within {self._settings.connect_timeout}s"
                )
            message = pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "subscribe":
                return sent

    # -- the replay log -------------------------------------------------------------------

    def _resync(self, listener: BackplaneListener) -> bool:
        """After subscribing: replay from the log what was missed. Return whether that made
        L1 whole (False: the cache must drop it, and the cursor restarts at the log's end)."""
        if not self._log_length:
            return False
        client = self._publisher
        epoch = self._epoch_script(keys=[self._epoch_key], args=[new_epoch()])
        entries = None
        cursor = self._cursor
        if cursor.last is not None and cursor.epoch == epoch:
            entries = self._read_log(cursor.last)
        server = self._server_id()
        replay = cursor.plan(epoch, entries, server)
        if replay is None:
            tail = parse_entries(client.xrevrange(self._log_key, count=1))
            cursor.reset(epoch, tail[0][0] if tail else None, server)
            return False
        for message in replay:
            listener.on_message(message)
        return True

    def _server_id(self) -> str | None:
        """Redis's run id (it changes on every restart), or None if INFO is not allowed."""
        try:
            info = self._publisher.info("server")
        except redis.ResponseError:
            return None
        run_id = info.get("run_id")
        return str(run_id) if run_id else None

    def _read_log(self, start: EntryId) -> list[tuple[EntryId, bytes]] | None:
        """The log's entries from ``start`` (inclusive) to its end, or None if too many."""
        entries: list[tuple[EntryId, bytes]] = []
        low = str(start)
        while True:
            page = parse_entries(self._publisher.xrange(self._log_key, min=low, count=REPLAY_PAGE))
            entries.extend(page)
            if len(page) < REPLAY_PAGE:
                return entries
            if len(entries) > self._log_length * 2:
                return None
            low = "(" + str(entries[-1][0])

    def _log_tail(self) -> tuple[bytes, EntryId | None]:
        """The log's epoch and last entry id, read on the command connection."""
        with self._publisher.pipeline(transaction=False) as pipe:
            pipe.get(self._epoch_key)
            pipe.xrevrange(self._log_key, count=1)
            epoch, tail = pipe.execute()
        entries = parse_entries(tail)
        return epoch or b"", entries[0][0] if entries else None

    def _reconcile_now(
        self, tail: tuple[bytes, EntryId | None], listener: BackplaneListener
    ) -> None:
        """A pong proved that everything published before the tail was read has arrived: if
        the cursor is still behind the tail, messages were lost on a live subscription."""
        replay = reconcile(self._cursor, tail, self._read_log)
        if replay is None:
            listener.on_loss("reconciliation: the log holds messages this instance never got")
            return
        for message in replay:
            listener.on_message(message)

    def _listen(self, pubsub: Any, listener: BackplaneListener) -> None:
        heartbeat = Heartbeat(self._heartbeat, self._heartbeat_timeout, self._clock())
        receiver = Receiver(listener, self._cursor, heartbeat)
        next_reconcile = self._clock() + self._reconcile
        checking: tuple[bytes, EntryId | None] | None = None
        while not self._closing.is_set():
            now = self._clock()
            token = heartbeat.due(now)
            if token is not None:
                if self._log_length and checking is None and now >= next_reconcile:
                    checking = self._log_tail()
                    next_reconcile = now + self._reconcile
                pubsub.ping(token)
            message = pubsub.get_message(timeout=heartbeat.wait(now))
            if message is not None and receiver.handle(message) and checking is not None:
                self._reconcile_now(checking, listener)
                checking = None
