"""Section ``workload``: four app processes serving Zipf traffic over a SQLite source of truth.

Every contender runs the same app: 4 processes, keys drawn from Zipf(s=1) over 100k rows (the
same popularity ranking in every process), 95% reads / 5% writes. The source of truth is one
SQLite file in WAL mode; a write is ``UPDATE ... SET version = version + 1 RETURNING`` then
the contender's cache update (half the writes store the new row, half drop the key). A read
returns ``(version, value)``. Every load from the source can be made slower by a fixed delay
(``--db-latency``, milliseconds; a sleep, as a networked database's round trip would be): each
contender runs at every delay given, 0 and 1 ms by default. The delay applies from the start
signal on (warming the caches beforehand is not timed).

- ``NearCache L1``: ``get_or_set(key, loader)``; writes ``write(key, update)`` (the source's new
  row, cached here) or ``remove`` after the update, then ``flush()`` (the write is visible to
  the other instances' invalidation stream when it returns).
- ``NearCache L1+L2``: the same with ``l2=True`` (a shared Redis L2 with leases).
- ``NearCache L1+L2+updates``: also ``propagate="update"`` (a ``set`` ships the new row).
- ``Redis-only``: GET on every read, SET NX after a miss, SET/DEL on writes, pickled values
  (what django-redis does).
- ``redis-py client-side caching``: the same code on a RESP3 client with
  ``cache_config=CacheConfig()`` (needs redis-server >= 7.4; skipped with a note otherwise).
- ``local cachetools, unsynchronized``: an LRUCache per process, no invalidation at all: the
  upper bound on speed, and it serves stale data.

Before the clock starts the caches are warm, as in a long-running app: Redis holds every row
(for the two Redis contenders; for the L2 contenders their L2 holds every row, written in the
library's own format), and each process reads the 20k hottest keys once through its read path
(they carry 87% of the reads). Throughput then counts operations after a 1 s warm-up; read
latency is sampled on every 16th read; database loads per second count every call of the
loader (SQLite) during the measured time, in all four processes.
Stale reads are checked afterwards: every process records its writes (key, version, time the
cache update / flush returned) and its reads (key, version, start time, rounded down to the
last clock refresh, at most 16 operations earlier). A read is stale if it returned a version
older than a write whose flush returned more than ``max_staleness`` (2 s) before the read
started; the same check with no allowance counts reads older than any completed write.

Steady state (at the largest delay, twice per contender): the same runs, with every key read
once per process before the clock, as in a fleet that has served traffic for a while. What is
left is the cost of the hits, of the writes and of the reloads the writes cause; a 6 s run of
the main pass also pays for the cold keys it meets for the first time (13% of reads fall
outside the 20k hottest), which no cache can serve without loading them once.

Cold start (at the largest delay, once): a fifth process with an empty L1 joins the warm fleet
at the start signal and runs the same workload; reported are the database loads it made until
its L1 hit ratio over a window of 2,000 reads came within 2 points of the fleet's.
"""

from __future__ import annotations

import math
import os
import pickle
import shutil
import sqlite3
import tempfile
import time
import uuid
from array import array
from pathlib import Path
from typing import Any

from benchmarks._env import Env, Options
from benchmarks._procs import Control, Workers
from benchmarks._rows import Row, Target, paired_ratios, percentile

__all__ = ["run"]

NAME = "workload"
N_KEYS = 100_000
PROCESSES = 4
WRITE_FRACTION = 0.05
ZIPF_S = 1.0
VALUE_SIZE = 200
MAX_STALENESS = 2.0
SAMPLES = 2_000_000  # pre-drawn operations per process (reused cyclically)
PREWARM = 20_000  # hottest keys read once per process before the clock starts (87% of reads)
STEADY_REPS = 2  # repetitions of the steady-state pass (every key read once before the clock)
LATENCY_EVERY = 16

NC_L1 = "NearCache L1"
NC_L2 = "NearCache L1+L2"
NC_UPDATES = "NearCache L1+L2+updates"
NEARCACHES = (NC_L1, NC_L2, NC_UPDATES)
L2_CONTENDERS = (NC_L2, NC_UPDATES)
COLD_WINDOW = 2_000  # reads per window of the joining process's hit ratio
COLD_MARGIN = 0.02
REDIS_ONLY = "Redis-only (GET/SET per request)"
CSC = "redis-py client-side caching"
LOCAL = "local cachetools, unsynchronized"


