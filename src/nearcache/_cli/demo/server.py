"""A private, throw-away ``redis-server`` for ``nearcache demo``.

Bound to 127.0.0.1 on a free port, no persistence, its files in the demo's temporary
directory. The demo crashes it (SIGKILL) and starts it again on the same port to show an
outage; :meth:`PrivateRedis.stop` always ends it, and it is killed when the demo exits.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

__all__ = ["INSTALL_HINT", "PrivateRedis", "RedisStartError", "find_redis_server"]

REDIS_SERVER_ENV = "NEARCACHE_REDIS_SERVER"
INSTALL_HINT = (
    "install it (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis; "
    "Fedora: dnf install redis) or set $NEARCACHE_REDIS_SERVER to its path, "
    "or point the demo at a running Redis with --redis CONNECTION"
)
_HOST = "127.0.0.1"


class RedisStartError(RuntimeError):
    """The private redis-server did not come up (the message carries its log's tail)."""


def find_redis_server() -> str | None:
    """``$NEARCACHE_REDIS_SERVER`` (a path or a name), else ``redis-server`` on PATH."""
    override = os.environ.get(REDIS_SERVER_ENV, "").strip()
    return shutil.which(override or "redis-server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


class PrivateRedis:
    """One ``redis-server`` child owned by the demo."""

    def __init__(
        self,
        binary: str,
        workdir: Path,
        *,
        extra_args: tuple[str, ...] = (),
        sentinel_config: Path | None = None,
        cluster_bus: bool = False,
    ) -> None:
        self._binary = binary
        self._workdir = workdir
        self._extra_args = extra_args  # more redis-server options (demo --topology)
        self._sentinel_config = sentinel_config  # run as a Sentinel with this config file
        self._log = workdir / "redis.log"
        self._port = 0
        self._cluster_bus = cluster_bus  # a cluster node: it needs a bus port too
        self._bus_port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        """The TCP port (kept across restarts)."""
        return self._port

    @property
    def bus_port(self) -> int:
        """The cluster bus port (``cluster_bus=True``; kept across restarts), else 0."""
        return self._bus_port

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{_HOST}:{self._port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start on a free port (others if one was taken meanwhile) and wait for PING."""
        for attempt in range(3):
            # The port given to redis-server may be taken before it binds it; pick new ones.
            self._port = _free_port()
            if self._cluster_bus:
                # The bus port must be given: port + 10000 may not exist (ports above 55535).
                self._bus_port = _free_port()
            try:
                self._launch(timeout)
                return
            except RedisStartError:
                if attempt == 2 or "Address already in use" not in self.log_tail():
                    raise

    def restart(self, timeout: float = 10.0) -> None:
        """Start again on the same port, once the port can be bound."""
        self.kill()
        deadline = time.monotonic() + timeout
        while not _bindable(self._port):
            if time.monotonic() > deadline:
                raise RedisStartError(f"port {self._port} did not become free within {timeout}s")
            time.sleep(0.02)
        self._launch(max(deadline - time.monotonic(), 1.0))

    @property
    def alive(self) -> bool:
        """Whether the process is running."""
        return self._proc is not None and self._proc.poll() is None

    def _launch(self, timeout: float) -> None:
        head = [self._binary]
        if self._sentinel_config is not None:
            head += [str(self._sentinel_config), "--sentinel"]
        args = [
            *head,
            "--port",
            str(self._port),
            "--bind",
            _HOST,
            # A Sentinel takes no persistence options (it rewrites its config file instead).
            *(() if self._sentinel_config is not None else ("--save", "", "--appendonly", "no")),
            *(("--cluster-port", str(self._bus_port)) if self._cluster_bus else ()),
            "--daemonize",
            "no",
            "--dir",
            str(self._workdir),
            "--logfile",
            str(self._log),
            *self._extra_args,
        ]
        self._proc = subprocess.Popen(  # noqa: S603 - the redis-server binary we found
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        last_error = "no answer"
        while True:
            if self._proc.poll() is not None:
                raise RedisStartError(
                    f"redis-server exited with code {self._proc.returncode} at start "
                    f"(port {self._port}); its log ends with:\n{self.log_tail()}"
                )
            try:
                with redis.Redis(
                    host=_HOST, port=self._port, socket_connect_timeout=1.0, socket_timeout=1.0
                ) as client:
                    # Our child, not a stranger that grabbed the port first.
                    if int(client.info("server")["process_id"]) == self._proc.pid:
                        return
                    last_error = "another server answered on the port"
            except (redis.RedisError, OSError) as exc:
                last_error = str(exc)
            if time.monotonic() > deadline:
                self.kill()
                raise RedisStartError(
                    f"redis-server did not answer on port {self._port} within {timeout:g}s "
                    f"({last_error})"
                )
            time.sleep(0.02)

    def kill(self) -> None:
        """Crash the server (SIGKILL), as a power cut would, and reap it."""
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)

    def stop(self) -> None:
        """End the server for good: SIGTERM, then SIGKILL if it lingers."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            proc.terminate()
        try:
            proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 5) -> str:
        """The end of the server's log."""
        try:
            text = self._log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "<no log>"
        return "\n".join(text.splitlines()[-lines:])
