"""Real Redis topologies for the tests: a Sentinel set and a Redis Cluster, with their faults.

Everything is a real ``redis-server`` child process (see :mod:`tests.servers`) on free
loopback ports; nothing is mocked. Both topologies wait for readiness by polling with a
deadline, are torn down reliably (every child is also killed at interpreter exit), and can be
*healed* after a destructive test so that one session-scoped instance serves many tests.

:class:`SentinelTopology`
    A primary, a replica and three sentinels (quorum 2). With ``proxied=True`` every data node
    sits behind a :class:`~tests.servers.TcpProxy` whose address is the one announced to the
    sentinels and handed to clients. The sentinels listen on, and connect from,
    ``127.0.0.2`` (``bind-source-addr``), so :meth:`SentinelTopology.cut_primary_from_sentinels`
    can reset just their connections while clients on ``127.0.0.1`` keep reaching the primary.

:class:`ClusterTopology`
    Three primaries and three replicas built with ``CLUSTER MEET`` / ``ADDSLOTSRANGE`` /
    ``REPLICATE`` (quicker than ``redis-cli --cluster create``, which sleeps a second per
    step). Faults: :meth:`~ClusterTopology.move_slot` (``SETSLOT IMPORTING/MIGRATING``,
    ``MIGRATE``, ``SETSLOT NODE``), :meth:`~ClusterTopology.kill` (``kill -9``),
    :meth:`~ClusterTopology.isolate_minority` (every other primary ``SIGSTOP``\\ ped), and with
    ``bus_proxied=True`` :meth:`~ClusterTopology.cut_bus` (a real partition of one node).

Timings measured here (2 cores, redis-server 7.0.15) are in docs/topologies.md.
"""

from __future__ import annotations

import binascii
import contextlib
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from tests.servers import HOST, RedisServer, TcpProxy, wait_until

__all__ = [
    "SENTINEL_HOST",
    "ClusterTopology",
    "SentinelServer",
    "SentinelTopology",
    "freeze",
    "key_slot",
    "thaw",
]

SENTINEL_HOST = "127.0.0.2"  # the sentinels' own loopback address (see the module docstring)
SERVICE_NAME = "mymaster"
SLOTS = 16384

_FAST_REPLICATION = (
    "--repl-diskless-sync",
    "yes",
    "--repl-diskless-sync-delay",
    "0",
    "--repl-diskless-sync-max-replicas",
    "1",
)


def _connect(host: str, port: int, **kwargs: Any) -> redis.Redis:
    """A client with redis-py's retries off (they would hide injected faults) and short
    timeouts (a frozen node must not hang a poll)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    kwargs.setdefault("socket_connect_timeout", 1.0)
    kwargs.setdefault("socket_timeout", 2.0)
    return redis.Redis(host=host, port=port, retry=Retry(NoBackoff(), 0), **kwargs)


def freeze(server: RedisServer) -> None:
    """``SIGSTOP`` the server: its sockets stay open and nothing answers (a hung host)."""
    if server.pid is not None and server.is_running():
        os.kill(server.pid, signal.SIGSTOP)


def thaw(server: RedisServer) -> None:
    """``SIGCONT`` a server stopped by :func:`freeze` (harmless on a running one)."""
    if server.pid is not None and server.is_running():
        os.kill(server.pid, signal.SIGCONT)


def key_slot(key: str | bytes) -> int:
    """Redis Cluster's hash slot of ``key`` (CRC16/XMODEM of the hash tag, mod 16384)."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


def _info(client: redis.Redis, section: str) -> dict[str, Any]:
    info: dict[str, Any] = client.info(section)
    return info


def _command(client: redis.Redis, *words: Any) -> Any:
    """Run a command split into words, so redis-py applies no reply parser of its own (its
    ``CLUSTER NODES`` / ``SLOTS`` parsers reshape the reply); bytes come back as ``str``."""
    return _decoded(client.execute_command(*words))


