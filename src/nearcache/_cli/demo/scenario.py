"""``nearcache demo``: several instance processes kept consistent over Redis, shown live.

The coordinator (this module, the parent process) starts a private ``redis-server`` (or uses
``--redis``), creates a SQLite product catalog, launches N instance processes
(:mod:`nearcache._cli.demo.instance`) and drives a scenario over their control channels
(:mod:`nearcache._cli.demo.fleet`):

1. every instance reads product 42 (loaded from SQLite, then served from L1);
2. A updates product 42 (SQLite, ``set``/``remove``, ``flush``); every other instance must
   drop it, and the time from A's write to the drop is measured on each;
3. the next read on the others returns the new version from SQLite;
4. ``clear_region("prices")`` drops prices everywhere and keeps products;
5. ``clear()`` drops everything everywhere;
   then a background load (random reads everywhere, an update every ~0.25 s) for
   ``--duration`` seconds;
6. a Redis outage (SIGKILL, a few seconds down, restart on the same port; private Redis
   only): reads keep being served, no L1 entry is served past ``max_staleness``, the
   backplanes reconnect by themselves and propagation works again.

It ends with every instance compared with SQLite. Each claim is a check; the exit code is 0
only when every check passed.

Latencies are differences of ``time.monotonic()`` readings taken in different processes on the
same host: the system-wide monotonic clock (``CLOCK_MONOTONIC`` on Linux), so they compare.
"""

from __future__ import annotations

import contextlib
import math
import random
import secrets
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from nearcache._cli.demo.catalog import HOT_PRODUCT, PRODUCT_COUNT, REGIONS, create
from nearcache._cli.demo.fleet import Call, InstanceError, InstanceProcess, close_all
from nearcache._cli.demo.server import (
    INSTALL_HINT,
    PrivateRedis,
    RedisStartError,
    find_redis_server,
)
from nearcache._cli.demo.topology import PrivateTopology
from nearcache._cli.demo.view import Board, format_latency, percentile, plain_output_reason
from nearcache._config import RedisSettings, parse_connection_string
from nearcache._exceptions import ConfigurationWarning

__all__ = ["DemoOptions", "DemoSetupError", "run_demo"]

_CALL_TIMEOUT = 5.0
_VERIFY_TIMEOUT = 30.0
_WATCH_TIMEOUT = 3.0
_START_TIMEOUT = 20.0
_UPDATE_EVERY = 0.25
_SAMPLE = list(range(1, 11))  # products warmed and checked by the clear steps
_OUTAGE_PRODUCT = 7
_SOURCES = {"l1": "L1", "l2": "L2 (Redis)", "sqlite": "SQLite"}


@dataclass(frozen=True)
class DemoOptions:
    """The demo's command-line options."""

    instances: int = 3
    duration: float = 10.0
    quiet: bool = False
    redis: str | None = None
    channel: str | None = None
    max_staleness: float = 1.0
    topology: str = "standalone"  # or "sentinel" / "cluster": a private one, failed over

    @property
    def outage(self) -> float:
        """How long Redis stays down: long enough for every L1 entry to age out."""
        return max(3.0, 2.5 * self.max_staleness)


class DemoSetupError(Exception):
    """The demo cannot start (no redis-server, Redis unreachable); ``exit_code`` says how."""

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class _Aborted(Exception):
    """A step could not go on (its check has been recorded)."""


