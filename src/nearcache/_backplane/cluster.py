"""Where a channel lives: standalone server, Sentinel-managed primary or Redis Cluster shard.

:func:`locate` (threaded) and :func:`alocate` (asyncio) take the parsed settings and the wire
channel and return a :class:`Placement`: the node to subscribe on and publish to, and the
channel's name there. Nothing is configured per topology beyond the connection string:

- With ``serviceName``, the Sentinels are asked (see :mod:`.sentinel`) and the primary a
  majority names is checked to say ``role:master`` itself.
- Otherwise the endpoints are tried in order. Each is asked ``HELLO`` (one round trip: its
  version, its mode and its role). A replica is skipped; a Sentinel is refused (the string
  lacks ``serviceName``); a cluster node (``mode:cluster``, as StackExchange.Redis detects
  it) is asked ``CLUSTER SLOTS``, and the placement is the primary of the channel's slot.
  A node that reports ``cluster_state:fail`` (cut off in a minority, or the whole cluster
  down) is asked too, but its map is used only if no other endpoint gives one: a primary
  left in a minority still names itself for slots the majority has moved to its replica.

On a cluster the channel is hash-tagged (:func:`~nearcache._core.topology.cluster_channel`),
sharded Pub/Sub is required (Redis 7.0 or later) and only database 0 exists; each is checked
here and refused with a :class:`~nearcache.ConfigurationError` naming what is wrong.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from nearcache._config import Endpoint, RedisSettings
from nearcache._core.topology import (
    Placement,
    ServerTraits,
    cluster_channel,
    key_slot,
    parse_hello,
    slot_primary,
)
from nearcache._exceptions import BackplaneUnavailableError, ConfigurationError

if TYPE_CHECKING:
    from nearcache._backplane.sentinel import AsyncSentinelResolver, SentinelResolver

__all__ = ["alocate", "locate", "node_kwargs"]


def node_kwargs(settings: RedisSettings, endpoint: Endpoint | None) -> dict[str, Any]:
    """redis-py client arguments for one data node, with redis-py's retries off."""
    kwargs = settings.redis_kwargs(endpoint)
    kwargs["retry"] = Retry(NoBackoff(), 0)
    kwargs["health_check_interval"] = 0
    return kwargs


def _probe_error(endpoint: Endpoint | None, exc: BaseException) -> str:
    where = "the Unix socket" if endpoint is None else str(endpoint)
    return f"{where}: {type(exc).__name__}: {exc}"


def _traits_from(reply: Any, error: redis.ResponseError | None) -> ServerTraits:
    if error is None:
        return parse_hello(reply)
    if "unknown command" in str(error).lower():
        return ServerTraits((5,), "standalone", "master")  # HELLO came with Redis 6.0
    return ServerTraits((0,), "unknown", "master")  # HELLO not permitted: see CLUSTER SLOTS


def _decide(
    settings: RedisSettings,
    channel: str,
    endpoint: Endpoint | None,
    traits: ServerTraits,
    slots: Any,
) -> Placement | str:
    """The placement, or why this endpoint is skipped. ``slots`` is the CLUSTER SLOTS reply
    (None on a standalone server)."""
    if traits.mode == "sentinel":
        raise ConfigurationError(
            f"serviceName: {endpoint} is a Sentinel; name the service to ask it about "
            "(serviceName=... or a redis+sentinel:// URL)",
            option="serviceName",
        )
    if slots is None:
        if traits.role != "master":
            return f"{endpoint}: a replica"
        return Placement(endpoint, channel, traits)
    if traits.version != (0,) and not traits.sharded_pubsub:
        shown = ".".join(map(str, traits.version))
        raise ConfigurationError(
            f"{endpoint} is a Redis Cluster node running Redis {shown}; nearcache needs "
            "sharded Pub/Sub there (Redis 7.0 or later)",
            option="endpoint",
        )
    if settings.database != 0:
        raise ConfigurationError(
            f"defaultDatabase: a Redis Cluster has only database 0, not {settings.database}",
            option="defaultDatabase",
        )
    tagged = cluster_channel(channel)
    slot = key_slot(tagged)
    owner = slot_primary(slots, slot)
    if owner is None:
        return f"{endpoint}: no node serves slot {slot}"
    host, port, node_id = owner
    where = Endpoint(host or (endpoint.host if endpoint else "127.0.0.1"), port)
    return Placement(where, tagged, traits, slot=slot, node_id=node_id or None)


