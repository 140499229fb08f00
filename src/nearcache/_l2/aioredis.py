"""The L2 for the asyncio driver: :mod:`nearcache._l2.redis` on ``redis.asyncio``."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from nearcache._backplane.aioredis import abort_connections
from nearcache._backplane.redis import publish_error
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
from nearcache._l2.redis import l2_client_kwargs
from nearcache._typing import Clock

__all__ = ["AsyncRedisL2"]

_ERRORS = (redis.RedisError, OSError, MessageError, asyncio.TimeoutError)


def _async_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs["retry"] = Retry(NoBackoff(), 0)  # the asyncio flavour of the same policy
    return kwargs


class AsyncRedisL2:
    """L2 reads, fills and the publish script for one :class:`~nearcache.AsyncNearCache`."""

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
        self._timeout = options.l2_timeout
        read_kwargs = _async_kwargs(l2_client_kwargs(settings, options.l2_timeout))
        self._client = aioredis.Redis(**read_kwargs)
        self._publisher = aioredis.Redis(**_async_kwargs(l2_client_kwargs(settings, 1e9)))
        self._read_script = self._client.register_script(l2.READ_SCRIPT)
        self._fill_script = self._client.register_script(l2.FILL_SCRIPT)
        self._release_script = self._client.register_script(l2.RELEASE_SCRIPT)
        self._publish_script = self._publisher.register_script(l2.PUBLISH_SCRIPT)
        self._breaker = Breaker()
        self._closed = False

    async def load(
        self,
        key: Key,
        region: Region,
        factory: Callable[[], Any],
        ttl: float | None,
        is_open: Callable[[], bool],
        reservation: Any = None,
    ) -> Loaded:
        """Run the read path for one missed key: L2, lease, wait, factory, fill (see
        :meth:`nearcache._l2.redis.RedisL2.load`)."""
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
                send = await self._get(key, region)
            elif type(step) is Read:
                send = await self._read(key, region, step.token)
            elif type(step) is Load:
                try:
                    send = factory()
                    if inspect.isawaitable(send):
                        send = await send
                except BaseException as exc:  # handed to the flow: it gives the lease up
                    error = exc
            elif type(step) is Wait:
                if is_open():
                    await asyncio.sleep(step.seconds)
                    send = True
            elif type(step) is Fill:
                send = await self._fill(key, region, step)
            elif type(step) is Release:
                # Shielded: a cancelled load still frees the lease for the next process.
                lease = l2.value_keys(self._channel, region, key)[1]
                await asyncio.shield(self._run(self._release_script, [lease], [step.token]))

    async def _get(self, key: Key, region: Region) -> tuple[bytes | None, int] | None:
        """GET and PTTL in one pipelined round trip (no script: see Sharing.load_flow)."""
        if self._closed or not self._usable() or not self._breaker.available(self._clock()):
            return None
        name = l2.value_keys(self._channel, region, key)[0]
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.get(name)
                pipe.pttl(name)
                record, pttl = await asyncio.wait_for(pipe.execute(), self._timeout)
            if not (record is None or isinstance(record, bytes)) or type(pttl) is not int:
                raise redis.ResponseError(f"unexpected reply to GET/PTTL: {record!r}, {pttl!r}")
        except _ERRORS:
            self._failed()
            return None
        finally:
            if self._closed:  # closed while it ran: close what it may have reopened
                abort_connections(self._client)
        self._breaker.succeeded()
        return record, pttl

    async def _read(self, key: Key, region: Region, token: str) -> l2.ReadResult | None:
        if not self._usable() or not self._breaker.available(self._clock()):
            return None
        keys, args = l2.read_call(self._channel, region, key, token, self._lease_ttl)
        reply = await self._run(self._read_script, keys, args)
        if reply is None:
            return None
        try:
            return l2.parse_read(reply)
        except MessageError:
            self._failed()
            return None

    async def _fill(self, key: Key, region: Region, step: Fill) -> bool | None:
        keys, args = l2.fill_call(
            self._channel, region, key, step.token, step.payload, step.ttl, step.gen, step.rgen
        )
        reply = await self._run(self._fill_script, keys, args)
        return None if reply is None else bool(reply)

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a read-path script within ``l2_timeout``; None (counted) if Redis failed.
        Once closed, None without a command (see :meth:`RedisL2._run`)."""
        if self._closed:
            return None
        try:
            reply = await asyncio.wait_for(script(keys=keys, args=args), self._timeout)
        except _ERRORS:
            self._failed()
            return None
        finally:
            if self._closed:  # closed while it ran: close what it may have reopened
                abort_connections(self._client)
        self._breaker.succeeded()
        return reply

    def _failed(self) -> None:
        self._sharing.stats.l2_errors += 1
        self._breaker.failed(self._clock())

    async def publish(
        self, plans: Sequence[l2.MessagePlan], since: tuple[bytes, str] | None, sender: bytes
    ) -> int:
        """See :meth:`nearcache._l2.redis.RedisL2.publish`."""
        keys, args = l2.publish_call(
            self._channel, self._log_length, sender, since, plans, new_epoch()
        )
        try:
            reply = await self._publish_script(keys=keys, args=args)
        except (redis.RedisError, OSError) as exc:
            raise publish_error(exc, self._channel, self._settings.describe()) from exc
        self._sharing.stats.updates_fell_back += int(reply[3])
        return int(reply[2])

    async def aclose(self) -> None:
        """Release the connections at once: a publish or read blocked on one fails now."""
        self._closed = True
        abort_connections(self._client, self._publisher)
        await self._client.aclose()
        await self._publisher.aclose()