def create_database(path: Path) -> None:
    """100k rows of (id, version 0, a 200-byte value), in WAL mode."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, version INTEGER NOT NULL, value BLOB)")
    value = b"v" * VALUE_SIZE
    db.execute("BEGIN")
    db.executemany("INSERT INTO items VALUES (?, 0, ?)", ((i, value) for i in range(N_KEYS)))
    db.execute("COMMIT")
    db.close()


def fill_redis(client: Any, db_path: Path) -> None:
    """Put every row into Redis (a warm shared cache, as the Redis contenders keep it)."""
    db = sqlite3.connect(db_path)
    with client.pipeline(transaction=False) as pipe:
        for n, (key, version, value) in enumerate(db.execute("SELECT * FROM items")):
            pipe.set(f"item:{key}", pickle.dumps((version, value)))
            if n % 5000 == 4999:
                pipe.execute()
        pipe.execute()
    db.close()


def fill_l2(client: Any, db_path: Path, channel: str) -> None:
    """Put every row into the L2 of ``channel`` (a warm shared cache), in the library's own
    record format, as a long-running fleet would have it."""
    from nearcache import SafeSerializer
    from nearcache._core import l2
    from nearcache._core.codec import channel_name

    wire = channel_name(channel)
    keys, args = l2.read_call(wire, None, 0, "", 1.0, l2.reign_arg("standalone"))  # the tokens
    got = l2.parse_read(client.register_script(l2.READ_SCRIPT)(keys=keys, args=args))
    tags = bytes([len(got.gen)]) + got.gen + bytes([len(got.rgen)]) + got.rgen
    dumps = SafeSerializer().dumps
    db = sqlite3.connect(db_path)
    with client.pipeline(transaction=False) as pipe:
        for n, (key, version, value) in enumerate(db.execute("SELECT * FROM items")):
            payload = l2.encode_payload(1, None, key, dumps((version, value)))
            pipe.set(l2.value_keys(wire, None, key)[0], tags + payload, px=3_600_000)
            if n % 5000 == 4999:
                pipe.execute()
        pipe.execute()
    db.close()


def _draws(seed: int) -> tuple[array[int], array[int], list[int]]:
    """Pre-drawn keys (Zipf, ranking shared by every process), operations (0 read,
    1 write+set, 2 write+remove) and every key, hottest first."""
    import numpy as np

    ranking = np.random.default_rng(12345).permutation(N_KEYS)  # same in every process
    weights = 1.0 / np.arange(1, N_KEYS + 1) ** ZIPF_S
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    rng = np.random.default_rng(seed)
    ranks = np.minimum(np.searchsorted(cdf, rng.random(SAMPLES)), N_KEYS - 1)
    keys = array("q")
    keys.frombytes(ranking[ranks].astype(np.int64).tobytes())
    u = rng.random(SAMPLES)
    ops = np.where(u < WRITE_FRACTION, np.where(u < WRITE_FRACTION / 2, 1, 2), 0)
    kinds = array("b")
    kinds.frombytes(ops.astype(np.int8).tobytes())
    return keys, kinds, ranking.tolist()


class _Database:
    def __init__(self, path: str) -> None:
        self.loads = 0
        self.latency = 0.0  # seconds added to every load (a networked database's round trip)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.execute("PRAGMA synchronous=NORMAL")

    def load(self, key: int) -> tuple[int, bytes]:
        self.loads += 1
        if self.latency:
            time.sleep(self.latency)
        row = self.db.execute("SELECT version, value FROM items WHERE id = ?", (key,)).fetchone()
        return row[0], row[1]

    def write(self, key: int) -> tuple[int, bytes]:
        rows = self.db.execute(
            "UPDATE items SET version = version + 1 WHERE id = ? RETURNING version, value",
            (key,),
        ).fetchall()
        return rows[0][0], rows[0][1]


def _app(contender: str, url: str, db: _Database, channel: str) -> tuple[Any, Any, Any, Any]:
    """(read(key) -> (version, value), write(key, op) -> version, close(), L1 hits())."""
    if contender in NEARCACHES:
        from nearcache import NearCache

        extra: dict[str, Any] = {}
        if contender in L2_CONTENDERS:
            extra["l2"] = True
        if contender == NC_UPDATES:
            extra["propagate"] = "update"
        cache = NearCache(url, channel=channel, max_entries=N_KEYS, abort_connect=True, **extra)
        get_or_set, load = cache.get_or_set, db.load

        def read(key: int) -> tuple[int, bytes]:
            return get_or_set(key, lambda: load(key))

        def write(key: int, op: int) -> int:
            if op == 1:  # the source's new row, cached and shared (safe against racing writers)
                row = cache.write(key, lambda: db.write(key))
            else:
                row = db.write(key)
                cache.remove(key)
            cache.flush()
            return row[0]  # type: ignore[no-any-return]

        return read, write, cache.close, cache.stats
    if contender in (REDIS_ONLY, CSC):
        import redis

        if contender == CSC:
            from redis.cache import CacheConfig

            # The default CacheConfig (10k entries): redis-py scans its whole cache on every
            # invalidation, so a larger one only gets slower under writes.
            client = redis.Redis.from_url(url, protocol=3, cache_config=CacheConfig())
        else:
            client = redis.Redis.from_url(url)
        get, set_nx, set_, delete = client.get, client.set, client.set, client.delete
        loads, dumps = pickle.loads, pickle.dumps

        def read(key: int) -> tuple[int, bytes]:
            name = f"item:{key}"
            raw = get(name)
            if raw is not None:
                return loads(raw)  # type: ignore[no-any-return]
            row = db.load(key)
            set_nx(name, dumps(row), nx=True)
            return row

        def write(key: int, op: int) -> int:
            row = db.write(key)
            if op == 1:
                set_(f"item:{key}", dumps(row))
            else:
                delete(f"item:{key}")
            return row[0]

        return read, write, client.close, None
    import cachetools

    lru: Any = cachetools.LRUCache(maxsize=N_KEYS)
    lru_get = lru.get

    def read(key: int) -> tuple[int, bytes]:
        row = lru_get(key)
        if row is None:
            row = lru[key] = db.load(key)
        return row  # type: ignore[no-any-return]

    def write(key: int, op: int) -> int:
        row = db.write(key)
        if op == 1:
            lru[key] = row
        else:
            lru.pop(key, None)
        return row[0]

    return read, write, lambda: None, None


def app_process(
    control: Control,
    contender: str,
    url: str,
    db_path: str,
    channel: str,
    seed: int,
    warmup: float,
    duration: float,
    out_dir: str,
    prewarm: int,
    latency: float = 0.0,
    late: bool = False,
) -> dict[str, Any]:
    keys, kinds, hottest = _draws(seed)
    db = _Database(db_path)
    read, write, close, stats = _app(contender, url, db, channel)
    if contender != REDIS_ONLY and not late:  # Redis-only's only cache was filled already
        for key in hottest[:prewarm]:  # a long-running app has its hot set cached
            read(key)
    r_key, r_ver, r_start = array("q"), array("q"), array("d")
    w_key, w_ver, w_done = array("q"), array("q"), array("d")
    latencies = array("d")
    control.report("ready")
    control.wait_go()
    db.latency = latency
    # L1 hits: the cache's own counter; for a local cache, the reads not loaded.
    hits_of = (lambda: stats().hits) if stats else (lambda: len(r_key) - db.loads)
    timeline: list[tuple[int, int, int, float]] = []  # (reads, loads, L1 hits, time) per window
    next_window = COLD_WINDOW if late else -1
    clock = time.monotonic
    start = clock()
    measure_from = start + warmup
    end = measure_from + duration
    i = ops_before = loads_before = reads_before = 0
    now = start
    measuring = False
    while True:
        if not i & 15:
            now = clock()
            if not measuring and now >= measure_from:
                measuring, ops_before, loads_before, reads_before = True, i, db.loads, len(r_key)
                hits_before = hits_of()
                counters_before = _counters(stats)
            if now >= end:
                break
            if len(r_key) >= next_window > 0:
                timeline.append((len(r_key), db.loads, hits_of(), now - start))
                next_window += COLD_WINDOW
        j = i % SAMPLES
        key = keys[j]
        if kinds[j] == 0:
            if measuring and not i & (LATENCY_EVERY - 1):
                t0 = clock()
                row = read(key)
                latencies.append(clock() - t0)
            else:
                row = read(key)
            r_key.append(key)
            r_ver.append(row[0])
            r_start.append(now)
        else:
            version = write(key, kinds[j])
            w_key.append(key)
            w_ver.append(version)
            w_done.append(clock())
        i += 1
    ops = i - ops_before
    elapsed = clock() - measure_from
    loads, reads = db.loads - loads_before, len(r_key) - reads_before
    hits = hits_of() - hits_before
    counters = {k: v - counters_before.get(k, 0) for k, v in _counters(stats).items()}
    close()
    base = os.path.join(out_dir, control.name)
    for suffix, data in (
        ("rk", r_key), ("rv", r_ver), ("rt", r_start), ("wk", w_key), ("wv", w_ver),
        ("wt", w_done),
    ):  # fmt: skip
        with open(f"{base}.{suffix}", "wb") as fh:
            data.tofile(fh)
    return {
        "ops": ops,
        "elapsed": elapsed,
        "latencies": list(latencies),
        "miss_ratio": loads / reads if reads else math.nan,
        "loads_per_s": loads / elapsed,
        "hit_ratio": hits / reads if reads else math.nan,
        "timeline": timeline,
        "counters": counters,
    }


COUNTERS = (
    "hits", "misses", "repairs", "loads", "l2_hits", "l2_lease_waits", "l2_fills_refused",
    "l2_errors", "updates_received", "updates_fell_back", "updates_rejected", "rejected_loads",
)  # fmt: skip


def _counters(stats: Any) -> dict[str, int]:
    """The cache's counters that explain its figures (nothing for the other contenders)."""
    if stats is None:
        return {}
    snapshot = stats()
    return {name: getattr(snapshot, name) for name in COUNTERS}


