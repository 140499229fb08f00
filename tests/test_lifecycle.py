"""Starting and stopping: abortConnect, TLS, ACL users, signing, fork, the embedded default."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import time
from collections.abc import Callable

import pytest

import nearcache
from nearcache import (
    AsyncNearCache,
    BackplaneUnavailableError,
    ConfigurationError,
    NearCache,
)
from tests.servers import RedisServer, free_port, wait_until

PASSWORD = "hunter2-never-printed"


def test_no_connection_string_is_a_plain_local_cache() -> None:
    """Without a connection string nothing connects and no thread starts; the cache works."""
    import threading

    threads = threading.active_count()
    with NearCache(ttl=60) as cache:
        cache.set("k", "v", region="r")
        assert cache.get("k", region="r") == "v"
        cache.flush()
        assert cache.backplane_state is None
        assert threading.active_count() == threads
        assert cache.stats().backplane == "local"


def test_abort_connect_true_raises_a_clear_error_without_the_password() -> None:
    """With abortConnect=True (the default) an unreachable Redis fails the constructor with an
    error naming where it tried, never the password."""
    port = free_port()
    started = time.monotonic()
    with pytest.raises(BackplaneUnavailableError) as info:
        NearCache(f"127.0.0.1:{port},password={PASSWORD},connectTimeout=300")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert PASSWORD not in message
    assert "abortConnect=False" in message


def test_abort_connect_true_async_raises_on_start() -> None:
    """The asyncio cache raises the same error when it starts."""

    async def main() -> None:
        cache = AsyncNearCache(f"127.0.0.1:{free_port()},connectTimeout=300")
        with pytest.raises(BackplaneUnavailableError):
            await cache.start()

    asyncio.run(main())


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_abort_connect_false_starts_locally_and_joins_later(
    redis_factory: Callable[..., RedisServer], channel: str, driver: str
) -> None:
    """With abortConnect=False the cache serves at once and joins the backplane by itself when
    Redis appears."""
    port = free_port()
    conn = f"127.0.0.1:{port},abortConnect=False,connectTimeout=300"

    async def scenario() -> None:
        if driver == "sync":
            cache: object = NearCache(conn, channel=channel)
        else:
            cache = AsyncNearCache(conn, channel=channel)
        c = cache

        async def run(x: object) -> object:
            return await x if inspect.isawaitable(x) else x  # type: ignore[misc]

        await run(c.set("k", "local"))  # type: ignore[attr-defined]
        assert await run(c.get("k")) == "local"  # type: ignore[attr-defined]
        assert c.backplane_state.value != "connected"  # type: ignore[attr-defined]
        server = redis_factory(port=port)
        deadline = time.monotonic() + 15
        while c.backplane_state.value != "connected":  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "never joined the backplane"
            await asyncio.sleep(0.01)
        with NearCache(server.url, channel=channel) as other:
            wait_until(lambda: other.backplane_state.value == "connected")  # type: ignore[union-attr]
            await run(c.set("k", "joined"))  # type: ignore[attr-defined]
            other.remove("k")
            other.flush()
            deadline = time.monotonic() + 5
            while await run(c.get("k")) is not None:  # type: ignore[attr-defined]
                assert time.monotonic() < deadline
                await asyncio.sleep(0.001)
        if driver == "sync":
            c.close()  # type: ignore[attr-defined]
        else:
            await c.aclose()  # type: ignore[attr-defined]

    asyncio.run(scenario())


def test_acl_user_and_password(acl_redis: RedisServer, channel: str) -> None:
    """A Redis ACL user authenticates; a wrong password fails without being echoed."""
    user, password = acl_redis.acl_user, acl_redis.acl_password
    conn = f"{acl_redis.host}:{acl_redis.port},user={user},password={password}"
    with NearCache(conn, channel=channel) as a, NearCache(acl_redis.url, channel=channel) as b:
        wait_until(lambda: b.backplane_state.value == "connected")  # type: ignore[union-attr]
        b.set("k", 1)
        a.remove("k")
        a.flush()
        wait_until(lambda: b.get("k") is None)
    wrong = f"{acl_redis.host}:{acl_redis.port},user=app,password={PASSWORD},connectTimeout=1000"
    with pytest.raises(BackplaneUnavailableError) as info:
        NearCache(wrong, channel=channel)
    assert PASSWORD not in str(info.value)
    assert "WRONGPASS" in str(info.value) or "auth" in str(info.value).lower()


def test_tls_with_a_private_ca(tls_redis: RedisServer, channel: str) -> None:
    """ssl=True verifies the server against sslCaFile and propagates over TLS."""
    conn = f"127.0.0.1:{tls_redis.port},ssl=True,sslCaFile={tls_redis.ca_file}"
    with NearCache(conn, channel=channel) as a, NearCache(conn, channel=channel) as b:
        wait_until(lambda: b.backplane_state.value == "connected")  # type: ignore[union-attr]
        b.set("k", 1)
        a.remove("k")
        a.flush()
        wait_until(lambda: b.get("k") is None)


def test_tls_verification_is_on_by_default(tls_redis: RedisServer, channel: str) -> None:
    """Without the CA the server's certificate is refused; sslVerify=False accepts it."""
    conn = f"127.0.0.1:{tls_redis.port},ssl=True,connectTimeout=2000"
    with pytest.raises(BackplaneUnavailableError, match=r"(?i)certificate|ssl"):
        NearCache(conn, channel=channel)
    with NearCache(conn + ",sslVerify=False", channel=channel) as cache:
        assert cache.backplane_state.value == "connected"  # type: ignore[union-attr]


