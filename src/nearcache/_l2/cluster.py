"""L2 scripts on a Redis Cluster: each one sent to the primary of its first key's slot.

The L2's values spread over every slot of the cluster (their hash tag is per value), so the
L2 cannot use the backplane's single placement. A :class:`ClusterRouter` keeps the slot map
(``CLUSTER SLOTS``, asked again after any ``MOVED``, ``CLUSTERDOWN`` or lost connection) and
one client per node, follows ``ASK`` during a slot migration (``ASKING`` and the script on
the importing node, in one round trip), and sends a batch of scripts as one pipeline per node
(:meth:`ClusterRouter.run_all`). redis-py's ``RedisCluster`` is not used: it connects and
retries on its own schedule (a cache must never block its constructor, nor wait on hidden
retries), and the read path needs its own short timeout. ``TRYAGAIN`` and ``CLUSTERDOWN``
are the caller's failure (a read goes to the factory, a publish is retried).

``CLUSTERDOWN`` comes from a primary cut off in a minority: it is alive and still names itself
for its slots, while the majority fails them over to its replica. So the map is asked again
(the connection string's endpoints, then the last map's nodes, the nodes that answered
``CLUSTERDOWN`` last of all), and :meth:`ClusterRouter.run` sends the script once more if
the new map names another node. That is at most one more ``CLUSTER SLOTS`` round per call:
while the whole cluster is down every call still fails at once, as before.

:class:`AsyncClusterRouter` is the asyncio flavour.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio
from redis.exceptions import AskError, ClusterDownError, MovedError

from nearcache._config import Endpoint, RedisSettings
from nearcache._core.topology import key_slot

__all__ = ["AsyncClusterRouter", "ClusterRouter", "ScriptCall", "SlotMap"]

ScriptCall = tuple[str, Sequence[str], Sequence[Any]]  # Lua source, KEYS, ARGV
_Client = TypeVar("_Client", redis.Redis, redis.asyncio.Redis)
_REDIRECTS = 3  # MOVED answers followed for one call before it counts as failed


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SlotMap:
    """Which node serves each slot, from a ``CLUSTER SLOTS`` reply (no I/O)."""

    def __init__(self, reply: Sequence[Any], asked: Endpoint | None) -> None:
        self._ranges: list[tuple[int, int, Endpoint]] = []
        for entry in reply:
            low, high, primary = int(entry[0]), int(entry[1]), entry[2]
            host = _text(primary[0])
            if host in ("", "?"):  # the node does not know its own address: the one we asked
                host = asked.host if asked is not None else "127.0.0.1"
            self._ranges.append((low, high, Endpoint(host, int(primary[1]))))
        self._ranges.sort(key=lambda r: r[0])

    def owner(self, key: str) -> Endpoint | None:
        """The primary serving ``key``'s slot, or None if no node does."""
        slot = key_slot(key)
        for low, high, endpoint in self._ranges:
            if low <= slot <= high:
                return endpoint
        return None

    @property
    def nodes(self) -> list[Endpoint]:
        """Every primary in the map."""
        return list(dict.fromkeys(endpoint for _, _, endpoint in self._ranges))


def _candidates(
    settings: RedisSettings, known: SlotMap | None, down: frozenset[Endpoint]
) -> list[Endpoint]:
    """Whom to ask for the map: the connection string's endpoints, then the nodes of the last
    map (the seeds may be gone for good), the nodes in ``down`` last (a minority node answers
    with its stale map)."""
    every = list(dict.fromkeys([*settings.endpoints, *(known.nodes if known else [])]))
    return [e for e in every if e not in down] + [e for e in every if e in down]


def _unavailable(reasons: list[str]) -> redis.ConnectionError:
    return redis.ConnectionError(f"no cluster node answered CLUSTER SLOTS ({'; '.join(reasons)})")


