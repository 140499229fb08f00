"""The Redis Pub/Sub backplane for the asyncio driver: the core's subscription flow as a task.

A listener task runs ``_core/subscription.py`` (subscribe, resync with the replay log,
heartbeat, reconcile; see there for why a pong proves delivery) with awaited redis-py calls,
exactly as the threaded backplane (``redis.py``) runs it on a thread. What this module adds is
only I/O: :meth:`AsyncRedisBackplane._execute`, the task, and stopping it.

Stopping never trusts one cancel (see ``nearcache._cancellation``): the task checks
``_closing`` before every command and after every reply, :meth:`AsyncRedisBackplane.aclose`
cancels until the task is done, and then aborts every socket, so it returns in bounded time
whatever the connections are doing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis

from nearcache._backplane import plainsub
from nearcache._backplane.cluster import alocate, node_kwargs
from nearcache._backplane.redis import RedisBackplaneBase, failure
from nearcache._backplane.sentinel import AsyncSentinelResolver
from nearcache._backplane.shard import AsyncShardSubscriber
from nearcache._backplane.wire import AsyncWire
from nearcache._cancellation import stop_task, wait_event
from nearcache._config import Endpoint, RedisSettings
from nearcache._core.commands import (
    AskSentinels,
    Call,
    Command,
    ConfirmPrimary,
    Disconnect,
    Locate,
    Pause,
    Ping,
    Pipeline,
    Receive,
    RunScript,
    Subscribe,
)
from nearcache._core.log import log_keys
from nearcache._core.topology import Placement
from nearcache._exceptions import BackplaneUnavailableError, ConfigurationError
from nearcache._typing import BackplaneListener, BackplaneState, Clock

__all__ = ["AsyncRedisBackplane", "abort_connections", "aexecute"]


async def aexecute(
    client: Any, scripts: dict[str, Any], command: Call | RunScript | Pipeline
) -> Any:
    """:func:`nearcache._backplane.redis.execute` with redis.asyncio."""
    if type(command) is Call:
        return await getattr(client, command.method)(*command.args)
    if type(command) is RunScript:
        script = scripts.get(command.source)
        if script is None:
            script = scripts[command.source] = client.register_script(command.source)
        return await script(keys=command.keys, args=command.args)
    assert type(command) is Pipeline
    async with client.pipeline(transaction=False) as pipe:
        for call in command.calls:
            getattr(pipe, call.method)(*call.args)
        return await pipe.execute()


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


class AsyncRedisBackplane(RedisBackplaneBase):
    """Redis Pub/Sub backplane for asyncio (a listener task per instance); the arguments are
    :class:`~nearcache._backplane.redis.RedisBackplane`'s."""

    _connected: asyncio.Event

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
            connected=asyncio.Event(),
            state_lock=contextlib.nullcontext(),  # one loop: nothing to lock
        )
        self._sentinels = (
            AsyncSentinelResolver(settings, clock=clock) if settings.sentinel else None
        )
        # Clients of the node the publisher, and the subscription, use now (None: not yet
        # located).
        self._publisher: aioredis.Redis | None = None
        self._subscriber_client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._settled = asyncio.Event()  # subscribed, or the start failed
        self._wire: AsyncWire | None = None  # the publishing connection
        self._wire_placement: Placement | None = None  # where the wire connects
        self._written: Placement | None = None  # where a caller's write_nowait went

    async def start(self, listener: BackplaneListener) -> None:
        """Start the listener task (and, with Sentinel, the ``+switch-master`` watch)."""
        self._new_subscription(listener)
        if self._sentinels is not None:
            self._sentinels.watch(self._on_switch)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"nearcache-listener:{self._channel}"
        )

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until subscribed, or until the start failed (``start_failure``), or
        ``timeout`` seconds passed; return whether subscribed."""
        await wait_event(self._settled, timeout)
        return self._connected.is_set()

    def _set_state(self, state: BackplaneState, reason: str | None = None) -> None:
        super()._set_state(state, reason)
        if state is BackplaneState.CONNECTED:
            self._settled.set()

    def _start_failed(self, exc: Exception) -> None:
        super()._start_failed(exc)
        self._settled.set()

    def _on_switch(self, new: Endpoint) -> None:
        """``+switch-master``: leave the old primary now (see the threaded backplane)."""
        placement = self._placement
        if placement is not None and placement.endpoint != new:
            self._publish_placement = None
            pubsub = self._pubsub
            connection = getattr(pubsub, "connection", None)
            writer = getattr(connection, "_writer", None)
            if writer is not None:
                writer.transport.abort()  # the listener's read fails: it resubscribes

    async def publish(self, payloads: Sequence[bytes]) -> int:
        """Log and publish every payload in one round trip on the node in charge of the
        channel; return the last receiver count."""
        try:
            wire, placement = await self._publish_wire()
            receivers = await wire.publish(payloads)
            await self._confirm_published(placement)
        except (redis.RedisError, OSError, BackplaneUnavailableError, ConfigurationError) as exc:
            self._publish_placement = None
            raise self._publish_error(exc) from exc
        return receivers

    @property
    def writable(self) -> bool:
        """Whether :meth:`write_nowait` may be called now (the publishing connection is up
        with no request outstanding, on the node still in charge)."""
        wire = self._wire
        return wire is not None and self._publish_placement is not None and wire.ready

    def write_nowait(self, payloads: Sequence[bytes]) -> None:
        """Write the publish of ``payloads`` into the connection's transport, from the
        caller's coroutine without awaiting; the sender task then awaits :meth:`complete`."""
        assert self._wire is not None
        self._written = self._publish_placement
        self._wire.write_nowait(payloads)

    @property
    def appendable(self) -> bool:
        """Whether :meth:`write_more_nowait` may be called now (callers wrote the requests
        outstanding, and not too many: :attr:`AsyncWire.appendable`)."""
        wire = self._wire
        return wire is not None and self._publish_placement is not None and wire.appendable

    def write_more_nowait(self, payloads: Sequence[bytes]) -> None:
        """Write the publish of ``payloads`` behind what callers wrote before and is not yet
        answered; the sender task's :meth:`complete` reads every reply."""
        assert self._wire is not None
        self._wire.write_more_nowait(payloads)

    async def complete(self) -> int:
        """Read the replies of what :meth:`write_nowait` (and :meth:`write_more_nowait`)
        wrote; raises as :meth:`publish`."""
        try:
            assert self._wire is not None
            receivers = await self._wire.complete()
            await self._confirm_published(self._written)
        except (redis.RedisError, OSError, BackplaneUnavailableError, ConfigurationError) as exc:
            self._publish_placement = None
            raise self._publish_error(exc) from exc
        return receivers

    async def _publish_wire(self) -> tuple[AsyncWire, Placement]:
        """The publishing connection on the node in charge (see the threaded backplane)."""
        placement = self._publish_placement
        if placement is not None and self._wire is not None:
            return self._wire, placement
        placement = await alocate(self._settings, self._channel, self._sentinels)
        if self._wire is None or not placement.same_wire(self._wire_placement):
            old_wire, old_client = self._wire, self._publisher
            self._publisher = self._new_client(placement)
            self._wire = AsyncWire(
                self._publisher.connection_pool,
                placement.channel,
                self._log_length,
                placement.sharded,
            )
            if old_wire is not None:
                with contextlib.suppress(Exception):
                    await old_wire.aclose()
            await self._retire(old_client)
        self._wire_placement = self._publish_placement = placement
        return self._wire, placement

    async def _confirm_published(self, placement: Placement | None) -> None:
        """See :meth:`RedisBackplane._confirm_published`."""
        if placement is None or placement.claim is None or self._sentinels is None:
            return
        acknowledged = self._clock()
        timeout = self._settings.sync_timeout
        if not await self._sentinels.confirm(placement.claim, acknowledged, timeout):
            self._publish_placement = None
            raise self._moved(placement)

    def _new_client(self, placement: Placement) -> aioredis.Redis:
        return aioredis.Redis(**node_kwargs(self._settings, placement.endpoint))

    async def _retire(self, client: aioredis.Redis | None) -> None:
        """Close a client of a node no longer used: its sockets are aborted first, so a
        stalled one cannot hold this up."""
        if client is not None:
            abort_connections(client)
            with contextlib.suppress(Exception):
                await client.aclose()

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
            self._settled.set()
            self._abort_connections()
        if self._sentinels is not None:
            await self._sentinels.aclose()
        # The sockets are already closed: this only settles redis-py's own bookkeeping.
        for client in self._clients():
            with contextlib.suppress(Exception):
                await client.aclose()

    def _clients(self) -> list[aioredis.Redis]:
        shard = getattr(self._pubsub, "client", None)
        clients = [self._publisher, self._subscriber_client, shard]
        return [client for client in clients if client is not None]

    def _abort_connections(self) -> None:
        """Close every socket of both clients now, without waiting (safe when cancelled).

        redis-py has no public way to do this: its ``aclose`` waits for each socket to flush,
        which a stalled connection never does. So this reaches into its connection pool (the
        attribute names hold from redis-py 5.0 to 8.1, and tests/test_shutdown.py checks with
        CLIENT LIST that no connection is left); with another layout it does nothing, and the
        ``aclose`` calls after it close the connections the ordinary way.
        """
        abort_connections(*self._clients())

    def _check_closing(self) -> None:
        """Stop the listener task, as a delivered cancel would, once ``aclose`` began."""
        if self._closing:
            raise asyncio.CancelledError

    async def _run(self) -> None:
        assert self._subscription is not None
        flow = self._subscription.run()
        reply: Any = None
        failed: Exception | None = None
        try:
            while True:
                self._check_closing()
                command = flow.send(reply) if failed is None else flow.throw(failed)
                reply, failed = None, None
                self._check_closing()
                try:
                    if type(command) is Receive:  # the hot path, inline
                        reply = await self._pubsub.get_message(timeout=command.timeout)
                    else:
                        reply = await self._execute(command)
                except Exception as exc:
                    self._check_closing()  # the failure is aclose cutting the socket: just stop
                    failed = failure(exc)
        finally:
            flow.close()
            pubsub, self._pubsub = self._pubsub, None
            shard = getattr(pubsub, "client", None)  # a shard or plain subscriber's own client
            if shard is not None:
                abort_connections(shard)
            if pubsub is not None and not self._closing:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _execute(self, command: Command) -> Any:
        kind = type(command)
        if kind is Receive:  # the hot path first
            return await self._pubsub.get_message(timeout=command.timeout)  # type: ignore[union-attr]
        if kind is Ping:
            return await self._pubsub.ping(command.token)  # type: ignore[union-attr]
        if kind is AskSentinels:
            if self._sentinels is not None:
                self._sentinels.ask()
            return None
        if kind is Subscribe:
            await self._disconnect()
            placement = self._placement
            assert placement is not None and self._subscriber_client is not None
            # No wait_for around this (it could lose aclose's cancel): connecting is bounded
            # by the connect timeout and every write and reply by the socket timeout.
            if placement.sharded:
                _, epoch_key = log_keys(placement.channel)
                kwargs = node_kwargs(self._settings, placement.endpoint)
                self._pubsub = AsyncShardSubscriber(kwargs, epoch_key)
            elif plainsub.usable(self._subscriber_client):
                kwargs = node_kwargs(self._settings, placement.endpoint)
                self._pubsub = plainsub.AsyncPlainSubscriber(kwargs)
            else:
                self._pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=False)
            return await self._pubsub.subscribe(command.channel)  # type: ignore[union-attr]
        if kind is Disconnect:
            await self._disconnect()
            return None
        if kind is Pause:
            await asyncio.sleep(command.seconds)  # type: ignore[union-attr]
            return None
        if kind is Locate:
            return await self._locate_subscription()
        if kind is ConfirmPrimary:
            placement = self._placement
            if self._sentinels is None or placement is None or placement.claim is None:
                return True
            return await self._sentinels.confirm(placement.claim, command.after, command.timeout)  # type: ignore[union-attr]
        return await aexecute(self._subscriber_client, self._scripts, command)  # type: ignore[arg-type]

    async def _locate_subscription(self) -> Placement:
        """Find the node in charge and point the subscriber's command client at it."""
        try:
            placement = await alocate(self._settings, self._channel, self._sentinels)
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
            await self._retire(old)
            self._scripts = {}
        self._placement = placement
        return placement

    async def _disconnect(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        shard = getattr(pubsub, "client", None)  # a shard or plain subscriber's own client
        if shard is not None:
            abort_connections(shard)  # before any await: a cancel may land there
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