def _decoded(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [_decoded(item) for item in value]
    return value


def _silently(default: Any, fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or ``default`` when the node cannot answer (down, frozen, loading)."""
    try:
        return fn(*args)
    except (redis.RedisError, OSError):
        return default


# --------------------------------------------------------------------------------------------
# Sentinel
# --------------------------------------------------------------------------------------------


class SentinelServer(RedisServer):
    """A ``redis-server --sentinel`` child on :data:`SENTINEL_HOST`, monitoring one primary.

    ``password`` is the sentinel's own ``requirepass`` (what ``sentinelPassword`` is for);
    ``node_password`` / ``node_user`` are what it authenticates to the data nodes with.
    The configuration file is written once; Sentinel rewrites it as it learns (and a restart
    keeps what it learned, as in production).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        primary: tuple[str, int],
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        node_user: str | None = None,
        node_password: str | None = None,
        binary: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(workdir, binary=binary, **kwargs)
        self.primary_address = primary
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.node_user = node_user
        self.node_password = node_password
        self.config_path = self.workdir / "sentinel.conf"

    @property
    def host(self) -> str:
        return SENTINEL_HOST

    def client_kwargs(self, **overrides: Any) -> dict[str, Any]:
        kwargs = super().client_kwargs(**overrides)
        kwargs.setdefault("host", SENTINEL_HOST)
        if "host" not in overrides:
            kwargs["host"] = SENTINEL_HOST
        return kwargs

    def _write_config(self) -> None:
        name = SERVICE_NAME
        host, port = self.primary_address
        lines = [
            f"port {self.port}",
            f"bind {SENTINEL_HOST}",
            f"bind-source-addr {SENTINEL_HOST}",
            f"dir {self.workdir}",
            f"logfile {self.log_path}",
            "daemonize no",
            "sentinel resolve-hostnames no",
            f"sentinel monitor {name} {host} {port} {self.quorum}",
            f"sentinel down-after-milliseconds {name} {self.down_after_ms}",
            f"sentinel failover-timeout {name} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {name} 1",
        ]
        if self.node_password is not None:
            lines.append(f"sentinel auth-pass {name} {self.node_password}")
        if self.node_user is not None:
            lines.append(f"sentinel auth-user {name} {self.node_user}")
        if self.password is not None:
            lines += [f"requirepass {self.password}", f"sentinel sentinel-pass {self.password}"]
        else:
            lines.append("protected-mode no")
        for user, secret in self.acl_users.items():
            lines.append(f"user {user} on >{secret} ~* &* +@all")
        self.config_path.write_text("\n".join(lines) + "\n")

    def command_line(self) -> list[str]:
        args = super().command_line()
        if not self.config_path.exists():
            self._write_config()
        return [args[0], str(self.config_path), "--sentinel"]

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<SentinelServer {SENTINEL_HOST}:{self.port} pid={self.pid} {state}>"


class SentinelTopology:
    """A primary, a replica and three sentinels (quorum 2) monitoring them as ``mymaster``.

    ``password`` protects the data nodes (``requirepass`` and ``masterauth``);
    ``sentinel_password`` the sentinels. ``proxied`` puts a :class:`TcpProxy` in front of
    each data node, announced to the sentinels (needed by :meth:`cut_primary_from_sentinels`
    and :meth:`proxy_of`).
    """

    READY_TIMEOUT = 30.0

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str,
        password: str | None = None,
        sentinel_password: str | None = None,
        proxied: bool = False,
        sentinels: int = 3,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        node_args: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir)
        self.binary = binary
        self.password = password
        self.sentinel_password = sentinel_password
        self.proxied = proxied
        self.service_name = SERVICE_NAME
        self._down_after_ms = down_after_ms
        self._failover_timeout_ms = failover_timeout_ms
        self._sentinel_count = sentinels
        args = [*_FAST_REPLICATION, *node_args]
        if password is not None:
            args += ["--masterauth", password]
        self.nodes: list[RedisServer] = [
            RedisServer(
                self.workdir / f"node{i}", password=password, binary=binary, extra_args=args
            )
            for i in range(2)
        ]
        self.sentinels: list[SentinelServer] = []
        self._proxies: dict[int, TcpProxy] = {}  # id(node) -> proxy

    # -- addresses ------------------------------------------------------------------------

    def address(self, node: RedisServer) -> tuple[str, int]:
        """The address the sentinels know ``node`` by (its proxy when proxied)."""
        proxy = self._proxies.get(id(node))
        return (HOST, proxy.port if proxy is not None else node.port)

    def node_at(self, host: str, port: int) -> RedisServer | None:
        """The data node the sentinels call ``host:port``."""
        for node in self.nodes:
            if self.address(node) == (host, int(port)):
                return node
        return None

    def proxy_of(self, node: RedisServer) -> TcpProxy:
        """The proxy in front of ``node`` (``proxied=True`` only)."""
        return self._proxies[id(node)]

    def connection_string(self, *, dead_first: int | None = None, **options: str) -> str:
        """``127.0.0.2:p1,127.0.0.2:p2,127.0.0.2:p3,serviceName=mymaster[,password=...]``;
        ``dead_first`` lists that port (where nothing listens) before the sentinels."""
        parts = [f"{SENTINEL_HOST}:{s.port}" for s in self.sentinels]
        if dead_first is not None:
            parts.insert(0, f"{SENTINEL_HOST}:{dead_first}")
        parts.append(f"serviceName={self.service_name}")
        if self.password is not None:
            parts.append(f"password={self.password}")
        if self.sentinel_password is not None:
            parts.append(f"sentinelPassword={self.sentinel_password}")
        parts += [f"{k}={v}" for k, v in options.items()]
        return ",".join(parts)

    def node_client(self, node: RedisServer, **kwargs: Any) -> redis.Redis:
        """A direct client of ``node`` (never through its proxy); close it."""
        return _connect(HOST, node.port, password=self.password, **kwargs)

    def sentinel_client(self, sentinel: SentinelServer, **kwargs: Any) -> redis.Redis:
        return _connect(SENTINEL_HOST, sentinel.port, password=self.sentinel_password, **kwargs)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> SentinelTopology:
        """Start the nodes and the sentinels; return once every sentinel sees the replica and
        the two other sentinels, and the quorum is reachable."""
        try:
            for node in self.nodes:
                node.start()
                if self.proxied:
                    proxy = TcpProxy(node.port).start()
                    self._proxies[id(node)] = proxy
                    announce = ["--replica-announce-port", str(proxy.port)]
                    node.extra_args = (*node.extra_args, *announce)
                    with self.node_client(node) as client:
                        client.config_set("replica-announce-port", proxy.port)
            primary, replica = self.nodes
            with self.node_client(replica) as client:
                client.replicaof(*self.address(primary))
            for i in range(self._sentinel_count):
                sentinel = SentinelServer(
                    self.workdir / f"sentinel{i}",
                    primary=self.address(primary),
                    quorum=self._sentinel_count // 2 + 1,
                    down_after_ms=self._down_after_ms,
                    failover_timeout_ms=self._failover_timeout_ms,
                    node_password=self.password,
                    password=self.sentinel_password,
                    binary=self.binary,
                )
                self.sentinels.append(sentinel)
                sentinel.start()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop everything (kill what does not stop); safe to call twice."""
        for server in [*self.sentinels, *self.nodes]:
            thaw(server)
            try:
                server.stop(timeout=5.0)
            except Exception:
                server.kill()
        for proxy in self._proxies.values():
            with contextlib.suppress(Exception):
                proxy.close()

    def __enter__(self) -> SentinelTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- views ----------------------------------------------------------------------------

    def sentinel_views(self) -> list[tuple[str, int] | None]:
        """What each sentinel names as the primary (None: the sentinel does not answer)."""
        views: list[tuple[str, int] | None] = []
        for sentinel in self.sentinels:
            with self.sentinel_client(sentinel) as client:
                reply = _silently(None, client.sentinel_get_master_addr_by_name, SERVICE_NAME)
            views.append(None if reply is None else (_decoded(reply[0]), int(reply[1])))
        return views

    def primary(self) -> RedisServer:
        """The data node a majority of the sentinels name as the primary."""
        views = [v for v in self.sentinel_views() if v is not None]
        for view in views:
            if views.count(view) * 2 > len(self.sentinels):
                node = self.node_at(*view)
                if node is not None:
                    return node
        raise AssertionError(f"no majority of sentinels agrees on a primary: {views}")

    def replica(self) -> RedisServer:
        """The data node that is not :meth:`primary`."""
        primary = self.primary()
        return next(node for node in self.nodes if node is not primary)

    def role(self, node: RedisServer) -> str | None:
        """``master`` / ``slave`` as ``node`` itself reports it (None: unreachable)."""
        with self.node_client(node) as client:
            info = _silently(None, _info, client, "replication")
        return None if info is None else str(info["role"])

    def health_problem(self) -> str | None:
        """What is still wrong with the set, or None when healthy (see :meth:`wait_healthy`)."""
        views = self.sentinel_views()
        if None in views or len(set(views)) != 1:
            return f"sentinels disagree: {views}"
        primary = self.node_at(*views[0])  # type: ignore[misc]
        if primary is None or self.role(primary) != "master":
            return f"{views[0]} is not a master"
        replica = next(node for node in self.nodes if node is not primary)
        with self.node_client(replica) as client:
            info = _silently(None, _info, client, "replication")
        if info is None:
            return f"{replica!r} does not answer"
        wanted = self.address(primary)
        if (
            info.get("role") != "slave"
            or (
                str(info.get("master_host")),
                int(info.get("master_port", 0)),
            )
            != wanted
        ):
            # Sentinel converts an old primary after ~10 s; a test fixture need not wait.
            with self.node_client(replica) as client:
                _silently(None, client.replicaof, *wanted)
            return f"{replica!r} is not a replica of the primary"
        if info.get("master_link_status") != "up":
            return f"{replica!r} is not in sync"
        for sentinel in self.sentinels:
            with self.sentinel_client(sentinel) as client:
                master = _silently(None, client.sentinel_master, SERVICE_NAME)
                replicas = _silently(None, client.sentinel_slaves, SERVICE_NAME)
                quorum = _silently(None, _command, client, "SENTINEL", "CKQUORUM", SERVICE_NAME)
            if master is None or replicas is None or quorum is None:
                return f"{sentinel!r} does not answer or has no quorum"
            if int(master["num-other-sentinels"]) != len(self.sentinels) - 1:
                return f"{sentinel!r} does not know every other sentinel"
            if "s_down" in str(master["flags"]) or "failover" in str(master["flags"]):
                return f"{sentinel!r} flags the primary {master['flags']}"
            up = [
                r
                for r in replicas
                if (str(r["ip"]), int(r["port"])) == self.address(replica)
                and str(r["flags"]) == "slave"
            ]
            if not up:
                seen = [(r["port"], r["flags"]) for r in replicas]
                return f"{sentinel!r} does not see the replica up: {seen}"
        return None

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until every sentinel agrees on a primary that has its replica attached and
        every sentinel sees that replica, the other sentinels and the quorum."""
        deadline = time.monotonic() + (self.READY_TIMEOUT if timeout is None else timeout)
        while (problem := self.health_problem()) is not None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sentinel set is not healthy: {problem}")
            time.sleep(0.05)

    # -- faults ---------------------------------------------------------------------------

    def failover(self, timeout: float = 30.0) -> RedisServer:
        """``SENTINEL FAILOVER`` (the old primary healthy); return the new primary once every
        sentinel names it. The old primary stays a writable ``master`` for a while after."""
        old = self.primary()
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.sentinel_client(self.sentinels[0]) as client:
                    client.sentinel_failover(SERVICE_NAME)
                break
            except redis.ResponseError as exc:
                # The sentinel may still be finishing the previous failover's state machine
                # (INPROG), or judge the replica by an INFO taken before it was healed (it
                # refreshes it every 10 s: NOGOODSLAVE while that one shows the replica's
                # link down), although every health check already passes: the fault is
                # asked for again once the sentinel agrees, never left out.
                busy = any(code in str(exc) for code in ("INPROG", "NOGOODSLAVE"))
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        return self.wait_switched(old, max(deadline - time.monotonic(), 1.0))

    def wait_switched(self, old: RedisServer, timeout: float = 30.0) -> RedisServer:
        """Wait until every sentinel names a primary other than ``old``; return it.

        A switch takes ~1-3.5 s here, but an election the Sentinels lose (split votes) is only
        retried after twice ``failover-timeout`` (6 s): the budget allows for two of them on a
        loaded machine."""
        old_address = self.address(old)

        def switched() -> RedisServer | None:
            views = self.sentinel_views()
            if None in views or len(set(views)) != 1 or views[0] == old_address:
                return None
            return self.node_at(*views[0])  # type: ignore[misc]

        new: RedisServer = wait_until(switched, timeout, interval=0.02, message="+switch-master")
        return new

    def kill_primary(self) -> RedisServer:
        """``kill -9`` the primary; return it (the sentinels fail over after down-after)."""
        primary = self.primary()
        primary.kill()
        return primary

    def cut_primary_from_sentinels(self) -> RedisServer:
        """Reset the sentinels' connections to the primary and refuse new ones (clients and
        the replica still reach it); return it. Needs ``proxied=True``."""
        primary = self.primary()
        self.proxy_of(primary).isolate(SENTINEL_HOST)
        return primary

    def heal(self, timeout: float | None = None) -> None:
        """Undo every fault (rejoin proxies, thaw, restart what was killed) and wait until
        healthy. Roles may have swapped: look the primary up again afterwards."""
        for proxy in self._proxies.values():
            proxy.rejoin(SENTINEL_HOST)
            proxy.resume()
            proxy.accept()
            proxy.delay(0)
        for server in [*self.nodes, *self.sentinels]:
            thaw(server)
            if not server.is_running():
                server.restart()
        self.wait_healthy(timeout)


# --------------------------------------------------------------------------------------------
# Cluster
# --------------------------------------------------------------------------------------------


class ClusterTopology:
    """Three primaries and three replicas; slots ``0-5460``, ``5461-10922``, ``10923-16383``.

    ``node_timeout_ms`` is ``cluster-node-timeout``: a failed primary's replica takes over
    about that long plus 0.5-1 s after the failure. ``proxied`` puts a :class:`TcpProxy`
    in front of each node's client port and announces it (``cluster-announce-port``), so
    redirections and ``CLUSTER SHARDS`` name the proxies.

    ``bus_proxied`` gives each node a loopback address of its own (``127.0.0.11`` and up: it
    listens there, announces it and connects from it) and puts its cluster bus behind a
    :class:`TcpProxy` on that address (announced with ``cluster-announce-bus-port``). Every
    bus connection then reaches a node through its proxy, which sees the connecting node's
    address: :meth:`cut_bus` partitions one node from the others while its clients (and
    its replica's replication link) still reach it.
    """

    READY_TIMEOUT = 30.0
    PRIMARIES = 3

    def __init__(
        self,
        workdir: Path,
        *,
        binary: str,
        password: str | None = None,
        proxied: bool = False,
        node_timeout_ms: int = 1000,
        node_args: Sequence[str] = (),
        bus_proxied: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.password = password
        self.proxied = proxied
        self.bus_proxied = bus_proxied
        self.node_timeout_ms = node_timeout_ms
        args = [
            *_FAST_REPLICATION,
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            # Keep the shape predictable: no replica moves to another shard on its own, and a
            # replica may always take over, however long it was disconnected.
            "--cluster-allow-replica-migration",
            "no",
            "--cluster-replica-validity-factor",
            "0",
            *node_args,
        ]
        if password is not None:
            args += ["--masterauth", password]
        self.nodes: list[RedisServer] = []
        for i in range(2 * self.PRIMARIES):
            self.nodes.append(
                RedisServer(
                    self.workdir / f"node{i}",
                    password=password,
                    binary=binary,
                    extra_args=args,
                    cluster_bus=True,
                    host=f"127.0.0.{11 + i}" if bus_proxied else HOST,
                )
            )
        self._proxies: dict[int, TcpProxy] = {}
        self._bus_proxies: dict[int, TcpProxy] = {}  # id(node) -> its bus proxy (bus_proxied)
        self.ids: dict[int, str] = {}  # id(node) -> cluster node id

    # -- addresses ------------------------------------------------------------------------

    def address(self, node: RedisServer) -> tuple[str, int]:
        """The address the cluster announces for ``node`` (its proxy when proxied)."""
        proxy = self._proxies.get(id(node))
        return (node.host, proxy.port if proxy is not None else node.port)

    def proxy_of(self, node: RedisServer) -> TcpProxy:
        return self._proxies[id(node)]

    def bus_port_of(self, node: RedisServer) -> int | None:
        """The cluster bus port the cluster announces for ``node`` (its bus proxy's)."""
        proxy = self._bus_proxies.get(id(node))
        return proxy.port if proxy is not None else node.bus_port

    def node_client(self, node: RedisServer, **kwargs: Any) -> redis.Redis:
        """A direct (non-cluster) client of ``node``; close it."""
        return _connect(node.host, node.port, password=self.password, **kwargs)

    def connection_string(self, *nodes: RedisServer, **options: str) -> str:
        """``host:port,host:port...[,password=...]`` naming the given nodes (default: all),
        the way an application names some nodes of a cluster (tried in order)."""
        parts = ["{}:{}".format(*self.address(node)) for node in nodes or self.nodes]
        if self.password is not None:
            parts.append(f"password={self.password}")
        parts += [f"{k}={v}" for k, v in options.items()]
        return ",".join(parts)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> ClusterTopology:
        """Start six nodes, join them, assign the slots and the replicas; return once every
        node reports ``cluster_state:ok`` and every replica is in sync."""
        try:
            for node in self.nodes:
                node.start()
                if self.proxied:
                    proxy = TcpProxy(node.port).start()
                    self._proxies[id(node)] = proxy
                    node.extra_args = (*node.extra_args, "--cluster-announce-port", str(proxy.port))
                    with self.node_client(node) as client:
                        client.config_set("cluster-announce-port", proxy.port)
                if self.bus_proxied:
                    assert node.bus_port is not None
                    bus = TcpProxy(node.bus_port, node.host, listen_host=node.host).start()
                    self._bus_proxies[id(node)] = bus
                    announce = ("--cluster-announce-ip", node.host)
                    announce += ("--cluster-announce-bus-port", str(bus.port))
                    node.extra_args = (*node.extra_args, *announce)
                    with self.node_client(node) as client:
                        client.config_set("cluster-announce-ip", node.host)
                        client.config_set("cluster-announce-bus-port", bus.port)
            self._build()
        except BaseException:
            self.stop()
            raise
        return self

    def _build(self) -> None:
        clients = [self.node_client(node) for node in self.nodes]
        try:
            for i, (node, client) in enumerate(zip(self.nodes, clients, strict=True)):
                self.ids[id(node)] = str(_command(client, "CLUSTER", "MYID"))
                # Distinct epochs up front: no collision rounds before the cluster settles.
                _command(client, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
            per_primary = SLOTS // self.PRIMARIES
            for i in range(self.PRIMARIES):
                low = i * per_primary
                high = SLOTS - 1 if i == self.PRIMARIES - 1 else low + per_primary - 1
                _command(clients[i], "CLUSTER", "ADDSLOTSRANGE", low, high)
            for node in self.nodes[1:]:
                meet = (node.host, node.port, self.bus_port_of(node))
                _command(clients[0], "CLUSTER", "MEET", *meet)

            def everyone_known() -> bool:
                for client in clients:
                    nodes = _silently("", _command, client, "CLUSTER", "NODES")
                    lines = [line for line in str(nodes).splitlines() if line]
                    if len(lines) != len(self.nodes) or "handshake" in str(nodes):
                        return False
                return True

            wait_until(everyone_known, self.READY_TIMEOUT, interval=0.05, message="CLUSTER MEET")
            for i in range(self.PRIMARIES):
                replica = clients[self.PRIMARIES + i]
                _command(replica, "CLUSTER", "REPLICATE", self.ids[id(self.nodes[i])])
        finally:
            for client in clients:
                client.close()
        self.wait_healthy()

    def stop(self) -> None:
        """Stop every node (kill what does not stop); safe to call twice."""
        for node in self.nodes:
            thaw(node)
            try:
                node.stop(timeout=5.0)
            except Exception:
                node.kill()
        for proxy in [*self._proxies.values(), *self._bus_proxies.values()]:
            with contextlib.suppress(Exception):
                proxy.close()

    def __enter__(self) -> ClusterTopology:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- views ----------------------------------------------------------------------------

    def node_by_id(self, node_id: str) -> RedisServer:
        return next(node for node in self.nodes if self.ids[id(node)] == node_id)

    def shards(self, via: RedisServer | None = None) -> list[tuple[RedisServer, list[RedisServer]]]:
        """``(primary, replicas)`` per shard as ``via`` (default: any live node) sees it."""
        candidates = [via] if via is not None else [n for n in self.nodes if n.is_running()]
        for node in candidates:
            with self.node_client(node) as client:
                text = _silently(None, _command, client, "CLUSTER", "NODES")
            if text is None:
                continue
            primaries: dict[str, list[RedisServer]] = {}
            lines = [line.split() for line in str(text).splitlines()]
            if any({"fail", "fail?", "handshake", "noaddr"} & set(f[2].split(",")) for f in lines):
                continue  # not settled (a node down or joining): ask another node
            for fields in lines:
                if "master" in fields[2].split(",") and len(fields) > 8:  # it has slots
                    primaries.setdefault(fields[0], [])
            for fields in lines:
                if "slave" in fields[2].split(",") and fields[3] in primaries:
                    primaries[fields[3]].append(self.node_by_id(fields[0]))
            return [(self.node_by_id(pid), reps) for pid, reps in primaries.items()]
        raise AssertionError("no cluster node answers")

    def owner(self, slot: int, via: RedisServer | None = None) -> RedisServer:
        """The primary that serves ``slot`` as ``via`` (default: any live node) sees it."""
        candidates = [via] if via is not None else [n for n in self.nodes if n.is_running()]
        for node in candidates:
            with self.node_client(node) as client:
                shards = _silently(None, _command, client, "CLUSTER", "SLOTS")
            if shards is None:
                continue
            for low, high, primary, *_replicas in shards:
                if low <= slot <= high:
                    port = int(primary[1])
                    return next(n for n in self.nodes if self.address(n)[1] == port)
        raise AssertionError(f"no node knows who owns slot {slot}")

    def primaries(self) -> list[RedisServer]:
        return [primary for primary, _ in self.shards()]

    def replica_of(self, primary: RedisServer) -> RedisServer:
        for shard_primary, replicas in self.shards():
            if shard_primary is primary and replicas:
                return replicas[0]
        raise AssertionError(f"{primary!r} has no replica")

    def cluster_state(self, node: RedisServer) -> str | None:
        """``ok`` / ``fail`` as ``node`` reports it (None: unreachable)."""
        with self.node_client(node) as client:
            text = _silently(None, _command, client, "CLUSTER", "INFO")
        if text is None:
            return None
        info = dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)
        return info.get("cluster_state")

    def _healthy(self) -> bool:
        if not all(node.is_running() for node in self.nodes):
            return False
        if any(self.cluster_state(node) != "ok" for node in self.nodes):
            return False
        try:
            shards = self.shards(self.nodes[0])
        except AssertionError:
            return False
        if len(shards) != self.PRIMARIES or any(len(reps) != 1 for _, reps in shards):
            return False
        for primary, replicas in shards:
            with self.node_client(primary) as client:
                info = _silently(None, _info, client, "replication")
            if info is None or info.get("role") != "master":
                return False
            with self.node_client(replicas[0]) as client:
                info = _silently(None, _info, client, "replication")
            if info is None or info.get("master_link_status") != "up":
                return False
        return True

    def wait_healthy(self, timeout: float | None = None) -> None:
        """Wait until every node says ``cluster_state:ok`` and each of the three primaries
        has one replica in sync."""
        wait_until(
            self._healthy,
            self.READY_TIMEOUT if timeout is None else timeout,
            interval=0.05,
            message="the cluster to be healthy",
        )

    # -- faults ---------------------------------------------------------------------------

    def move_slot(self, slot: int, target: RedisServer | None = None) -> RedisServer:
        """Reshard ``slot`` (keys included) to ``target`` (default: the next primary);
        return the new owner. Subscribers of the slot's shard channels on the old owner get
        ``sunsubscribe`` when ownership changes."""
        source = self.owner(slot)
        if target is None:
            primaries = sorted(self.primaries(), key=lambda n: n.port)
            target = primaries[(primaries.index(source) + 1) % len(primaries)]
        if target is source:
            return source
        source_id, target_id = self.ids[id(source)], self.ids[id(target)]
        with self.node_client(source) as src, self.node_client(target) as dst:
            _command(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            _command(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while True:
                keys = _command(src, "CLUSTER", "GETKEYSINSLOT", slot, 100)
                if not keys:
                    break
                auth: list[Any] = [] if self.password is None else ["AUTH", self.password]
                migrate = ("MIGRATE", target.host, target.port, "", 0, 5000, *auth, "KEYS", *keys)
                src.execute_command(*migrate)
            # The new owner first, then the old one (the order redis-cli uses), then the rest.
            _command(dst, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
            _command(src, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        for node in self.primaries():
            if node is not source and node is not target:
                with self.node_client(node) as client:
                    _silently(None, _command, client, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        return target

    def kill(self, node: RedisServer) -> None:
        """``kill -9`` one node."""
        node.kill()

    def wait_owner_changed(self, slot: int, old: RedisServer, timeout: float = 15.0) -> RedisServer:
        """Wait until the live nodes agree that a node other than ``old`` serves ``slot`` and
        report ``cluster_state:ok``; return the new owner."""

        def moved() -> RedisServer | None:
            live = [n for n in self.nodes if n.is_running() and n is not old]
            owners = {self.owner(slot, n) if self.cluster_state(n) == "ok" else None for n in live}
            if len(owners) != 1:
                return None
            owner = owners.pop()
            return None if owner is old else owner

        new: RedisServer = wait_until(moved, timeout, interval=0.05, message="slot failover")
        return new

    def isolate_minority(self, primary: RedisServer) -> list[RedisServer]:
        """Freeze every other primary, so ``primary`` is alone in a minority; return the frozen
        ones (``heal`` thaws them). It keeps answering PING and SPUBLISH; after about
        ``node_timeout_ms`` it reports ``cluster_state:fail`` and refuses keyed commands."""
        others = [p for p in self.primaries() if p is not primary]
        for other in others:
            freeze(other)
        return others

    def cut_bus(self, node: RedisServer) -> None:
        """Partition ``node`` (``bus_proxied`` only): every cluster bus connection between it
        and the other nodes is reset and refused, both ways, while its client port stays
        reachable. A primary cut off reports ``cluster_state:fail`` after about
        ``node_timeout_ms`` and answers keyed commands with ``CLUSTERDOWN``; the others fail
        its slots over to its replica. ``heal`` joins it again."""
        for other in self.nodes:
            if other is not node:
                self._bus_proxies[id(node)].isolate(other.host)  # their links to it
                self._bus_proxies[id(other)].isolate(node.host)  # its links to them

    def heal(self, timeout: float | None = None) -> None:
        """Undo every fault (thaw, restart what was killed, reset proxies) and wait until
        healthy. Roles may have swapped: look owners up again afterwards."""
        for proxy in self._proxies.values():
            proxy.resume()
            proxy.accept()
            proxy.delay(0)
        for proxy in self._bus_proxies.values():
            for node in self.nodes:
                proxy.rejoin(node.host)
        for node in self.nodes:
            thaw(node)
        for node in self.nodes:
            if not node.is_running():
                node.restart()  # nodes.conf in its workdir brings it back as a replica
        self.wait_healthy(timeout)
