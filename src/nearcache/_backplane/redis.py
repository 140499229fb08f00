"""The Redis Pub/Sub backplane for the threaded driver.

A listener thread runs the core's subscription flow (``_core/subscription.py``: locate,
subscribe, resync with the replay log, heartbeat, reconcile) with blocking redis-py calls; the
asyncio backplane (``aioredis.py``) runs the same flow as a task. What this module adds is only
I/O: the connections, :meth:`RedisBackplane._execute` (one redis-py call per command the flow
yields), the thread, and shutting the subscriber socket down to wake a blocking read on close.

The node they talk to is found anew for every subscription and after every failed publish
(``cluster.locate``: a standalone server, the primary a majority of Sentinels names, or the
primary of the channel's slot on a Redis Cluster, where the subscriber is a
``shard.ShardSubscriber``). With Sentinel, a publish counts as delivered only once a majority
of the Sentinels, asked after Redis acknowledged it, still names the primary it went to, and
``+switch-master`` makes both sides leave the old primary at once.

Publishing is one command too (:func:`~nearcache._core.log.publish_command`: the publish
script through the replay log, or plain ``PUBLISH``), run by :func:`execute`, which operator
tools (``nearcache invalidate``) share through :func:`publish_messages`. redis-py's own
retries and silent resubscription are switched off: a lost connection must never go
unnoticed.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nearcache._backplane import plainsub
from nearcache._backplane.cluster import locate, node_kwargs
from nearcache._backplane.sentinel import SentinelResolver
from nearcache._backplane.shard import ShardSubscriber
from nearcache._backplane.wire import Wire
from nearcache._cancellation import STOP_GRACE
from nearcache._config import Endpoint, RedisSettings
from nearcache._core.commands import (
    AskSentinels,
    Call,
    Command,
    ConfirmPrimary,
    ConnectionLost,
    Disconnect,
    ErrorReply,
    Locate,
    Pause,
    Ping,
    Pipeline,
    Receive,
    RunScript,
    Subscribe,
)
from nearcache._core.log import Cursor, log_keys, new_epoch, publish_command, published_to
from nearcache._core.subscription import REPLAY_PAGE, Subscription
from nearcache._core.topology import Placement
from nearcache._exceptions import (
    BackplaneError,
    BackplaneUnavailableError,
    ConfigurationError,
    PublishRefusedError,
)
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

log = logging.getLogger("nearcache")


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
    *,
    sharded: bool = False,
) -> int:
    """Publish encoded messages in order, through the replay log unless ``log_length`` is 0,
    in one round trip (``SPUBLISH`` on a cluster shard when ``sharded``); return how many
    subscribers received the last one. Used by the backplane and by operator tools, so both
    write the log the same way."""
    command = publish_command(channel, log_length, payloads, sharded=sharded)
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
    reply (its code first) when Redis answered with an error or refused the credentials, or
    when the topology cannot work (a :class:`ConfigurationError`), else
    :class:`BackplaneError`. The cache decides from the reply what a retry may bring."""
    message = f"publish to channel {channel!r} on {where} failed: {exc}"
    if isinstance(exc, (redis.ResponseError, redis.AuthenticationError)):
        return PublishRefusedError(message, reply=_reply(exc))
    if isinstance(exc, ConfigurationError):
        return PublishRefusedError(message, reply=f"CONFIG {exc}")
    return BackplaneError(message)


