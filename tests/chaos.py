"""The chaos suite: N instance processes, a mixed load, real faults, and a check of every read.

Run it (it starts its own Redis servers and proxies on loopback)::

    .venv/bin/python -m tests.chaos --duration 300 --instances 4

Instances alternate between ``NearCache`` and ``AsyncNearCache`` (``--drivers``); in an
asyncio instance ``--tasks`` tasks share the load on one event loop.
Each instance process reads keys through ``get_or_set`` from a source of truth (a
second Redis, never faulted, holding a version number per key) and sometimes writes: it bumps
the version in the source, then invalidates (remove, clear_region or clear), sometimes reads
the key back at once, and calls ``flush()``. Every instance reaches the backplane Redis
through its own TCP proxy, so faults can hit one instance or all: connection resets, silent
stalls, added latency, the backplane Redis killed with -9 and restarted (with and without its
data), FLUSHALL, Redis dropping every subscriber, and an instance process frozen with SIGSTOP.

A read is *stale* if it returned a version older than a write whose ``flush()`` returned more
than ``max_staleness`` before the read started. The run prints operations, faults by kind,
stale reads (must be 0), the L1 hit ratio just before and right after each kind of fault, and
how L1 was repaired after each lost subscription (replayed from the log, or dropped).
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.chaos_topologies import TopologyChaos

ROOT = Path(__file__).resolve().parent.parent
FAULTS = (
    "reset",
    "reset_all",
    "stall",
    "delay",
    "kill9_restart",
    "restart_lose_data",
    "flushall",
    "kill_subscribers",
    "pause_instance",
)
REGIONS = ("a", "b", "c", "d")
DRIVER_NAMES = {"sync": "NearCache (threads)", "async": "AsyncNearCache (asyncio)"}


# -- the instance process ----------------------------------------------------------------

CONNECTION = "127.0.0.1:{port},abortConnect=False,connectTimeout=1000,syncTimeout=2000"
SHARING_COUNTERS = (
    "loads", "l2_hits", "l2_fills", "l2_fills_refused", "l2_lease_waits", "l2_errors",
    "l2_corrupt", "updates_sent", "updates_fell_back", "updates_received", "updates_rejected",
)  # fmt: skip
DRIVERS = {"sync": ("sync",), "async": ("async",), "mix": ("sync", "async")}


class Load:
    """The mixed load of one instance process: what to do next, and what happened.

    Shared by the threaded worker (one loop) and the asyncio worker (several tasks on one
    loop); only the calls into the cache and the source of truth differ between them.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.keys = [f"k{i}" for i in range(args.keys)]
        self.weights = [1 / (i + 1) for i in range(args.keys)]  # Zipf, s = 1
        self.reads: list[tuple[float, str, int, bool]] = []
        self.writes: list[tuple[str, str, int, float]] = []  # kind, key, version, flushed
        # Writes accepted by the cache, in order; the first `covered` are in `writes`. A
        # flush() covers every write accepted before it was called, so a write whose own
        # flush timed out is still checked, from the first later flush that returned.
        self.accepted: list[tuple[str, str, int]] = []
        self.covered = 0
        self.samples: list[tuple[float, int, int]] = []  # time, hits, misses (this process)
        self.hits = self.misses = 0
        self.end = time.monotonic() + args.duration
        self._next_sample = 0.0

    def next(self) -> tuple[str, str, str | None] | None:
        """The next operation: key, region and the kind of write (None for a read); None
        once the run is over."""
        now = time.monotonic()
        if now >= self.end:
            return None
        if now >= self._next_sample:
            self.samples.append((now, self.hits, self.misses))
            self._next_sample = now + 0.1
        rng = self.rng
        key = rng.choices(self.keys, self.weights)[0]
        region = REGIONS[int(key[1:]) % len(REGIONS)]
        if rng.random() >= self.args.write_ratio:
            return key, region, None
        roll = rng.random()
        if self.args.l2 or self.args.propagate == "update":
            # Half the writes carry the new value (write(): L2 and update messages).
            roll = roll * 2 - 1
            if roll < 0:
                return key, region, "write"
        return key, region, "remove" if roll < 0.9 else "clear_region" if roll < 0.995 else "clear"

    def read_back(self) -> bool:
        """Whether a write is followed by a read of its key before flush(): the writer's own
        read while its write is not yet published (a window the rest of the load rarely hits)."""
        return self.rng.random() < 0.25

    def read(self, start: float, key: str, value: object, hit: bool) -> None:
        self.reads.append((start, key, int(value), hit))  # type: ignore[arg-type]
        self.hits += hit
        self.misses += not hit

    def flushing(self, kind: str, key: str, version: int) -> int:
        """The cache accepted this write, and flush() is called now: what it will cover."""
        self.accepted.append((kind, key, version))
        return len(self.accepted)

    def flushed(self, upto: int) -> None:
        """``flush()`` returned just now: every write accepted before it was called is
        delivered."""
        now = time.monotonic()
        for kind, key, version in self.accepted[self.covered : upto]:
            self.writes.append((kind, key, version, now))
        self.covered = max(self.covered, upto)

    def save(self, stats: Any, close_seconds: float) -> None:
        """Write the instance's results for the conductor."""
        self.samples.append((time.monotonic(), self.hits, self.misses))
        result = {
            "driver": self.args.driver,
            "reads": self.reads,
            "writes": self.writes,
            "samples": self.samples,
            "unflushed": len(self.accepted) - self.covered,
            "stats": dataclasses.asdict(stats),
            "state_at_end": stats.backplane,
            "close_seconds": close_seconds,
        }
        Path(self.args.out).write_text(json.dumps(result))