def run_demo(options: DemoOptions, stream: TextIO | None = None) -> int:
    """Run the demo; return 0 when every check passed, 1 otherwise.

    Raises :class:`DemoSetupError` when it cannot start; ``KeyboardInterrupt`` (also raised
    for SIGTERM) once everything it started has been stopped.
    """
    out = sys.stdout if stream is None else stream
    reason = None if options.quiet else plain_output_reason()
    if reason is not None:
        out.write(f"nearcache demo: {reason}\n")
    names = [chr(ord("A") + i) for i in range(options.instances + 1)]  # the last joins late
    channel = options.channel or f"demo-{secrets.token_hex(3)}"
    board = Board(names, out, live=not options.quiet and reason is None)
    with (
        _interrupt_on_sigterm(),
        tempfile.TemporaryDirectory(prefix="nearcache-demo-") as tmp,
        contextlib.ExitStack() as cleanup,
    ):
        workdir = Path(tmp)
        private: PrivateRedis | None = None
        topology: PrivateTopology | None = None
        try:
            if options.topology != "standalone":
                binary = find_redis_server()
                if binary is None:
                    raise DemoSetupError(f"redis-server not found; {INSTALL_HINT}")
                topology = PrivateTopology(options.topology, binary, workdir)
                try:
                    topology.start()
                except RedisStartError as exc:
                    raise DemoSetupError(str(exc), exit_code=1) from None
                connection = topology.connection
                where = topology.describe()
            elif options.redis is not None:
                connection = options.redis
                where = _check_reachable(options.redis)
                if options.channel is None:  # a channel of our own: leave nothing behind
                    cleanup.callback(_drop_replay_log, options.redis, channel)
            else:
                binary = find_redis_server()
                if binary is None:
                    raise DemoSetupError(f"redis-server not found; {INSTALL_HINT}")
                private = PrivateRedis(binary, workdir)
                try:
                    private.start()
                except RedisStartError as exc:
                    raise DemoSetupError(str(exc), exit_code=1) from None
                connection = private.url
                where = f"private redis-server on {private.url}"
            create(workdir / "catalog.sqlite3")
            demo = _Demo(options, board, connection, channel, workdir, private)
            demo.topology = topology
            return demo.run(where)
        finally:
            with _shielded():
                if private is not None:
                    private.stop()
                if topology is not None:
                    topology.stop()


def _check_reachable(connection: str) -> str:
    """PING the Redis of ``--redis``; return its safe description."""
    import redis

    from nearcache._backplane.redis import make_client_kwargs

    settings = _settings(connection)
    client = redis.Redis(**make_client_kwargs(settings))
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise DemoSetupError(
            f"cannot reach Redis at {settings.describe()}: {exc}", exit_code=1
        ) from None
    finally:
        client.close()
    return settings.describe()


def _floor_ms(seconds: float) -> str:
    """Milliseconds with one decimal, rounded down (999.96 ms is not 1000.0 ms)."""
    return f"{math.floor(seconds * 10_000) / 10:.1f}"


