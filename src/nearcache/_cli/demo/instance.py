"""One instance of ``nearcache demo``: a process serving the catalog through a NearCache.

Run as ``python -m nearcache._cli.demo.instance`` by the coordinator
(``nearcache._cli.demo.scenario``) and driven over JSON lines. The first stdin line is the
configuration; every later line is a command ``{"id": n, "op": "...", ...}``. Replies go to
stdout (which carries nothing else) as ``{"id": n, "stage": "done", "ok": true, ...}``; a
``watch`` sends ``"stage": "armed"`` first. Every command runs on its own thread, so a slow
one (a flush, a watch) never holds up the others. The process ends on stdin EOF: when the
coordinator exits, however it exits, its instances follow.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from nearcache._cli.demo.catalog import (
    PRODUCT_COUNT,
    REGIONS,
    CatalogSerializer,
    Price,
    Product,
    connect,
    current_versions,
    load,
    update_price,
)
from nearcache._core.store import MISSING
from nearcache._drivers.sync import NearCache
from nearcache._exceptions import FlushTimeoutError

__all__ = ["main"]

# A probe sleeps this long between two L1 lookups. A pure spin would hold the GIL and delay
# the very listener thread whose invalidation it waits for (by up to the 5 ms switch
# interval); 50 µs keeps the resolution well under the propagation time.
_PROBE_PAUSE = 50e-6
_LOAD_BATCH = 5  # background reads between two pauses: at most ~1000 reads/s
_LOAD_PAUSE = 0.005
# A value written with set() is stored a few µs after its loaded_at was taken (a loaded value
# is stored before: its reservation precedes the load); this slack absorbs that.
_AGE_SLACK = 1e-3

Reply = dict[str, Any]


class _OutageLog:
    """Records the reads made while the coordinator tracks an outage."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.on = False
        # (time before the read, "l1" | "sqlite" | "error", loaded_at of the value served)
        self.reads: list[tuple[float, str, float]] = []

    def start(self) -> None:
        """Record every read from now on."""
        with self._lock:
            self.on = True
            self.reads = []

    def add(self, started: float, source: str, loaded_at: float) -> None:
        with self._lock:
            if self.on:
                self.reads.append((started, source, loaded_at))

    def report(self, start: float, end: float, bound: float) -> Reply:
        """Summarize the reads made in ``[start, end)``; ``start`` is when Redis died."""
        with self._lock:
            window = [r for r in self.reads if start <= r[0] < end]
            self.reads = []
            self.on = False
        hits = [(t, loaded_at) for t, source, loaded_at in window if source == "l1"]
        # An L1 answer at t is within the staleness bound when t <= max(stored, confirmed) +
        # max_staleness. The last confirmation came before Redis died (start), a loaded value
        # was stored before its load started (loaded_at) and t is read before the lookup, so
        # with a correct cache every age computed here is <= max_staleness.
        ages = [t - max(loaded_at, start) for t, loaded_at in hits]
        return {
            "reads": len(window),
            "l1": len(hits),
            "sqlite": sum(1 for r in window if r[1] == "sqlite"),
            "errors": sum(1 for r in window if r[1] == "error"),
            "max_age": max(ages, default=0.0),
            "violations": sum(1 for age in ages if age > bound + _AGE_SLACK),
        }