def worker(args: argparse.Namespace) -> None:
    """One instance: a NearCache under a mixed load, recording every read and write."""
    import logging

    import redis

    from nearcache import MISSING, FlushTimeoutError, NearCache

    logging.getLogger("nearcache").setLevel(logging.ERROR)  # faults are expected here

    source = redis.Redis(port=args.source_port)
    cache = NearCache(
        args.connection or CONNECTION.format(port=args.proxy_port),
        channel=args.channel,
        max_staleness=args.max_staleness,
        reconcile_interval=1.0,
        l2=args.l2,
        propagate=args.propagate,
    )
    load = Load(args)
    print(json.dumps({"ready": True}), flush=True)
    while (op := load.next()) is not None:
        key, region, write = op
        if write == "write":  # the source's new version is the value cached and shared
            version = cache.write(key, lambda k=key: int(source.incr(k)), region=region)
        elif write is not None:
            version = int(source.incr(key))
        if write is not None:
            if write == "write":
                pass
            elif write == "remove":
                cache.remove(key, region=region)
            elif write == "clear_region":
                cache.clear_region(region)
            else:
                cache.clear()
            if load.read_back():
                start = time.monotonic()
                value = cache.get(key, MISSING, region)
                hit = value is not MISSING
                if not hit:
                    value = cache.get_or_set(
                        key, lambda k=key: int(source.get(k) or 0), region=region
                    )
                load.read(start, key, value, hit)
            upto = load.flushing(write, key, version)
            try:
                cache.flush(timeout=args.max_staleness)
                load.flushed(upto)
            except FlushTimeoutError:
                pass  # not acknowledged: no promise made yet (a later flush() makes it)
        else:
            start = time.monotonic()
            value = cache.get(key, MISSING, region)
            hit = value is not MISSING
            if not hit:
                value = cache.get_or_set(key, lambda k=key: int(source.get(k) or 0), region=region)
            load.read(start, key, value, hit)
    # The listener must still be alive: wait for the backplane, then prove propagation.
    deadline = time.monotonic() + 30
    while cache.backplane_state is None or cache.backplane_state.value != "connected":
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    stats = cache.stats()
    started = time.monotonic()
    cache.close()
    load.save(stats, time.monotonic() - started)


