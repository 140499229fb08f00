"""The chaos suite's Sentinel and Cluster backplanes and their faults (``--topology``).

With ``--topology sentinel`` the instances connect through three Sentinels to a primary and a
replica (each behind a TcpProxy); with ``--topology cluster`` to a 3-primary, 3-replica Redis
Cluster, any node of which they are given. Faults here are the topology's own: failovers,
primaries killed, cut off from the Sentinels or left alone in a minority, the channel's slot
moved, subscribers dropped; each is healed (``heal()``: the topology is healthy again, roles
possibly swapped) before the next one starts. ``pause_instance`` from the standalone list is
kept for both.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Callable
from pathlib import Path

from tests.servers import redis_server_binary, wait_until
from tests.topologies import ClusterTopology, SentinelTopology, key_slot

__all__ = ["CLUSTER_FAULTS", "CLUSTER_L2_FAULTS", "SENTINEL_FAULTS", "TopologyChaos"]

SENTINEL_FAULTS = (
    "failover",
    "kill9_primary",
    "cut_primary_from_sentinels",
    "reset_primary",
    "kill_subscribers",
    "pause_instance",
)
CLUSTER_FAULTS = (
    "move_slot",
    "kill9_owner",
    "minority_owner",
    "reset_owner",
    "kill_subscribers",
    "pause_instance",
)
# With the L2 on a cluster, values live on every primary: their slots move and their owners
# die too, not only the channel's.
CLUSTER_L2_FAULTS = (*CLUSTER_FAULTS, "move_value_slot", "kill9_value_owner")
OPTIONS = "abortConnect=False,connectTimeout=1000,syncTimeout=2000"

Later = Callable[[float, Callable[[], object], str, float], None]


class TopologyChaos:
    """A Sentinel set or a cluster for the chaos suite, and how to hurt it."""

    def __init__(self, kind: str, workdir: Path, channel: str, *, l2: bool = False) -> None:
        binary = redis_server_binary()
        if binary is None:
            raise RuntimeError("redis-server not found")
        self.kind = kind
        self.workdir = workdir
        self.sentinel: SentinelTopology | None = None
        self.cluster: ClusterTopology | None = None
        # The wire channel's slot (see nearcache._core.topology.cluster_channel).
        self.slot = key_slot("{nearcache:v1:" + channel + "}")
        if kind == "sentinel":
            self.sentinel = SentinelTopology(workdir / "sentinel", binary=binary, proxied=True)
            self.sentinel.start()
            self.faults = SENTINEL_FAULTS
            self.connection = f"{self.sentinel.connection_string()},{OPTIONS}"
        else:
            self.cluster = ClusterTopology(workdir / "cluster", binary=binary)
            self.cluster.start()
            self.faults = CLUSTER_L2_FAULTS if l2 else CLUSTER_FAULTS
            self.connection = f"{self.cluster.connection_string()},{OPTIONS}"

    def inject(
        self, kind: str, rng: random.Random, duration: float, later: Later, now: float
    ) -> None:
        """Start fault ``kind``; ``later(delay, heal, kind, now)`` ends it."""
        if self.sentinel is not None:
            self._sentinel_fault(self.sentinel, kind, duration, later, now)
        elif self.cluster is not None:
            self._cluster_fault(self.cluster, kind, rng, duration, later, now)

    def _sentinel_fault(
        self, topology: SentinelTopology, kind: str, duration: float, later: Later, now: float
    ) -> None:
        if kind == "failover":
            topology.failover()
        elif kind == "kill9_primary":
            old = topology.kill_primary()
            # Restarting it is part of healing, once the Sentinels have replaced it.
            later(duration, lambda: topology.wait_switched(old), kind, now)
            return
        elif kind == "cut_primary_from_sentinels":
            old = topology.cut_primary_from_sentinels()
            later(duration, lambda: topology.wait_switched(old), kind, now)
            return
        elif kind == "reset_primary":
            topology.proxy_of(topology.primary()).cut()
        elif kind == "kill_subscribers":
            with topology.node_client(topology.primary()) as client:
                client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        later(0.0, lambda: None, kind, now)

    def _cluster_fault(
        self,
        topology: ClusterTopology,
        kind: str,
        rng: random.Random,
        duration: float,
        later: Later,
        now: float,
    ) -> None:
        owner = topology.owner(self.slot)
        if kind == "move_slot":
            topology.move_slot(self.slot)
        elif kind == "kill9_owner":
            topology.kill(owner)
            later(duration, lambda: topology.wait_owner_changed(self.slot, owner), kind, now)
            return
        elif kind == "minority_owner":
            topology.isolate_minority(owner)
            later(
                duration,
                lambda: wait_until(lambda: topology.cluster_state(owner) == "fail", 15),
                kind,
                now,
            )
            return
        elif kind in ("move_value_slot", "kill9_value_owner"):
            # A primary that serves values but not the channel, and one of its values' slots.
            others = [p for p in topology.primaries() if p is not owner]
            node = rng.choice(others)
            with topology.node_client(node) as client:
                key = client.randomkey()
            if key is None:
                later(0.0, lambda: None, kind, now)
                return
            slot = key_slot(key)
            if kind == "move_value_slot":
                topology.move_slot(
                    slot, rng.choice([p for p in topology.primaries() if p is not node])
                )
            else:
                topology.kill(node)
                later(duration, lambda: topology.wait_owner_changed(slot, node), kind, now)
                return
        elif kind == "reset_owner":
            with topology.node_client(owner) as client:
                client.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        elif kind == "kill_subscribers":
            with topology.node_client(owner) as client:
                client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
        later(0.0, lambda: None, kind, now)

    def heal(self) -> None:
        """Undo every fault and wait until the topology is healthy again."""
        if self.sentinel is not None:
            self.sentinel.heal(timeout=60)
        if self.cluster is not None:
            self.cluster.heal(timeout=60)

    def close(self) -> None:
        if self.sentinel is not None:
            self.sentinel.stop()
        if self.cluster is not None:
            self.cluster.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
