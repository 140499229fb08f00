"""One cache instance in its own process, driven over JSON lines on stdin/stdout.

Run as ``python -m tests.instance --driver sync|async --connection CONN --channel NAME``.
Each request is ``{"id": N, "op": NAME, ...}``; each reply is ``{"id": N, "ok": RESULT}`` or
``{"id": N, "error": "Type: message"}``. Times are ``time.monotonic()``, which is the same
clock in every process of one Linux machine, so the test process can compare them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nearcache import MISSING, AsyncNearCache, NearCache


def _stats(stats: Any) -> dict[str, Any]:
    """The counters as JSON-ready data (nested snapshots become dicts)."""
    return {**dataclasses.asdict(stats), "state": stats.backplane}


def _read_source(path: str) -> str:
    return Path(path).read_text()


class SyncHost:
    """Runs requests against a NearCache."""

    def __init__(self, cache: NearCache) -> None:
        self.cache = cache

    def handle(self, req: dict[str, Any]) -> Any:
        c = self.cache
        op = req["op"]
        region = req.get("region")
        if op == "set":
            c.set(req["key"], req["value"], region=region, ttl=req.get("ttl"))
            return None
        if op == "get":
            v = c.get(req["key"], MISSING, region)
            return {"missing": True} if v is MISSING else {"value": v}
        if op == "get_or_set":
            return c.get_or_set(req["key"], lambda: req["value"], region=region)
        if op == "load":  # get_or_set reading a shared source file
            return c.get_or_set(req["key"], lambda: _read_source(req["source"]), region=region)
        if op == "remove":
            c.remove(req["key"], region=region)
            return None
        if op == "clear_region":
            c.clear_region(region)
            return None
        if op == "clear":
            c.clear()
            return None
        if op == "flush":
            c.flush(req.get("timeout", 5.0))
            return time.monotonic()
        if op == "burst":
            for i in range(req["count"]):
                c.remove(f"{req['prefix']}{i}", region=region)
            c.flush(req.get("timeout", 10.0))
            return None
        if op == "stats":
            return _stats(c.stats())
        if op == "state":
            st = c.backplane_state
            return None if st is None else st.value
        if op == "wait_gone":
            return _poll_gone(lambda: c.get(req["key"], MISSING, region), req.get("timeout", 5.0))
        if op == "read_loop":
            return _read_loop(
                lambda: c.get_or_set(
                    req["key"], lambda: _read_source(req["source"]), region=region
                ),
                req["duration"],
            )
        raise ValueError(f"unknown op {op!r}")


def _poll_gone(read: Callable[[], object], timeout: float) -> float | None:
    """Spin until the key reads as missing; return when (monotonic), None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if read() is MISSING:
            return time.monotonic()
    return None


def _read_loop(read: Callable[[], object], duration: float) -> list[list[Any]]:
    """Read repeatedly for ``duration`` seconds; return runs of equal values as
    ``[first read start, last read start, value, reads]`` (starts are monotonic seconds)."""
    runs: list[list[Any]] = []
    end = time.monotonic() + duration
    while True:
        start = time.monotonic()
        if start >= end:
            return runs
        value = read()
        if runs and runs[-1][2] == value:
            runs[-1][1] = start
            runs[-1][3] += 1
        else:
            runs.append([start, start, value, 1])


class AsyncHost:
    """Runs requests against an AsyncNearCache on a loop in its own thread."""

    def __init__(self, cache: AsyncNearCache, loop: asyncio.AbstractEventLoop) -> None:
        self.cache = cache
        self.loop = loop

    def handle(self, req: dict[str, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(self._handle(req), self.loop).result()

    async def _handle(self, req: dict[str, Any]) -> Any:
        c = self.cache
        op = req["op"]
        region = req.get("region")
        if op == "set":
            await c.set(req["key"], req["value"], region=region, ttl=req.get("ttl"))
            return None
        if op == "get":
            v = await c.get(req["key"], MISSING, region)
            return {"missing": True} if v is MISSING else {"value": v}
        if op == "get_or_set":
            return await c.get_or_set(req["key"], lambda: req["value"], region=region)
        if op == "load":
            return await c.get_or_set(
                req["key"], lambda: _read_source(req["source"]), region=region
            )
        if op == "remove":
            await c.remove(req["key"], region=region)
            return None
        if op == "clear_region":
            await c.clear_region(region)
            return None
        if op == "clear":
            await c.clear()
            return None
        if op == "flush":
            await c.flush(req.get("timeout", 5.0))
            return time.monotonic()
        if op == "burst":
            for i in range(req["count"]):
                await c.remove(f"{req['prefix']}{i}", region=region)
            await c.flush(req.get("timeout", 10.0))
            return None
        if op == "stats":
            return _stats(c.stats())
        if op == "state":
            st = c.backplane_state
            return None if st is None else st.value
        if op == "start":
            await c.start()
            return None
        if op == "wait_gone":
            deadline = time.monotonic() + req.get("timeout", 5.0)
            while time.monotonic() < deadline:
                if await c.get(req["key"], MISSING, region) is MISSING:
                    return time.monotonic()
                await asyncio.sleep(0)
            return None
        if op == "read_loop":
            runs: list[list[Any]] = []
            end = time.monotonic() + req["duration"]
            while (start := time.monotonic()) < end:
                value = await c.get_or_set(
                    req["key"], lambda: _read_source(req["source"]), region=region
                )
                if runs and runs[-1][2] == value:
                    runs[-1][1] = start
                    runs[-1][3] += 1
                else:
                    runs.append([start, start, value, 1])
                await asyncio.sleep(0)
            return runs
        raise ValueError(f"unknown op {op!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--driver", choices=["sync", "async"], default="sync")
    parser.add_argument("--connection", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--max-staleness", type=float, default=2.0)
    args = parser.parse_args()
    kwargs: dict[str, Any] = {"channel": args.channel, "max_staleness": args.max_staleness}
    host: SyncHost | AsyncHost
    if args.driver == "sync":
        host = SyncHost(NearCache(args.connection, **kwargs))
    else:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        cache = AsyncNearCache(args.connection, **kwargs)
        asyncio.run_coroutine_threadsafe(cache.start(), loop).result()
        host = AsyncHost(cache, loop)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "exit":
            break
        try:
            reply = {"id": req["id"], "ok": host.handle(req)}
        except Exception as exc:
            reply = {"id": req["id"], "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)
    if isinstance(host, SyncHost):
        host.cache.close()
    else:
        asyncio.run_coroutine_threadsafe(host.cache.aclose(), host.loop).result(10)


if __name__ == "__main__":
    main()
