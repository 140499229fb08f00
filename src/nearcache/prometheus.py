"""Prometheus metrics: a ``prometheus_client`` collector reading ``stats()`` at each scrape
(``pip install 'nearcache[prometheus]'``; see docs/metrics.md).

::

    from prometheus_client import REGISTRY
    from nearcache.prometheus import NearCacheCollector

    REGISTRY.register(NearCacheCollector(cache))

Every series has a ``channel`` label (the channel on the wire); the cached functions' series
also have ``region``. Counters are ``nearcache_<stat>_total``; gauges ``nearcache_entries``,
``nearcache_pending_invalidations`` and ``nearcache_backplane_state{state=...}`` (1 for the
current state); the histogram ``nearcache_apply_latency_seconds``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import accumulate
from typing import Any

try:
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised by test_extras_missing
    raise ImportError(
        "nearcache.prometheus needs prometheus_client: pip install 'nearcache[prometheus]'"
    ) from exc

from nearcache._cached import region_loads
from nearcache._metrics import (
    APPLY_LATENCY_HELP,
    COUNTERS,
    GAUGES,
    REGION_COUNTERS,
    STATES,
    caches_by_channel,
)

__all__ = ["NearCacheCollector"]

_GAUGE_NAMES = {"entries": "entries", "pending": "pending_invalidations"}


class NearCacheCollector(Collector):
    """Collects the metrics of one or more caches (``NearCache`` or ``AsyncNearCache``, on
    distinct channels) at each scrape.

    Args:
        caches: the caches to export.
        namespace: the metric name prefix.
    """

    def __init__(self, *caches: Any, namespace: str = "nearcache") -> None:
        self._caches = caches_by_channel(caches)
        self._ns = namespace

    def describe(self) -> Iterator[Metric]:
        """The metric families, empty (no stats are read): a registry refuses a second
        collector whose names would collide, rather than expose every family twice."""
        return self._families(())

    def collect(self) -> Iterator[Metric]:
        """The metrics of every cache, as of now."""
        return self._families(self._caches.items())

    def _families(self, caches: Iterable[tuple[str, Any]]) -> Iterator[Metric]:
        ns = self._ns
        counters = {
            m.field: CounterMetricFamily(f"{ns}_{m.field}", m.help, labels=["channel"])
            for m in COUNTERS
        }
        gauges = {
            m.field: GaugeMetricFamily(f"{ns}_{_GAUGE_NAMES[m.field]}", m.help, labels=["channel"])
            for m in GAUGES
        }
        state = GaugeMetricFamily(
            f"{ns}_backplane_state",
            "The backplane's state (1 for the current one)",
            labels=["channel", "state"],
        )
        latency = HistogramMetricFamily(
            f"{ns}_apply_latency_seconds", APPLY_LATENCY_HELP, labels=["channel"]
        )
        regions = {
            m.field: CounterMetricFamily(f"{ns}_{m.field}", m.help, labels=["channel", "region"])
            for m in REGION_COUNTERS
        }
        for channel, cache in caches:
            stats = cache.stats()
            for name, family in counters.items():
                family.add_metric([channel], getattr(stats, name))
            for name, gauge in gauges.items():
                gauge.add_metric([channel], getattr(stats, name))
            for value in STATES:
                state.add_metric([channel, value], 1.0 if stats.backplane == value else 0.0)
            hist = stats.apply_latency
            cumulative = list(accumulate(hist.counts))
            buckets = [
                (_le(bound), float(n))
                for bound, n in zip(hist.bounds, cumulative[:-1], strict=True)
            ]
            buckets.append(("+Inf", float(cumulative[-1])))
            latency.add_metric([channel], buckets, hist.sum)
            for region, loads in sorted(region_loads(cache).items()):
                for name, region_family in regions.items():
                    region_family.add_metric([channel, region], getattr(loads, name))
        yield from counters.values()
        yield from gauges.values()
        yield state
        yield latency
        yield from regions.values()


def _le(bound: float) -> str:
    return repr(float(bound))
