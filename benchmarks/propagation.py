"""Section ``propagation``: how long until another process stops serving a written key.

Writer process A calls ``set`` on one key per millisecond (paced, 1k invalidations/s) and
records ``time.monotonic()`` just before each call. Each subscriber process B holds every key
in its L1 and, key after key, spins on ``get`` until the old value is gone, then records
``time.monotonic()`` (one clock for every process on Linux). The spin sleeps zero seconds
between reads so that the listener thread (or task) gets the GIL (or the loop) at once.
Latency = seen - sent. The instant the listener applied the invalidation is recorded too (by
wrapping the driver's receive hook), which shows how much of the figure is the reader's spin.

The baseline, in the same run: raw redis-py Pub/Sub one way, a publisher process stamping
``time.monotonic()`` into each payload and subscriber processes in a blocking ``get_message``
loop. Each driver is compared with the same redis-py flavour (threads with sync redis-py,
asyncio with ``redis.asyncio``), with 1 and 4 subscriber processes.

Headline rows time an idle reader: the instant the listener applied the invalidation to L1,
the moment from which every ``get`` misses, like the raw subscriber idle in ``get_message``.
"spinning reader" rows follow the literal recipe (a reader busy-polling ``get``); they add the
reader's own contention for the GIL or the loop, and with 4 spinning processes on 2 cores they
would measure the scheduler, so they run with 1 subscriber only. "replay_log=0" shows what the
replay log (a Lua script: XADD + PUBLISH) costs per message.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

from benchmarks._env import Env, Options
from benchmarks._procs import Control, Workers
from benchmarks._rows import Row, Target, paired_ratios, percentile

__all__ = ["run"]

NAME = "propagation"
RATE = 1000.0  # invalidations per second
_STAMP = struct.Struct(">Id")
CONNECT_TIMEOUT = 15.0


def _keys(n: int) -> list[str]:
    return [f"prop:{i:06d}" for i in range(n)]


def _pace(t0: float, i: int) -> None:
    delay = t0 + i / RATE - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _deadline(n: int) -> float:
    return time.monotonic() + n / RATE + 10.0


# -- nearcache, threaded driver -----------------------------------------------------------


def _install_hook(cache: Any) -> list[tuple[float, int]]:
    """Record (monotonic, invalidations received so far) after each applied message."""
    core = cache._core
    log: list[tuple[float, int]] = []
    original = core.receive
    stats = core.stats
    clock = time.monotonic

    def receive(payload: bytes) -> None:
        original(payload)
        log.append((clock(), stats.invalidations_received))

    core.receive = receive
    return log


def nc_subscriber(
    control: Control, url: str, channel: str, n: int, reader: str, options: dict[str, Any]
) -> dict[str, Any]:
    from nearcache import MISSING, NearCache

    cache = NearCache(url, channel=channel, abort_connect=True, **options)
    keys = _keys(n)
    for k in keys:
        cache.get_or_set(k, lambda: "old")  # a load: nothing is published
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while cache.get(keys[0]) != "old":  # servable: the backplane proved L1 current
        if time.monotonic() > deadline:
            raise RuntimeError("L1 never became servable")
        time.sleep(0.005)
    repairs = cache.stats().repairs
    log = _install_hook(cache)
    control.report("ready")
    control.wait_go()
    get, sleep, clock, missing = cache.get, time.sleep, time.monotonic, MISSING
    seen = [math.nan] * n
    deadline = _deadline(n)
    if reader == "idle":
        while (not log or log[-1][1] < n) and clock() < deadline:
            sleep(0.01)
    else:
        for i, k in enumerate(keys):
            while get(k, missing) is not missing:
                sleep(0)  # hand the GIL to the listener thread
                if clock() > deadline:
                    break
            else:
                seen[i] = clock()
    still_cached = sum(get(k, missing) is not missing for k in keys)
    repairs = cache.stats().repairs - repairs
    cache.close()
    return {"seen": seen, "applied": log, "repairs": repairs, "still_cached": still_cached}


def nc_writer(
    control: Control, url: str, channel: str, n: int, options: dict[str, Any]
) -> dict[str, Any]:
    from nearcache import NearCache

    cache = NearCache(url, channel=channel, abort_connect=True, **options)
    keys = _keys(n)
    control.report("ready")
    control.wait_go()
    sent = []
    clock, set_ = time.monotonic, cache.set
    t0 = clock() + 0.02
    for i, k in enumerate(keys):
        _pace(t0, i)
        sent.append(clock())
        set_(k, "new")
    cache.flush()
    cache.close()
    return {"sent": sent}


# -- nearcache, asyncio driver ------------------------------------------------------------


async def _anc_subscriber(
    control: Control, url: str, channel: str, n: int, reader: str
) -> dict[str, Any]:
    from nearcache import MISSING, AsyncNearCache

    cache = AsyncNearCache(url, channel=channel, abort_connect=True)
    await cache.start()
    keys = _keys(n)
    for k in keys:
        await cache.get_or_set(k, lambda: "old")
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while await cache.get(keys[0]) != "old":
        if time.monotonic() > deadline:
            raise RuntimeError("L1 never became servable")
        await asyncio.sleep(0.005)
    repairs = cache.stats().repairs
    log = _install_hook(cache)
    control.report("ready")
    await asyncio.get_running_loop().run_in_executor(None, control.wait_go)
    get, clock, missing, sleep = cache.get, time.monotonic, MISSING, asyncio.sleep
    seen = [math.nan] * n
    deadline = _deadline(n)
    if reader == "idle":
        while (not log or log[-1][1] < n) and clock() < deadline:
            await sleep(0.01)
    else:
        for i, k in enumerate(keys):
            while await get(k, missing) is not missing:
                await sleep(0)  # let the listener task run
                if clock() > deadline:
                    break
            else:
                seen[i] = clock()
    still_cached = 0
    for k in keys:
        still_cached += await get(k, missing) is not missing
    repairs = cache.stats().repairs - repairs
    await cache.aclose()
    return {"seen": seen, "applied": log, "repairs": repairs, "still_cached": still_cached}


def anc_subscriber(control: Control, url: str, channel: str, n: int, reader: str) -> dict[str, Any]:
    return asyncio.run(_anc_subscriber(control, url, channel, n, reader))


async def _anc_writer(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    from nearcache import AsyncNearCache

    cache = AsyncNearCache(url, channel=channel, abort_connect=True)
    await cache.start()
    keys = _keys(n)
    control.report("ready")
    await asyncio.get_running_loop().run_in_executor(None, control.wait_go)
    sent = []
    clock, set_ = time.monotonic, cache.set
    t0 = clock() + 0.02
    for i, k in enumerate(keys):
        delay = t0 + i / RATE - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        sent.append(clock())
        await set_(k, "new")
    await cache.flush()
    await cache.aclose()
    return {"sent": sent}


def anc_writer(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    return asyncio.run(_anc_writer(control, url, channel, n))


# -- raw redis-py Pub/Sub -----------------------------------------------------------------


def raw_subscriber(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    pubsub = client.pubsub()
    pubsub.subscribe(channel)
    while (m := pubsub.get_message(timeout=CONNECT_TIMEOUT)) is None or m["type"] != "subscribe":
        pass
    control.report("ready")
    control.wait_go()
    got: list[tuple[float, bytes]] = []
    clock, get_message = time.monotonic, pubsub.get_message
    deadline = _deadline(n)
    while len(got) < n and clock() < deadline:
        message = get_message(timeout=1.0)
        if message is not None and message["type"] == "message":
            got.append((clock(), message["data"]))
    pubsub.close()
    client.close()
    seen = [math.nan] * n
    for t, data in got:
        i, _ = _STAMP.unpack(data)
        seen[i] = t
    return {"seen": seen}


def raw_publisher(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    import redis

    client = redis.Redis.from_url(url)
    client.ping()
    control.report("ready")
    control.wait_go()
    sent = []
    clock, publish, pack = time.monotonic, client.publish, _STAMP.pack
    t0 = clock() + 0.02
    for i in range(n):
        _pace(t0, i)
        now = clock()
        sent.append(now)
        publish(channel, pack(i, now))
    client.close()
    return {"sent": sent}


async def _araw_subscriber(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    while True:
        m = await pubsub.get_message(timeout=CONNECT_TIMEOUT)
        if m is not None and m["type"] == "subscribe":
            break
    control.report("ready")
    await asyncio.get_running_loop().run_in_executor(None, control.wait_go)
    got: list[tuple[float, bytes]] = []
    clock, get_message = time.monotonic, pubsub.get_message
    deadline = _deadline(n)
    while len(got) < n and clock() < deadline:
        message = await get_message(timeout=1.0)
        if message is not None and message["type"] == "message":
            got.append((clock(), message["data"]))
    await pubsub.aclose()
    await client.aclose()
    seen = [math.nan] * n
    for t, data in got:
        i, _ = _STAMP.unpack(data)
        seen[i] = t
    return {"seen": seen}


def araw_subscriber(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    return asyncio.run(_araw_subscriber(control, url, channel, n))


async def _araw_publisher(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    await client.ping()
    control.report("ready")
    await asyncio.get_running_loop().run_in_executor(None, control.wait_go)
    sent = []
    clock, publish, pack = time.monotonic, client.publish, _STAMP.pack
    t0 = clock() + 0.02
    for i in range(n):
        delay = t0 + i / RATE - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        now = clock()
        sent.append(now)
        await publish(channel, pack(i, now))
    await client.aclose()
    return {"sent": sent}


def araw_publisher(control: Control, url: str, channel: str, n: int) -> dict[str, Any]:
    return asyncio.run(_araw_publisher(control, url, channel, n))


# -- orchestration ------------------------------------------------------------------------

RAW_SYNC = "redis-py Pub/Sub (sync)"
RAW_AIO = "redis.asyncio Pub/Sub"


@dataclass(frozen=True)
class _Contender:
    name: str
    writer: Any
    subscriber: Any
    reader: str = ""  # nearcache: "idle" (listener timestamps) or "spin" (reader polls get)
    baseline: str = ""
    target: bool = False
    options: tuple[tuple[str, Any], ...] = ()  # NearCache keyword arguments


CONTENDERS = (
    _Contender(RAW_SYNC, raw_publisher, raw_subscriber),
    _Contender("NearCache", nc_writer, nc_subscriber, "idle", RAW_SYNC, target=True),
    _Contender("NearCache, spinning reader", nc_writer, nc_subscriber, "spin", RAW_SYNC),
    # What the replay log (one Lua script: XADD + PUBLISH) costs on the way.
    _Contender(
        "NearCache, replay_log=0",
        nc_writer,
        nc_subscriber,
        "idle",
        RAW_SYNC,
        options=(("replay_log", 0),),
    ),
    _Contender(RAW_AIO, araw_publisher, araw_subscriber),
    _Contender("AsyncNearCache", anc_writer, anc_subscriber, "idle", RAW_AIO, target=True),
    _Contender("AsyncNearCache, spinning reader", anc_writer, anc_subscriber, "spin", RAW_AIO),
)
SPIN_SUBSCRIBERS = (1,)  # spinning readers oversubscribe 2 cores at 4 subscribers
VARIANT_SUBSCRIBERS = (1,)  # option variants: one subscriber is enough to show the cost


def _one_run(url: str, contender: _Contender, subs: int, n: int) -> dict[str, Any]:
    channel = f"bench-prop-{uuid.uuid4().hex[:8]}"
    names = [f"sub{i}" for i in range(subs)]
    sub_extra: tuple[Any, ...] = ()
    writer_extra: tuple[Any, ...] = ()
    if contender.subscriber is nc_subscriber:
        sub_extra, writer_extra = (
            (contender.reader, dict(contender.options)),
            (dict(contender.options),),
        )
    elif contender.reader:
        sub_extra = (contender.reader,)
    with Workers() as workers:
        for name in names:
            workers.spawn(name, contender.subscriber, url, channel, n, *sub_extra)
        workers.spawn("writer", contender.writer, url, channel, n, *writer_extra)
        workers.collect("ready", [*names, "writer"], timeout=60)
        workers.go()
        results = workers.collect("result", [*names, "writer"], timeout=n / RATE + 60)
    sent = results["writer"]["sent"]
    latencies: list[float] = []
    lost = repairs = 0
    for name in names:
        r = results[name]
        repairs += r.get("repairs", 0)
        lost += r.get("still_cached", 0)
        if contender.reader == "idle":
            got = _applied_latencies(r["applied"], sent)
            latencies.extend(got)
            lost += len(sent) - len(got)
        else:
            for i, t in enumerate(r["seen"]):
                if math.isnan(t):
                    lost += 1
                else:
                    latencies.append(t - sent[i])
    return {"lat": latencies, "lost": lost, "repairs": repairs}


def _applied_latencies(log: list[tuple[float, int]], sent: list[float]) -> list[float]:
    """Latency from ``sent[i]`` to the message that brought the count past ``i``."""
    out = []
    j = 0
    for i, t_sent in enumerate(sent):
        while j < len(log) and log[j][1] <= i:
            j += 1
        if j == len(log):
            break
        out.append(log[j][0] - t_sent)
    return out


def run(options: Options, env: Env) -> list[Row]:
    """Measure and return the section's rows."""
    reps = options.reps(default=3, quick=1)
    n = 200 if options.quick else 1500
    url = env.redis().url
    plan = [
        (c, subs)
        for subs in (1, 4)
        for c in CONTENDERS
        if not (c.reader == "spin" and subs not in SPIN_SUBSCRIBERS)
        and not (c.options and subs not in VARIANT_SUBSCRIBERS)
    ]
    figures: dict[tuple[str, int], dict[str, list[float]]] = {}
    for rep in range(reps):
        for c, subs in plan:
            env.log(f"propagation: rep {rep + 1}/{reps}: {c.name}, {subs} subscriber(s), {n} sets")
            r = _one_run(url, c, subs, n)
            lat = [x * 1e6 for x in r["lat"]]
            f = figures.setdefault((c.name, subs), {"p50": [], "p99": [], "lost": [], "rep": []})
            f["p50"].append(percentile(lat, 50))
            f["p99"].append(percentile(lat, 99))
            f["lost"].append(r["lost"])
            f["rep"].append(r["repairs"])
    rows: list[Row] = []
    for c, subs in plan:
        f = figures[(c.name, subs)]
        notes = []
        if sum(f["lost"]):
            notes.append(f"{sum(f['lost']):.0f} invalidations never seen")
        if sum(f["rep"]):
            notes.append(f"{sum(f['rep']):.0f} L1 repairs during the run")
        if c.options:
            notes.append(", ".join(f"{k}={v!r}" for k, v in c.options) + " on every instance")
        if c.reader == "idle":
            notes.append("reader idle; timestamp when the listener applied it to L1")
        elif c.reader == "spin":
            notes.append("reader busy-polls get() with sleep(0)")
        for q, limit in (("p50", 1.2), ("p99", 1.5)):
            row = Row(NAME, f"{c.name}, {subs} sub", f"{q} latency us", "us", f[q])
            row.note = "; ".join(notes)
            if c.baseline:
                row.ratios = paired_ratios(f[q], figures[(c.baseline, subs)][q])
                row.ratio_to = f"{c.baseline}, {subs} sub"
                if c.target:
                    row.target = Target("ratio", "<=", limit, f"<= {limit}x raw {q}")
            rows.append(row)
    return rows