def _is_cluster_disabled(exc: redis.ResponseError) -> bool:
    return "cluster support disabled" in str(exc).lower()


def _candidates(settings: RedisSettings) -> list[Endpoint | None]:
    return [None] if settings.unix_socket is not None else list(settings.endpoints)


def _unavailable(settings: RedisSettings, reasons: list[str]) -> BackplaneUnavailableError:
    return BackplaneUnavailableError(
        f"no usable Redis primary at {settings.describe()} ({'; '.join(reasons)})"
    )


def _probe_kwargs(settings: RedisSettings, endpoint: Endpoint | None) -> dict[str, Any]:
    # Database 0 always: a cluster refuses SELECT, and must be told apart first.
    return {**node_kwargs(settings, endpoint), "db": 0}


def _cluster_failing(info: Any) -> bool:
    """Whether a ``CLUSTER INFO`` reply (text, or redis-py's parsed dict) says
    ``cluster_state:fail``."""
    if isinstance(info, dict):
        return str(info.get("cluster_state", "")) == "fail"
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    return "cluster_state:fail" in text


class _Search:
    """The endpoints' answers, in the order they are tried: the first placement from a node
    whose cluster state is ok wins; one from a node reporting ``cluster_state:fail`` is only
    kept as the last resort (see the module docstring)."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.best: Placement | None = None  # the placement found, or the last resort

    def answered(self, endpoint: Endpoint | None, found: Placement | str, failing: bool) -> bool:
        """Record one endpoint's answer; return whether the search is over (:attr:`best`)."""
        if isinstance(found, str):
            self.reasons.append(found)
            return False
        if failing:
            self.reasons.append(f"{endpoint}: cluster_state:fail")
            if self.best is None:
                self.best = found
            return False
        self.best = found
        return True

    def failed(self, endpoint: Endpoint | None, exc: BaseException) -> None:
        self.reasons.append(_probe_error(endpoint, exc))

    def result(self, settings: RedisSettings) -> Placement:
        """The placement found, else a failing node's, else :class:`BackplaneUnavailableError`."""
        if self.best is None:
            raise _unavailable(settings, self.reasons)
        return self.best


def _probe(
    settings: RedisSettings,
    channel: str,
    endpoint: Endpoint | None,
    probes: set[redis.Redis] | None = None,
) -> tuple[Placement | str, bool]:
    """The endpoint's placement (or why it is skipped), and whether it reports
    ``cluster_state:fail``."""
    with redis.Redis(**_probe_kwargs(settings, endpoint)) as client, _probing(client, probes):
        error: redis.ResponseError | None = None
        reply: Any = None
        try:
            reply = client.execute_command("HELLO")
        except redis.ResponseError as exc:
            error = exc
        traits = _traits_from(reply, error)
        slots: Any = None
        failing = False
        if traits.mode in ("cluster", "unknown"):
            try:
                slots = client.execute_command("CLUSTER", "SLOTS")
            except redis.ResponseError as exc:
                if not _is_cluster_disabled(exc):
                    raise
            if slots is not None:
                failing = _cluster_failing(client.execute_command("CLUSTER", "INFO"))
        return _decide(settings, channel, endpoint, traits, slots), failing


@contextlib.contextmanager
def _probing(client: redis.Redis, probes: set[redis.Redis] | None) -> Iterator[None]:
    """Keep ``client`` in ``probes`` while it is used, so that its owner can shut its socket
    down to interrupt it (closing a cache must not wait for a silent server)."""
    if probes is None:
        yield
        return
    probes.add(client)
    try:
        yield
    finally:
        probes.discard(client)