class _Routing(Generic[_Client]):
    """What both routers keep: the slot map (None: ask again), a client per node and the
    scripts registered on each. ``client_kwargs(endpoint)`` gives the redis-py arguments of a
    node's client (the read path passes its short timeout)."""

    def __init__(
        self, settings: RedisSettings, client_kwargs: Callable[[Endpoint], dict[str, Any]]
    ) -> None:
        self._settings = settings
        self._client_kwargs = client_kwargs
        self._map: SlotMap | None = None
        self._last_map: SlotMap | None = None  # kept when _map is dropped: its nodes are asked
        # Nodes whose latest answer was CLUSTERDOWN (asked last for the map); replaced, never
        # changed in place, as the threaded router's callers read it concurrently.
        self._down: frozenset[Endpoint] = frozenset()
        self._clients: dict[Endpoint, _Client] = {}
        self._scripts: dict[tuple[Endpoint, str], Any] = {}
        self._closed = False

    def _client(self, endpoint: Endpoint) -> _Client:
        raise NotImplementedError

    def _script(self, endpoint: Endpoint, source: str) -> Any:
        script = self._scripts.get((endpoint, source))
        if script is None:
            script = self._scripts[(endpoint, source)] = self._client(endpoint).register_script(
                source
            )
        return script

    def _owner_in(self, known: SlotMap, key: str) -> Endpoint:
        """The primary serving ``key``'s slot in ``known``; a slot nobody serves drops the map
        (asked again next time) and fails the call."""
        owner = known.owner(key)
        if owner is None:
            self._map = None
            raise redis.ConnectionError(f"no cluster node serves the slot of {key!r}")
        return owner

    def _map_from(self, reply: Any, endpoint: Endpoint) -> SlotMap:
        self._map = self._last_map = SlotMap(reply, endpoint)
        return self._map

    def _went_down(self, endpoint: Endpoint) -> None:
        """``endpoint`` answered ``CLUSTERDOWN``: drop the map (asked again, that node last)."""
        self._map = None
        self._down = self._down | {endpoint}

    def _answered(self, endpoint: Endpoint) -> None:
        if endpoint in self._down:
            self._down = self._down - {endpoint}

    def _still_down(self, endpoint: Endpoint, refused: ClusterDownError | None) -> None:
        """Raise ``refused`` (met earlier in this call) if the map asked again still names a
        node that answered ``CLUSTERDOWN``: one more try per call, and only elsewhere."""
        if refused is not None and endpoint in self._down:
            raise refused


