"""Section ``workload``: four app processes serving Zipf traffic over a SQLite source of truth.

Every contender runs the same app: 4 processes, keys drawn from Zipf(s=1) over 100k rows (the
same popularity ranking in every process), 95% reads / 5% writes. The source of truth is one
SQLite file in WAL mode; a write is ``UPDATE ... SET version = version + 1 RETURNING`` then
the contender's cache update (half the writes store the new row, half drop the key). A read
returns ``(version, value)``.

- ``NearCache``: ``get_or_set(key, loader)``; writes ``set``/``remove`` then ``flush()`` (the
  write is visible to the other instances' invalidation stream when it returns).
- ``Redis-only``: GET on every read, SET NX after a miss, SET/DEL on writes, pickled values
  (what django-redis does).
- ``redis-py client-side caching``: the same code on a RESP3 client with
  ``cache_config=CacheConfig()`` (needs redis-server >= 7.4; skipped with a note otherwise).
- ``local cachetools, unsynchronized``: an LRUCache per process, no invalidation at all: the
  upper bound on speed, and it serves stale data.

Before the clock starts the caches are warm, as in a long-running app: Redis holds every row
(for the two Redis contenders), and each process reads the 20k hottest keys once through its
read path (they carry 87% of the reads). Throughput then counts operations after a 1 s
warm-up; read latency is sampled on every 16th read.
Stale reads are checked afterwards: every process records its writes (key, version, time the
cache update / flush returned) and its reads (key, version, start time, rounded down to the
last clock refresh, at most 16 operations earlier). A read is stale if it returned a version
older than a write whose flush returned more than ``max_staleness`` (2 s) before the read
started; the same check with no allowance counts reads older than any completed write.
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
LATENCY_EVERY = 16

NEARCACHE = "NearCache"
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


def _draws(seed: int) -> tuple[array[int], array[int], list[int]]:
    """Pre-drawn keys (Zipf, ranking shared by every process), operations (0 read,
    1 write+set, 2 write+remove) and the hottest keys, hottest first."""
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
    return keys, kinds, ranking[:PREWARM].tolist()


class _Database:
    def __init__(self, path: str) -> None:
        self.loads = 0
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA busy_timeout=10000")
        self.db.execute("PRAGMA synchronous=NORMAL")

    def load(self, key: int) -> tuple[int, bytes]:
        self.loads += 1
        row = self.db.execute("SELECT version, value FROM items WHERE id = ?", (key,)).fetchone()
        return row[0], row[1]

    def write(self, key: int) -> tuple[int, bytes]:
        rows = self.db.execute(
            "UPDATE items SET version = version + 1 WHERE id = ? RETURNING version, value",
            (key,),
        ).fetchall()
        return rows[0][0], rows[0][1]


def _app(contender: str, url: str, db: _Database, channel: str) -> tuple[Any, Any, Any]:
    """(read(key) -> (version, value), write(key, op) -> version, close())."""
    if contender == NEARCACHE:
        from nearcache import NearCache

        cache = NearCache(url, channel=channel, max_entries=N_KEYS, abort_connect=True)
        get_or_set, load = cache.get_or_set, db.load

        def read(key: int) -> tuple[int, bytes]:
            return get_or_set(key, lambda: load(key))

        def write(key: int, op: int) -> int:
            row = db.write(key)
            if op == 1:
                cache.set(key, row)
            else:
                cache.remove(key)
            cache.flush()
            return row[0]

        return read, write, cache.close
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

        return read, write, client.close
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

    return read, write, lambda: None


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
) -> dict[str, Any]:
    keys, kinds, hottest = _draws(seed)
    db = _Database(db_path)
    read, write, close = _app(contender, url, db, channel)
    if contender != REDIS_ONLY:  # its only cache, Redis, was filled by the parent
        for key in hottest[:prewarm]:  # a long-running app has its hot set cached
            read(key)
    r_key, r_ver, r_start = array("q"), array("q"), array("d")
    w_key, w_ver, w_done = array("q"), array("q"), array("d")
    latencies = array("d")
    control.report("ready")
    control.wait_go()
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
            if now >= end:
                break
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
    }


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
) -> dict[str, Any]:
    out_dir = tempfile.mkdtemp(prefix="nearcache-bench-wl-")
    try:
        channel = f"bench-app-{uuid.uuid4().hex[:8]}"
        names = [f"app{i}" for i in range(PROCESSES)]
        with Workers() as workers:
            for i, name in enumerate(names):
                seed = 1000 * rep + i
                workers.spawn(
                    name, app_process, contender, url, db_path, channel, seed, warmup,
                    duration, out_dir, prewarm,
                )  # fmt: skip
            workers.collect("ready", names, timeout=300)
            workers.go()
            results = workers.collect("result", names, timeout=warmup + duration + 120)
        ops = sum(r["ops"] / r["elapsed"] for r in results.values())
        latencies = [x for r in results.values() for x in r["latencies"]]
        miss_ratios = [r["miss_ratio"] for r in results.values()]
        return {
            "ops": ops,
            "p99": percentile(latencies, 99) * 1e6,
            "p50": percentile(latencies, 50) * 1e6,
            "stale": count_stale(out_dir, names, MAX_STALENESS),
            "stale0": count_stale(out_dir, names, 0.0),
            "miss_ratio": sum(miss_ratios) / len(miss_ratios),
        }
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def run(options: Options, env: Env) -> list[Row]:
    """Measure and return the section's rows."""
    reps = options.reps(default=3, quick=1)
    warmup, duration = (0.3, 1.0) if options.quick else (1.0, 5.0)
    prewarm = 2_000 if options.quick else PREWARM
    server, where = env.redis_client_caching()
    contenders = [NEARCACHE, REDIS_ONLY, CSC, LOCAL]
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
    tmp = Path(tempfile.mkdtemp(prefix="nearcache-bench-db-"))
    figures: dict[str, dict[str, list[float]]] = {}
    try:
        db_path = tmp / "items.sqlite3"
        create_database(db_path)
        for rep in range(reps):
            for contender in contenders:
                with server.client() as admin:
                    admin.flushall()
                    if contender in (REDIS_ONLY, CSC):
                        fill_redis(admin, db_path)
                env.log(
                    f"workload: rep {rep + 1}/{reps}: {contender}, "
                    f"{PROCESSES} processes, {warmup}+{duration}s"
                )
                r = _one_run(contender, server.url, str(db_path), warmup, duration, rep, prewarm)
                f = figures.setdefault(contender, {})
                for key, value in r.items():
                    f.setdefault(key, []).append(value)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows: list[Row] = []
    nc = figures[NEARCACHE]
    targets = {REDIS_ONLY: 10.0, CSC: 5.0}
    for contender in contenders:
        f = figures[contender]
        ops = Row(NAME, contender, "ops/s (4 procs)", "ops/s", f["ops"], lower_is_better=False)
        misses = sorted(f["miss_ratio"])[len(f["miss_ratio"]) // 2]
        ops.note = f"{misses:.2%} of reads loaded from SQLite"
        if contender != NEARCACHE:
            # nearcache's speed-up over this contender, per repetition
            ops.ratios = paired_ratios(nc["ops"], f["ops"])
            ops.ratio_to = f"NearCache / {contender}"
            if contender in targets:
                limit = targets[contender]
                ops.target = Target("ratio", ">=", limit, f"NearCache >= {limit:.0f}x")
            else:
                ops.ratios = paired_ratios(f["ops"], nc["ops"])
                ops.ratio_to = f"{contender} / NearCache"
                ops.target = Target("ratio", "<=", 1.3, "NearCache within 1.3x")
        rows.append(ops)
        rows.append(Row(NAME, contender, "p99 read latency us", "us", f["p99"]))
        stale = Row(NAME, contender, "stale reads past 2 s", "stale reads", f["stale"])
        if contender == NEARCACHE:
            stale.target = Target("value", "<=", 0, "0")
        stale.note = f"reads older than a completed write: {sum(f['stale0']):,.0f} in total"
        rows.append(stale)
    return rows
