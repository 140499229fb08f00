"""The Redis Pub/Sub backplane for the threaded driver.

A listener thread runs the core's subscription flow (``_core/subscription.py``: subscribe,
resync with the replay log, heartbeat, reconcile) with blocking redis-py calls; the asyncio
backplane (``aioredis.py``) runs the same flow as a task. What this module adds is only I/O:
the two connections, :meth:`RedisBackplane._execute` (one redis-py call per command the flow
yields), the thread, and shutting the subscriber socket down to wake a blocking read on close.

Publishing is one command too (:func:`~nearcache._core.log.publish_command`: the publish
script through the replay log, or plain ``PUBLISH``), run by :func:`execute`, which operator
tools (``nearcache invalidate``) share through :func:`publish_messages`. redis-py's own
retries and silent resubscription are switched off: a lost connection must never go
unnoticed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nearcache._backplane.wire import Wire
from nearcache._cancellation import STOP_GRACE
from nearcache._config import RedisSettings
from nearcache._core.commands import (
    Call,
    Command,
    ConnectionLost,
    Disconnect,
    ErrorReply,
    Pause,
    Ping,
    Pipeline,
    Receive,
    RunScript,
    Subscribe,
)
from nearcache._core.log import Cursor, log_keys, new_epoch, publish_command, published_to
from nearcache._core.subscription import REPLAY_PAGE, Subscription
from nearcache._exceptions import BackplaneError, PublishRefusedError
from nearcache._typing import BackplaneListener, BackplaneState, Clock

if TYPE_CHECKING:
    import asyncio

__all__ = [
    "REPLAY_PAGE",
    "RedisBackplane",
    "RedisBackplaneBase",
    "execute",
    "failure",
    "log_keys",
    "make_client_kwargs",
    "new_epoch",
    "publish_error",
    "publish_messages",
]


def execute(client: Any, scripts: dict[str, Any], command: Call | RunScript | Pipeline) -> Any:
    """Run one command of the command connection with blocking redis-py and return its
    reply (``scripts`` caches the registered scripts by source)."""
    if type(command) is Call:
        return getattr(client, command.method)(*command.args)
    if type(command) is RunScript:
        script = scripts.get(command.source)
        if script is None:
            script = scripts[command.source] = client.register_script(command.source)
        return script(keys=command.keys, args=command.args)
    assert type(command) is Pipeline
    with client.pipeline(transaction=False) as pipe:
        for call in command.calls:
            getattr(pipe, call.method)(*call.args)
        return pipe.execute()


def publish_messages(
    client: redis.Redis,
    channel: str,
    payloads: Sequence[bytes],
    log_length: int,
    scripts: dict[str, Any] | None = None,
) -> int:
    """Publish encoded messages in order, through the replay log unless ``log_length`` is 0,
    in one round trip; return how many subscribers received the last one. Used by the
    backplane and by operator tools, so both write the log the same way."""
    command = publish_command(channel, log_length, payloads)
    return published_to(command, execute(client, {} if scripts is None else scripts, command))


# redis-py turns these replies into their own classes and drops the code from the message;
# the cache needs the code back to tell "no" (NOPERM, OOM) from "not now" (READONLY, ...).
_REPLY_CODES: tuple[tuple[type[Exception], str], ...] = tuple(
    (kind, code)
    for name, code in (
        ("NoPermissionError", "NOPERM"),
        ("OutOfMemoryError", "OOM"),
        ("ReadOnlyError", "READONLY"),
        ("NoScriptError", "NOSCRIPT"),
        ("ExecAbortError", "EXECABORT"),
        ("MasterDownError", "MASTERDOWN"),
        ("TryAgainError", "TRYAGAIN"),
        ("ClusterDownError", "CLUSTERDOWN"),
        ("MovedError", "MOVED"),
        ("AskError", "ASK"),
        ("AuthenticationError", "WRONGPASS"),
    )
    if isinstance(kind := getattr(redis.exceptions, name, None), type)
)


def _reply(exc: redis.RedisError) -> str:
    """Redis's error reply, its code first."""
    code = next((code for kind, code in _REPLY_CODES if isinstance(exc, kind)), None)
    return f"{code} {exc}" if code else str(exc)


