"""Private Sentinel and Redis Cluster topologies for ``nearcache demo --topology``.

``sentinel``: a primary and a replica plus three Sentinels (quorum 2, ``down-after`` 1 s).
``cluster``: three primaries and three replicas (``cluster-node-timeout`` 1 s), joined with
``CLUSTER MEET`` / ``ADDSLOTSRANGE`` / ``REPLICATE``. Every process is a
:class:`~nearcache._cli.demo.server.PrivateRedis` on a free loopback port, its files in the
demo's temporary directory, stopped by :meth:`PrivateTopology.stop`. The demo's failure step
is :meth:`PrivateTopology.fail`: ``kill -9`` of the node in charge of the channel.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from nearcache._cli.demo.server import PrivateRedis, RedisStartError
from nearcache._core.codec import channel_name
from nearcache._core.topology import cluster_channel, key_slot, slot_primary

__all__ = ["PrivateTopology"]

_HOST = "127.0.0.1"
_SERVICE = "mymaster"
_REPLICATION = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")


def _client(port: int) -> redis.Redis:
    return redis.Redis(host=_HOST, port=port, socket_connect_timeout=1.0, socket_timeout=2.0)


def _command(client: redis.Redis, *words: object) -> Any:
    """One command, its reply as the server sent it (no redis-py reply parser)."""
    return client.execute_command(*words)  # type: ignore[no-untyped-call]


def _until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RedisStartError(f"the private topology did not settle: {what}")
        time.sleep(0.05)  # polling the servers with a deadline


class PrivateTopology:
    """A private Sentinel set or Redis Cluster (``kind``), started by :meth:`start`."""

    def __init__(self, kind: str, binary: str, workdir: Path) -> None:
        self.kind = kind
        self._binary = binary
        self._workdir = workdir
        self.nodes: list[PrivateRedis] = []
        self.sentinels: list[PrivateRedis] = []

    @property
    def connection(self) -> str:
        """The connection string the instances use."""
        if self.kind == "sentinel":
            hosts = ",".join(f"{_HOST}:{s.port}" for s in self.sentinels)
            return f"{hosts},serviceName={_SERVICE}"
        return ",".join(f"{_HOST}:{n.port}" for n in self.nodes)

    def describe(self) -> str:
        """One line for the board."""
        if self.kind == "sentinel":
            return (
                f"private Sentinel set: primary and replica on ports "
                f"{', '.join(str(n.port) for n in self.nodes)}, 3 Sentinels on "
                f"{', '.join(str(s.port) for s in self.sentinels)}"
            )
        return "private Redis Cluster: 3 primaries, 3 replicas on ports " + ", ".join(
            str(n.port) for n in self.nodes
        )

    def start(self) -> None:
        """Start every process and wait until the topology is ready."""
        if self.kind == "sentinel":
            self._start_sentinel()
        else:
            self._start_cluster()

    def _node(self, name: str, *args: str, cluster_bus: bool = False) -> PrivateRedis:
        node = PrivateRedis(
            self._binary, self._workdir / name, extra_args=args, cluster_bus=cluster_bus
        )
        (self._workdir / name).mkdir(parents=True, exist_ok=True)
        node.start()
        return node

    def _start_sentinel(self) -> None:
        primary = self._node("node0", *_REPLICATION)
        replica = self._node("node1", *_REPLICATION)
        self.nodes = [primary, replica]
        with _client(replica.port) as client:
            client.replicaof(_HOST, primary.port)
        for i in range(3):
            workdir = self._workdir / f"sentinel{i}"
            workdir.mkdir(parents=True, exist_ok=True)
            config = workdir / "sentinel.conf"
            config.write_text(
                f"sentinel monitor {_SERVICE} {_HOST} {primary.port} 2\n"
                f"sentinel down-after-milliseconds {_SERVICE} 1000\n"
                f"sentinel failover-timeout {_SERVICE} 3000\n"
                "sentinel resolve-hostnames no\n"
            )
            sentinel = PrivateRedis(self._binary, workdir, sentinel_config=config)
            sentinel.start()
            self.sentinels.append(sentinel)

        def ready() -> bool:
            for sentinel in self.sentinels:
                with _client(sentinel.port) as client:
                    master = client.sentinel_master(_SERVICE)
                    if int(master["num-other-sentinels"]) != 2 or int(master["num-slaves"]) < 1:
                        return False
            return True

        _until(ready, 30.0, "the Sentinels to see the replica and each other")

    def _start_cluster(self) -> None:
        args = (
            *_REPLICATION,
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "1000",
            "--cluster-allow-replica-migration", "no",
        )  # fmt: skip
        self.nodes = [self._node(f"node{i}", *args, cluster_bus=True) for i in range(6)]
        clients = [_client(n.port) for n in self.nodes]
        try:
            ids = [_command(c, "CLUSTER", "MYID").decode() for c in clients]
            for i, client in enumerate(clients):
                _command(client, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            for i, (low, high) in enumerate(((0, 5460), (5461, 10922), (10923, 16383))):
                _command(clients[i], "CLUSTER", "ADDSLOTSRANGE", low, high)
            for node in self.nodes[1:]:
                _command(clients[0], "CLUSTER", "MEET", _HOST, node.port, node.bus_port)

            def joined() -> bool:
                return all(
                    len(_command(c, "CLUSTER", "NODES").decode().splitlines()) == 6
                    and b"handshake" not in _command(c, "CLUSTER", "NODES")
                    for c in clients
                )

            _until(joined, 30.0, "the nodes to meet")
            for i in range(3):
                _command(clients[3 + i], "CLUSTER", "REPLICATE", ids[i])

            def ok() -> bool:
                return all(b"cluster_state:ok" in _command(c, "CLUSTER", "INFO") for c in clients)

            _until(ok, 30.0, "cluster_state:ok")
        finally:
            for client in clients:
                client.close()

    def fail(self, channel: str) -> str:
        """``kill -9`` the node in charge of ``channel``; return what was done."""
        if self.kind == "sentinel":
            with _client(self.sentinels[0].port) as client:
                _, port = client.sentinel_get_master_addr_by_name(_SERVICE)
            victim = next(n for n in self.nodes if n.port == int(port))
            victim.kill()
            return f"kill -9 of the primary (port {victim.port}); the Sentinels promote the replica"
        wire = cluster_channel(channel_name(channel))
        slot = key_slot(wire)
        live = [n for n in self.nodes if n.alive]
        with _client(live[0].port) as client:
            owner = slot_primary(_command(client, "CLUSTER", "SLOTS"), slot)
        assert owner is not None
        victim = next(n for n in self.nodes if n.port == owner[1])
        victim.kill()
        return (
            f"kill -9 of the primary of the channel's slot {slot} (port {victim.port}); "
            "its replica takes over"
        )

    def stop(self) -> None:
        """Stop every process."""
        for server in [*self.sentinels, *self.nodes]:
            server.stop()
