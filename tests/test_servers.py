"""Tests of the test infrastructure itself: real redis-server children and the TCP proxy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.servers import (
    RedisServer,
    TcpProxy,
    free_port,
    port_is_bindable,
    redis_server_binary,
    wait_until,
)

RedisFactory = Callable[..., RedisServer]
ProxyFactory = Callable[[int], TcpProxy]


def _pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` names a process (a zombie counts: it was not reaped)."""
    assert pid is not None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


# -- helpers ---------------------------------------------------------------------------------


def test_free_port_is_bindable() -> None:
    """free_port() returns a loopback port that can be bound right away."""
    port = free_port()
    assert 0 < port < 65536
    assert port_is_bindable(port)


def test_wait_until_returns_value_and_times_out() -> None:
    """wait_until returns the predicate's truthy value and raises TimeoutError at the deadline."""
    calls = iter(range(10))
    assert wait_until(lambda: next(calls) >= 3, timeout=10.0) is True
    with pytest.raises(TimeoutError, match="never"):
        wait_until(lambda: False, timeout=0.05, message="never")


def test_binary_env_override(monkeypatch: pytest.MonkeyPatch, redis_binary: str) -> None:
    """NEARCACHE_REDIS_SERVER overrides PATH, and a bad override yields None."""
    real = redis_server_binary()
    assert real == redis_binary
    monkeypatch.setenv("NEARCACHE_REDIS_SERVER", real)
    assert redis_server_binary() == real
    monkeypatch.setenv("NEARCACHE_REDIS_SERVER", "/nonexistent/redis-server")
    assert redis_server_binary() is None


# -- redis-server ----------------------------------------------------------------------------


def test_server_starts_and_answers(redis_server: RedisServer) -> None:
    """The shared server is a live child process that answers PING and stores data."""
    assert redis_server.is_running()
    assert redis_server.host == "127.0.0.1"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}"
    assert redis_server.connection_string == f"127.0.0.1:{redis_server.port}"
    with redis_server.client() as r:
        assert r.ping() is True
        assert r.info("server")["process_id"] == redis_server.pid
        assert r.config_get("save") == {"save": ""}
        assert r.config_get("appendonly") == {"appendonly": "no"}
    with redis.Redis.from_url(redis_server.url) as r:
        assert r.ping() is True


def test_kill_makes_clients_fail(redis_factory: RedisFactory) -> None:
    """SIGKILL crashes the server: existing and new connections raise ConnectionError."""
    server = redis_factory()
    pid = server.pid
    with server.client() as r:
        assert r.ping()
        server.kill()
        assert not server.is_running()
        assert not _pid_alive(pid)  # reaped, not a zombie
        with pytest.raises(redis.ConnectionError):
            r.ping()
    with server.client() as r, pytest.raises(redis.ConnectionError):
        r.ping()


def test_restart_same_port_data_gone(redis_factory: RedisFactory) -> None:
    """restart() brings up a new process on the same port with an empty dataset."""
    server = redis_factory()
    port, pid = server.port, server.pid
    with server.client() as r:
        r.set("k", "v")
        assert r.get("k") == b"v"
    server.kill()
    server.restart()
    assert server.port == port
    assert server.pid != pid
    with server.client() as r:
        assert r.ping()
        assert r.get("k") is None
    server.restart()  # graceful stop + start works too
    assert server.port == port
    with server.client() as r:
        assert r.ping()


def test_stop_reaps_and_context_manager(tmp_path: Path, redis_binary: str) -> None:
    """A server used as a context manager is stopped and reaped on exit."""
    with RedisServer(tmp_path / "cm") as server:
        pid = server.pid
        assert server.is_running()
        with server.client() as r:
            assert r.ping()
    assert not server.is_running()
    assert not _pid_alive(pid)
    assert "ready to accept connections" in server.log_tail().lower()


def test_start_failure_reports_log(tmp_path: Path, redis_binary: str) -> None:
    """A server that cannot start raises with the tail of its log in the message."""
    server = RedisServer(tmp_path / "bad", extra_args=["--no-such-option", "1"])
    with pytest.raises(RuntimeError, match="no-such-option"):
        server.start()
    assert not server.is_running()


def test_pinned_port_in_use_fails(tmp_path: Path, redis_server: RedisServer) -> None:
    """Starting on a port that is already taken fails fast instead of hijacking it."""
    server = RedisServer(tmp_path / "dup", port=redis_server.port)
    with pytest.raises(RuntimeError, match="Address already in use"):
        server.start()
    with redis_server.client() as r:
        assert r.ping()