def failure(exc: Exception) -> Exception:
    """A redis-py failure as the core's flows see it: :class:`ErrorReply` when Redis answered
    with an error, :class:`ConnectionLost` when it did not answer; anything else as is (a
    bug, which the flow logs)."""
    if isinstance(exc, redis.ResponseError):
        return ErrorReply(f"{type(exc).__name__}: {_reply(exc)}")
    if isinstance(exc, (redis.RedisError, OSError)):
        return ConnectionLost(f"{type(exc).__name__}: {exc}")
    return exc


def publish_error(exc: Exception, channel: str, where: str) -> BackplaneError:
    """The error a failed publish raises: :class:`PublishRefusedError` carrying Redis's
    reply (its code first) when Redis answered with an error or refused the credentials,
    else :class:`BackplaneError`. The cache decides from the reply what a retry may bring."""
    message = f"publish to channel {channel!r} on {where} failed: {exc}"
    if isinstance(exc, (redis.ResponseError, redis.AuthenticationError)):
        return PublishRefusedError(message, reply=_reply(exc))
    return BackplaneError(message)


def make_client_kwargs(settings: RedisSettings) -> dict[str, Any]:
    """redis-py client arguments with redis-py's own retries off (nearcache retries itself,
    and must see every disconnect)."""
    kwargs = settings.redis_kwargs()
    kwargs["retry"] = Retry(NoBackoff(), 0)
    kwargs["health_check_interval"] = 0
    return kwargs


class RedisBackplaneBase:
    """What both Redis backplanes hold and do alike, without I/O: settings, state, the
    cursor, the subscription flow and the publish command. :class:`RedisBackplane` and
    :class:`~nearcache._backplane.aioredis.AsyncRedisBackplane` add the clients, a thread or a
    task, and the execution of each command."""

    def __init__(
        self,
        settings: RedisSettings,
        channel: str,
        *,
        clock: Clock,
        heartbeat: float,
        heartbeat_timeout: float,
        log_length: int,
        reconcile: float,
        connected: threading.Event | asyncio.Event,
        state_lock: AbstractContextManager[Any],
    ) -> None:
        self._settings = settings
        self._channel = channel
        self._clock = clock
        self._heartbeat = heartbeat
        self._heartbeat_timeout = heartbeat_timeout
        self._log_length = log_length
        self._reconcile = reconcile
        self._connected = connected
        self._state_lock = state_lock
        self._state = BackplaneState.IDLE
        self._scripts: dict[str, Any] = {}
        self._pubsub: Any = None
        self._listener: BackplaneListener | None = None
        self._subscription: Subscription | None = None
        self._cursor = Cursor()

    @property
    def channel(self) -> str:
        """The full channel name on the wire."""
        return self._channel

    @property
    def state(self) -> BackplaneState:
        """The current state."""
        return self._state

    @property
    def last_error(self) -> str | None:
        """Why the latest subscription failed, if one did."""
        return None if self._subscription is None else self._subscription.last_error

    def log_position(self) -> tuple[bytes, str] | None:
        """The replay log position this subscriber has applied (``Cursor.position``)."""
        return self._cursor.position()

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

    def _new_subscription(self, listener: BackplaneListener) -> Subscription:
        """The subscription flow this backplane's thread or task will run."""
        self._listener = listener
        self._subscription = Subscription(
            listener,
            channel=self._channel,
            clock=self._clock,
            heartbeat=self._heartbeat,
            heartbeat_timeout=self._heartbeat_timeout,
            connect_timeout=self._settings.connect_timeout,
            log_length=self._log_length,
            reconcile=self._reconcile,
            set_state=self._set_state,
            cursor=self._cursor,
        )
        self._set_state(BackplaneState.CONNECTING)
        return self._subscription

    def _publish_command(self, payloads: Sequence[bytes]) -> RunScript | Call | Pipeline:
        return publish_command(self._channel, self._log_length, payloads)

    def _publish_error(self, exc: Exception) -> BackplaneError:
        return publish_error(exc, self._channel, self._settings.describe())