def locate(
    settings: RedisSettings,
    channel: str,
    sentinels: SentinelResolver | None = None,
    probes: set[redis.Redis] | None = None,
) -> Placement:
    """Find where ``channel`` lives now (threaded); see the module docstring. ``probes``
    holds the clients in use meanwhile (see :func:`_probing`).

    Raises :class:`~nearcache.ConfigurationError` for what no retry can fix (a Sentinel
    without ``serviceName``, an unknown service, a cluster on Redis < 7, a database other
    than 0 or a braced channel on a cluster) and
    :class:`~nearcache.BackplaneUnavailableError` when no primary can be reached now.
    """
    if sentinels is not None:
        claim = sentinels.primary()
        try:
            found, _ = _probe(settings, channel, claim.endpoint, probes)
        except (redis.RedisError, OSError) as exc:
            raise BackplaneUnavailableError(
                "the primary the Sentinels name is unreachable: "
                + _probe_error(claim.endpoint, exc)
            ) from exc
        if isinstance(found, str):
            raise BackplaneUnavailableError(f"the Sentinels name {found} (not yet a primary)")
        return Placement(
            found.endpoint, found.channel, found.traits, claim=claim, quorum=sentinels.quorum
        )
    search = _Search()
    for endpoint in _candidates(settings):
        try:
            if search.answered(endpoint, *_probe(settings, channel, endpoint, probes)):
                break
        except (redis.RedisError, OSError) as exc:
            search.failed(endpoint, exc)
    return search.result(settings)


async def _aprobe(
    settings: RedisSettings, channel: str, endpoint: Endpoint | None
) -> tuple[Placement | str, bool]:
    """See :func:`_probe`."""
    client = redis.asyncio.Redis(**_probe_kwargs(settings, endpoint))
    try:
        error: redis.ResponseError | None = None
        reply: Any = None
        try:
            reply = await client.execute_command("HELLO")  # type: ignore[no-untyped-call]
        except redis.ResponseError as exc:
            error = exc
        traits = _traits_from(reply, error)
        slots: Any = None
        failing = False
        if traits.mode in ("cluster", "unknown"):
            try:
                slots = await client.execute_command("CLUSTER", "SLOTS")  # type: ignore[no-untyped-call]
            except redis.ResponseError as exc:
                if not _is_cluster_disabled(exc):
                    raise
            if slots is not None:
                info = await client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
                failing = _cluster_failing(info)
        return _decide(settings, channel, endpoint, traits, slots), failing
    finally:
        # Abort first: a cancel (aclose of the cache) may land in the await below.
        from nearcache._backplane.aioredis import abort_connections

        abort_connections(client)
        with contextlib.suppress(Exception):
            await client.aclose()


async def alocate(
    settings: RedisSettings, channel: str, sentinels: AsyncSentinelResolver | None = None
) -> Placement:
    """The asyncio flavour of :func:`locate`."""
    if sentinels is not None:
        claim = await sentinels.primary()
        try:
            found, _ = await _aprobe(settings, channel, claim.endpoint)
        except (redis.RedisError, OSError) as exc:
            raise BackplaneUnavailableError(
                "the primary the Sentinels name is unreachable: "
                + _probe_error(claim.endpoint, exc)
            ) from exc
        if isinstance(found, str):
            raise BackplaneUnavailableError(f"the Sentinels name {found} (not yet a primary)")
        return Placement(
            found.endpoint, found.channel, found.traits, claim=claim, quorum=sentinels.quorum
        )
    search = _Search()
    for endpoint in _candidates(settings):
        try:
            if search.answered(endpoint, *await _aprobe(settings, channel, endpoint)):
                break
        except (redis.RedisError, OSError) as exc:
            search.failed(endpoint, exc)
    return search.result(settings)
