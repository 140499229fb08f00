"""Metrics: the apply-latency histogram in the core, and its exporters."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from nearcache import NearCache
from nearcache._core.cache import APPLY_LATENCY_BOUNDS, CacheCore, CacheOptions, LatencyHistogram
from nearcache._core.codec import Invalidation, Kind, encode
from nearcache._metrics import COUNTERS
from tests.servers import RedisServer, free_port, wait_until

OTHER = b"\x02" * 16


class TickingClock:
    """Moves ``step`` seconds at every reading."""

    def __init__(self, step: float) -> None:
        self.now = 100.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_apply_latency_counts_each_received_message() -> None:
    """Every message applied is one observation, from its arrival to applied, own clock."""
    clock = TickingClock(0.003)
    core = CacheCore(CacheOptions(), clock=clock, instance_id=b"\x01" * 16, networked=True)
    seen: list[float] = []
    core.apply_latency.observers.append(seen.append)
    for seq in (1, 2):
        assert core.receive(encode(OTHER, seq, [Invalidation(Kind.KEY, None, f"k{seq}")]))
    assert not core.receive(b"garbage")  # malformed: counted elsewhere, not a latency
    snap = core.apply_latency.snapshot()
    assert snap.count == 2
    assert snap.bounds == APPLY_LATENCY_BOUNDS
    assert snap.counts[APPLY_LATENCY_BOUNDS.index(0.005)] == 2  # 3 ms <= 5 ms bucket
    assert len(seen) == 2
    assert abs(snap.sum - sum(seen)) < 1e-12


def test_latency_histogram_buckets_and_a_failing_observer() -> None:
    """Bounds are inclusive; past the last bound goes to the overflow bucket; an observer
    that raises is logged and never stops the count."""
    hist = LatencyHistogram((0.1, 1.0))

    def broken(seconds: float) -> None:
        raise RuntimeError("exporter bug")

    hist.observers.append(broken)
    for value in (0.1, 0.5, 2.0):
        hist.observe(value)
    snap = hist.snapshot()
    assert snap.counts == (1, 1, 1)
    assert snap.sum == 2.6


# -- the exporters, scraped ----------------------------------------------------------------


@pytest.fixture
def pair(redis_server: RedisServer, channel: str) -> Iterator[tuple[NearCache, NearCache]]:
    """Two instances on one channel; b has received 3 messages, read, missed and loaded."""
    with (
        NearCache(redis_server.url, channel=channel) as a,
        NearCache(redis_server.url, channel=channel) as b,
    ):
        for c in (a, b):
            wait_until(lambda c=c: c.stats().backplane == "connected", 5.0)
        for i in range(3):
            a.set(f"k{i}", i)
            a.flush()
        wait_until(lambda: b.stats().messages_received == 3, 5.0)
        b.set("x", 1)
        b.flush()  # nothing pending when scraped: b's own invalidation of x is acknowledged
        b.get("x")
        b.get("nope")

        @b.cached(region="catalog")
        def page(n: int) -> int:
            return n

        page(1)
        page(1)
        yield a, b


def scrape(registry: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_prometheus_collector_exports_what_stats_knows(pair: tuple[NearCache, NearCache]) -> None:
    """A scrape has every counter, gauge, the state, the latency histogram and the regions."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry

    from nearcache.prometheus import NearCacheCollector

    _, b = pair
    registry = CollectorRegistry()
    registry.register(NearCacheCollector(b))
    samples = scrape(registry)
    stats = b.stats()
    ch = (("channel", b.channel),)
    for m in COUNTERS:
        assert samples[(f"nearcache_{m.field}_total", ch)] == getattr(stats, m.field), m
    assert samples[("nearcache_entries", ch)] == stats.entries
    assert samples[("nearcache_pending_invalidations", ch)] == 0
    assert samples[("nearcache_backplane_state", (*ch, ("state", "connected")))] == 1
    assert samples[("nearcache_backplane_state", (*ch, ("state", "disconnected")))] == 0
    assert samples[("nearcache_apply_latency_seconds_count", ch)] == 3
    assert samples[("nearcache_apply_latency_seconds_bucket", (*ch, ("le", "+Inf")))] == 3
    assert 0 < samples[("nearcache_apply_latency_seconds_sum", ch)] < 1
    region = (*ch, ("region", "catalog"))
    assert samples[("nearcache_calls_total", region)] == 2
    assert samples[("nearcache_loads_total", region)] == 1
    assert samples[("nearcache_load_errors_total", region)] == 0
    assert stats.hits >= 2 and stats.misses >= 2