def cold_start(
    timeline: list[tuple[int, int, int, float]], fleet: float
) -> tuple[int, float, bool, float]:
    """Database loads and seconds until the joiner's L1 hit ratio over one window came within
    COLD_MARGIN of the fleet's, whether it did, and its last window's ratio (if it did not,
    the loads and time until the run ended)."""
    reads0 = hits0 = 0
    ratio = 0.0
    for reads, loads, hits, at in timeline:
        ratio = (hits - hits0) / max(reads - reads0, 1)
        if ratio >= fleet - COLD_MARGIN:
            return loads, at, True, ratio
        reads0, hits0 = reads, hits
    if not timeline:
        return 0, math.nan, False, math.nan
    return timeline[-1][1], timeline[-1][3], False, ratio


def count_stale(out_dir: str, names: list[str], allowance: float) -> int:
    """Reads that returned a version older than a write that completed more than
    ``allowance`` seconds before the read started."""
    import numpy as np

    def load(suffix: str, dtype: str) -> Any:
        parts = [np.fromfile(os.path.join(out_dir, f"{n}.{suffix}"), dtype=dtype) for n in names]
        return np.concatenate(parts)

    rk, rv, rt = load("rk", "int64"), load("rv", "int64"), load("rt", "float64")
    wk, wv, wt = load("wk", "int64"), load("wv", "int64"), load("wt", "float64")
    if len(wk) == 0 or len(rk) == 0:
        return 0
    t0 = min(rt.min(), wt.min())
    span = max(rt.max(), wt.max()) - t0 + 10.0
    # One sortable number per event: key-major, then time (exact to well under 1 us).
    w_pos = wk.astype(np.float64) * span + (wt - t0)
    order = np.argsort(w_pos, kind="stable")
    w_pos, wk, wv = w_pos[order], wk[order], wv[order]
    # Running max of the version within each key (versions < 2**32; keys shift them apart).
    running = np.maximum.accumulate(wk * (1 << 32) + wv) - wk * (1 << 32)
    r_pos = rk.astype(np.float64) * span + (rt - allowance - t0)
    idx = np.searchsorted(w_pos, r_pos, side="left") - 1
    valid = idx >= 0
    idx_c = np.where(valid, idx, 0)
    same_key = valid & (wk[idx_c] == rk)
    newest = np.where(same_key, running[idx_c], -1)
    return int(np.count_nonzero(rv < newest))


