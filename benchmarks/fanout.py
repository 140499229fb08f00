"""Section ``fanout``: what one invalidation costs the writer, Redis and each receiver, with
1, 4, 16 and 64 subscriber connections (the cost model of docs/scaling.md).

Subscribers are NearCache instances (each with its own subscriber connection), spread over
four processes (one with one subscriber). One writer process invalidates keys through the
replay log (the default), in two shapes:

- ``single``: one ``set`` per millisecond, paced (1k messages/s, one key per message: every
  invalidation travels as its own message, the propagation benchmark's load);
- ``bulk``: ``remove_many`` of 256 keys at 40 chunks/s (10k keys/s, 256 keys per message).

Measured per run: the writer's and every receiver process's CPU time (``time.process_time``,
all threads), Redis's CPU (``INFO cpu``: used_cpu_user + used_cpu_sys) and its network
output (``INFO stats``: total_net_output_bytes), each divided by the invalidations published
(writer, Redis) or received (a receiver, per subscriber connection). Idle costs (heartbeats)
are inside the figures; at these rates they are small.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from benchmarks._env import Env, Options
from benchmarks._procs import Control, Workers
from benchmarks._rows import Row

__all__ = ["run"]

NAME = "fanout"
FANOUT = (1, 4, 16, 64)
PROCESSES = 4
SHAPES = {"single": (1, 1000.0), "bulk": (256, 40.0)}  # keys per call, calls per second
CONNECT_TIMEOUT = 30.0


def _keys(n: int) -> list[str]:
    return [f"fan:{i:07d}" for i in range(n)]


def subscriber(control: Control, url: str, channel: str, conns: int, expect: int) -> dict[str, Any]:
    from nearcache import NearCache

    caches = [
        NearCache(url, channel=channel, abort_connect=True, max_pending=10**6) for _ in range(conns)
    ]
    control.report("ready")
    control.wait_go()
    cpu0, clock = time.process_time(), time.monotonic
    deadline = clock() + 120.0
    while clock() < deadline:
        if all(c.stats().invalidations_received >= expect for c in caches):
            break
        time.sleep(0.01)
    cpu = time.process_time() - cpu0
    stats = [c.stats() for c in caches]
    for c in caches:
        c.close(timeout=0)
    return {
        "cpu": cpu,
        "received": sum(s.invalidations_received for s in stats),
        # Subscriptions made again after the first and log entries replayed: their Redis CPU
        # and egress would be inside the figures.
        "resubscribed": sum(s.resubscriptions - 1 for s in stats),
        "replayed": sum(s.replays for s in stats),
    }


def writer(control: Control, url: str, channel: str, shape: str, n: int) -> dict[str, Any]:
    from nearcache import NearCache

    per_call, rate = SHAPES[shape]
    cache = NearCache(url, channel=channel, abort_connect=True, max_pending=10**6)
    keys = _keys(n)
    calls = [keys[i : i + per_call] for i in range(0, n, per_call)]
    control.report("ready")
    control.wait_go()
    time.sleep(0.05)
    cpu0, clock = time.process_time(), time.monotonic
    t0 = clock()
    for i, call in enumerate(calls):
        delay = t0 + i / rate - clock()
        if delay > 0:
            time.sleep(delay)
        if per_call == 1:
            cache.set(call[0], 1)
        else:
            cache.remove_many(call)
    cache.flush(timeout=60)
    cpu = time.process_time() - cpu0
    stats = cache.stats()
    cache.close()
    return {"cpu": cpu, "messages": stats.messages_sent, "sent": stats.invalidations_sent}


def _redis_counters(client: Any) -> tuple[float, int]:
    cpu = client.info("cpu")
    stats = client.info("stats")
    return (
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        int(stats["total_net_output_bytes"]),
    )


def _one_run(url: str, shape: str, fanout: int, n: int) -> dict[str, float]:
    import redis

    channel = f"bench-fan-{uuid.uuid4().hex[:8]}"
    procs = min(PROCESSES, fanout)
    share = [fanout // procs + (1 if i < fanout % procs else 0) for i in range(procs)]
    names = [f"sub{i}" for i in range(procs)]
    client = redis.Redis.from_url(url)
    with Workers() as workers:
        for name, conns in zip(names, share, strict=True):
            workers.spawn(name, subscriber, url, channel, conns, n)
        workers.spawn("writer", writer, url, channel, shape, n)
        workers.collect("ready", [*names, "writer"], timeout=120)
        cpu0, out0 = _redis_counters(client)
        workers.go()
        results = workers.collect("result", [*names, "writer"], timeout=n / 1000 + 180)
        cpu1, out1 = _redis_counters(client)
    client.close()
    w = results["writer"]
    received = sum(results[name]["received"] for name in names)
    receiver_cpu = sum(results[name]["cpu"] for name in names)
    sent = w["sent"]
    return {
        "writer_us": w["cpu"] / sent * 1e6,
        "redis_us": (cpu1 - cpu0) / sent * 1e6,
        "redis_out_b": (out1 - out0) / sent,
        "receiver_us": receiver_cpu / max(received, 1) * 1e6,
        "keys_per_msg": sent / max(w["messages"], 1),
        "lost": fanout * sent - received,
        "resubscribed": sum(results[name]["resubscribed"] for name in names),
        "replayed": sum(results[name]["replayed"] for name in names),
    }


METRICS = (
    ("writer_us", "writer CPU us/inv", "us"),
    ("redis_us", "Redis CPU us/inv", "us"),
    ("redis_out_b", "Redis egress B/inv", "B"),
    ("receiver_us", "receiver CPU us/inv per conn", "us"),
    ("lost", "lost", "lost"),
)


def run(options: Options, env: Env) -> list[Row]:
    """Measure and return the section's rows."""
    reps = options.reps(default=2, quick=1)
    sizes = {"single": 500 if options.quick else 2000, "bulk": 5120 if options.quick else 25_600}
    url = env.redis().url
    figures: dict[tuple[str, int], dict[str, list[float]]] = {}
    for rep in range(reps):
        for shape in SHAPES:
            for fanout in FANOUT:
                n = sizes[shape]
                env.log(f"fanout: rep {rep + 1}/{reps}: {shape}, {fanout} subscribers, {n} keys")
                r = _one_run(url, shape, fanout, n)
                if r["resubscribed"] or r["replayed"]:
                    env.notes.append(
                        f"fanout: {shape}, {fanout} subscribers, rep {rep + 1}: "
                        f"{r['resubscribed']:.0f} subscriptions made again and "
                        f"{r['replayed']:.0f} log entries replayed (inside the Redis figures)"
                    )
                f = figures.setdefault((shape, fanout), {})
                for key, value in r.items():
                    f.setdefault(key, []).append(value)
    rows: list[Row] = []
    for (shape, fanout), f in figures.items():
        per_call, rate = SHAPES[shape]
        kpm = sorted(f["keys_per_msg"])[len(f["keys_per_msg"]) // 2]
        for key, metric, unit in METRICS:
            row = Row(NAME, f"{shape}, {fanout} subscribers", metric, unit, f[key])
            if key == "writer_us":
                # A writer that falls behind its pace batches several keys per message: the
                # per-invalidation figures then fall (per-message costs are shared).
                row.note = f"{kpm:.2f} keys/message; {per_call * rate:,.0f} keys/s offered"
            rows.append(row)
    return rows
