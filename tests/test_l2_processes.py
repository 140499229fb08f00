"""The L2 across separate processes: one load per key in the fleet (leases), a dead lease
holder, and a load held open across a write on another instance (never cached anywhere)."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import redis

from nearcache._core import l2
from nearcache._core.codec import channel_name
from tests.servers import RedisServer, wait_until

ROOT = Path(__file__).resolve().parent.parent


class Process:
    """A cache with the L2 in its own process (``tests/l2_process.py``); calls may overlap."""

    def __init__(self, connection: str, channel: str, loads: Path, driver: str, **opts: Any):
        args = [sys.executable, "-m", "tests.l2_process", "--driver", driver]
        args += ["--connection", connection, "--channel", channel, "--loads", str(loads)]
        for name, value in opts.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        self.pid = self._proc.pid
        self._lock = threading.Lock()
        self._next = 0
        self._pending: dict[int, Future[Any]] = {}
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._ready: Future[None] = Future()
        threading.Thread(target=self._read, daemon=True).start()
        self._ready.result(30)
        wait_until(lambda: self.call("state") == "connected", 10)

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            message = json.loads(line)
            if message.get("ready"):
                self._ready.set_result(None)
            elif "event" in message:
                self.events.put(message)
            else:
                future = self._pending.pop(message["id"])
                if "error" in message:
                    future.set_exception(RuntimeError(message["error"]))
                else:
                    future.set_result(message["ok"])
        for future in list(self._pending.values()):
            future.set_exception(RuntimeError("the process exited"))
        if not self._ready.done():
            self._ready.set_exception(RuntimeError("the process did not start"))

    def start(self, op: str, **fields: Any) -> Future[Any]:
        """Send a request; its reply completes the returned future."""
        with self._lock:
            self._next += 1
            future: Future[Any] = Future()
            self._pending[self._next] = future
            assert self._proc.stdin is not None
            self._proc.stdin.write(json.dumps({"id": self._next, "op": op, **fields}) + "\n")
            self._proc.stdin.flush()
        return future

    def call(self, op: str, **fields: Any) -> Any:
        return self.start(op, **fields).result(30)

    def loading(self, key: str, timeout: float = 10.0) -> None:
        """Wait until this process's factory for ``key`` has started."""
        deadline = time.monotonic() + timeout
        while True:
            event = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            if event["key"] == key:
                return

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self._proc.wait(10)

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self._proc.stdin.flush()
                self._proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()


class Fleet:
    def __init__(self, server: RedisServer, channel: str, tmp: Path, driver: str) -> None:
        self.server, self.channel, self.driver = server, channel, driver
        self.loads = tmp / "loads"
        self.loads.touch()
        self.processes: list[Process] = []

    def spawn(self, **opts: Any) -> Process:
        process = Process(self.server.url, self.channel, self.loads, self.driver, **opts)
        self.processes.append(process)
        return process

    def load_lines(self) -> list[str]:
        return self.loads.read_text().splitlines()

    def in_l2(self, key: str, region: str | None = None) -> bytes | None:
        with redis.Redis(port=self.server.port) as client:
            return client.get(l2.value_keys(channel_name(self.channel), region, key)[0])  # type: ignore[return-value]

    def close(self) -> None:
        for process in self.processes:
            process.close()


@pytest.fixture(params=["sync", "async"])
def fleet(
    request: pytest.FixtureRequest, redis_server: RedisServer, channel: str, tmp_path: Path
) -> Iterator[Fleet]:
    f = Fleet(redis_server, channel, tmp_path, request.param)
    yield f
    f.close()


def test_one_load_per_key_in_the_fleet(fleet: Fleet) -> None:
    """Three processes miss one key together: one factory call; the others wait for its fill
    and return the same value."""
    # The others' lease wait is far longer than the test takes to see them waiting and
    # release the holder (with the default 1 s, a loaded machine let a waiter give up and
    # load itself first); a fill that never woke them still fails (result(10) below).
    holder, *others = [fleet.spawn(lease_wait=30) for _ in range(3)]
    first = holder.start("get_or_set", key="k", value="from-holder", hold=True)
    holder.loading("k")
    waiting = [p.start("get_or_set", key="k", value="from-other") for p in others]
    for process in others:
        wait_until(lambda p=process: p.call("stats")["l2_lease_waits"] == 1)
    holder.call("release", key="k")
    assert first.result(10) == "from-holder"
    assert [w.result(10) for w in waiting] == ["from-holder", "from-holder"]
    assert fleet.load_lines() == [f"k from-holder {holder.pid}"]