def test_tls_async(tls_redis: RedisServer, channel: str) -> None:
    """The asyncio driver connects over TLS too."""
    conn = f"127.0.0.1:{tls_redis.port},ssl=True,sslCaFile={tls_redis.ca_file}"

    async def main() -> None:
        async with AsyncNearCache(conn, channel=channel) as cache:
            assert cache.backplane_state.value == "connected"  # type: ignore[union-attr]

    asyncio.run(main())


def test_signed_messages_and_forgeries(redis_server: RedisServer, channel: str) -> None:
    """With a secret, signed messages are applied, unsigned or forged ones are counted and
    dropped, and a rotated key is still accepted while it is listed."""
    from nearcache._core.codec import Invalidation, Kind, encode

    url = redis_server.url
    with (
        NearCache(url, channel=channel, secret={"k2": "new", "k1": "old"}) as receiver,
        NearCache(url, channel=channel, secret={"k1": "old"}) as old_writer,
    ):
        wait_until(lambda: receiver.backplane_state.value == "connected")  # type: ignore[union-attr]
        receiver.set("k", 1)
        raw = redis_server.client()
        op = [Invalidation(Kind.CLEAR)]
        raw.publish(receiver.channel, encode(b"f" * 16, 1, op))
        raw.publish(receiver.channel, encode(b"f" * 16, 2, op, signing_key=("k1", b"forged")))
        raw.publish(receiver.channel, encode(b"f" * 16, 3, op, signing_key=("k9", b"x")))
        raw.close()
        wait_until(lambda: receiver.stats().malformed_messages == 3)
        assert receiver.get("k") == 1
        old_writer.remove("k")
        old_writer.flush()
        wait_until(lambda: receiver.get("k") is None)


def test_bad_options_are_refused_by_name() -> None:
    """Bad constructor options raise ConfigurationError naming the option."""
    for kwargs, name in [
        ({"max_entries": 0}, "max_entries"),
        ({"ttl": -1}, "ttl"),
        ({"max_staleness": 0}, "max_staleness"),
        ({"heartbeat_interval": 5, "max_staleness": 1}, "heartbeat_interval"),
    ]:
        with pytest.raises(ConfigurationError) as info:
            NearCache(**kwargs)  # type: ignore[arg-type]
        assert info.value.option == name
    with pytest.raises(ConfigurationError) as info:
        NearCache(f"127.0.0.1:6379,password={PASSWORD},bogus=1")
    assert info.value.option == "bogus"
    assert PASSWORD not in str(info.value)


