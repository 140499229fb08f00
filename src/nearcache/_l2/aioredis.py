"""The L2 for the asyncio driver: :mod:`nearcache._l2.redis` on ``redis.asyncio``."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from nearcache._backplane.aioredis import AsyncRedisBackplane, abort_connections
from nearcache._backplane.cluster import alocate, node_kwargs
from nearcache._backplane.redis import PrimaryMovedError, publish_error
from nearcache._config import Endpoint, RedisSettings
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
from nearcache._core.topology import Placement
from nearcache._exceptions import (
    BackplaneError,
    BackplaneUnavailableError,
    ConfigurationError,
    MessageError,
)
from nearcache._l2.cluster import AsyncClusterRouter
from nearcache._l2.redis import l2_client_kwargs, reign_of
from nearcache._typing import Clock

__all__ = ["AsyncRedisL2"]

_ERRORS = (redis.RedisError, OSError, MessageError, asyncio.TimeoutError)
_PUBLISH_ERRORS = (redis.RedisError, OSError, BackplaneError, ConfigurationError)


def _async_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs["retry"] = Retry(NoBackoff(), 0)  # the asyncio flavour of the same policy
    return kwargs


class _Node:
    """A client of one node and the scripts registered on it."""

    def __init__(self, endpoint: Endpoint | None, kwargs: dict[str, Any]) -> None:
        self.endpoint = endpoint
        self.client = aioredis.Redis(**_async_kwargs(kwargs))
        self._scripts: dict[str, Any] = {}

    async def run(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return await script(keys=keys, args=args)


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
        backplane: AsyncRedisBackplane,
        current: Callable[[], bool],
    ) -> None:
        self._settings = settings
        self._channel = channel
        self._sharing = sharing
        self._clock = clock
        self._log_length = log_length
        self._usable = usable
        self._backplane = backplane
        self._current = current
        options = sharing.options
        # Reads go through L2 only with l2=True (propagate="update" alone only publishes here).
        self.reads = sharing.l2
        self._lease_ttl = options.l2_lease_ttl
        self._timeout = options.l2_timeout
        self._reader: _Node | None = None
        self._publisher: _Node | None = None
        self._publish_placement: Placement | None = None
        self._read_router: AsyncClusterRouter | None = None
        self._write_router: AsyncClusterRouter | None = None
        self._retired: list[aioredis.Redis] = []  # clients left behind by a failover
        self._breaker = Breaker()
        self._closed = False
        self._fills: set[asyncio.Task[None]] = set()  # fills the callers did not wait for

    def _read_node(self, placement: Placement) -> _Node:
        node = self._reader
        if node is None or node.endpoint != placement.endpoint:
            if node is not None:
                self._retire(node)
            kwargs = l2_client_kwargs(self._settings, self._timeout, placement.endpoint)
            node = self._reader = _Node(placement.endpoint, kwargs)
        return node

    def _retire(self, node: _Node) -> None:
        abort_connections(node.client)  # a read still on it fails: counted, as any L2 error
        self._retired.append(node.client)

    def _router(self, *, write: bool) -> AsyncClusterRouter:
        router = self._write_router if write else self._read_router
        if router is None:
            settings, timeout = self._settings, self._timeout
            if write:
                router = self._write_router = AsyncClusterRouter(
                    settings, lambda e: _async_kwargs(node_kwargs(settings, e))
                )
            else:
                router = self._read_router = AsyncClusterRouter(
                    settings, lambda e: _async_kwargs(l2_client_kwargs(settings, timeout, e))
                )
        return router

    async def load(
        self,
        key: Key,
        region: Region,
        factory: Callable[[], Any],
        ttl: float | None,
        is_open: Callable[[], bool],
        reservation: Any = None,
        dropped: bool = False,
    ) -> Loaded:
        """Run the read path for one missed key: L2, lease, wait, factory, fill (see
        :meth:`nearcache._l2.redis.RedisL2.load`). The fill runs in a task of its own: the
        caller has its value one round trip sooner."""
        placement = self._backplane.placement
        plain = (
            reservation is not None
            and not dropped
            and placement is not None
            and not placement.sharded
        )
        flow = self._sharing.load_flow(
            key, region, l2.new_token(), ttl, plain=plain, looking=factory is lookup
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
                if not self._closed:
                    task = asyncio.ensure_future(self._fill_counted(key, region, step))
                    self._fills.add(task)
                    task.add_done_callback(self._fills.discard)
            elif type(step) is Release:
                # Shielded: a cancelled load still frees the lease for the next process.
                await asyncio.shield(self._release(key, region, step))

    async def _get(self, key: Key, region: Region) -> tuple[bytes | None, int] | None:
        """GET and PTTL in one pipelined round trip (no script: see Sharing.load_flow)."""
        if self._closed or not self._usable() or not self._breaker.available(self._clock()):
            return None
        placement = self._backplane.placement
        if placement is None or placement.sharded:
            return None
        name = l2.value_keys(placement.channel, region, key)[0]
        client = self._read_node(placement).client
        try:
            async with client.pipeline(transaction=False) as pipe:
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
                self._abort()
        self._breaker.succeeded()
        if placement.claim is not None and self._backplane.placement is not placement:
            return None  # Sentinel: the subscription left that node meanwhile (see _read)
        return record, pttl

    async def _read(self, key: Key, region: Region, token: str) -> l2.ReadResult | None:
        if not self._usable() or not self._breaker.available(self._clock()):
            return None
        placement = self._backplane.placement
        if placement is None:
            return None
        reign = reign_of(placement)
        if placement.sharded:
            reply = await self._cluster_read(placement.channel, region, key, token, reign)
        else:
            keys, args = l2.read_call(placement.channel, region, key, token, self._lease_ttl, reign)
            reply = await self._run(self._read_node(placement), l2.READ_SCRIPT, keys, args)
        if reply is None:
            return None
        try:
            result = l2.parse_read(reply)
        except MessageError:
            self._failed()
            return None
        if placement.claim is not None and result.status == l2.VALUE:
            # See RedisL2._read: only a subscription still on that node vouches for it.
            if self._backplane.placement is not placement or not self._current():
                return None
            result = result._replace(confirmed_only=True)
        return result

    async def _cluster_read(
        self, channel: str, region: Region, key: Key, token: str, reign: str
    ) -> Any:
        router = self._router(write=False)
        keys, args = l2.gens_call(channel, region, reign)
        tags = await self._run(router, l2.GENS_SCRIPT, keys, args)
        if tags is None:
            return None
        keys, args = l2.vread_call(channel, region, key, tags, token, self._lease_ttl, reign)
        return await self._run(router, l2.VREAD_SCRIPT, keys, args)

    async def _fill(self, key: Key, region: Region, step: Fill) -> bool | None:
        placement = self._backplane.placement
        if placement is None:
            return None
        reign = None if placement.sharded else reign_of(placement)
        source, keys, args = step.script_call(placement.channel, region, key, reign)
        reply = await self._run(self._read_where(placement), source, keys, args)
        return None if reply is None else bool(reply)

    async def _fill_counted(self, key: Key, region: Region, step: Fill) -> None:
        self._sharing.fill_answered(await self._fill(key, region, step))

    async def settle(self) -> None:
        """Wait for the fills running in the background (those started before the call):
        once it returns, the values they stored are in L2 (each is bounded by
        ``l2_timeout``)."""
        if self._fills:
            await asyncio.wait(list(self._fills))

    async def _release(self, key: Key, region: Region, step: Release) -> None:
        placement = self._backplane.placement
        if placement is None:
            return
        source, keys, args = step.script_call(placement.channel, region, key)
        await self._run(self._read_where(placement), source, keys, args)

    def _read_where(self, placement: Placement) -> Any:
        """Where read-path scripts run: the cluster's router, or the subscription's node."""
        return self._router(write=False) if placement.sharded else self._read_node(placement)

    async def _run(self, where: Any, source: str, keys: list[str], args: list[Any]) -> Any:
        """Run a read-path script within ``l2_timeout``; None (counted) if Redis failed.
        Once closed, None without a command (see :meth:`RedisL2._run`)."""
        if self._closed:
            return None
        try:
            reply = await asyncio.wait_for(where.run(source, keys, args), self._timeout)
        except _ERRORS:
            self._failed()
            return None
        finally:
            if self._closed:  # closed while it ran: close what it may have reopened
                self._abort()
        self._breaker.succeeded()
        return reply

    def _failed(self) -> None:
        self._sharing.stats.l2_errors += 1
        self._breaker.failed(self._clock())

    # -- the write path ---------------------------------------------------------------------

    async def publish(
        self, plans: Sequence[l2.MessagePlan], since: tuple[bytes, str] | None, sender: bytes
    ) -> int:
        """See :meth:`nearcache._l2.redis.RedisL2.publish`."""
        try:
            if self._closed:
                raise BackplaneUnavailableError("the cache is closed")
            placement = self._publish_placement
            if placement is None:
                placement = await alocate(self._settings, self._channel, self._backplane.sentinels)
            if placement.sharded:
                reply = await self._cluster_publish(placement, plans, since, sender)
            else:
                reply = await self._publish_on(placement, plans, since, sender)
        except _PUBLISH_ERRORS as exc:
            self._publish_placement = None
            if isinstance(exc, BackplaneError) and not isinstance(exc, BackplaneUnavailableError):
                raise
            raise publish_error(exc, self._channel, self._settings.describe()) from exc
        self._publish_placement = placement
        self._sharing.stats.updates_fell_back += int(reply[3])
        return int(reply[2])

    async def _publish_on(
        self,
        placement: Placement,
        plans: Sequence[l2.MessagePlan],
        since: tuple[bytes, str] | None,
        sender: bytes,
    ) -> Any:
        node = self._publisher
        if node is None or node.endpoint != placement.endpoint:
            if node is not None:
                self._retire(node)
            kwargs = l2_client_kwargs(self._settings, 1e9, placement.endpoint)
            node = self._publisher = _Node(placement.endpoint, kwargs)
        keys, args = l2.publish_call(
            placement.channel,
            self._log_length,
            sender,
            since,
            plans,
            new_epoch(),
            reign_of(placement),
        )
        reply = await node.run(l2.PUBLISH_SCRIPT, keys, args)
        sentinels = self._backplane.sentinels
        if placement.claim is not None and sentinels is not None:
            acknowledged = self._clock()
            if not await sentinels.confirm(
                placement.claim, acknowledged, self._settings.sync_timeout
            ):
                raise PrimaryMovedError(
                    f"publish to channel {self._channel!r}: a majority of the Sentinels no "
                    f"longer names {placement.endpoint} the primary; publishing again"
                )
        return reply

    async def _cluster_publish(
        self,
        placement: Placement,
        plans: Sequence[l2.MessagePlan],
        since: tuple[bytes, str] | None,
        sender: bytes,
    ) -> Any:
        """See :meth:`nearcache._l2.redis.RedisL2._cluster_publish`."""
        router = self._router(write=True)
        channel, reign = placement.channel, reign_of(placement)
        writes = l2.value_writes(plans)
        token = l2.write_token(plans)
        if writes:
            await router.run_all(
                [(l2.PREPARE_SCRIPT, *l2.prepare_call(channel, op, token, reign)) for op in writes]
            )
        keys, args = l2.publish_call(
            channel, self._log_length, sender, since, plans, new_epoch(), reign, split=True
        )
        reply = await router.run(l2.SHARDED_PUBLISH_SCRIPT, keys, args)
        if writes:
            tags = iter(reply[4:])
            await router.run_all(
                [
                    (
                        l2.COMMIT_SCRIPT,
                        *l2.commit_call(
                            channel,
                            op,
                            token,
                            (next(tags), next(tags)) if isinstance(op, l2.StoreValue) else None,
                            reign,
                        ),
                    )
                    for op in writes
                ]
            )
        return reply

    def _abort(self) -> None:
        nodes = [n.client for n in (self._reader, self._publisher) if n is not None]
        abort_connections(*nodes, *self._retired)
        for router in (self._read_router, self._write_router):
            if router is not None:
                router.abort()

    async def aclose(self) -> None:
        """Release the connections at once: a publish or read blocked on one fails now."""
        self._closed = True
        self._abort()
        fills = list(self._fills)
        for task in fills:
            task.cancel()  # their leases expire
        if fills:
            await asyncio.wait(fills)
        clients = [n.client for n in (self._reader, self._publisher) if n is not None]
        for client in [*clients, *self._retired]:
            with contextlib.suppress(Exception):
                await client.aclose()
        for router in (self._read_router, self._write_router):
            if router is not None:
                await router.aclose()