def test_prometheus_scrape_over_http(pair: tuple[NearCache, NearCache]) -> None:
    """prometheus_client's own HTTP server serves the metrics on loopback."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, start_http_server

    from nearcache.prometheus import NearCacheCollector

    a, _ = pair
    registry = CollectorRegistry()
    registry.register(NearCacheCollector(a))
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            body = reply.read().decode()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert f'nearcache_invalidations_sent_total{{channel="{a.channel}"}} 3.0' in body


def test_prometheus_collector_refuses_two_caches_on_one_channel() -> None:
    """Two caches on one channel would make duplicate series: refused up front."""
    pytest.importorskip("prometheus_client")
    from nearcache.prometheus import NearCacheCollector

    with NearCache(channel="same") as a, NearCache(channel="same") as b:
        with pytest.raises(ValueError, match="two caches on channel 'same'"):
            NearCacheCollector(a, b)
        with pytest.raises(TypeError, match="expected a NearCache"):
            NearCacheCollector(object())
        local = scrape_one(NearCacheCollector(a))
        assert local[("nearcache_backplane_state", (("channel", "same"), ("state", "local")))]


def scrape_one(collector: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(collector)
    return scrape(registry)


def test_opentelemetry_metrics_with_an_in_memory_reader(pair: tuple[NearCache, NearCache]) -> None:
    """An SDK reader collects every stat, the state, the regions and the latency histogram,
    which records the messages applied after instrumenting."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from nearcache.opentelemetry import instrument

    a, b = pair
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instruments = instrument(b, meter_provider=provider)
    try:
        a.set("late", 1)
        a.flush()
        wait_until(lambda: b.stats().messages_received == 4, 5.0)
        points = otel_points(reader)
        stats = b.stats()
        ch = (("channel", b.channel),)
        for m in COUNTERS:
            assert points[(f"nearcache.{m.field}", ch)] == getattr(stats, m.field), m
        assert points[("nearcache.entries", ch)] == stats.entries
        assert points[("nearcache.backplane.state", (*ch, ("state", "connected")))] == 1
        assert points[("nearcache.loads", (*ch, ("region", "catalog")))] == 1
        latency = points[("nearcache.apply_latency", ch)]
        assert latency.count == 1  # the message applied after instrument()
        assert list(latency.explicit_bounds) == list(APPLY_LATENCY_BOUNDS)
    finally:
        instruments.close()
        provider.shutdown()
    assert b._core.apply_latency.observers == []


def otel_points(reader: Any) -> dict[tuple[str, tuple[tuple[str, Any], ...]], Any]:
    data = reader.get_metrics_data()
    points: dict[tuple[str, tuple[tuple[str, Any], ...]], Any] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                for point in metric.data.data_points:
                    key = (metric.name, tuple(sorted(point.attributes.items())))
                    points[key] = getattr(point, "value", point)
    return points


def test_prometheus_a_second_collector_on_one_registry_is_refused() -> None:
    """Two collectors on one registry would expose every family twice, an exposition that
    Prometheus rejects whole: the registry refuses the second one when it is registered."""
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry

    from nearcache.prometheus import NearCacheCollector

    with NearCache(channel="a") as a, NearCache(channel="b") as b:
        registry = CollectorRegistry()
        registry.register(NearCacheCollector(a))
        with pytest.raises(ValueError, match="Duplicated timeseries"):
            registry.register(NearCacheCollector(b))
        assert scrape(registry)[("nearcache_misses_total", (("channel", "a"),))] == 0


def test_opentelemetry_instrument_called_for_each_cache() -> None:
    """instrument(a) then instrument(b) on one meter provider reports both caches (the
    second one's instruments were dropped as duplicates); closing one stops only its
    reports, and a cache can be instrumented again; one channel twice is refused."""
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from nearcache.opentelemetry import instrument

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        with NearCache(channel="a") as a, NearCache(channel="b") as b:
            first = instrument(a, meter_provider=provider)
            second = instrument(b, meter_provider=provider)
            a.get(1)
            b.get(1)
            b.get(2)
            points = otel_points(reader)
            assert points[("nearcache.misses", (("channel", "a"),))] == 1
            assert points[("nearcache.misses", (("channel", "b"),))] == 2
            with pytest.raises(ValueError, match="two caches on channel 'a'"):
                instrument(a, meter_provider=provider)
            first.close()
            b.get(3)
            assert otel_points(reader)[("nearcache.misses", (("channel", "b"),))] == 3
            again = instrument(a, meter_provider=provider)
            a.get(2)
            assert otel_points(reader)[("nearcache.misses", (("channel", "a"),))] == 2
            again.close()
            second.close()
    finally:
        provider.shutdown()