def _one_run(
    contender: str,
    url: str,
    db_path: str,
    warmup: float,
    duration: float,
    rep: int,
    prewarm: int = PREWARM,
    latency: float = 0.0,
    channel: str = "",
    cold: bool = False,
) -> dict[str, Any]:
    out_dir = tempfile.mkdtemp(prefix="nearcache-bench-wl-")
    try:
        names = [f"app{i}" for i in range(PROCESSES)]
        with Workers() as workers:
            for i, name in enumerate(names):
                seed = 1000 * rep + i
                workers.spawn(
                    name, app_process, contender, url, db_path, channel, seed, warmup,
                    duration, out_dir, prewarm, latency,
                )  # fmt: skip
            if cold:
                workers.spawn(
                    "late", app_process, contender, url, db_path, channel, 1000 * rep + 99,
                    warmup, duration, out_dir, prewarm, latency, True,
                )  # fmt: skip
            everyone = [*names, "late"] if cold else names
            workers.collect("ready", everyone, timeout=300)
            workers.go()
            results = workers.collect("result", everyone, timeout=warmup + duration + 120)
        if cold:
            fleet = sum(results[n]["hit_ratio"] for n in names) / len(names)
            loads, seconds, reached, last = cold_start(results["late"]["timeline"], fleet)
            return {
                "cold_loads": loads,
                "cold_seconds": seconds,
                "reached": reached,
                "last_ratio": last,
                "fleet_hit_ratio": fleet,
            }
        ops = sum(r["ops"] / r["elapsed"] for r in results.values())
        counters: dict[str, int] = {}
        for r in results.values():
            for k, v in r["counters"].items():
                counters[k] = counters.get(k, 0) + v
        loads_per_s = sum(r["loads_per_s"] for r in results.values())
        latencies = [x for r in results.values() for x in r["latencies"]]
        miss_ratios = [r["miss_ratio"] for r in results.values()]
        return {
            "ops": ops,
            "p99": percentile(latencies, 99) * 1e6,
            "p50": percentile(latencies, 50) * 1e6,
            "stale": count_stale(out_dir, names, MAX_STALENESS),
            "stale0": count_stale(out_dir, names, 0.0),
            "miss_ratio": sum(miss_ratios) / len(miss_ratios),
            "loads_per_s": loads_per_s,
            "counters": counters,  # type: ignore[dict-item]
        }
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def _prepare(contender: str, server: Any, db_path: Path, channel: str) -> None:
    """Empty Redis, then fill the shared cache the contender keeps there."""
    with server.client() as admin:
        admin.flushall()
        if contender in (REDIS_ONLY, CSC):
            fill_redis(admin, db_path)
        elif contender in L2_CONTENDERS:
            fill_l2(admin, db_path, channel)


