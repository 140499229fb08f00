"""Propagation and throughput on a 3-primary Redis Cluster next to one standalone server.

The same NearCache writer and subscriber processes as the ``propagation`` and ``throughput``
sections, pointed once at a standalone ``redis-server`` and once at a 3-primary, 3-replica
cluster (built by ``tests/topologies.py``; every instance is given all six nodes and finds the
channel's shard itself). On the cluster the channel is a shard channel (``SPUBLISH`` /
``SSUBSCRIBE`` on the slot's primary) and every heartbeat carries an ownership check, so the
ratios show what sharded Pub/Sub and that check cost on the way (one shard carries one
channel: a cluster spreads channels, not one channel's messages).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import propagation, throughput
from benchmarks._env import Env, Options
from benchmarks._rows import Row, paired_ratios, percentile
from benchmarks._servers import find_redis_binary

NAME = "topology"


def run(options: Options, env: Env) -> list[Row]:
    """Measure and return the section's rows."""
    from tests.topologies import ClusterTopology

    reps = options.reps(default=3, quick=1)
    n_prop = 200 if options.quick else 1500
    n_tput = 20_000 if options.quick else 100_000
    contender = next(c for c in propagation.CONTENDERS if c.name == "NearCache")
    standalone = env.redis().url
    with tempfile.TemporaryDirectory(prefix="nearcache-bench-cluster-") as tmp:
        cluster = ClusterTopology(Path(tmp), binary=find_redis_binary() or "redis-server")
        with cluster:
            targets = {"standalone": standalone, "3-primary cluster": cluster.connection_string()}
            figures: dict[str, dict[str, list[float]]] = {}
            for rep in range(reps):
                for where, url in targets.items():
                    env.log(f"topology: rep {rep + 1}/{reps}: {where}")
                    prop = propagation._one_run(url, contender, 1, n_prop)
                    lat = [x * 1e6 for x in prop["lat"]]
                    tput = throughput._one_run(
                        url, throughput.nc_writer, throughput.nc_subscriber, n_tput
                    )
                    f = figures.setdefault(where, {})
                    for key, value in (
                        ("p50", percentile(lat, 50)),
                        ("p99", percentile(lat, 99)),
                        ("rate", tput["rate"]),
                        ("lost", prop["lost"] + tput["lost"]),
                    ):
                        f.setdefault(key, []).append(value)
    rows: list[Row] = []
    base = figures["standalone"]
    for where, f in figures.items():
        note = f"{sum(f['lost']):.0f} lost" if sum(f["lost"]) else ""
        for metric, unit, key, lower in (
            ("propagation p50 us, 1 sub", "us", "p50", True),
            ("propagation p99 us, 1 sub", "us", "p99", True),
            ("remove+flush keys/s to 4 subs", "keys/s", "rate", False),
        ):
            row = Row(NAME, f"NearCache, {where}", metric, unit, f[key], lower_is_better=lower)
            row.note = note
            if where != "standalone":
                row.ratios = paired_ratios(f[key], base[key])
                row.ratio_to = "NearCache, standalone"
            rows.append(row)
    return rows + recovery_rows(options, env)


# -- recovery: how long an instance takes to follow each fault ------------------------------


def _recovery(cache: object, fault: object, connected_before: int) -> float:
    """Seconds from the fault until ``cache`` is subscribed again on the new node."""
    import time

    started = time.monotonic()
    fault()  # type: ignore[operator]
    deadline = started + 30.0
    while time.monotonic() < deadline:
        stats = cache.stats()  # type: ignore[attr-defined]
        if stats.resubscriptions > connected_before and stats.backplane == "connected":
            return time.monotonic() - started
        time.sleep(0.005)  # a poll of the cache's own state: the measurement's resolution
    return float("nan")


def recovery_rows(options: Options, env: Env) -> list[Row]:
    """Time from each topology fault until an instance is subscribed on the new node."""
    from tests.topologies import ClusterTopology, SentinelTopology, key_slot

    from nearcache import NearCache

    reps = options.reps(default=3, quick=1)
    binary = find_redis_binary() or "redis-server"
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="nearcache-bench-recovery-") as tmp:
        sentinel = SentinelTopology(Path(tmp) / "s", binary=binary, proxied=True)
        cluster = ClusterTopology(Path(tmp) / "c", binary=binary)
        with sentinel, cluster:
            for rep in range(reps):
                env.log(f"topology: recovery rep {rep + 1}/{reps}")

                def slot_of(channel: str) -> int:
                    return key_slot("{nearcache:v1:" + channel + "}")

                faults: list[tuple[str, Any, Callable[[str], object]]] = [
                    ("Sentinel: SENTINEL FAILOVER", sentinel, lambda _c: sentinel.failover()),
                    ("Sentinel: primary killed (-9)", sentinel, lambda _c: sentinel.kill_primary()),
                    ("Sentinel: primary cut off from the Sentinels", sentinel,
                     lambda _c: sentinel.cut_primary_from_sentinels()),
                    ("Cluster: the channel's slot moved", cluster,
                     lambda c: cluster.move_slot(slot_of(c))),
                    ("Cluster: the slot's primary killed (-9)", cluster,
                     lambda c: cluster.kill(cluster.owner(slot_of(c)))),
                ]  # fmt: skip
                for name, topology, fault in faults:
                    topology.heal()
                    channel = f"bench-recovery-{rep}"
                    cache = NearCache(topology.connection_string(), channel=channel)
                    try:
                        before = cache.stats().resubscriptions
                        measured = _recovery(cache, lambda f=fault, c=channel: f(c), before)
                        samples.setdefault(name, []).append(measured)
                    finally:
                        cache.close()
            sentinel.heal()
            cluster.heal()
    rows = []
    for name, values in samples.items():
        row = Row(NAME, name, "resubscribed on the new node, ms", "ms", [v * 1e3 for v in values])
        row.note = "Sentinel down-after 1 s, cluster-node-timeout 1 s; max_staleness 2 s"
        rows.append(row)
    return rows
