"""Section ``throughput``: invalidations per second delivered to every subscriber.

One writer process calls ``remove`` on N distinct keys as fast as it can, then ``flush``.
Four subscriber processes count ``stats().invalidations_received`` until all N arrived (or a
deadline passed); each applied message is timestamped by wrapping the driver's receive hook.
Rate = N / (last key applied in the slowest subscriber - first ``remove`` call). Latency is
sampled on the first key of every chunk of 100 (the writer stamps the chunk before removing
it). Lost = N minus what the slowest subscriber counted: it must be 0.

Two questions, two kinds of row. Capacity: the unpaced rows offer everything at once, so
their rate is what the pipeline sustains and their p99 is the backlog a writer faster than
its receivers builds (it grows with N). Latency at a load: the paced row offers 200k keys/s
(a chunk of 100 every 0.5 ms) and its p99 is the delay a key sees at that load; the latency
target is stated there.

Baselines, in the same run: redis-py publishing one message per key, first one PUBLISH per
round trip, then pipelined 1000 at a time, to four subscriber processes in a blocking
``get_message`` loop.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from benchmarks._env import Env, Options
from benchmarks._procs import Control, Workers
from benchmarks._rows import Row, Target, percentile

__all__ = ["run"]

NAME = "throughput"
SUBSCRIBERS = 4
CHUNK = 100
# The offered load of the paced row: the rate the latency target is stated at. The unpaced
# rows offer all they can, so their p99 is the backlog a writer faster than its receivers
# builds (queueing, growing with the run's length), not the latency at a given load.
PACED_RATE = 200_000.0
CONNECT_TIMEOUT = 15.0


PACED = "NearCache remove+flush, paced at 200k keys/s"


def _keys(n: int) -> list[str]:
    return [f"inv:{i:07d}" for i in range(n)]


def nc_subscriber(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    from nearcache import NearCache

    cache = NearCache(url, channel=channel, abort_connect=True, max_pending=max(n, 100_000))
    core = cache._core
    log: list[tuple[float, int]] = []
    original, stats, clock = core.receive, core.stats, time.monotonic

    def receive(payload: bytes) -> bool:
        valid = original(payload)
        log.append((clock(), stats.invalidations_received))
        return valid

    core.receive = receive  # type: ignore[method-assign]
    before = cache.stats()
    control.report("ready")
    control.wait_go()
    deadline = clock() + 60.0
    while cache.stats().invalidations_received - before.invalidations_received < n:
        if clock() > deadline:
            break
        time.sleep(0.005)
    after = cache.stats()
    cache.close()
    base = before.invalidations_received
    return {
        "log": [(t, c - base) for t, c in log],
        "received": after.invalidations_received - base,
        "repairs": after.repairs - before.repairs,
        "gaps": after.sequence_gaps - before.sequence_gaps,
    }


def nc_writer(
    control: Control, url: str, channel: str, n: int, bulk: bool = False, rate: float = 0.0
) -> dict[str, Any]:
    """Invalidate the keys chunk by chunk: ``remove`` per key, or one ``remove_many`` per
    chunk with ``bulk``. With ``rate`` (keys/s), chunk ``c`` starts no earlier than
    ``c * CHUNK / rate`` after the first: an offered load, as a fleet's writes arrive."""
    from nearcache import NearCache

    # max_pending >= n: the outbox must not degrade the run into one clear-all
    cache = NearCache(url, channel=channel, abort_connect=True, max_pending=max(n, 100_000))
    keys = _keys(n)
    chunks = [keys[i : i + CHUNK] for i in range(0, n, CHUNK)]
    control.report("ready")
    control.wait_go()
    time.sleep(0.05)
    stamps = []
    clock, remove, remove_many = time.monotonic, cache.remove, cache.remove_many
    begin = clock()
    for c, chunk in enumerate(chunks):
        if rate:
            # On an absolute schedule: a late wake-up is caught up by the next chunks. (A spin
            # would take a core from the receivers on this 2-core box.)
            ahead = begin + c * CHUNK / rate - clock()
            if ahead > 0:
                time.sleep(ahead)
        stamps.append(clock())
        if bulk:
            remove_many(chunk)
        else:
            for k in chunk:
                remove(k)
    loop_done = clock()
    cache.flush(timeout=60)
    flushed = clock()
    stats = cache.stats()
    cache.close()
    return {
        "stamps": stamps,
        "loop_done": loop_done,
        "flushed": flushed,
        "degraded": stats.degraded_to_clear,
        "messages": stats.messages_sent,
    }


