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

from nearcache._backplane.redis import RedisBackplaneBase, failure, make_client_kwargs
from nearcache._backplane.wire import AsyncWire
from nearcache._cancellation import stop_task, wait_event
from nearcache._config import RedisSettings
from nearcache._core.commands import (
    Call,
    Command,
    Disconnect,
    Pause,
    Ping,
    Pipeline,
    Receive,
    RunScript,
    Subscribe,
)
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
        kwargs = make_client_kwargs(settings)
        self._publisher = aioredis.Redis(**kwargs)
        self._subscriber_client = aioredis.Redis(**kwargs)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._wire = AsyncWire(self._publisher.connection_pool, channel, log_length)

    async def start(self, listener: BackplaneListener) -> None:
        """Start the listener task."""
        self._new_subscription(listener)
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"nearcache-listener:{self._channel}"
        )

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until subscribed or ``timeout`` seconds passed."""
        return await wait_event(self._connected, timeout)

    async def publish(self, payloads: Sequence[bytes]) -> int:
        """Log and publish every payload in one round trip; return the last receiver count."""
        try:
            return await self._wire.publish(payloads)
        except (redis.RedisError, OSError) as exc:
            raise self._publish_error(exc) from exc

    @property
    def writable(self) -> bool:
        """Whether :meth:`write_nowait` may be called now (the publishing connection is up
        with no request outstanding)."""
        return self._wire.ready

    def write_nowait(self, payloads: Sequence[bytes]) -> None:
        """Write the publish of ``payloads`` into the connection's transport, from the
        caller's coroutine without awaiting; the sender task then awaits :meth:`complete`."""
        self._wire.write_nowait(payloads)

    async def complete(self) -> int:
        """Read the reply of what :meth:`write_nowait` wrote; raises as :meth:`publish`."""
        try:
            return await self._wire.complete()
        except (redis.RedisError, OSError) as exc:
            raise self._publish_error(exc) from exc

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
            if pubsub is not None and not self._closing:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    async def _execute(self, command: Command) -> Any:
        kind = type(command)
        if kind is Receive:  # the hot path first
            return await self._pubsub.get_message(timeout=command.timeout)  # type: ignore[union-attr]
        if kind is Ping:
            return await self._pubsub.ping(command.token)  # type: ignore[union-attr]
        if kind is Subscribe:
            await self._disconnect()
            # No wait_for around this (it could lose aclose's cancel): connecting is bounded
            # by the connect timeout and every write and reply by the socket timeout.
            self._pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=False)
            return await self._pubsub.subscribe(command.channel)  # type: ignore[union-attr]
        if kind is Disconnect:
            await self._disconnect()
            return None
        if kind is Pause:
            await asyncio.sleep(command.seconds)  # type: ignore[union-attr]
            return None
        return await aexecute(self._publisher, self._scripts, command)  # type: ignore[arg-type]

    async def _disconnect(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