def _l2_available() -> str | None:
    """Why the L2 contenders cannot run with this nearcache, or None."""
    import inspect

    from nearcache import NearCache

    if "l2" not in inspect.signature(NearCache).parameters:
        return "this nearcache has no l2= option"
    return None


def run(options: Options, env: Env) -> list[Row]:
    """Measure and return the section's rows."""
    reps = options.reps(default=3, quick=1)
    warmup, duration = (0.3, 1.0) if options.quick else (1.0, 5.0)
    cold_duration = 2.0 if options.quick else 15.0
    prewarm = 2_000 if options.quick else PREWARM
    latencies = options.db_latencies
    server, where = env.redis_client_caching()
    contenders = [*NEARCACHES, REDIS_ONLY, CSC, LOCAL]
    if server is None:
        server = env.redis()
        contenders.remove(CSC)
        env.notes.append(f"workload: redis-py client-side caching skipped: {where}")
    else:
        env.notes.append(f"workload: every contender ran against {where}")
    try:
        import cachetools  # noqa: F401
    except ImportError:
        contenders.remove(LOCAL)
        env.notes.append("workload: cachetools not installed: unsynchronized local skipped")
    why = _l2_available()
    if why:
        for contender in L2_CONTENDERS:
            contenders.remove(contender)
        env.notes.append(f"workload: L2 contenders skipped: {why}")
    tmp = Path(tempfile.mkdtemp(prefix="nearcache-bench-db-"))
    figures: dict[tuple[str, float], dict[str, list[float]]] = {}
    cold: dict[str, dict[str, Any]] = {}
    steady: dict[str, dict[str, list[float]]] = {}
    db_path = tmp / "items.sqlite3"

    def fresh_run(
        contender: str, rep: int, keys_warm: int, delay: float, seconds: float, cold: bool = False
    ) -> dict[str, Any]:
        """One run on a new database (every run starts from version 0) and a new channel."""
        create_database(db_path)
        channel = f"bench-app-{uuid.uuid4().hex[:8]}"
        _prepare(contender, server, db_path, channel)
        try:
            return _one_run(
                contender, server.url, str(db_path), warmup, seconds, rep, keys_warm,
                delay / 1000, channel, cold,
            )  # fmt: skip
        finally:
            db_path.unlink()

    try:
        for latency in latencies:
            for rep in range(reps):
                for contender in contenders:
                    env.log(
                        f"workload: db +{latency:g} ms, rep {rep + 1}/{reps}: {contender}, "
                        f"{PROCESSES} processes, {warmup}+{duration}s"
                    )
                    r = fresh_run(contender, rep, prewarm, latency, duration)
                    f = figures.setdefault((contender, latency), {})
                    counters = r.pop("counters")
                    if counters and rep == 0:
                        shown = ", ".join(f"{k} {v:,}" for k, v in counters.items())
                        env.notes.append(f"workload: {contender}, db +{latency:g} ms: {shown}")
                    for key, value in r.items():
                        f.setdefault(key, []).append(value)
        latency = max(latencies)
        for rep in range(0 if options.quick else STEADY_REPS):
            for contender in contenders:
                env.log(
                    f"workload: steady state at db +{latency:g} ms, rep {rep + 1}/"
                    f"{STEADY_REPS}: {contender} (all {N_KEYS:,} keys read before the clock)"
                )
                r = fresh_run(contender, rep, N_KEYS, latency, duration)
                f = steady.setdefault(contender, {})
                r.pop("counters")
                for key, value in r.items():
                    f.setdefault(key, []).append(value)
        for contender in contenders:
            if contender in (REDIS_ONLY, CSC):
                continue  # nothing local to warm
            env.log(f"workload: cold start at db +{latency:g} ms: {contender}")
            cold[contender] = fresh_run(contender, 0, prewarm, latency, cold_duration, cold=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows: list[Row] = []
    for latency in latencies:
        rows += _rows(figures, contenders, latency)
    top = max(latencies)
    if steady:
        rows += _steady_rows(steady, contenders, top)
    for contender, c in cold.items():
        row = Row(
            NAME, contender, f"cold start: db loads, db +{top:g} ms", "count", [c["cold_loads"]]
        )
        row.note = (
            f"a 5th process joining the warm fleet: L1 hit ratio within {COLD_MARGIN:.0%} of "
            f"the fleet's ({c['fleet_hit_ratio']:.1%}) after {c['cold_seconds']:.2f}s"
            if c["reached"]
            else f"NOT within {COLD_MARGIN:.0%} of the fleet's L1 hit ratio "
            f"({c['fleet_hit_ratio']:.1%}) by the end ({c['cold_seconds']:.1f}s: "
            f"{c['last_ratio']:.1%}); loads until then"
        )
        rows.append(row)
    return rows


def _stale_row(contender: str, f: dict[str, list[float]], at: str) -> Row:
    """Reads past the bound (a target of 0 for nearcache), and reads older than any write."""
    stale = Row(NAME, contender, f"stale reads past 2 s, {at}", "stale reads", f["stale"])
    if contender in NEARCACHES:
        stale.target = Target("value", "<=", 0, "0")
    stale.note = f"reads older than a completed write: {sum(f['stale0']):,.0f} in total"
    return stale


def _steady_rows(
    steady: dict[str, dict[str, list[float]]], contenders: list[str], latency: float
) -> list[Row]:
    """The steady-state pass: every process read every key once before the clock (a fleet
    that has run for a while), so that what is left is the cost of writes, of the reloads
    they cause and of the hits, not of the cold keys a 6 s run meets for the first time."""
    at = f"db +{latency:g} ms, steady state"
    rows: list[Row] = []
    redis_only = steady[REDIS_ONLY]
    for contender in contenders:
        f = steady[contender]
        ops = Row(NAME, contender, f"ops/s, {at}", "ops/s", f["ops"], lower_is_better=False)
        misses = sorted(f["miss_ratio"])[len(f["miss_ratio"]) // 2]
        ops.note = f"{misses:.2%} of reads loaded from SQLite; all keys read before the clock"
        if contender != REDIS_ONLY:
            ops.ratios = paired_ratios(f["ops"], redis_only["ops"])
            ops.ratio_to = f"{contender} / Redis-only"
            if contender in L2_CONTENDERS:
                ops.target = Target("ratio", ">=", 3.0, ">= 3x Redis-only")
        rows.append(ops)
        rows.append(_stale_row(contender, f, at))
    return rows


def _rows(
    figures: dict[tuple[str, float], dict[str, list[float]]], contenders: list[str], latency: float
) -> list[Row]:
    """The rows of every contender at one database delay, with their ratios and targets."""
    at = f"db +{latency:g} ms"
    rows: list[Row] = []
    redis_only = figures[(REDIS_ONLY, latency)]
    local = figures.get((LOCAL, latency))
    for contender in contenders:
        f = figures[(contender, latency)]
        l2 = contender in L2_CONTENDERS
        slow_db = latency >= 1.0
        ops = Row(NAME, contender, f"ops/s, {at}", "ops/s", f["ops"], lower_is_better=False)
        misses = sorted(f["miss_ratio"])[len(f["miss_ratio"]) // 2]
        ops.note = f"{misses:.2%} of reads loaded from SQLite"
        loads = Row(NAME, contender, f"db loads/s, {at}", "loads/s", f["loads_per_s"])
        # Per read as well: a faster contender also writes (and so invalidates) more often.
        per_read = Row(
            NAME,
            contender,
            f"db loads per 1k reads, {at}",
            "loads",
            [m * 1000 for m in f["miss_ratio"]],
        )
        if contender in NEARCACHES or contender == CSC:
            ops.ratios = paired_ratios(f["ops"], redis_only["ops"])
            ops.ratio_to = f"{contender} / Redis-only"
            loads.ratios = paired_ratios(f["loads_per_s"], redis_only["loads_per_s"])
            loads.ratio_to = f"{contender} / Redis-only"
            per_read.ratios = paired_ratios(f["miss_ratio"], redis_only["miss_ratio"])
            per_read.ratio_to = f"{contender} / Redis-only"
            if l2 and slow_db:
                ops.target = Target("ratio", ">=", 3.0, ">= 3x Redis-only")
                loads.target = Target("ratio", "<=", 1.0, "<= Redis-only")
                per_read.target = Target("ratio", "<=", 1.0, "<= Redis-only")
            elif contender == NC_L1 and not latency:
                ops.target = Target("ratio", ">=", 10.0, ">= 10x Redis-only")
            elif contender == CSC:
                ops.ratios = paired_ratios(figures[(NC_L1, latency)]["ops"], f["ops"])
                ops.ratio_to = f"{NC_L1} / {CSC}"
        rows += [ops, loads, per_read]
        if contender in NEARCACHES and local is not None:
            vs_local = Row(NAME, contender, f"local over this, ops/s, {at}", "ops/s", f["ops"])
            vs_local.ratios = paired_ratios(local["ops"], f["ops"])
            vs_local.ratio_to = f"{LOCAL} / {contender}"
            if l2 and slow_db:
                vs_local.target = Target("ratio", "<=", 1.5, "within 1.5x")
            elif contender == NC_L1 and not latency:
                vs_local.target = Target("ratio", "<=", 1.3, "within 1.3x")
            rows.append(vs_local)
        rows.append(Row(NAME, contender, f"p99 read latency us, {at}", "us", f["p99"]))
        rows.append(_stale_row(contender, f, at))
    return rows
