"""The Redis Pub/Sub backplane for the asyncio driver (same protocol as ``_redis``).

A listener task owns the subscriber connection, pings on it every ``heartbeat`` seconds and
treats a missing pong as a stall; see the ``_redis`` module for why this proves delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from nearcache._config import RedisSettings
from nearcache._exceptions import BackplaneError
from nearcache._heartbeat import Heartbeat, StalledError, dispatch
from nearcache._typing import BackplaneListener, BackplaneState, Clock

__all__ = ["AsyncRedisBackplane"]

_RECONNECT_MIN = 0.05
_RECONNECT_MAX = 2.0


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
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def publish(self, payloads: Sequence[bytes]) -> int:
        """PUBLISH every payload in one pipelined round trip; return the last receiver count."""
        try:
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

    async def aclose(self) -> None:
        """Stop the listener task and close the connections."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._state = BackplaneState.CLOSED
        await self._publisher.aclose()
        await self._subscriber_client.aclose()

    async def _run(self) -> None:
        delay = _RECONNECT_MIN
        listener = self._listener
        assert listener is not None
        while not self._closing:
            pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=False)
            try:
                as_of = await self._subscribe(pubsub)
                listener.on_subscribed(as_of)
                self._set_state(BackplaneState.CONNECTED)
                delay = _RECONNECT_MIN
                await self._listen(pubsub, listener)
            except (redis.RedisError, OSError, StalledError, ValueError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._set_state(BackplaneState.DISCONNECTED, self.last_error)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.shield(pubsub.aclose())  # type: ignore[no-untyped-call]
            await asyncio.sleep(random.uniform(_RECONNECT_MIN, delay))
            delay = min(delay * 2, _RECONNECT_MAX)

    async def _subscribe(self, pubsub: Any) -> float:
        sent = self._clock()
        timeout = self._settings.connect_timeout
        try:
            await asyncio.wait_for(pubsub.subscribe(self._channel), timeout)
        except asyncio.TimeoutError:
            raise StalledError(f"could not subscribe within {timeout}s") from None
        deadline = sent + timeout
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise StalledError(f"no subscribe confirmation within {timeout}s")
            message = await pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "subscribe":
                return sent

    async def _listen(self, pubsub: Any, listener: BackplaneListener) -> None:
        heartbeat = Heartbeat(self._heartbeat, self._heartbeat_timeout, self._clock())
        while True:
            now = self._clock()
            token = heartbeat.due(now)
            if token is not None:
                await pubsub.ping(token)
            message = await pubsub.get_message(timeout=heartbeat.wait(now))
            if message is not None:
                dispatch(message, heartbeat, listener)