def nc_writer_bulk(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    """:func:`nc_writer` with ``remove_many``."""
    return nc_writer(control, url, channel, n, bulk=True)


def nc_writer_paced(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    """:func:`nc_writer` offering ``PACED_RATE`` keys/s."""
    return nc_writer(control, url, channel, n, rate=PACED_RATE)


def raw_subscriber(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    while (m := pubsub.get_message(timeout=CONNECT_TIMEOUT)) is None or m["type"] != "subscribe":
        pass
    control.report("ready")
    control.wait_go()
    log: list[tuple[float, int]] = []
    count = 0
    clock, get_message = time.monotonic, pubsub.get_message
    deadline = clock() + 120.0
    while count < n and clock() < deadline:
        message = get_message(timeout=1.0)
        if message is not None and message["type"] == "message":
            count += 1
            log.append((clock(), count))
    pubsub.close()
    client.close()
    return {"log": log, "received": count, "repairs": 0, "gaps": 0}


def raw_writer(control: Control, url: str, channel: str, n: int, pipelined: int) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    client.ping()
    keys = [k.encode() for k in _keys(n)]
    chunks = [keys[i : i + CHUNK] for i in range(0, n, CHUNK)]
    control.report("ready")
    control.wait_go()
    time.sleep(0.05)
    stamps = []
    clock = time.monotonic
    if pipelined:
        pipe = client.pipeline(transaction=False)
        pending = 0
        for chunk in chunks:
            stamps.append(clock())
            for k in chunk:
                pipe.publish(channel, k)
                pending += 1
                if pending == pipelined:
                    pipe.execute()
                    pending = 0
        pipe.execute()
    else:
        publish = client.publish
        for chunk in chunks:
            stamps.append(clock())
            for k in chunk:
                publish(channel, k)
    done = clock()
    client.close()
    return {"stamps": stamps, "loop_done": done, "flushed": done, "degraded": 0, "messages": n}


def raw_writer_rt(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    return raw_writer(control, url, channel, n, 0)


def raw_writer_pipe(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    return raw_writer(control, url, channel, n, 1000)


def _one_run(url: str, writer: Any, subscriber: Any, n: int) -> dict[str, Any]:
    channel = f"bench-inv-{uuid.uuid4().hex[:8]}"
    names = [f"sub{i}" for i in range(SUBSCRIBERS)]
    with Workers() as workers:
        for name in names:
            workers.spawn(name, subscriber, url, channel, n)
        workers.spawn("writer", writer, url, channel, n)
        workers.collect("ready", [*names, "writer"], timeout=60)
        workers.go()
        results = workers.collect("result", [*names, "writer"], timeout=180)
    w = results["writer"]
    start = w["stamps"][0]
    ends, latencies = [], []
    received = []
    repairs = gaps = 0
    for name in names:
        r = results[name]
        received.append(r["received"])
        repairs += r["repairs"]
        gaps += r["gaps"]
        log = r["log"]
        if log:
            ends.append(log[-1][0])
        j = 0
        for c, stamp in enumerate(w["stamps"]):
            first = c * CHUNK  # index of the chunk's first key
            while j < len(log) and log[j][1] <= first:
                j += 1
            if j == len(log):
                break
            latencies.append(log[j][0] - stamp)
    lost = n - min(received)
    end = max(ends) if ends else float("nan")
    return {
        "rate": n / (end - start) if lost == 0 else (n - lost) / (end - start),
        "p50": percentile(latencies, 50) * 1e6,
        "p99": percentile(latencies, 99) * 1e6,
        "lost": lost,
        "repairs": repairs,
        "gaps": gaps,
        "writer_s": w["loop_done"] - start,
        "flush_s": w["flushed"] - start,
        "degraded": w["degraded"],
        "messages": w["messages"],
    }


def run(options: Options, env: Env) -> list[Row]:
    """Measure and return the section's rows."""
    reps = options.reps(default=3, quick=1)
    n = 20_000 if options.quick else 100_000
    n_rt = 2_000 if options.quick else 10_000  # one round trip per key is slow: fewer keys
    url = env.redis().url
    plan = [
        ("NearCache remove+flush", nc_writer, nc_subscriber, n),
        ("NearCache remove_many+flush", nc_writer_bulk, nc_subscriber, n),
        (PACED, nc_writer_paced, nc_subscriber, n),
        ("redis-py PUBLISH per key, pipelined 1000", raw_writer_pipe, raw_subscriber, n),
        ("redis-py PUBLISH per key, 1 round trip each", raw_writer_rt, raw_subscriber, n_rt),
    ]
    figures: dict[str, dict[str, list[float]]] = {}
    for rep in range(reps):
        for name, writer, subscriber, count in plan:
            env.log(f"throughput: rep {rep + 1}/{reps}: {name}, {count} keys, {SUBSCRIBERS} subs")
            r = _one_run(url, writer, subscriber, count)
            f = figures.setdefault(name, {})
            for key, value in r.items():
                f.setdefault(key, []).append(value)
    rows: list[Row] = []
    base_name = plan[4][0]
    for name, _, _, count in plan:
        f = figures[name]
        lost = sum(f["lost"])
        notes = [f"{count:,} keys"]
        if name.startswith("NearCache"):
            writer_s = sorted(f["writer_s"])[len(f["writer_s"]) // 2]
            notes.append(
                f"writer loop {writer_s * 1e3:.0f} ms, "
                f"{sorted(f['messages'])[len(f['messages']) // 2]:.0f} messages"
            )
            if sum(f["degraded"]):
                notes.append("outbox degraded to clear-all")
        if sum(f["repairs"]) or sum(f["gaps"]):
            notes.append(f"{sum(f['repairs']):.0f} repairs, {sum(f['gaps']):.0f} sequence gaps")
        rate = Row(NAME, name, "keys/s to all 4 subs", "keys/s", f["rate"], lower_is_better=False)
        if name == PACED:
            p50 = sorted(f["p50"])[len(f["p50"]) // 2]
            notes.append(f"offered {PACED_RATE:,.0f} keys/s; p50 latency {p50:,.0f} us")
        if name != base_name:
            rate.ratios = [
                a / b for a, b in zip(f["rate"], figures[base_name]["rate"], strict=False)
            ]
            rate.ratio_to = base_name
        if name.startswith("NearCache") and name != PACED:
            rate.target = Target("value", ">=", 200_000, ">= 200k keys/s")
        rate.note = "; ".join(notes)
        rows.append(rate)
        p99 = Row(NAME, name, "p99 latency us", "us", f["p99"])
        if name == PACED:
            p99.target = Target("value", "<=", 10_000, "<= 10 ms at 200k keys/s")
        rows.append(p99)
        lost_row = Row(NAME, name, "lost", "lost", f["lost"])
        if name.startswith("NearCache"):
            lost_row.target = Target("value", "<=", 0, "0 lost")
        if lost:
            lost_row.note = f"{lost:.0f} lost over {reps} repetition(s)"
        rows.append(lost_row)
    return rows