def test_repr_never_shows_the_password(redis_server: RedisServer, channel: str) -> None:
    """The cache's repr names where it is connected, never the password."""
    with NearCache(
        f"127.0.0.1:{redis_server.port},password={PASSWORD},abortConnect=False,connectTimeout=300",
        channel=channel,
    ) as cache:
        assert PASSWORD not in repr(cache)
        assert str(redis_server.port) in repr(cache)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+: fork with threads
def test_a_cache_created_before_fork_works_in_the_child(
    redis_server: RedisServer, channel: str
) -> None:
    """A NearCache made before os.fork() (gunicorn --preload) gets its own connections, id and
    listener in the child, and the two processes invalidate each other."""
    with NearCache(redis_server.url, channel=channel) as cache:
        wait_until(lambda: cache.backplane_state.value == "connected")  # type: ignore[union-attr]
        cache.set("parent-key", "p")
        read_fd, write_fd = os.pipe()
        go_read, go_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through the pipe
            report: dict[str, object] = {}
            try:
                deadline = time.monotonic() + 10
                while cache.backplane_state.value != "connected":  # type: ignore[union-attr]
                    if time.monotonic() > deadline:
                        raise TimeoutError("child never connected")
                    time.sleep(0.01)
                report["id"] = cache.instance_id
                cache.set("child-key", "c")
                os.write(write_fd, (json.dumps(report) + "\n").encode())
                os.read(go_read, 1)  # parent removed child-key
                deadline = time.monotonic() + 10
                while cache.get("child-key") is not None:
                    if time.monotonic() > deadline:
                        raise TimeoutError("child never saw the parent's remove")
                    time.sleep(0.001)
                cache.remove("parent-key")
                cache.flush()
                os.write(write_fd, b'{"done": true}\n')
            except BaseException as exc:
                os.write(write_fd, (json.dumps({"error": repr(exc)}) + "\n").encode())
            finally:
                os._exit(0)
        with os.fdopen(read_fd) as reports:
            first = json.loads(reports.readline())
            assert "error" not in first, first
            assert first["id"] != cache.instance_id
            cache.remove("child-key")
            cache.flush()
            os.write(go_write, b"x")
            second = json.loads(reports.readline())
            assert second == {"done": True}, second
            wait_until(lambda: cache.get("parent-key") is None)
        os.close(write_fd)
        os.close(go_read)
        os.close(go_write)
        os.waitpid(pid, 0)


def test_every_public_name_is_exported() -> None:
    """__all__ lists every public name of the package, sorted, and each one exists."""
    public = {n for n in dir(nearcache) if not n.startswith("_")} - {
        "annotations",
    }
    modules = {n for n in public if type(getattr(nearcache, n)).__name__ == "module"}
    assert set(nearcache.__all__) == (public - modules) | {"__version__"}
    for name in nearcache.__all__:
        assert getattr(nearcache, name) is not None


def test_the_core_imports_no_io() -> None:
    """Nothing under nearcache._core imports redis, asyncio or threading: every decision there
    runs without I/O and takes its time from an injected clock."""
    import ast
    import pathlib

    core = pathlib.Path(nearcache.__file__).parent / "_core"
    forbidden = {"redis", "asyncio", "threading", "socket"}
    for path in core.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"


def test_the_command_is_installed_and_runs_as_a_module() -> None:
    """The ``nearcache`` console script and ``python -m nearcache`` both answer --version."""
    import shutil
    import subprocess
    import sys

    script = shutil.which("nearcache", path=os.path.dirname(sys.executable))
    assert script is not None
    for argv in ([script, "--version"], [sys.executable, "-m", "nearcache", "--version"]):
        out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == f"nearcache {nearcache.__version__}"