def test_acl_user_auth(acl_redis: RedisServer) -> None:
    """The ACL user authenticates; a wrong password or no credentials are rejected."""
    assert acl_redis.acl_user == "app"
    assert acl_redis.acl_password == "s3cr3t-app-pass"
    assert acl_redis.url == f"redis://app:s3cr3t-app-pass@127.0.0.1:{acl_redis.port}"
    assert acl_redis.connection_string == (
        f"127.0.0.1:{acl_redis.port},password=s3cr3t-app-pass,user=app"
    )
    with acl_redis.client() as r:
        assert r.acl_whoami() == "app"
    with redis.Redis.from_url(acl_redis.url) as r:
        assert r.acl_whoami() == "app"
    with acl_redis.client(username=None, password=acl_redis.password) as r:
        assert r.acl_whoami() == "default"
    with acl_redis.client(password="wrong") as r, pytest.raises(redis.AuthenticationError):
        r.ping()
    with (
        acl_redis.client(username=None, password=None) as r,
        pytest.raises(redis.AuthenticationError),
    ):
        r.ping()


def test_tls_requires_trusted_ca(tls_redis: RedisServer) -> None:
    """TLS works with the trustme CA, fails verification without it, and plain TCP fails."""
    assert tls_redis.tls is not None
    assert tls_redis.tls.ca_file.is_file()
    assert tls_redis.url == f"rediss://127.0.0.1:{tls_redis.port}"
    assert tls_redis.connection_string == (
        f"127.0.0.1:{tls_redis.port},ssl=True,sslCaFile={tls_redis.tls.ca_file}"
    )
    with tls_redis.client() as r:
        assert r.ping()
    with (
        tls_redis.client(ssl_ca_certs=None) as r,
        pytest.raises(redis.ConnectionError, match=r"(?i)certificate"),
    ):
        r.ping()
    with tls_redis.client(ssl_ca_certs=None, ssl_cert_reqs="none", ssl_check_hostname=False) as r:
        assert r.ping()
    with tls_redis.client(ssl=False, socket_timeout=2.0) as r, pytest.raises(redis.ConnectionError):
        r.ping()


def test_factory_tls_shortcut(redis_factory: RedisFactory) -> None:
    """redis_factory(tls=True, password=...) builds a private TLS server with auth."""
    server = redis_factory(tls=True, password="pw")
    assert server.url == f"rediss://:pw@127.0.0.1:{server.port}"
    with server.client() as r:
        assert r.ping()


# -- TCP proxy -------------------------------------------------------------------------------


def test_proxy_forwards_ping(redis_server: RedisServer, tcp_proxy: ProxyFactory) -> None:
    """Commands sent through the proxy reach Redis and the counters move."""
    proxy = tcp_proxy(redis_server.port)
    assert proxy.port != redis_server.port
    with redis_server.client(port=proxy.port) as r:
        assert r.ping()
        assert proxy.connections == 1
        assert proxy.bytes_forwarded > 0
    wait_until(lambda: proxy.connections == 0, message="closed connection is reaped")


def test_proxy_large_values_and_pubsub(
    redis_server: RedisServer, tcp_proxy: ProxyFactory, channel: str
) -> None:
    """Multi-megabyte values and Pub/Sub messages pass through the proxy intact."""
    proxy = tcp_proxy(redis_server.port)
    blob = os.urandom(3 * 1024 * 1024)
    with redis_server.client(port=proxy.port) as r:
        r.set(channel, blob)
        assert r.get(channel) == blob
        r.delete(channel)
        with r.pubsub() as ps:
            ps.subscribe(channel)
            assert ps.get_message(timeout=5)["type"] == "subscribe"
            with redis_server.client() as direct:
                assert direct.publish(channel, "hello") == 1
            msg = wait_until(lambda: ps.get_message(timeout=1))
            assert msg["data"] == b"hello"


def test_proxy_cut_resets_existing_connections(
    redis_server: RedisServer, tcp_proxy: ProxyFactory, channel: str
) -> None:
    """cut() makes held redis-py connections (plain and Pub/Sub) fail with ConnectionError."""
    proxy = tcp_proxy(redis_server.port)
    # A pooled client would silently reconnect at checkout (redis-py's can_read() check), so
    # hold the connection like a subscriber does.
    with redis_server.client(port=proxy.port, single_connection_client=True) as r:
        assert r.ping()
        with r.pubsub() as ps:
            ps.subscribe(channel)
            assert ps.get_message(timeout=5)["type"] == "subscribe"
            assert proxy.connections == 2
            proxy.cut()
            assert proxy.connections == 0
            with pytest.raises(redis.ConnectionError):
                r.ping()
            with pytest.raises(redis.ConnectionError):
                ps.get_message(timeout=1)
    with redis_server.client(port=proxy.port) as r:
        assert r.ping()  # new connections are still accepted


