"""What a section gets from the harness: its options, the servers, and a progress log."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from benchmarks._servers import (
    RedisServer,
    find_client_caching_binary,
    find_redis_binary,
)

__all__ = ["Env", "Options"]


@dataclass(frozen=True)
class Options:
    """Command-line choices."""

    quick: bool = False
    repeat: int | None = None  # None: each section's own default
    db_latencies: tuple[float, ...] = (0.0, 1.0)  # workload: ms added to every source load

    def reps(self, default: int, quick: int) -> int:
        """Repetitions for a section: ``--repeat`` wins, else its quick or full default."""
        if self.repeat is not None:
            return self.repeat
        return quick if self.quick else default


@dataclass
class Env:
    """Servers started on demand (and stopped by :meth:`close`), notes for the report."""

    options: Options
    notes: list[str] = field(default_factory=list)
    _redis: RedisServer | None = None
    _csc: RedisServer | None = None
    _csc_checked: bool = False
    _csc_note: str = ""
    _started: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        """Progress on stderr (the table goes to stdout)."""
        elapsed = time.monotonic() - self._started
        print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    def redis(self) -> RedisServer:
        """The default redis-server (PATH or ``$NEARCACHE_REDIS_SERVER``)."""
        if self._redis is None:
            binary = find_redis_binary()
            if binary is None:
                raise RuntimeError(
                    "redis-server not found on PATH (or set $NEARCACHE_REDIS_SERVER)"
                )
            self._redis = RedisServer(binary, "main").start()
            self.log(f"redis-server {self._redis.version} on port {self._redis.port}")
        return self._redis

    def redis_client_caching(self) -> tuple[RedisServer | None, str]:
        """A redis-server >= 7.4 for redis-py's client-side caching, or None and why not."""
        if not self._csc_checked:
            self._csc_checked = True
            main = self.redis()
            if tuple(int(p) for p in main.version.split(".")[:2]) >= (7, 4):
                self._csc, self._csc_note = main, f"redis-server {main.version} (PATH)"
            else:
                binary, where = find_client_caching_binary()
                if binary is not None:
                    self._csc = RedisServer(binary, "csc").start()
                    self._csc_note = f"redis-server {self._csc.version} from {where}"
                    self.log(f"{self._csc_note} on port {self._csc.port}")
                else:
                    self._csc_note = where
        return self._csc, self._csc_note

    def close(self) -> None:
        """Stop every server this run started."""
        for server in (self._csc, self._redis):
            if server is not None:
                server.stop()
        self._csc = self._redis = None
