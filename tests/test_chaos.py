"""A short run of the chaos suite (tests/chaos.py): real faults, every read checked."""

from __future__ import annotations

import pytest

from tests.chaos import FAULTS, run_chaos


@pytest.mark.timeout(180)
def test_short_chaos_run_has_no_stale_read(redis_binary: str) -> None:
    """Under resets, stalls, delays, kill -9, data loss, FLUSHALL, dropped subscribers and
    frozen processes, no read of a NearCache or an AsyncNearCache instance returns a value
    older than the staleness bound allows, every instance's listener is alive at the end,
    and every instance then closes within its bound."""
    report = run_chaos(duration=20.0, instances=3, fault_every=1.0, max_staleness=1.0, seed=7)
    print(report.render())
    assert report.drivers == {"sync": 2, "async": 1}
    assert report.stale_reads == 0, report.stale_examples
    assert report.longest_close < 1.0 + 2.0  # close(timeout=1.0): timeout + 4 x STOP_GRACE
    assert report.instances_connected_at_end == 3
    assert len(report.faults) >= len(FAULTS) - 2
    assert report.reads > 1000
    assert report.writes > 50
    assert report.replays > 0  # some outages were repaired from the log, not by a wipe


@pytest.mark.timeout(180)
def test_short_chaos_run_with_l2_and_updates_has_no_stale_read(redis_binary: str) -> None:
    """The same faults with the shared L2 and value-carrying writes (write() bumping the
    source and sharing the new version): no stale read from L1, L2 or an update message."""
    report = run_chaos(
        duration=20.0,
        instances=3,
        fault_every=1.0,
        max_staleness=1.0,
        seed=11,
        l2=True,
        propagate="update",
    )
    print(report.render())
    assert report.stale_reads == 0, report.stale_examples
    assert report.instances_connected_at_end == 3
    assert report.sharing["l2_hits"] > 0 and report.sharing["updates_received"] > 0
    assert report.writes > 50


@pytest.mark.timeout(240)
@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_short_chaos_run_on_sentinel_and_cluster_has_no_stale_read(
    redis_binary: str, topology: str
) -> None:
    """Sentinel failovers (manual, kill -9, a primary cut off from the Sentinels) or cluster
    slot moves, owners killed or left in a minority, among dropped subscribers and frozen
    processes: no stale read past the bound, every listener alive at the end."""
    from tests.chaos_topologies import CLUSTER_FAULTS, SENTINEL_FAULTS

    report = run_chaos(
        topology=topology, duration=20.0, instances=3, fault_every=1.0, max_staleness=1.0, seed=7
    )
    print(report.render())
    assert report.stale_reads == 0, report.stale_examples
    assert report.instances_connected_at_end == 3
    faults = SENTINEL_FAULTS if topology == "sentinel" else CLUSTER_FAULTS
    assert set(report.faults) == set(faults)
    assert report.reads > 1000
    assert report.writes > 50


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("topology", "propagate"), [("sentinel", "update"), ("cluster", "invalidate")]
)
def test_short_chaos_run_with_l2_on_sentinel_and_cluster_has_no_stale_read(
    redis_binary: str, topology: str, propagate: str
) -> None:
    """The topology faults with the shared L2 (and, on Sentinel, value-carrying writes); on a
    cluster also the slots of values moved and their owners killed: no stale read from L1, L2
    or an update message past the bound."""
    from tests.chaos_topologies import CLUSTER_L2_FAULTS, SENTINEL_FAULTS

    report = run_chaos(
        topology=topology,
        duration=15.0,
        instances=3,
        fault_every=1.0,
        max_staleness=1.0,
        seed=5,
        l2=True,
        propagate=propagate,
    )
    print(report.render())
    assert report.stale_reads == 0, report.stale_examples
    assert report.instances_connected_at_end == 3
    assert report.sharing["l2_hits"] > 0
    assert report.faults.keys() <= set(
        SENTINEL_FAULTS if topology == "sentinel" else CLUSTER_L2_FAULTS
    )
    assert report.writes > 50
