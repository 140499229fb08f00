"""What the metrics exporters (:mod:`nearcache.prometheus`, :mod:`nearcache.opentelemetry`)
export: one table, read from :meth:`NearCache.stats() <nearcache.NearCache.stats>` and the
decorators' per-region load counters, so that both exporters say the same thing."""

from __future__ import annotations

from typing import Any, NamedTuple

from nearcache._typing import BackplaneState

__all__ = ["COUNTERS", "GAUGES", "REGION_COUNTERS", "STATES", "Metric", "caches_by_channel"]


class Metric(NamedTuple):
    """One exported number: the ``CacheStats`` field (or region counter) and its help."""

    field: str
    help: str


COUNTERS = (
    Metric("hits", "L1 reads that returned a cached value"),
    Metric("misses", "L1 reads that found nothing servable"),
    Metric("sets", "Values stored in L1 (sets and loads)"),
    Metric("evictions", "Entries evicted by the size bound"),
    Metric("expirations", "Entries dropped because they expired"),
    Metric("rejected_loads", "Loaded values not cached: their key was invalidated meanwhile"),
    Metric("repairs", "Times L1 was dropped because messages may have been lost"),
    Metric("messages_sent", "Backplane messages published"),
    Metric("invalidations_sent", "Invalidations published (a message carries several)"),
    Metric("messages_received", "Backplane messages received from other instances"),
    Metric("invalidations_received", "Invalidations received from other instances"),
    Metric("own_messages", "This instance's own messages echoed back and ignored"),
    Metric("malformed_messages", "Messages that could not be decoded or verified (dropped)"),
    Metric("sequence_gaps", "Gaps in another instance's message sequence (L1 dropped)"),
    Metric("resubscriptions", "Subscriptions made to the channel (first one included)"),
    Metric("listener_errors", "on_invalidation callbacks that raised"),
    Metric("replays", "Reconnections repaired by replaying the Redis log (L1 kept)"),
    Metric("losses", "Times messages were found lost on a live subscription"),
    Metric("publish_failures", "Publish attempts that failed (retried)"),
    Metric("degraded_to_clear", "Times queued invalidations overflowed into one clear-all"),
)
GAUGES = (
    Metric("entries", "Entries held in L1"),
    Metric("pending", "Invalidations waiting to be published"),
)
REGION_COUNTERS = (
    Metric("calls", "Calls of cached functions"),
    Metric("loads", "Calls of cached functions that ran the function"),
    Metric("load_errors", "Loads that raised"),
    Metric("load_seconds", "Seconds spent in loads"),
)
#: Every value ``CacheStats.backplane`` takes (a local cache has no backplane).
STATES = ("local", *(state.value for state in BackplaneState))
APPLY_LATENCY_HELP = (
    "Seconds from a message's arrival to its invalidations applied in L1 (receiver's clock)"
)


def caches_by_channel(caches: tuple[Any, ...]) -> dict[str, Any]:
    """The caches by channel (the label); two caches on one channel would export one series
    twice, so they are refused."""
    by_channel: dict[str, Any] = {}
    for cache in caches:
        if not hasattr(cache, "stats") or not hasattr(cache, "channel"):
            raise TypeError(f"expected a NearCache or AsyncNearCache, got {cache!r}")
        if cache.channel in by_channel:
            raise ValueError(
                f"two caches on channel {cache.channel!r}: their series would collide; "
                "export them from separate registries or meter providers"
            )
        by_channel[cache.channel] = cache
    return by_channel