def _settings(connection: str) -> RedisSettings:
    """Parse ``--redis`` again (the command line has shown its warnings already)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigurationWarning)
        return parse_connection_string(connection)


def _drop_replay_log(connection: str, channel: str) -> None:
    """Delete the replay log and the L2 the instances kept in a Redis given with ``--redis``
    (the L2's values by SCAN: an operator's clean-up, not the cache's own path)."""
    import redis

    from nearcache._backplane.redis import log_keys, make_client_kwargs
    from nearcache._core.codec import channel_name
    from nearcache._core.l2 import generation_keys, reign_key, value_keys

    settings = _settings(connection)
    wire = channel_name(channel, settings.channel_prefix, settings.database)
    values = value_keys(wire, None, "")[0].split("{")[0] + "*"
    with (
        contextlib.suppress(redis.RedisError, OSError),
        redis.Redis(**make_client_kwargs(settings)) as client,
    ):
        client.delete(*log_keys(wire), *generation_keys(wire), reign_key(wire))
        for key in client.scan_iter(values, count=1000):
            client.delete(key)


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into KeyboardInterrupt, so that cleanup runs for them too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {sig: signal.signal(sig, interrupt) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up, so that cleanup finishes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Demo:
    """One run of the scenario."""

    def __init__(
        self,
        options: DemoOptions,
        board: Board,
        connection: str,
        channel: str,
        workdir: Path,
        private: PrivateRedis | None,
    ) -> None:
        self.options = options
        self.board = board
        self.connection = connection
        self.channel = channel
        self.workdir = workdir
        self.private = private
        self.topology: PrivateTopology | None = None
        self.instances: list[InstanceProcess] = []
        self.rng = random.Random()
        self.stop = threading.Event()
        self.poller: threading.Thread | None = None
        self.died: list[InstanceProcess] = []
        self.crash: str | None = None
        self.outage_line: str | None = None
        self.converged_line: str | None = None

    # -- the run ----------------------------------------------------------------------------

    def run(self, where: str) -> int:
        board = self.board
        try:
            with board:
                board.note(f"Redis: {where}; channel {self.channel!r}")
                if self.topology is not None:
                    board.note(
                        f"watch it live: nearcache monitor {self.connection} "
                        f"--channel {self.channel}"
                    )
                if self.private is not None:
                    board.note(
                        f"watch it live: nearcache monitor {self.private.url} "
                        f"--channel {self.channel}"
                    )
                board.note(
                    f"catalog: {PRODUCT_COUNT} products in {self.workdir / 'catalog.sqlite3'}; "
                    f"regions {', '.join(REGIONS)}; max_staleness {self.options.max_staleness:g} s"
                )
                try:
                    self._scenario()
                except (InstanceError, RedisStartError) as exc:
                    board.check(False, f"aborted: {exc}")
                except _Aborted:
                    pass
                except Exception as exc:  # a bug: still stop everything and report it
                    board.check(False, f"aborted: unexpected {type(exc).__name__}: {exc}")
                    self.crash = traceback.format_exc()
                finally:
                    self.stop.set()
                    if self.poller is not None:
                        self.poller.join(timeout=3.0)
                    self._refresh_stats()
        finally:
            self.died = [i for i in self.instances if not i.alive]
            with _shielded():
                close_all(self.instances)
        return self._summary()

    def _scenario(self) -> None:
        self._start_instances()
        writer, others = self.instances[0], self.instances[1:]
        self._read_everywhere()
        new_version = self._update_hot_product(writer, others)
        self._next_read(writer, others, new_version)
        self._clear_region(writer, others)
        self._clear_all(writer)
        self._load()
        self._late_join()
        if self.topology is not None:
            self._failover(self.topology, writer, others)
        elif self.private is None:
            self.board.step("step 6/6: Redis outage -- skipped")
            self.board.note(
                "outage step skipped: --redis was given, and the demo only crashes a Redis "
                "it started itself"
            )
        else:
            self._outage(self.private, writer, others)
        self._converge()

    # -- instances --------------------------------------------------------------------------

    def _start_instances(self) -> None:
        board = self.board
        board.step(f"starting {self.options.instances} instance processes")
        config = {
            "connection": self.connection,
            "l2": True,
            "channel": self.channel,
            "db": str(self.workdir / "catalog.sqlite3"),
            "max_staleness": self.options.max_staleness,
        }
        started = time.monotonic()
        self._config = config
        names = board.names[: self.options.instances]  # the last one joins late
        starting = [
            InstanceProcess.spawn(name, {**config, "seed": index + 1}, self.workdir)
            for index, name in enumerate(names)
        ]
        for instance in starting:
            self._started(instance)
            self.instances.append(instance)
        self._wait_stats(lambda _, s: s["state"] == "connected", 15.0, "connected")
        board.check(
            True,
            f"{len(self.instances)} instance processes subscribed "
            f"(pids {', '.join(str(i.pid) for i in self.instances)}) "
            f"in {time.monotonic() - started:.2f} s",
        )
        if self.board.live:
            self.poller = threading.Thread(target=self._poll_stats, daemon=True)
            self.poller.start()

    def _spawn(self, name: str, index: int) -> InstanceProcess:
        instance = InstanceProcess.spawn(name, {**self._config, "seed": index + 1}, self.workdir)
        self._started(instance)
        return instance

    def _started(self, instance: InstanceProcess) -> None:
        try:
            instance.wait_started(_START_TIMEOUT)
        except InstanceError as exc:
            tail = instance.log_tail()
            raise InstanceError(f"{exc}\n{tail}" if tail else str(exc)) from None
        self.board.ids[instance.name] = instance.instance_id

    def _stats(self) -> dict[str, dict[str, Any]]:
        calls = [(i, i.send("stats")) for i in self.instances]
        result = {}
        for instance, call in calls:
            stats = call.wait(_CALL_TIMEOUT)
            self.board.set_stats(instance.name, stats)
            result[instance.name] = stats
        return result

    def _refresh_stats(self) -> None:
        """Fetch the final counters; an instance that is gone keeps its last ones."""
        calls = [(i.name, i.send("stats")) for i in self.instances]
        for name, call in calls:
            self._final_stats(name, call)

    def _final_stats(self, name: str, call: Call) -> None:
        try:
            self.board.set_stats(name, call.wait(_CALL_TIMEOUT))
        except InstanceError:
            self.board.set_stats(name, {**self.board.stats.get(name, {}), "state": "gone"})

    def _poll_stats(self) -> None:
        while not self.stop.wait(0.25):
            with contextlib.suppress(InstanceError):
                self._stats()

    def _wait_stats(
        self, condition: Callable[[str, dict[str, Any]], bool], timeout: float, what: str
    ) -> float:
        """Poll every instance's stats until ``condition(name, stats)`` holds for all;
        return when."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self._stats()
            if all(condition(name, s) for name, s in stats.items()):
                return time.monotonic()
            if time.monotonic() > deadline:
                lagging = ", ".join(
                    f"{name} ({s['state']}, last error: {s['last_error']})"
                    for name, s in stats.items()
                    if not condition(name, s)
                )
                self.board.check(False, f"not {what} within {timeout:g} s: {lagging}")
                raise _Aborted
            time.sleep(0.02)

    def _each(
        self,
        instances: Sequence[InstanceProcess],
        op: str,
        timeout: float = _CALL_TIMEOUT,
        **args: Any,
    ) -> list[Any]:
        """Send one request to several instances at once; return their replies in order."""
        calls = [i.send(op, **args) for i in instances]
        return [call.wait(timeout) for call in calls]

    def _propagate(
        self,
        writer: InstanceProcess,
        product: int,
        watchers: Sequence[InstanceProcess],
        action: str = "update",
        region: str = "products",
    ) -> tuple[dict[str, Any], dict[str, float | None]]:
        """Have ``watchers`` hold ``product`` in L1 and watch it, let ``writer`` do ``action``;
        return the writer's reply and each watcher's propagation latency (None: not dropped)."""
        calls = [
            (w, w.send("watch", region=region, key=product, timeout=_WATCH_TIMEOUT))
            for w in watchers
        ]
        for _, call in calls:
            call.wait(_CALL_TIMEOUT, stage="armed")
        args: dict[str, Any] = {"update": {"key": product}, "clear_region": {"region": "prices"}}
        reply = writer.call(action, **args.get(action, {}))
        latencies: dict[str, float | None] = {}
        for watcher, call in calls:
            result = call.wait(_WATCH_TIMEOUT + _CALL_TIMEOUT)
            if result["evicted"]:
                latency = max(float(result["at"]) - float(reply["t0"]), 0.0)
                self.board.add_latency(watcher.name, latency)
                latencies[watcher.name] = latency
            else:
                latencies[watcher.name] = None
        return reply, latencies

    def _latency_text(self, latencies: dict[str, float | None]) -> str:
        return ", ".join(
            f"{name} after {format_latency(value, unicode=self.board.unicode)}"
            if value is not None
            else f"{name} NOT within {_WATCH_TIMEOUT:g} s"
            for name, value in latencies.items()
        )

    # -- the steps --------------------------------------------------------------------------

    def _read_everywhere(self) -> None:
        board = self.board
        board.step(f"step 1/6: every instance reads product {HOT_PRODUCT}")
        loader, *rest = self.instances
        first = [loader.call("read", region="products", key=HOT_PRODUCT)]
        first += self._each(rest, "read", region="products", key=HOT_PRODUCT)
        second = self._each(self.instances, "read", region="products", key=HOT_PRODUCT)
        self._each(self.instances, "read", region="prices", key=HOT_PRODUCT)
        names = ", ".join(i.name for i in rest)
        shared = "l2"  # the loader filled the shared L2
        board.check(
            first[0]["source"] == "sqlite"
            and all(r["source"] == shared for r in first[1:])
            and all(r["source"] == "l1" for r in second),
            f"{loader.name} loaded product {HOT_PRODUCT} (v{first[0]['version']}) from SQLite, "
            f"{names} got it from {_SOURCES[shared]}; then every instance served it from L1",
        )

    def _update_hot_product(
        self, writer: InstanceProcess, others: Sequence[InstanceProcess]
    ) -> int:
        board = self.board
        board.step(
            f"step 2/6: {writer.name} updates product {HOT_PRODUCT} (SQLite, set/remove, flush); "
            "the others must drop it"
        )
        reply, latencies = self._propagate(writer, HOT_PRODUCT, others)
        board.check(
            bool(reply["flushed"]) and all(v is not None for v in latencies.values()),
            f"{writer.name} wrote v{reply['version']} (Redis acknowledged in "
            f"{format_latency(reply.get('flush_seconds', float('nan')), unicode=board.unicode)});"
            f" dropped by {self._latency_text(latencies)}",
        )
        return int(reply["version"])

    def _next_read(
        self, writer: InstanceProcess, others: Sequence[InstanceProcess], version: int
    ) -> None:
        board = self.board
        board.step(f"step 3/6: the next read returns the new version of product {HOT_PRODUCT}")
        for region in REGIONS:
            replies = self._each(others, "read", region=region, key=HOT_PRODUCT)
            board.check(
                all(r["source"] in ("sqlite", "l2") and r["version"] == version for r in replies),
                f"next read of {region}/{HOT_PRODUCT}: "
                + ", ".join(
                    f"{o.name} v{r['version']} from {_SOURCES[r['source']]}"
                    for o, r in zip(others, replies, strict=True)
                ),
            )
        mine = writer.call("read", region="products", key=HOT_PRODUCT)
        board.check(
            mine["source"] == "l1" and mine["version"] == version,
            f"{writer.name} serves its own write from L1: products/{HOT_PRODUCT} "
            f"v{mine['version']}",
        )

    def _clear_region(self, writer: InstanceProcess, others: Sequence[InstanceProcess]) -> None:
        board = self.board
        board.step(f"step 4/6: {writer.name} clears region 'prices' everywhere")
        for region in REGIONS:
            self._each(self.instances, "read", region=region, keys=_SAMPLE)
        _, latencies = self._propagate(writer, 1, others, "clear_region", region="prices")
        prices = self._each(self.instances, "cached", region="prices", keys=_SAMPLE)
        products = self._each(self.instances, "cached", region="products", keys=_SAMPLE)
        board.check(
            all(v is not None for v in latencies.values())
            and all(not r["cached"] for r in prices)
            and all(r["cached"] == _SAMPLE for r in products),
            f"prices dropped on every instance ({self._latency_text(latencies)}); "
            f"products kept ({len(_SAMPLE)} of {len(_SAMPLE)} still cached everywhere)",
        )

    def _clear_all(self, writer: InstanceProcess) -> None:
        board = self.board
        board.step(f"step 5/6: {writer.name} clears everything everywhere")
        others = [i for i in self.instances if i is not writer]
        _, latencies = self._propagate(writer, 1, others, "clear")
        left = [
            len(r["cached"])
            for region in REGIONS
            for r in self._each(self.instances, "cached", region=region, keys=_SAMPLE)
        ]
        board.check(
            all(v is not None for v in latencies.values()) and not any(left),
            f"every instance is empty ({self._latency_text(latencies)})",
        )

    def _late_join(self) -> None:
        """A new instance joins the warm fleet: its reads come from L2, not from SQLite."""
        board = self.board
        name = board.names[len(self.instances)]
        board.step(f"late join: instance {name} starts with an empty L1 and reads products")
        warm = self.instances[0]
        for region in REGIONS:  # what the fleet reads is in L2 (a clear step emptied it)
            warm.call("read", region=region, keys=_SAMPLE)
        late = self._spawn(name, len(self.instances))
        deadline = time.monotonic() + 15.0
        while (before := late.call("stats"))["state"] != "connected":
            if time.monotonic() > deadline:
                raise InstanceError(f"{name} did not connect within 15 s")
            self.stop.wait(0.05)
        for region in REGIONS:
            late.call("read", region=region, keys=_SAMPLE)
        after = late.call("stats")
        from_l2 = after["l2_hits"] - before["l2_hits"]
        loads = after["loads"] - before["loads"]
        reads = after["reads"] - before["reads"]
        self.instances.append(late)
        late.call("load", on=True)  # from now on it serves background reads like the others
        board.check(
            loads == 0 and from_l2 == reads,
            f"{name} warmed from L2: {from_l2} of its {reads} first reads came from Redis, "
            f"{loads} from SQLite",
        )

    def _load(self) -> None:
        board = self.board
        duration = self.options.duration
        # The background reads go on until the final check: the outage needs them too.
        self._each(self.instances, "load", on=True)
        if not duration:
            board.note("load phase skipped (--duration 0); background reads continue")
            return
        board.step(
            f"load: random reads on every instance, an update every ~{_UPDATE_EVERY:g} s "
            f"({duration:g} s)"
        )
        deadline = time.monotonic() + duration
        rounds = missed = 0
        while time.monotonic() < deadline:
            writer = self.rng.choice(self.instances)
            watchers = [i for i in self.instances if i is not writer]
            product = self.rng.randint(1, 20)
            _, latencies = self._propagate(writer, product, watchers)
            rounds += 1
            missed += sum(v is None for v in latencies.values())
            left = max(deadline - time.monotonic(), 0.0)
            board.progress(f"load: {rounds} updates propagated, {left:.0f} s left")
            self.stop.wait(min(_UPDATE_EVERY, left))
        samples = len(board.all_latencies())
        board.check(
            missed == 0,
            f"{rounds} updates under load: every other instance dropped the old version "
            f"each time ({missed} missed; {samples} propagation latencies measured so far)",
        )

    def _outage(
        self, private: PrivateRedis, writer: InstanceProcess, others: Sequence[InstanceProcess]
    ) -> None:
        board = self.board
        outage = self.options.outage
        bound = self.options.max_staleness
        board.step(f"step 6/6: Redis outage: SIGKILL, {outage:g} s down, restart on the same port")
        before = {name: s["resubscriptions"] for name, s in self._stats().items()}
        self._each(self.instances, "track")
        private.kill()
        # Taken once the server is dead and reaped: every heartbeat answered came before it.
        killed = time.monotonic()
        noticed = self._wait_stats(lambda _, s: s["state"] != "connected", 5.0, "disconnected")
        board.check(
            True,
            f"Redis killed; every backplane noticed within {(noticed - killed) * 1000:.0f} ms",
        )
        queued = writer.call("update", key=_OUTAGE_PRODUCT, flush_timeout=0.3)
        board.check(
            not queued["flushed"] and int(queued.get("pending", 0)) >= 1,
            f"{writer.name} updated product {_OUTAGE_PRODUCT} while Redis was down: "
            f"v{queued['version']} in SQLite, its invalidation queued",
        )
        while (left := killed + outage - time.monotonic()) > 0:
            board.progress(
                f"step 6/6: Redis down for {time.monotonic() - killed:.1f} of {outage:g} s; "
                "instances serve reads from SQLite"
            )
            self.stop.wait(min(left, 0.1))
        restarted = time.monotonic()
        private.restart()
        board.note(f"redis-server restarted on port {private.port}")
        reconnected = self._wait_stats(
            lambda name, s: s["state"] == "connected" and s["resubscriptions"] > before[name],
            15.0,
            "reconnected",
        )
        board.check(
            True,
            f"every backplane reconnected by itself {reconnected - restarted:.2f} s after the "
            "restart (connected, resubscriptions +1)",
        )
        reports = self._each(self.instances, "outage_report", start=killed, end=restarted)
        served = ", ".join(
            f"{i.name} {r['reads']:,} ({r['l1']:,} L1, {r['sqlite']:,} SQLite)"
            for i, r in zip(self.instances, reports, strict=True)
        )
        errors = sum(r["errors"] for r in reports)
        board.check(
            errors == 0 and all(r["reads"] > 0 for r in reports),
            f"reads kept being served while Redis was down: {served}; {errors} errors",
        )
        oldest = self._check_bound(reports, "the crash")
        delivered = writer.call("flush", timeout=_CALL_TIMEOUT + 5, flush_timeout=5.0)
        board.check(
            bool(delivered["flushed"]),
            f"{writer.name}'s queued invalidation was delivered once Redis was back",
        )
        _, latencies = self._propagate(writer, HOT_PRODUCT, others)
        board.check(
            all(v is not None for v in latencies.values()),
            f"propagation works again: {writer.name} updated product {HOT_PRODUCT}, dropped by "
            f"{self._latency_text(latencies)}",
        )
        self.outage_line = (
            f"outage recovery: Redis down {restarted - killed:.1f} s; reads kept flowing "
            f"({sum(r['reads'] for r in reports):,} served, {errors} errors); oldest L1 answer "
            f"{_floor_ms(oldest)} ms <= max_staleness {bound * 1000:g} ms; reconnected "
            f"{reconnected - restarted:.2f} s after the restart; propagation works again"
        )

    def _check_bound(self, reports: Sequence[dict[str, Any]], fault: str) -> float:
        """Check that no instance served an L1 entry past the staleness bound around ``fault``
        (its outage reports); return the age of the oldest L1 answer."""
        oldest = max(float(r["max_age"]) for r in reports)
        violations = sum(r["violations"] for r in reports)
        self.board.check(
            violations == 0,
            f"no L1 entry served past the staleness bound: the oldest L1 answer came "
            f"{_floor_ms(oldest)} ms after its load or {fault}, whichever was later "
            f"(max_staleness {self.options.max_staleness * 1000:g} ms); {violations} violations",
        )
        return oldest

    def _failover(
        self, topology: PrivateTopology, writer: InstanceProcess, others: Sequence[InstanceProcess]
    ) -> None:
        """Step 6 on a Sentinel set or a cluster: kill the node in charge, watch every
        instance follow the new one, with no entry served past the bound meanwhile."""
        board = self.board
        bound = self.options.max_staleness
        board.step(f"step 6/6: failover ({topology.kind}): kill -9 of the node in charge")
        before = {name: s["resubscriptions"] for name, s in self._stats().items()}
        self._each(self.instances, "track")
        killed = time.monotonic()
        board.note(topology.fail(self.channel))
        followed = self._wait_stats(
            lambda name, s: s["state"] == "connected" and s["resubscriptions"] > before[name],
            30.0,
            "subscribed on the new node",
        )
        board.check(
            True,
            f"every instance subscribed on the new node by itself {followed - killed:.2f} s "
            "after the kill",
        )
        reports = self._each(self.instances, "outage_report", start=killed, end=followed)
        errors = sum(r["errors"] for r in reports)
        board.check(
            errors == 0 and all(r["reads"] > 0 for r in reports),
            f"reads kept being served during the failover: "
            f"{sum(r['reads'] for r in reports):,}; {errors} errors",
        )
        oldest = self._check_bound(reports, "the kill")
        _, latencies = self._propagate(writer, HOT_PRODUCT, others)
        board.check(
            all(v is not None for v in latencies.values()),
            f"propagation works on the new node: {writer.name} updated product {HOT_PRODUCT}, "
            f"dropped by {self._latency_text(latencies)}",
        )
        self.outage_line = (
            f"failover ({topology.kind}): every instance followed in {followed - killed:.2f} s; "
            f"oldest L1 answer {_floor_ms(oldest)} ms <= max_staleness {bound * 1000:g} ms; "
            "propagation works on the new node"
        )

    def _converge(self) -> None:
        """Compare every instance with SQLite once the staleness bound covers every write.

        The bound promises nothing about a read that starts less than ``max_staleness``
        after the writer's ``flush()`` returned (nor about a write whose flush timed out), so
        every instance flushes first, and a stale answer counts only from a verify started
        more than ``max_staleness`` after those flushes returned: one started earlier (the
        verify itself can take seconds on a loaded machine) is asked again. A stale answer in
        a verify started later is a violation of the bound, reported as such.
        """
        board = self.board
        bound = self.options.max_staleness
        board.step("final check: every instance against SQLite")
        self._each(self.instances, "load", on=False)
        calls = [i.send("flush", flush_timeout=_CALL_TIMEOUT) for i in self.instances]
        flushed = [call.wait(_CALL_TIMEOUT + 5) for call in calls]
        # Taken after every reply: each instance's flush() had returned by then.
        settled = time.monotonic()
        unflushed = [
            i.name for i, r in zip(self.instances, flushed, strict=True) if not r.get("flushed")
        ]
        if unflushed:
            self.converged_line = (
                f"NOT converged: {', '.join(unflushed)} could not flush within {_CALL_TIMEOUT:g} s"
            )
            board.check(False, self.converged_line)
            return
        while True:
            started = time.monotonic()
            # A verify reads every product in both regions: seconds on a loaded machine.
            replies = self._each(self.instances, "verify", timeout=_VERIFY_TIMEOUT)
            stale = sum(r["stale_count"] for r in replies)
            if stale == 0 or started > settled + bound:
                break
            time.sleep(0.05)
        checked = replies[0]["checked"]
        if stale == 0:
            self.converged_line = (
                f"converged: all {len(self.instances)} instances serve the SQLite version of "
                f"all {checked // len(REGIONS)} products in both regions"
            )
        else:
            examples = "; ".join(
                f"{i.name}: {', '.join(r['stale'])}"
                for i, r in zip(self.instances, replies, strict=True)
                if r["stale"]
            )
            self.converged_line = (
                f"NOT converged: {stale} stale answers {_floor_ms(started - settled)} ms "
                f"after every flush() returned (max_staleness {bound * 1000:g} ms): {examples}"
            )
        board.check(stale == 0, self.converged_line)

    # -- the end ----------------------------------------------------------------------------

    def _summary(self) -> int:
        board = self.board
        board.line()
        board.print_table("instances at the end")
        samples = board.all_latencies()
        unicode = board.unicode
        board.line()
        if samples:
            board.line(
                "propagation latency (write on one instance -> entry dropped on another): "
                f"p50 {format_latency(percentile(samples, 50), unicode=unicode)}, "
                f"p99 {format_latency(percentile(samples, 99), unicode=unicode)}, "
                f"max {format_latency(max(samples), unicode=unicode)} "
                f"over {len(samples)} measurements"
            )
        if self.private is None and self.topology is None:
            board.line("outage step skipped (--redis): the demo only crashes its own Redis")
        elif self.outage_line is not None:
            board.line(self.outage_line)
        if self.converged_line is not None:
            board.line(self.converged_line)
        failed = [c for c in board.checks if not c.ok]
        if self.crash is not None:
            for text in self.crash.splitlines():
                board.line(text)
        for instance in self.died:
            tail = instance.log_tail()
            if tail:
                board.line(f"instance {instance.name} log (last lines):")
                for text in tail.splitlines():
                    board.line(f"  {text}")
        if failed or not board.checks:
            board.line(
                f"result: {len(failed)} of {len(board.checks)} checks FAILED", style="bold red"
            )
            for check in failed:
                board.line(f"  - {check.text}", style="red")
            return 1
        board.line(f"result: all {len(board.checks)} checks passed", style="bold green")
        return 0