class Instance:
    """The catalog service of one demo instance."""

    def __init__(self, config: dict[str, Any], out: TextIO) -> None:
        self.name = str(config["name"])
        self.max_staleness = float(config["max_staleness"])
        self._db = Path(config["db"])
        self._products = int(config.get("products", PRODUCT_COUNT))
        self._out = out
        self._out_lock = threading.Lock()
        self._local = threading.local()
        self._rng = random.Random(int(config.get("seed", 0)))
        self._rng_lock = threading.Lock()
        self._outage = _OutageLog()
        self._counts_lock = threading.Lock()
        self.reads = 0
        self.hits = 0  # reads served from L1
        self.l2_hits = 0  # reads served from the shared L2 (Redis), not from SQLite
        self.loads = 0  # loads from SQLite made by a read (others joined a load in flight)
        self.errors = 0
        self._load_on = threading.Event()
        self._stopping = threading.Event()
        # Zipf-like popularity: a few products take most reads, so the tables show real hit
        # ratios rather than all-hits or all-misses.
        self._cumulative = list(
            itertools.accumulate(1.0 / rank**1.1 for rank in range(1, self._products + 1))
        )
        self.cache = NearCache(
            str(config["connection"]),
            channel=str(config["channel"]),
            max_staleness=self.max_staleness,
            abort_connect=False,
            l2=bool(config.get("l2", True)),
            serializer=CatalogSerializer(),
        )
        self._loader = threading.Thread(target=self._load_loop, name="demo-load", daemon=True)

    # -- plumbing ---------------------------------------------------------------------------

    def send(self, message: Reply) -> None:
        line = json.dumps(message, separators=(",", ":"))
        with self._out_lock:
            self._out.write(line + "\n")
            self._out.flush()

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect(self._db)
            self._local.conn = conn
        return conn

    def run(self, commands: TextIO) -> None:
        """Answer commands until stdin ends or a ``close`` command comes."""
        self._loader.start()
        self.send({"id": 0, "stage": "done", "ok": True, "instance_id": self.cache.instance_id})
        for line in commands:
            if not line.strip():
                continue
            request = json.loads(line)
            if request.get("op") == "close":
                break
            threading.Thread(target=self._serve, args=(request,), daemon=True).start()
        self._stopping.set()
        self._load_on.set()  # wake the load loop so that it sees the stop
        self._loader.join(timeout=2.0)
        self.cache.close(timeout=0.5)

    def _serve(self, request: dict[str, Any]) -> None:
        ident = request.get("id")
        handler: Callable[[dict[str, Any]], Reply] | None = getattr(
            self, f"op_{request.get('op')}", None
        )
        try:
            if handler is None:
                raise ValueError(f"unknown op {request.get('op')!r}")
            reply = handler(request)
        except Exception as exc:
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        reply.setdefault("ok", True)
        self.send({"id": ident, "stage": "done", **reply})

    # -- reading the catalog ----------------------------------------------------------------

    def read(self, region: str, product_id: int) -> tuple[Product | Price, str]:
        """Read a product through the cache; return it and where it came from."""
        loaded: list[float] = []

        def from_sqlite() -> Product | Price:
            now = time.monotonic()
            loaded.append(now)
            return load(self._conn(), region, product_id, now)

        started = time.monotonic()
        key = str(product_id)
        try:
            value = self.cache.get(key, MISSING, region)
            hit = value is not MISSING
            if not hit:
                value = self.cache.get_or_set(key, from_sqlite, region=region)
        except Exception:
            with self._counts_lock:
                self.errors += 1
            self._outage.add(started, "error", 0.0)
            raise
        # Joining another thread's load counts as SQLite too: the value is fresh either way.
        # A miss that neither loaded nor joined a fresh load was answered by the L2.
        source = "l1" if hit else "sqlite" if loaded or value.loaded_at >= started else "l2"
        with self._counts_lock:
            self.reads += 1
            self.hits += source == "l1"
            self.l2_hits += source == "l2"
            self.loads += bool(loaded)
        self._outage.add(started, source, value.loaded_at)
        return value, source

    def _load_loop(self) -> None:
        while not self._stopping.is_set():
            self._load_on.wait()
            if self._stopping.is_set():
                return
            for _ in range(_LOAD_BATCH):
                with self._rng_lock:
                    point = self._rng.random() * self._cumulative[-1]
                    region = self._rng.choice(REGIONS)
                product_id = bisect.bisect_left(self._cumulative, point) + 1
                try:
                    self.read(region, min(product_id, self._products))
                except Exception as exc:
                    print(f"{self.name}: background read failed: {exc}", file=sys.stderr)
            self._stopping.wait(_LOAD_PAUSE)

    # -- commands ---------------------------------------------------------------------------

    def op_stats(self, request: dict[str, Any]) -> Reply:
        stats = self.cache.stats()
        state = self.cache.backplane_state
        with self._counts_lock:
            reads, hits, loads, errors = self.reads, self.hits, self.loads, self.errors
            l2_hits = self.l2_hits
        return {
            "state": "local" if state is None else state.value,
            "entries": stats.entries,
            # Counted per application read (served from L1 or not): the library's own
            # hits/misses also count the demo's L1 probes (watch, cached).
            "hits": hits,
            "misses": reads - hits,
            "hit_ratio": hits / reads if reads else 0.0,
            "invalidations_sent": stats.invalidations_sent,
            "invalidations_received": stats.invalidations_received,
            "messages_sent": stats.messages_sent,
            "messages_received": stats.messages_received,
            "resubscriptions": stats.resubscriptions,
            "repairs": stats.repairs,
            "pending": stats.pending,
            "publish_failures": stats.publish_failures,
            "malformed_messages": stats.malformed_messages,
            "sequence_gaps": stats.sequence_gaps,
            "last_error": stats.last_error,
            "reads": reads,
            "loads": loads,
            "l2_hits": l2_hits,
            "errors": errors,
        }

    def op_read(self, request: dict[str, Any]) -> Reply:
        """Read one product (``key``) or several (``keys``) through the cache."""
        region = str(request["region"])
        if "keys" in request:
            versions = [self.read(region, int(k))[0].version for k in request["keys"]]
            return {"versions": versions}
        value, source = self.read(region, int(request["key"]))
        return {"source": source, "version": value.version}

    def op_cached(self, request: dict[str, Any]) -> Reply:
        region = str(request["region"])
        keys = [int(k) for k in request["keys"]]
        cached = [k for k in keys if self.cache.get(str(k), MISSING, region) is not MISSING]
        return {"cached": cached}

    def op_watch(self, request: dict[str, Any]) -> Reply:
        """Make sure the key is in L1, say so ("armed"), then poll L1 until it is gone."""
        region, product_id = str(request["region"]), int(request["key"])
        key = str(product_id)
        for _ in range(20):  # a concurrent invalidation may beat the first load
            value, _ = self.read(region, product_id)
            if self.cache.get(key, MISSING, region) is value:
                break
        else:
            raise RuntimeError(f"{region}/{key} would not stay in L1")
        # From the moment the coordinator may let the writer go, not from the request's
        # arrival: arming can take a while on a loaded machine, and that time is not the
        # writer's.
        deadline = time.monotonic() + float(request.get("timeout", 3.0))
        self.send({"id": request["id"], "stage": "armed", "version": value.version})
        while True:
            current = self.cache.get(key, MISSING, region)
            if current is not value:  # dropped (or already replaced by a newer load)
                return {"evicted": True, "at": time.monotonic(), "version": value.version}
            if time.monotonic() > deadline:
                return {"evicted": False, "version": value.version}
            time.sleep(_PROBE_PAUSE)

    def _flush(self, timeout: float) -> Reply:
        started = time.monotonic()
        try:
            self.cache.flush(timeout)
        except FlushTimeoutError as exc:
            return {"flushed": False, "pending": exc.pending}
        return {"flushed": True, "flush_seconds": time.monotonic() - started}

    def op_update(self, request: dict[str, Any]) -> Reply:
        """Write a new price to SQLite, then update the cache (set here, drop elsewhere)."""
        product_id = int(request["key"])
        key = str(product_id)
        with self._rng_lock:
            rng = random.Random(self._rng.random())
        price = update_price(self._conn(), product_id, rng)
        product = load(self._conn(), "products", product_id, time.monotonic())
        started = time.monotonic()
        self.cache.set(key, product, region="products")
        self.cache.remove(key, region="prices")
        reply = self._flush(float(request.get("flush_timeout", 5.0)))
        return {"t0": started, "version": price.version, "cents": price.cents, **reply}

    def op_clear_region(self, request: dict[str, Any]) -> Reply:
        started = time.monotonic()
        self.cache.clear_region(str(request["region"]))
        return {"t0": started, **self._flush(float(request.get("flush_timeout", 5.0)))}

    def op_clear(self, request: dict[str, Any]) -> Reply:
        started = time.monotonic()
        self.cache.clear()
        return {"t0": started, **self._flush(float(request.get("flush_timeout", 5.0)))}

    def op_flush(self, request: dict[str, Any]) -> Reply:
        return self._flush(float(request.get("flush_timeout", 5.0)))

    def op_load(self, request: dict[str, Any]) -> Reply:
        if request.get("on"):
            self._load_on.set()
        else:
            self._load_on.clear()
        return {}

    def op_track(self, request: dict[str, Any]) -> Reply:
        self._outage.start()
        return {}

    def op_outage_report(self, request: dict[str, Any]) -> Reply:
        return self._outage.report(
            float(request["start"]), float(request["end"]), self.max_staleness
        )

    def op_verify(self, request: dict[str, Any]) -> Reply:
        """Read every product of every region through the cache and compare with SQLite."""
        truth = current_versions(self._conn())
        stale = [
            f"{region}/{product_id}: v{value.version}, SQLite has v{version}"
            for product_id, version in sorted(truth.items())
            for region in REGIONS
            if (value := self.read(region, product_id)[0]).version != version
        ]
        return {"checked": len(truth) * len(REGIONS), "stale": stale[:5], "stale_count": len(stale)}


def main() -> int:
    """Entry point of an instance process."""
    # Ctrl-C reaches the whole process group; the coordinator stops its instances in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out = sys.stdout
    sys.stdout = sys.stderr  # stdout carries the protocol and nothing else
    first = sys.stdin.readline()
    if not first:
        return 0
    instance = Instance(json.loads(first), out)
    try:
        instance.run(sys.stdin)
    except BrokenPipeError:  # the coordinator is gone
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