class ClusterRouter(_Routing[redis.Redis]):
    """Runs L2 scripts on the node serving their slot (threaded; see the module docstring)."""

    def __init__(
        self, settings: RedisSettings, client_kwargs: Callable[[Endpoint], dict[str, Any]]
    ) -> None:
        super().__init__(settings, client_kwargs)
        self._lock = threading.Lock()  # the read path runs in every caller's thread

    def _client(self, endpoint: Endpoint) -> redis.Redis:
        with self._lock:
            if self._closed:
                raise redis.ConnectionError("the cache is closed")
            client = self._clients.get(endpoint)
            if client is None:
                client = self._clients[endpoint] = redis.Redis(**self._client_kwargs(endpoint))
            return client

    def _slots(self) -> SlotMap:
        known = self._map
        if known is not None:
            return known
        reasons: list[str] = []
        for endpoint in _candidates(self._settings, self._last_map, self._down):
            try:
                reply = self._client(endpoint).execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            except (redis.RedisError, OSError) as exc:
                reasons.append(f"{endpoint}: {type(exc).__name__}: {exc}")
                continue
            return self._map_from(reply, endpoint)
        raise _unavailable(reasons)

    def _owner(self, key: str) -> Endpoint:
        return self._owner_in(self._slots(), key)

    def run(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script on the node serving ``keys[0]``; redis-py's errors propagate."""
        refused: ClusterDownError | None = None
        for _ in range(_REDIRECTS):
            endpoint = self._owner(keys[0])
            self._still_down(endpoint, refused)
            try:
                reply = self._script(endpoint, source)(keys=keys, args=args)
            except MovedError:
                self._map = None  # asked again at once
                continue
            except AskError as exc:
                return self._asking(Endpoint(exc.host, int(exc.port)), source, keys, args)
            except ClusterDownError as exc:
                self._went_down(endpoint)  # a minority: its slots may have failed over
                if refused is not None:
                    raise
                refused = exc
                continue
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._map = None  # the node may be gone: its slots have a new owner
                raise
            self._answered(endpoint)
            return reply
        raise refused or redis.ConnectionError(f"the slot of {keys[0]!r} keeps moving")

    def _asking(
        self, endpoint: Endpoint, source: str, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        with self._client(endpoint).pipeline(transaction=False) as pipe:
            pipe.execute_command("ASKING")  # type: ignore[no-untyped-call]
            pipe.execute_command("EVAL", source, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
            return pipe.execute()[1]

    def run_all(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run many scripts, one pipeline per node; their replies in order. A call that met a
        redirection is run again on its own; any other error reply is raised (after
        ``CLUSTERDOWN`` the map is asked again by the next call)."""
        groups: dict[Endpoint, list[int]] = {}
        for index, (_, keys, _) in enumerate(calls):
            groups.setdefault(self._owner(keys[0]), []).append(index)
        replies: list[Any] = [None] * len(calls)
        for endpoint, indexes in groups.items():
            try:
                with self._client(endpoint).pipeline(transaction=False) as pipe:
                    for index in indexes:
                        source, keys, args = calls[index]
                        self._script(endpoint, source)(keys=keys, args=args, client=pipe)
                    results = pipe.execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._map = None
                raise
            for index, result in zip(indexes, results, strict=True):
                if isinstance(result, AskError):  # MOVED or ASK: on its own
                    if isinstance(result, MovedError):
                        self._map = None
                    replies[index] = self.run(*calls[index])
                elif isinstance(result, Exception):
                    if isinstance(result, ClusterDownError):
                        self._went_down(endpoint)
                    raise result
                else:
                    replies[index] = result
        return replies

    def close(self) -> None:
        """Close every node's connections (a call blocked on one fails now)."""
        with self._lock:
            self._closed = True
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                client.close()


class AsyncClusterRouter(_Routing[redis.asyncio.Redis]):
    """The asyncio flavour of :class:`ClusterRouter` (same methods, awaited)."""

    def _client(self, endpoint: Endpoint) -> redis.asyncio.Redis:
        if self._closed:
            raise redis.ConnectionError("the cache is closed")
        client = self._clients.get(endpoint)
        if client is None:
            client = self._clients[endpoint] = redis.asyncio.Redis(**self._client_kwargs(endpoint))
        return client

    async def _slots(self) -> SlotMap:
        known = self._map
        if known is not None:
            return known
        reasons: list[str] = []
        for endpoint in _candidates(self._settings, self._last_map, self._down):
            try:
                reply = await self._client(endpoint).execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            except (redis.RedisError, OSError) as exc:
                reasons.append(f"{endpoint}: {type(exc).__name__}: {exc}")
                continue
            return self._map_from(reply, endpoint)
        raise _unavailable(reasons)

    async def _owner(self, key: str) -> Endpoint:
        return self._owner_in(await self._slots(), key)

    async def run(self, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """See :meth:`ClusterRouter.run`."""
        refused: ClusterDownError | None = None
        for _ in range(_REDIRECTS):
            endpoint = await self._owner(keys[0])
            self._still_down(endpoint, refused)
            try:
                reply = await self._script(endpoint, source)(keys=keys, args=args)
            except MovedError:
                self._map = None
                continue
            except AskError as exc:
                return await self._asking(Endpoint(exc.host, int(exc.port)), source, keys, args)
            except ClusterDownError as exc:
                self._went_down(endpoint)
                if refused is not None:
                    raise
                refused = exc
                continue
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._map = None
                raise
            self._answered(endpoint)
            return reply
        raise refused or redis.ConnectionError(f"the slot of {keys[0]!r} keeps moving")

    async def _asking(
        self, endpoint: Endpoint, source: str, keys: Sequence[str], args: Sequence[Any]
    ) -> Any:
        async with self._client(endpoint).pipeline(transaction=False) as pipe:
            pipe.execute_command("ASKING")
            pipe.execute_command("EVAL", source, len(keys), *keys, *args)
            return (await pipe.execute())[1]

    async def run_all(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """See :meth:`ClusterRouter.run_all`."""
        groups: dict[Endpoint, list[int]] = {}
        for index, (_, keys, _) in enumerate(calls):
            groups.setdefault(await self._owner(keys[0]), []).append(index)
        replies: list[Any] = [None] * len(calls)
        for endpoint, indexes in groups.items():
            try:
                async with self._client(endpoint).pipeline(transaction=False) as pipe:
                    for index in indexes:
                        source, keys, args = calls[index]
                        await self._script(endpoint, source)(keys=keys, args=args, client=pipe)
                    results = await pipe.execute(raise_on_error=False)
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                self._map = None
                raise
            for index, result in zip(indexes, results, strict=True):
                if isinstance(result, AskError):  # MOVED or ASK: on its own
                    if isinstance(result, MovedError):
                        self._map = None
                    replies[index] = await self.run(*calls[index])
                elif isinstance(result, Exception):
                    if isinstance(result, ClusterDownError):
                        self._went_down(endpoint)
                    raise result
                else:
                    replies[index] = result
        return replies

    def abort(self) -> None:
        """Shut every connection down at once (see ``abort_connections``)."""
        from nearcache._backplane.aioredis import abort_connections

        self._closed = True
        abort_connections(*self._clients.values())

    async def aclose(self) -> None:
        """Abort, then close every node's client."""
        self.abort()
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()
