"""OpenTelemetry metrics: observable instruments reading ``stats()`` at each collection, and
the apply latency as a histogram (``pip install 'nearcache[opentelemetry]'`` and an SDK;
see docs/metrics.md).

::

    from nearcache.opentelemetry import instrument

    instruments = instrument(cache)          # the global MeterProvider, or meter_provider=...
    ...
    instruments.close()                      # stop reporting

Instruments are named ``nearcache.<stat>`` (the same stats as :mod:`nearcache.prometheus`),
with a ``channel`` attribute, and ``region`` on the cached functions' counters. Instrument
a cache in the process that uses it: in a ``gunicorn --preload`` app, in each worker after
the fork (the SDK's exporters do not survive ``fork()`` either).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
except ImportError as exc:  # pragma: no cover - exercised by test_extras_missing
    raise ImportError(
        "nearcache.opentelemetry needs the OpenTelemetry API: "
        "pip install 'nearcache[opentelemetry]' (and an SDK to export)"
    ) from exc

from nearcache import __version__
from nearcache._cached import region_loads
from nearcache._core.cache import APPLY_LATENCY_BOUNDS
from nearcache._metrics import (
    APPLY_LATENCY_HELP,
    COUNTERS,
    GAUGES,
    REGION_COUNTERS,
    STATES,
    caches_by_channel,
)

__all__ = ["Instruments", "instrument"]

_GAUGE_NAMES = {"entries": "entries", "pending": "pending_invalidations"}


class _Reporter:
    """The instruments of one meter, reporting every cache instrumented on it: a meter makes
    each instrument once (a second one of the same name is dropped with its callbacks), so
    every :func:`instrument` call on one meter shares these."""

    def __init__(self, meter: metrics.Meter) -> None:
        self.caches: dict[str, Any] = {}
        self.lock = threading.Lock()
        self._stats: dict[str, Any] = {}
        for i, m in enumerate(COUNTERS):
            meter.create_observable_counter(
                f"nearcache.{m.field}",
                callbacks=[self._stat_callback(m.field, refresh=i == 0)],
                description=m.help,
            )
        for m in GAUGES:
            meter.create_observable_gauge(
                f"nearcache.{_GAUGE_NAMES[m.field]}",
                callbacks=[self._stat_callback(m.field, refresh=False)],
                description=m.help,
            )
        meter.create_observable_gauge(
            "nearcache.backplane.state",
            callbacks=[self._observe_state],
            description="The backplane's state (1 for the current one)",
        )
        for m in REGION_COUNTERS:
            meter.create_observable_counter(
                f"nearcache.{m.field}",
                callbacks=[self._region_callback(m.field)],
                unit="s" if m.field == "load_seconds" else "",
                description=m.help,
            )
        self.latency = meter.create_histogram(
            "nearcache.apply_latency",
            unit="s",
            description=APPLY_LATENCY_HELP,
            explicit_bucket_boundaries_advisory=list(APPLY_LATENCY_BOUNDS),
        )

    def _stat_callback(
        self, field: str, *, refresh: bool
    ) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            # One stats() per cache and collection: the SDK runs the callbacks in the order
            # the instruments were made, and the first one takes the snapshot.
            if refresh or not self._stats:
                with self.lock:
                    caches = list(self.caches.items())
                self._stats = {ch: cache.stats() for ch, cache in caches}
            return [
                Observation(getattr(stats, field), {"channel": channel})
                for channel, stats in self._stats.items()
            ]

        return callback

    def _observe_state(self, options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(1 if stats.backplane == state else 0, {"channel": ch, "state": state})
            for ch, stats in self._stats.items()
            for state in STATES
        ]

    def _region_callback(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            with self.lock:
                caches = list(self.caches.items())
            return [
                Observation(getattr(loads, field), {"channel": channel, "region": region})
                for channel, cache in caches
                for region, loads in sorted(region_loads(cache).items())
            ]

        return callback


_reporters: dict[Any, _Reporter] = {}  # by meter
_reporters_lock = threading.Lock()


class Instruments:
    """What one :func:`instrument` call reports; :meth:`close` stops its reports."""

    def __init__(self, caches: dict[str, Any], meter: metrics.Meter) -> None:
        with _reporters_lock:
            reporter = _reporters.get(meter)
            if reporter is None:
                reporter = _reporters[meter] = _Reporter(meter)
        self._reporter = reporter
        with reporter.lock:
            for channel in caches:
                if channel in reporter.caches:
                    raise ValueError(
                        f"two caches on channel {channel!r}: their series would collide; "
                        "close the other's Instruments, or use another meter provider"
                    )
            reporter.caches.update(caches)
        self._caches = caches
        self._observers: list[tuple[list[Callable[[float], None]], Callable[[float], None]]] = []
        latency = reporter.latency
        for channel, cache in caches.items():
            attributes = {"channel": channel}

            def record(seconds: float, attributes: dict[str, str] = attributes) -> None:
                latency.record(seconds, attributes)

            # Every message's latency, as it is applied (the core calls its observers).
            observers: list[Callable[[float], None]] = cache._core.apply_latency.observers
            observers.append(record)
            self._observers.append((observers, record))

    def close(self) -> None:
        """Stop reporting these caches (OpenTelemetry cannot remove instruments: the other
        caches instrumented on the same meter go on reporting)."""
        reporter = self._reporter
        with reporter.lock:
            for channel, cache in self._caches.items():
                if reporter.caches.get(channel) is cache:
                    del reporter.caches[channel]
            reporter._stats = {}
        self._caches = {}
        for observers, record in self._observers:
            if record in observers:
                observers.remove(record)
        self._observers.clear()


def instrument(*caches: Any, meter_provider: MeterProvider | None = None) -> Instruments:
    """Report the metrics of ``caches`` (``NearCache`` or ``AsyncNearCache``, on distinct
    channels) through ``meter_provider`` (default: the global one)."""
    meter = metrics.get_meter("nearcache", __version__, meter_provider=meter_provider)
    return Instruments(caches_by_channel(caches), meter)