def test_a_dead_lease_holder_delays_the_others_by_the_lease_wait_at_most(fleet: Fleet) -> None:
    """The holder is killed with -9 mid-load: the waiting processes load themselves once
    l2_lease_wait (0.5 s here) has passed, not later."""
    holder = fleet.spawn(lease_wait=0.5)
    others = [fleet.spawn(lease_wait=0.5) for _ in range(2)]
    holder.start("get_or_set", key="k", value="never", hold=True)
    holder.loading("k")
    waiting = [p.start("get_or_set", key="k", value=f"own-{i}") for i, p in enumerate(others)]
    for process in others:
        wait_until(lambda p=process: p.call("stats")["l2_lease_waits"] == 1)
    killed = time.monotonic()
    holder.kill()
    assert sorted(w.result(10) for w in waiting) == ["own-0", "own-1"]
    assert time.monotonic() - killed < 0.5 + 1.0  # the wait, plus scheduling on a busy box
    assert len(fleet.load_lines()) == 3


@pytest.mark.parametrize("write", ["remove", "set", "clear_region", "clear"])
def test_a_load_held_open_across_a_write_is_cached_nowhere(fleet: Fleet, write: str) -> None:
    """B loads key k (lease taken, factory started: it read the old row); A writes k, its
    region or everything and flushes; B's factory then returns the old row. B returns it to
    its caller, but it reaches neither L2 nor B's L1: a fresh process reads the new state."""
    a, b = fleet.spawn(), fleet.spawn()
    a.call("remove", key="prime")
    a.call("flush")
    loading = b.start("get_or_set", key="k", region="r", value="old", hold=True)
    b.loading("k")
    if write == "set":
        a.call("set", key="k", region="r", value="new")
    elif write == "remove":
        a.call("remove", key="k", region="r")
    elif write == "clear_region":
        a.call("clear_region", region="r")
    else:
        a.call("clear")
    a.call("flush")
    wait_until(lambda: b.call("stats")["invalidations_received"] >= 2)
    b.call("release", key="k")
    assert loading.result(10) == "old"
    b.call("flush")  # its fill is answered
    assert b.call("stats")["l2_fills_refused"] == 1
    assert b.call("get", key="k", region="r") == {"missing": True}
    stored = fleet.in_l2("k", "r")
    assert stored is None or b"old" not in stored
    c = fleet.spawn()
    expected = "new" if write == "set" else "db"
    assert c.call("get_or_set", key="k", region="r", value="db") == expected


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_restart_from_an_older_snapshot_leaves_no_stale_value_in_l2(
    redis_factory: Callable[..., RedisServer], channel: str, tmp_path: Path, driver: str
) -> None:
    """A standalone Redis killed and restarted from a snapshot older than a flushed write
    (an RDB, or an AOF with ``appendfsync everysec`` that lost its last second) comes back
    with the replaced value in L2, and a new run id: every read after it goes to the source
    (the record's reign, the server's replication id, changed), never to the old value."""
    server = redis_factory()
    fleet = Fleet(server, channel, tmp_path, driver)
    try:
        a, b = fleet.spawn(), fleet.spawn()
        assert b.call("get_or_set", key="k", value="v1") == "v1"  # loaded and filled
        b.call("flush")  # its fill is answered
        assert fleet.in_l2("k") is not None
        with redis.Redis(port=server.port) as admin:
            admin.save()  # the snapshot holds v1
        a.call("set", key="k", value="v2")  # the source holds v2 from now on
        a.call("flush")
        server.kill()
        server.restart()
        for process in (a, b):
            wait_until(lambda p=process: p.call("state") == "connected", 15)
        assert fleet.in_l2("k") is not None  # the old record is back
        c = fleet.spawn()
        assert c.call("get_or_set", key="k", value="v2") == "v2"
        assert b.call("get_or_set", key="k", value="v2") == "v2"
    finally:
        fleet.close()