def async_worker(args: argparse.Namespace) -> None:
    """One instance: an AsyncNearCache with ``--tasks`` tasks sharing the mixed load."""
    import asyncio
    import logging

    import redis.asyncio as aioredis

    from nearcache import MISSING, AsyncNearCache, FlushTimeoutError

    logging.getLogger("nearcache").setLevel(logging.ERROR)  # faults are expected here

    async def main() -> None:
        source = aioredis.Redis(port=args.source_port)
        cache = AsyncNearCache(
            args.connection or CONNECTION.format(port=args.proxy_port),
            channel=args.channel,
            max_staleness=args.max_staleness,
            reconcile_interval=1.0,
            l2=args.l2,
            propagate=args.propagate,
        )
        await cache.start()
        load = Load(args)

        async def from_source(key: str) -> int:
            return int(await source.get(key) or 0)

        async def run() -> None:
            while (op := load.next()) is not None:
                key, region, write = op
                if write == "write":

                    async def bump(k: str = key) -> int:
                        return int(await source.incr(k))

                    version = await cache.write(key, bump, region=region)
                elif write is not None:
                    version = int(await source.incr(key))
                if write is not None:
                    if write == "write":
                        pass
                    elif write == "remove":
                        await cache.remove(key, region=region)
                    elif write == "clear_region":
                        await cache.clear_region(region)
                    else:
                        await cache.clear()
                    upto = load.flushing(write, key, version)
                    if load.read_back():
                        start = time.monotonic()
                        value = await cache.get(key, MISSING, region)
                        hit = value is not MISSING
                        if not hit:
                            value = await cache.get_or_set(
                                key, lambda k=key: from_source(k), region=region
                            )
                        load.read(start, key, value, hit)
                    try:
                        await cache.flush(timeout=args.max_staleness)
                        load.flushed(upto)
                    except FlushTimeoutError:
                        pass  # a later flush() makes the promise
                else:
                    start = time.monotonic()
                    value = await cache.get(key, MISSING, region)
                    hit = value is not MISSING
                    if not hit:
                        value = await cache.get_or_set(
                            key, lambda k=key: from_source(k), region=region
                        )
                    load.read(start, key, value, hit)
                    # A hit never suspends: yield, as any application awaiting I/O would,
                    # so that the other tasks and the listener get the loop.
                    await asyncio.sleep(0)

        print(json.dumps({"ready": True}), flush=True)
        await asyncio.gather(*(run() for _ in range(args.tasks)))
        deadline = time.monotonic() + 30
        while cache.backplane_state is None or cache.backplane_state.value != "connected":
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        stats = cache.stats()
        started = time.monotonic()
        await cache.aclose()
        close_seconds = time.monotonic() - started
        await source.aclose()
        load.save(stats, close_seconds)

    asyncio.run(main())


# -- the conductor -------------------------------------------------------------------------


@dataclass
class Report:
    """What a chaos run measured."""

    operations: int = 0
    reads: int = 0
    writes: int = 0
    unflushed_writes: int = 0
    stale_reads: int = 0
    stale_examples: list[Any] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    hit_ratio: float = 0.0
    hit_ratio_around: dict[str, tuple[float, float]] = field(default_factory=dict)
    full_clears: int = 0
    replays: int = 0
    losses: int = 0
    malformed: int = 0
    instances_connected_at_end: int = 0
    instances: int = 0
    drivers: dict[str, int] = field(default_factory=dict)
    stale_by_driver: dict[str, int] = field(default_factory=dict)
    longest_close: float = 0.0
    sharing: dict[str, int] = field(default_factory=dict)  # L2 / update counters, summed

    def ok(self) -> bool:
        """No stale read, and every instance's listener alive at the end."""
        return self.stale_reads == 0 and self.instances_connected_at_end == self.instances

    def render(self) -> str:
        lines = [
            "instances           "
            + ", ".join(f"{n} {DRIVER_NAMES[d]}" for d, n in sorted(self.drivers.items())),
            f"operations          {self.operations:>10,}  ({self.reads:,} reads, "
            f"{self.writes:,} acknowledged writes, {self.unflushed_writes:,} unacknowledged)",
            f"faults injected     {sum(self.faults.values()):>10,}  "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items())),
            f"stale reads         {self.stale_reads:>10,}  (must be 0)"
            + "".join(f", {DRIVER_NAMES[d]} {n}" for d, n in sorted(self.stale_by_driver.items())),
            f"L1 hit ratio        {self.hit_ratio:>10.1%}",
            f"L1 repairs          {self.full_clears:>10,} full clears, {self.replays:,} replays "
            f"from the log, {self.losses:,} losses found live",
            f"listeners alive     {self.instances_connected_at_end:>10} / {self.instances}",
            f"longest close       {self.longest_close * 1000:>10.0f} ms  (at the end of the run)",
            *(
                ["L2 and updates      " + ", ".join(f"{k} {v:,}" for k, v in self.sharing.items())]
                if any(self.sharing.values())
                else []
            ),
            "hit ratio around faults (1 s before -> 1 s after it healed):",
        ]
        lines.extend(
            f"  {kind:<20} {before:6.1%} -> {after:6.1%}"
            for kind, (before, after) in sorted(self.hit_ratio_around.items())
        )
        lines.extend(f"  STALE: {example}" for example in self.stale_examples[:5])
        lines.append("RESULT: " + ("PASS" if self.ok() else "FAIL"))
        return "\n".join(lines)