class RedisBackplane(RedisBackplaneBase):
    """Redis Pub/Sub backplane (blocking; a listener thread per instance).

    Args:
        settings: parsed connection settings.
        channel: the full wire channel name.
        clock: monotonic seconds.
        heartbeat: seconds between pings on the subscriber connection.
        heartbeat_timeout: seconds without a pong before the connection counts as stalled.
        log_length: the replay log's length (0: plain PUBLISH, no log).
        reconcile: seconds between comparisons of the log's tail with this instance.
    """

    _connected: threading.Event

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
        super().__init__(
            settings,
            channel,
            clock=clock,
            heartbeat=heartbeat,
            heartbeat_timeout=heartbeat_timeout,
            log_length=log_length,
            reconcile=reconcile,
            connected=threading.Event(),
            state_lock=threading.Lock(),
        )
        kwargs = make_client_kwargs(settings)
        self._publisher = redis.Redis(**kwargs)
        self._subscriber_client = redis.Redis(**kwargs)
        self._wire = Wire(self._publisher.connection_pool, channel, log_length)
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, listener: BackplaneListener) -> None:
        """Start the listener thread."""
        self._new_subscription(listener)
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
            return self._wire.publish(payloads)
        except (redis.RedisError, OSError) as exc:
            raise self._publish_error(exc) from exc

    @property
    def writable(self) -> bool:
        """Whether :meth:`write_nowait` may be called now: the publishing connection is up,
        on a plain socket, with no request outstanding."""
        return self._wire.ready

    def write_nowait(self, payloads: Sequence[bytes]) -> None:
        """Write the publish of ``payloads`` without blocking, from the caller's thread (after
        checking :attr:`writable`); the sender then calls :meth:`complete`."""
        self._wire.write_nowait(payloads)

    def complete(self) -> int:
        """Finish what :meth:`write_nowait` began and read its reply (in the sender); raises
        as :meth:`publish` does."""
        try:
            return self._wire.complete()
        except (redis.RedisError, OSError) as exc:
            raise self._publish_error(exc) from exc

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
        self._wire.close()
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

    # -- the listener thread: runs the subscription flow ----------------------------------

    def _run(self) -> None:
        assert self._subscription is not None
        flow = self._subscription.run()
        reply: Any = None
        failed: Exception | None = None
        try:
            while not self._closing.is_set():
                command = flow.send(reply) if failed is None else flow.throw(failed)
                reply, failed = None, None
                try:
                    if type(command) is Receive:  # the hot path, inline
                        reply = self._pubsub.get_message(timeout=command.timeout)
                    else:
                        reply = self._execute(command)
                except Exception as exc:
                    failed = failure(exc)
        finally:
            flow.close()
            self._disconnect()

    def _execute(self, command: Command) -> Any:
        kind = type(command)
        if kind is Receive:  # the hot path first
            return self._pubsub.get_message(timeout=command.timeout)  # type: ignore[union-attr]
        if kind is Ping:
            return self._pubsub.ping(command.token)  # type: ignore[union-attr]
        if kind is Subscribe:
            self._disconnect()
            self._pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
            return self._pubsub.subscribe(command.channel)  # type: ignore[union-attr]
        if kind is Disconnect:
            self._disconnect()
            return None
        if kind is Pause:
            self._closing.wait(command.seconds)  # type: ignore[union-attr]
            return None
        return execute(self._publisher, self._scripts, command)  # type: ignore[arg-type]

    def _disconnect(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()