def test_proxy_cut_raw_socket_sees_reset(
    redis_server: RedisServer, tcp_proxy: ProxyFactory
) -> None:
    """After cut() the client socket gets ECONNRESET rather than a clean EOF."""
    proxy = tcp_proxy(redis_server.port)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"
        proxy.cut()
        with pytest.raises(ConnectionResetError):
            sock.recv(64)


def test_proxy_stall_times_out_but_keeps_socket(
    redis_server: RedisServer, tcp_proxy: ProxyFactory
) -> None:
    """stall() makes PING time out with the socket still open; resume() restores service."""
    proxy = tcp_proxy(redis_server.port)
    with redis_server.client(port=proxy.port, socket_timeout=0.5) as r:
        assert r.ping()
        proxy.stall()
        with pytest.raises(redis.TimeoutError):
            r.ping()
        # Nothing was closed: the proxied connection is still held open.
        assert proxy.connections >= 1
        with (
            redis_server.client(port=proxy.port, socket_timeout=0.5) as fresh,
            pytest.raises(redis.TimeoutError),
        ):
            fresh.ping()  # new connections are accepted but get no service either
        proxy.resume()
        with redis_server.client(port=proxy.port) as again:
            assert again.ping()


def test_proxy_stall_discards_bytes(redis_server: RedisServer, tcp_proxy: ProxyFactory) -> None:
    """Bytes sent during a stall are dropped, not delivered after resume()."""
    proxy = tcp_proxy(redis_server.port)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        assert sock.recv(64) == b"+PONG\r\n"
        proxy.stall()
        sock.sendall(b"ECHO lost\r\n")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(64)
        proxy.resume()
        sock.settimeout(5)
        sock.sendall(b"ECHO kept\r\n")
        assert sock.recv(64) == b"$4\r\nkept\r\n"


def test_proxy_refuse(redis_server: RedisServer, tcp_proxy: ProxyFactory) -> None:
    """refuse() rejects new connections but leaves open ones alone; accept() undoes it."""
    proxy = tcp_proxy(redis_server.port)
    with redis_server.client(port=proxy.port) as existing:
        assert existing.ping()
        proxy.refuse()
        with redis_server.client(port=proxy.port) as r, pytest.raises(redis.ConnectionError):
            r.ping()
        assert existing.ping()
        proxy.accept()
        with redis_server.client(port=proxy.port) as r:
            assert r.ping()


def test_proxy_delay_adds_latency(redis_server: RedisServer, tcp_proxy: ProxyFactory) -> None:
    """delay() holds each chunk in both directions, so a round trip takes twice the delay."""
    proxy = tcp_proxy(redis_server.port)
    with redis_server.client(port=proxy.port) as r:
        assert r.ping()
        proxy.delay(0.15)
        started = time.monotonic()
        assert r.ping()
        assert time.monotonic() - started >= 0.29
        proxy.delay(0)
        started = time.monotonic()
        assert r.ping()
        assert time.monotonic() - started < 0.29  # no longer delayed (a loaded box may pause)


def test_proxy_target_down_resets_client(
    redis_factory: RedisFactory, tcp_proxy: ProxyFactory
) -> None:
    """With the target killed, new proxied connections fail fast with ConnectionError."""
    server = redis_factory()
    proxy = tcp_proxy(server.port)
    server.kill()
    with server.client(port=proxy.port) as r, pytest.raises(redis.ConnectionError):
        r.ping()
    server.restart()
    with server.client(port=proxy.port) as r:
        assert r.ping()


def test_proxy_over_tls(tls_redis: RedisServer, tcp_proxy: ProxyFactory) -> None:
    """The proxy is byte-transparent, so TLS (hostname 127.0.0.1) works through it."""
    proxy = tcp_proxy(tls_redis.port)
    with tls_redis.client(port=proxy.port) as r:
        assert r.ping()


def test_proxy_close_is_clean(redis_server: RedisServer) -> None:
    """close() resets live connections, stops the thread and frees the port."""
    proxy = TcpProxy(redis_server.port).start()
    port = proxy.port
    with redis_server.client(port=port) as r:
        assert r.ping()
        proxy.close()
        assert proxy.connections == 0
        assert proxy._thread is not None
        assert not proxy._thread.is_alive()
        with pytest.raises(redis.ConnectionError):
            r.ping()
    assert port_is_bindable(port)
    proxy.close()  # idempotent
    with pytest.raises(RuntimeError):
        proxy.stall()


def test_atexit_hook_kills_leftovers(tmp_path: Path, redis_binary: str) -> None:
    """A process that leaves a server running still kills it at interpreter exit."""
    code = (
        "from pathlib import Path; from tests.servers import RedisServer;"
        f"s = RedisServer(Path({str(tmp_path)!r})).start(); print(s.pid, flush=True)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    pid = int(out.stdout.split()[0])
    assert not _pid_alive(pid)