class Conductor:
    """Starts the servers, proxies and instances; injects faults; checks the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        from tests.servers import RedisServer, TcpProxy

        self.args = args
        self.rng = random.Random(args.seed)
        self.tmp = Path(tempfile.mkdtemp(prefix="nearcache-chaos-"))
        self.channel = f"chaos-{os.getpid()}"
        self.topology: TopologyChaos | None = None
        self.backplane: RedisServer | None = None
        self.proxies: list[TcpProxy] = []
        self.faults: tuple[str, ...] = FAULTS
        if args.topology == "standalone":
            self.backplane = RedisServer(
                self.tmp / "backplane",
                extra_args=["--appendonly", "yes", "--appendfsync", "always"],
            ).start()
            self.proxies = [TcpProxy(self.backplane.port).start() for _ in range(args.instances)]
        else:
            from tests.chaos_topologies import TopologyChaos

            self.topology = TopologyChaos(
                args.topology, self.tmp / "topology", self.channel, l2=args.l2
            )
            self.faults = self.topology.faults
        self.source = RedisServer(self.tmp / "source").start()
        self.procs: list[subprocess.Popen[str]] = []
        self.fault_log: list[tuple[str, float, float]] = []  # kind, start, healed
        self._timers: list[threading.Thread] = []

    def start_instances(self) -> None:
        channel = self.channel
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        drivers = DRIVERS[self.args.drivers]
        for i in range(self.args.instances):
            if self.topology is not None:
                where = ["--connection", self.topology.connection]
            else:
                where = ["--proxy-port", str(self.proxies[i].port)]
            cmd = [
                sys.executable, "-m", "tests.chaos", "--worker",
                "--driver", drivers[i % len(drivers)], "--tasks", str(self.args.tasks),
                *where, "--source-port", str(self.source.port),
                "--channel", channel, "--duration", str(self.args.duration),
                "--max-staleness", str(self.args.max_staleness), "--keys", str(self.args.keys),
                "--write-ratio", str(self.args.write_ratio), "--seed", str(self.args.seed + i),
                "--propagate", self.args.propagate, *(["--l2"] if self.args.l2 else []),
                "--out", str(self.tmp / f"instance-{i}.json"),
            ]  # fmt: skip
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            self.procs.append(proc)
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("an instance process failed to start")

    def _later(self, delay: float, action: Any, kind: str, started: float) -> None:
        def run() -> None:
            time.sleep(delay)  # the fault's duration, not synchronisation
            action()
            self.fault_log.append((kind, started, time.monotonic()))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._timers.append(thread)

    def inject(self, kind: str) -> None:
        rng = self.rng
        now = time.monotonic()
        duration = rng.uniform(0.2, self.args.max_staleness * 1.5)
        if self.topology is not None and kind != "pause_instance":
            topology = self.topology

            def heal_after(delay: float, action: Any, kind: str, started: float) -> None:
                self._later(delay, lambda: (action(), topology.heal()), kind, started)

            topology.inject(kind, rng, duration, heal_after, now)
            return
        if kind == "pause_instance":
            proc = rng.choice(self.procs)
            proc.send_signal(signal.SIGSTOP)
            self._later(duration, lambda: proc.send_signal(signal.SIGCONT), kind, now)
            return
        assert self.backplane is not None
        proxy = rng.choice(self.proxies)
        if kind == "reset":
            proxy.cut()
            self.fault_log.append((kind, now, now))
        elif kind == "reset_all":
            for p in self.proxies:
                p.cut()
            self.fault_log.append((kind, now, now))
        elif kind == "stall":
            proxy.stall()
            self._later(duration, proxy.resume, kind, now)
        elif kind == "delay":
            proxy.delay(0.02)
            self._later(duration, lambda: proxy.delay(0.0), kind, now)
        elif kind == "kill9_restart":
            self.backplane.kill()
            self._later(duration, self.backplane.restart, kind, now)
        elif kind == "restart_lose_data":
            self.backplane.kill()

            def wipe_and_start() -> None:
                shutil.rmtree(self.backplane.workdir / "appendonlydir", ignore_errors=True)
                (self.backplane.workdir / "dump.rdb").unlink(missing_ok=True)
                self.backplane.restart()

            self._later(duration, wipe_and_start, kind, now)
        elif kind == "flushall":
            client = self.backplane.client()
            client.flushall()
            client.close()
            self.fault_log.append((kind, now, now))
        elif kind == "kill_subscribers":
            client = self.backplane.client()
            client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            client.close()
            self.fault_log.append((kind, now, now))

    def run(self) -> Report:
        self.start_instances()
        end = time.monotonic() + self.args.duration
        kinds = list(self.faults)
        self.rng.shuffle(kinds)
        i = 0
        next_fault = time.monotonic() + self.args.fault_every
        while time.monotonic() < end - self.args.fault_every:
            now = time.monotonic()
            if now >= next_fault and all(not t.is_alive() for t in self._timers):
                self.inject(kinds[i % len(kinds)])
                i += 1
                next_fault = now + self.args.fault_every
            time.sleep(0.02)  # the conductor's tick, not synchronisation
        for thread in self._timers:
            thread.join()
        for proc in self.procs:
            proc.wait(timeout=self.args.duration + 120)
        return self.check()

    def check(self) -> Report:
        report = Report(instances=len(self.procs))
        results = [
            json.loads((self.tmp / f"instance-{i}.json").read_text())
            for i in range(len(self.procs))
        ]
        # Per key: acknowledged writes sorted by flush time, with the running max version.
        by_key: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for result in results:
            for _kind, key, version, flushed in result["writes"]:
                by_key[key].append((flushed, version))
            report.writes += len(result["writes"])
            report.unflushed_writes += result["unflushed"]
        index: dict[str, tuple[list[float], list[int]]] = {}
        for key, items in by_key.items():
            items.sort()
            times, best, top = [], [], 0
            for flushed, version in items:
                top = max(top, version)
                times.append(flushed)
                best.append(top)
            index[key] = (times, best)
        limit = self.args.max_staleness
        hits = reads = 0
        for result in results:
            driver = result["driver"]
            report.drivers[driver] = report.drivers.get(driver, 0) + 1
            report.stale_by_driver.setdefault(driver, 0)
            report.longest_close = max(report.longest_close, result["close_seconds"])
            for start, key, version, hit in result["reads"]:
                reads += 1
                hits += hit
                times, best = index.get(key, ([], []))
                pos = bisect.bisect_left(times, start - limit)  # writes flushed before start-S
                if pos and best[pos - 1] > version:
                    report.stale_reads += 1
                    report.stale_by_driver[driver] += 1
                    if len(report.stale_examples) < 10:
                        report.stale_examples.append(
                            {
                                "key": key,
                                "read": version,
                                "start": start,
                                "newer": best[pos - 1],
                                "hit": hit,
                                "driver": driver,
                            }
                        )
            stats = result["stats"]
            report.full_clears += stats["repairs"]
            for name in SHARING_COUNTERS:
                report.sharing[name] = report.sharing.get(name, 0) + stats.get(name, 0)
            report.replays += stats["replays"]
            report.losses += stats["losses"]
            report.malformed += stats["malformed_messages"]
            report.instances_connected_at_end += result["state_at_end"] == "connected"
        report.reads = reads
        report.operations = reads + report.writes + report.unflushed_writes
        report.hit_ratio = hits / reads if reads else 0.0
        for kind, _start, _healed in self.fault_log:
            report.faults[kind] = report.faults.get(kind, 0) + 1
        report.hit_ratio_around = self._hit_ratio_around(results)
        return report

    def _hit_ratio_around(self, results: list[dict[str, Any]]) -> dict[str, tuple[float, float]]:
        def ratio(t0: float, t1: float) -> float | None:
            h = m = 0
            for result in results:
                samples = result["samples"]
                times = [s[0] for s in samples]
                a = bisect.bisect_left(times, t0)
                b = bisect.bisect_left(times, t1)
                if 0 < a < b < len(samples):
                    h += samples[b][1] - samples[a - 1][1]
                    m += samples[b][2] - samples[a - 1][2]
            return h / (h + m) if h + m else None

        sums: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for kind, start, healed in self.fault_log:
            before, after = ratio(start - 1.0, start), ratio(healed, healed + 1.0)
            if before is not None and after is not None:
                sums[kind].append((before, after))
        return {
            k: (sum(b for b, _ in v) / len(v), sum(a for _, a in v) / len(v))
            for k, v in sums.items()
        }

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for proxy in self.proxies:
            proxy.close()
        if self.backplane is not None:
            self.backplane.stop()
        if self.topology is not None:
            self.topology.close()
        self.source.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_chaos(**overrides: Any) -> Report:
    """Run the chaos suite with the command line's defaults, overridden by keyword."""
    args = parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    conductor = Conductor(args)
    try:
        return conductor.run()
    finally:
        conductor.close()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (60)")
    parser.add_argument("--instances", type=int, default=4, help="instance processes (4)")
    parser.add_argument("--fault-every", type=float, default=1.5, help="seconds between faults")
    parser.add_argument("--max-staleness", type=float, default=1.0, help="the bound checked (1)")
    parser.add_argument("--keys", type=int, default=200, help="distinct keys (200)")
    parser.add_argument("--write-ratio", type=float, default=0.05, help="share of writes (0.05)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--drivers",
        choices=sorted(DRIVERS),
        default="mix",
        help="instances' driver: NearCache (sync), AsyncNearCache (async) or alternately (mix)",
    )
    parser.add_argument(
        "--tasks", type=int, default=3, help="tasks sharing the load in an asyncio instance (3)"
    )
    parser.add_argument(
        "--l2",
        action="store_true",
        help="instances use the shared L2 (half the writes carry values)",
    )
    parser.add_argument(
        "--propagate",
        choices=("invalidate", "update"),
        default="invalidate",
        help="with update, a write sends the new value to the other instances",
    )
    parser.add_argument(
        "--topology",
        choices=("standalone", "sentinel", "cluster"),
        default="standalone",
        help="the backplane: one server behind per-instance proxies (standalone), a primary, "
        "a replica and 3 Sentinels (sentinel), or a 3+3 Redis Cluster (cluster), each with "
        "its own faults",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--connection", help=argparse.SUPPRESS)
    parser.add_argument("--driver", choices=("sync", "async"), help=argparse.SUPPRESS)
    parser.add_argument("--proxy-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--source-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--channel", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.worker:
        (async_worker if args.driver == "async" else worker)(args)
        return
    started = time.monotonic()
    conductor = Conductor(args)
    try:
        report = conductor.run()
    finally:
        conductor.close()
    print(
        f"chaos run: {args.instances} instances, {args.duration:.0f} s, "
        f"max_staleness {args.max_staleness} s, wall {time.monotonic() - started:.0f} s"
    )
    print(report.render())
    sys.exit(0 if report.ok() else 1)


if __name__ == "__main__":
    main()