class PrimaryMovedError(BackplaneError):
    """A publish reached a primary that a majority of the Sentinels no longer names: it is
    published again on the new one (receiving it twice is harmless)."""


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
        # Where the subscription and the publisher are (each found again after a failure).
        self._placement: Placement | None = None
        self._publish_placement: Placement | None = None
        # Why starting cannot succeed: a ConfigurationError found on the server, or the
        # connectRetry attempts all failed; the start (abortConnect) raises it at once.
        self.start_failure: Exception | None = None
        self._connected_once = False
        self._failed_attempts = 0
        self._reported: str | None = None

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

    @property
    def placement(self) -> Placement | None:
        """Where the subscription is while it is up (the L2's reads follow it), else None."""
        return self._placement if self._state is BackplaneState.CONNECTED else None

    @property
    def sentinels(self) -> Any:
        """The Sentinel resolver (the L2's publishes share it), or None."""
        return getattr(self, "_sentinels", None)

    def _set_state(self, state: BackplaneState, reason: str | None = None) -> None:
        if state is BackplaneState.CONNECTED:
            self._connected_once = True
        elif state is BackplaneState.DISCONNECTED and not self._connected_once:
            self._failed_attempts += 1
            if self._failed_attempts >= max(1, self._settings.connect_retry):
                self._start_failed(
                    self.start_failure
                    or BackplaneUnavailableError(
                        f"{self._failed_attempts} connection attempts failed ({reason})"
                    )
                )
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

    def _start_failed(self, exc: Exception) -> None:
        """Record why the start cannot succeed and wake whoever waits for it."""
        self.start_failure = exc

    def _topology_error(self, exc: ConfigurationError) -> None:
        """A configuration the server shows cannot work (a Sentinel without serviceName, a
        cluster on Redis < 7, a braced channel on a cluster, ...): fail the start at once,
        log it once, and keep retrying quietly (an operator may change the server)."""
        self._start_failed(exc)
        if self._reported != str(exc):
            self._reported = str(exc)
            log.error("nearcache: channel %r cannot be used: %s", self._channel, exc)

    def _publish_command(
        self, placement: Placement, payloads: Sequence[bytes]
    ) -> RunScript | Call | Pipeline:
        return publish_command(
            placement.channel, self._log_length, payloads, sharded=placement.sharded
        )

    def _publish_error(self, exc: Exception) -> BackplaneError:
        return publish_error(exc, self._channel, self._settings.describe())

    def _moved(self, placement: Placement) -> PrimaryMovedError:
        return PrimaryMovedError(
            f"publish to channel {self._channel!r}: a majority of the Sentinels no longer names "
            f"{placement.endpoint} the primary; publishing again on the new one"
        )


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
        self._sentinels = SentinelResolver(settings, clock=clock) if settings.sentinel else None
        # Clients of the node the publisher, and the subscription, use now (None: not yet
        # located); each with the scripts registered on it.
        self._publisher: redis.Redis | None = None
        self._subscriber_client: redis.Redis | None = None
        self._probes: set[redis.Redis] = set()  # clients asking a node what it is, meanwhile
        self._wire: Wire | None = None  # the publishing connection, on the publisher's node
        self._wire_placement: Placement | None = None  # where the wire connects
        self._written: Placement | None = None  # where a caller's write_nowait went
        self._closing = threading.Event()
        self._settled = threading.Event()  # subscribed, or the start failed
        self._thread: threading.Thread | None = None

    def start(self, listener: BackplaneListener) -> None:
        """Start the listener thread (and, with Sentinel, the ``+switch-master`` watch)."""
        self._new_subscription(listener)
        if self._sentinels is not None:
            self._sentinels.watch(self._on_switch)
        self._thread = threading.Thread(
            target=self._run, name=f"nearcache-listener:{self._channel}", daemon=True
        )
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Block until subscribed, or until the start failed (``start_failure``), or
        ``timeout`` seconds passed; return whether subscribed."""
        self._settled.wait(timeout)
        return self._connected.is_set()

    def _set_state(self, state: BackplaneState, reason: str | None = None) -> None:
        super()._set_state(state, reason)
        if state is BackplaneState.CONNECTED:
            self._settled.set()

    def _start_failed(self, exc: Exception) -> None:
        super()._start_failed(exc)
        self._settled.set()

    def _on_switch(self, new: Endpoint) -> None:
        """``+switch-master`` from a Sentinel: leave the old primary now rather than at the
        next heartbeat (the new placement still needs a majority)."""
        placement = self._placement
        if placement is not None and placement.endpoint != new:
            self._publish_placement = None
            self._interrupt()

    def publish(self, payloads: Sequence[bytes]) -> int:
        """Log and publish every payload in one round trip on the node in charge of the
        channel; return the last receiver count."""
        try:
            wire, placement = self._publish_wire()
            receivers = wire.publish(payloads)
            self._confirm_published(placement)
        except (redis.RedisError, OSError, BackplaneUnavailableError, ConfigurationError) as exc:
            self._publish_failed()
            raise self._publish_error(exc) from exc
        return receivers

    @property
    def writable(self) -> bool:
        """Whether :meth:`write_nowait` may be called now: the publishing connection is up,
        on a plain socket, with no request outstanding, on the node still in charge."""
        wire = self._wire
        return wire is not None and self._publish_placement is not None and wire.ready

    def write_nowait(self, payloads: Sequence[bytes]) -> None:
        """Write the publish of ``payloads`` without blocking, from the caller's thread (after
        checking :attr:`writable`); the sender then calls :meth:`complete`."""
        assert self._wire is not None
        self._written = self._publish_placement
        self._wire.write_nowait(payloads)

    def complete(self) -> int:
        """Finish what :meth:`write_nowait` began and read its reply (in the sender); raises
        as :meth:`publish` does."""
        try:
            assert self._wire is not None
            receivers = self._wire.complete()
            self._confirm_published(self._written)
        except (redis.RedisError, OSError, BackplaneUnavailableError, ConfigurationError) as exc:
            self._publish_failed()
            raise self._publish_error(exc) from exc
        return receivers

    def _publish_wire(self) -> tuple[Wire, Placement]:
        """The publishing connection on the node in charge, located again after a failure or
        a switch; a new node gets a new client and connection."""
        placement = self._publish_placement
        if placement is not None and self._wire is not None:
            return self._wire, placement
        placement = locate(self._settings, self._channel, self._sentinels, self._probes)
        if self._wire is None or not placement.same_wire(self._wire_placement):
            old_wire, old_client = self._wire, self._publisher
            self._publisher = self._new_client(placement)
            self._wire = Wire(
                self._publisher.connection_pool,
                placement.channel,
                self._log_length,
                placement.sharded,
            )
            if old_wire is not None:
                old_wire.close()
            if old_client is not None:
                old_client.close()
        self._wire_placement = self._publish_placement = placement
        return self._wire, placement

    def _confirm_published(self, placement: Placement | None) -> None:
        """With Sentinel, a publish counts as delivered only once a majority of the Sentinels,
        asked after Redis acknowledged it, still names the primary it went to; otherwise it
        is published again (on the new primary: receiving it twice is harmless)."""
        if placement is None or placement.claim is None or self._sentinels is None:
            return
        acknowledged = self._clock()
        timeout = self._settings.sync_timeout
        if not self._sentinels.confirm(placement.claim, acknowledged, timeout):
            self._publish_failed()
            raise self._moved(placement)

    def _publish_failed(self) -> None:
        """Locate the node in charge again before the next publish."""
        self._publish_placement = None

    def _new_client(self, placement: Placement) -> redis.Redis:
        return redis.Redis(**node_kwargs(self._settings, placement.endpoint))

    def close(self) -> None:
        """Stop the listener thread and close the connections."""
        self._closing.set()
        if self._sentinels is not None:
            self._sentinels.close()  # wakes a listener waiting for the Sentinels' answers
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
        self._settled.set()
        self._close_clients()

    def _close_clients(self) -> None:
        if self._wire is not None:
            self._wire.close()
        for client in (self._publisher, self._subscriber_client):
            if client is not None:
                client.close()

    def _interrupt(self) -> None:
        """Wake the listener out of a blocking read by shutting its socket down.

        The pubsub only holds its connection once connected; one still in its handshake is
        found in the subscriber client's pool (redis-py's private attribute, with a default:
        without it, the listener still stops, after its socket timeout).
        """
        pubsub = self._pubsub
        in_use: list[Any] = []
        probes: list[redis.Redis] = []
        with contextlib.suppress(RuntimeError):  # changed while copied: interrupted again
            probes = list(self._probes)
        for client in [self._subscriber_client, getattr(pubsub, "client", None), *probes]:
            pool = getattr(client, "connection_pool", None)
            # RuntimeError: the set changed while copied; close() interrupts again.
            with contextlib.suppress(RuntimeError):
                in_use += list(getattr(pool, "_in_use_connections", ()))
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
            if self._closing.is_set():
                self._close_clients()  # one made while close() was waiting

    def _execute(self, command: Command) -> Any:
        kind = type(command)
        if kind is Receive:  # the hot path first
            return self._pubsub.get_message(timeout=command.timeout)  # type: ignore[union-attr]
        if kind is Ping:
            return self._pubsub.ping(command.token)  # type: ignore[union-attr]
        if kind is AskSentinels:
            if self._sentinels is not None:
                self._sentinels.ask()
            return None
        if kind is Subscribe:
            self._disconnect()
            placement = self._placement
            assert placement is not None and self._subscriber_client is not None
            if placement.sharded:
                _, epoch_key = log_keys(placement.channel)
                kwargs = node_kwargs(self._settings, placement.endpoint)
                self._pubsub = ShardSubscriber(kwargs, epoch_key)
            elif plainsub.usable(self._subscriber_client):
                self._pubsub = plainsub.PlainSubscriber(self._subscriber_client)
            else:
                self._pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
            return self._pubsub.subscribe(command.channel)  # type: ignore[union-attr]
        if kind is Disconnect:
            self._disconnect()
            return None
        if kind is Pause:
            self._closing.wait(command.seconds)  # type: ignore[union-attr]
            return None
        if kind is Locate:
            return self._locate_subscription()
        if kind is ConfirmPrimary:
            placement = self._placement
            if self._sentinels is None or placement is None or placement.claim is None:
                return True
            return self._sentinels.confirm(placement.claim, command.after, command.timeout)  # type: ignore[union-attr]
        return execute(self._subscriber_client, self._scripts, command)  # type: ignore[arg-type]

    def _locate_subscription(self) -> Placement:
        """Find the node in charge and point the subscriber's command client at it."""
        try:
            placement = locate(self._settings, self._channel, self._sentinels, self._probes)
        except ConfigurationError as exc:
            self._topology_error(exc)
            raise redis.ConnectionError(str(exc)) from exc
        except BackplaneUnavailableError as exc:
            raise redis.ConnectionError(str(exc)) from exc
        previous = self._placement
        if (
            self._subscriber_client is None
            or previous is None
            or (previous.endpoint != placement.endpoint)
        ):
            old, self._subscriber_client = self._subscriber_client, self._new_client(placement)
            self._scripts = {}
            if old is not None:
                old.close()
        self._placement = placement
        return placement

    def _disconnect(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()
