"""Metrics: the apply-latency histogram in the core, and its exporters."""

from __future__ import annotations

from nearcache._core.cache import APPLY_LATENCY_BOUNDS, CacheCore, CacheOptions, LatencyHistogram
from nearcache._core.codec import Invalidation, Kind, encode

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
