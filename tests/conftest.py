"""Shared fixtures: real ``redis-server`` processes and fault-injecting TCP proxies.

Without a ``redis-server`` binary the fixtures skip the tests that use them, unless ``$CI`` is
set, in which case the whole run fails at start-up (a CI run must never "pass" by skipping).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.servers import (
    REDIS_SERVER_ENV,
    RedisServer,
    TcpProxy,
    make_tls_files,
    redis_server_binary,
)
from tests.topologies import ClusterTopology, SentinelTopology

ACL_USER = "app"
ACL_PASSWORD = "s3cr3t-app-pass"
DEFAULT_USER_PASSWORD = "default-s3cr3t-pass"

_MISSING = (
    f"redis-server binary not found (looked at ${REDIS_SERVER_ENV}, then PATH); "
    "install redis-server >= 7 or point the variable at it"
)


def pytest_configure(config: pytest.Config) -> None:
    if redis_server_binary() is None and os.environ.get("CI"):
        raise pytest.UsageError(f"CI is set but {_MISSING}")


def _require_redis() -> str:
    binary = redis_server_binary()
    if binary is None:
        pytest.skip(_MISSING)
    return binary


@pytest.fixture(scope="session")
def redis_binary() -> str:
    """Path of the redis-server binary (skips, or fails under $CI, when there is none)."""
    return _require_redis()


def _stop_server(server: RedisServer) -> BaseException | None:
    try:
        server.stop()
    except Exception as exc:
        server.kill()
        return exc
    return None


def _close_proxy(proxy: TcpProxy) -> BaseException | None:
    try:
        proxy.close()
    except Exception as exc:
        return exc
    return None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A plain, shared redis-server (isolate tests by channel/key names; never kill it)."""
    binary = _require_redis()
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"), binary=binary)
    with server.start():
        yield server


@pytest.fixture
def redis_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RedisServer]]:
    """Start a fresh, private redis-server per call: ``redis_factory(**RedisServer kwargs)``.

    ``tls=True`` is accepted as a shortcut for freshly generated :class:`TlsFiles`.  Every
    server is stopped (killed if need be) at teardown.
    """
    binary = _require_redis()
    servers: list[RedisServer] = []

    def factory(**kwargs: Any) -> RedisServer:
        workdir = tmp_path_factory.mktemp("redis")
        if kwargs.get("tls") is True:
            kwargs["tls"] = make_tls_files(workdir / "tls")
        kwargs.setdefault("binary", binary)
        server = RedisServer(workdir, **kwargs)
        servers.append(server)
        return server.start()

    yield factory
    errors = [err for err in map(_stop_server, reversed(servers)) if err is not None]
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Shared server: ``requirepass`` on ``default`` plus ACL user ``app``/``s3cr3t-app-pass``.

    ``.acl_user``/``.acl_password`` are the ACL identity (used by ``.url``/``.client()``);
    ``.password`` is the ``default`` user's password.
    """
    binary = _require_redis()
    server = RedisServer(
        tmp_path_factory.mktemp("redis-acl"),
        password=DEFAULT_USER_PASSWORD,
        acl_users={ACL_USER: ACL_PASSWORD},
        binary=binary,
    )
    with server.start():
        yield server


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """Shared TLS-only server signed by a throw-away trustme CA (``.tls.ca_file``)."""
    binary = _require_redis()
    workdir = tmp_path_factory.mktemp("redis-tls")
    server = RedisServer(workdir, tls=make_tls_files(workdir / "tls"), binary=binary)
    with server.start():
        yield server


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[[int], TcpProxy]]:
    """Start a :class:`TcpProxy` per call: ``tcp_proxy(target_port)``; all closed at teardown."""
    proxies: list[TcpProxy] = []

    def factory(target_port: int, target_host: str = "127.0.0.1") -> TcpProxy:
        proxy = TcpProxy(target_port, target_host)
        proxies.append(proxy)
        return proxy.start()

    yield factory
    errors = [err for err in map(_close_proxy, reversed(proxies)) if err is not None]
    if errors:
        raise errors[0]


@pytest.fixture
def channel() -> str:
    """A channel name unique to this test."""
    return f"t-{uuid.uuid4().hex[:12]}"


# -- Sentinel and Cluster topologies (tests/topologies.py) -----------------------------------

SENTINEL_NODE_PASSWORD = "node-s3cr3t-pass"
SENTINEL_PASSWORD = "sentinel-s3cr3t-pass"


@pytest.fixture(scope="session")
def _sentinel_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    topology = SentinelTopology(
        tmp_path_factory.mktemp("sentinel"),
        binary=_require_redis(),
        password=SENTINEL_NODE_PASSWORD,
        sentinel_password=SENTINEL_PASSWORD,
        proxied=True,
    )
    with topology:
        yield topology


@pytest.fixture
def sentinel_set(_sentinel_session: SentinelTopology) -> Iterator[SentinelTopology]:
    """The shared primary + replica + 3 sentinels (passwords on both; each data node behind
    a TcpProxy), healthy at the start of the test and healed after it, so a test may fail
    over, kill or cut anything. Roles change between tests: look the primary up."""
    _sentinel_session.heal()
    yield _sentinel_session
    _sentinel_session.heal()


@pytest.fixture(scope="session")
def _cluster_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    topology = ClusterTopology(tmp_path_factory.mktemp("cluster"), binary=_require_redis())
    with topology:
        yield topology


@pytest.fixture
def redis_cluster(_cluster_session: ClusterTopology) -> Iterator[ClusterTopology]:
    """The shared 3-primary, 3-replica Redis Cluster, healthy at the start of the test and
    healed after it (a test may move slots, kill or freeze nodes). Owners change between
    tests: look them up."""
    _cluster_session.heal()
    yield _cluster_session
    _cluster_session.heal()
