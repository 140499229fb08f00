"""A cache instance with the L2 in its own process, for ``tests/test_l2_processes.py``.

Run as ``python -m tests.l2_process --driver sync|async --connection C --channel N
[--loads FILE] [--propagate update] [--lease-wait S]``. Requests are JSON lines on stdin,
each handled on its own thread so that a load held open does not block the others; replies are
``{"id": N, "ok": R}`` or ``{"id": N, "error": "..."}``, and ``{"event": "loading", "key": K}``
when a factory starts. A factory appends ``key value pid`` to the ``--loads`` file (one line
per call, across the fleet) and, with ``"hold": true``, returns only once ``release`` comes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
from typing import Any

from nearcache import MISSING, AsyncNearCache, NearCache

_out = threading.Lock()


def emit(message: dict[str, Any]) -> None:
    with _out:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


class Host:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.releases: dict[str, threading.Event] = {}
        kwargs: dict[str, Any] = {
            "channel": args.channel,
            "l2": True,
            "propagate": args.propagate,
            "l2_lease_wait": args.lease_wait,
        }
        self.loop: asyncio.AbstractEventLoop | None = None
        if args.driver == "async":
            self.loop = asyncio.new_event_loop()
            threading.Thread(target=self.loop.run_forever, daemon=True).start()
            self.cache: Any = AsyncNearCache(args.connection, **kwargs)
            self.run(self.cache.start())
        else:
            self.cache = NearCache(args.connection, **kwargs)

    def run(self, value: Any) -> Any:
        if self.loop is None:
            return value

        async def wait() -> Any:
            return await value

        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result()

    def record(self, key: str, value: Any) -> None:
        if self.args.loads:
            with open(self.args.loads, "a") as fh:  # one short write: atomic with O_APPEND
                fh.write(f"{key} {value} {os.getpid()}\n")

    def factory(self, req: dict[str, Any]) -> Any:
        key, value = req["key"], req["value"]
        release = self.releases.setdefault(key, threading.Event())

        def load() -> Any:
            self.record(key, value)
            emit({"event": "loading", "key": key})
            if req.get("hold"):
                release.wait(60)
            return value

        if self.loop is None:
            return load

        async def aload() -> Any:
            return await asyncio.to_thread(load)

        return aload

    def handle(self, req: dict[str, Any]) -> Any:
        c, op, region = self.cache, req["op"], req.get("region")
        if op == "get_or_set":
            return self.run(c.get_or_set(req["key"], self.factory(req), region=region))
        if op == "release":
            self.releases.setdefault(req["key"], threading.Event()).set()
            return None
        if op == "get":
            value = self.run(c.get(req["key"], MISSING, region))
            return {"missing": True} if value is MISSING else {"value": value}
        if op == "set":
            return self.run(c.set(req["key"], req["value"], region=region))
        if op == "remove":
            return self.run(c.remove(req["key"], region=region))
        if op == "clear_region":
            return self.run(c.clear_region(region))
        if op == "clear":
            return self.run(c.clear())
        if op == "flush":
            return self.run(c.flush())
        if op == "stats":
            return {k: v for k, v in c.stats().__dict__.items() if isinstance(v, int | str)}
        if op == "state":
            return c.backplane_state.value
        raise ValueError(f"unknown op {op!r}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--driver", default="sync")
    parser.add_argument("--connection", required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--loads", default="")
    parser.add_argument("--propagate", default="invalidate")
    parser.add_argument("--lease-wait", type=float, default=1.0)
    host = Host(parser.parse_args())
    emit({"ready": True})

    def serve(req: dict[str, Any]) -> None:
        try:
            emit({"id": req["id"], "ok": host.handle(req)})
        except Exception as exc:
            emit({"id": req["id"], "error": f"{type(exc).__name__}: {exc}"})

    for line in sys.stdin:
        req = json.loads(line)
        if req.get("op") == "exit":
            break
        threading.Thread(target=serve, args=(req,), daemon=True).start()
    if host.loop is not None:
        host.run(host.cache.aclose())
    else:
        host.cache.close()


if __name__ == "__main__":
    main()
