"""A FastAPI app on ``nearcache.fastapi``: the AsyncNearCache is made with the app, started
and closed by the lifespan, injected with ``Cache``. It speaks the JSON protocol of
tests/apps/host.py."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any

from fastapi import Body, FastAPI

from nearcache import MISSING, AsyncNearCache
from nearcache.fastapi import Cache, CacheLifespan
from tests.apps.source import read_price, write_price

JsonBody = Annotated[dict[str, Any], Body()]


def create_app(connection: str, channel: str, source: str) -> FastAPI:
    """The app and its cache (made here, connected only when the lifespan starts)."""
    cache = AsyncNearCache(connection, channel=channel, max_staleness=2.0)
    app = FastAPI(lifespan=CacheLifespan(cache))
    loads = {"count": 0}

    @cache.cached(region="products")
    async def load_product(pid: int) -> dict[str, Any]:
        loads["count"] += 1
        return {"id": pid, "price": read_price(source, pid)}

    async def flushed(cache: AsyncNearCache) -> dict[str, float]:
        await cache.flush(5.0)
        return {"flushed_at": time.monotonic()}

    @app.get("/items/{key}")
    async def get_item(key: str, cache: Cache) -> dict[str, Any]:
        value = await cache.get(key, MISSING)
        found = value is not MISSING
        return {"found": found, "value": value if found else None}

    @app.put("/items/{key}")
    async def put_item(key: str, cache: Cache, body: JsonBody) -> Any:
        await cache.set(key, body["value"], ttl=body.get("ttl"))
        return await flushed(cache)

    @app.delete("/items/{key}")
    async def delete_item(key: str, cache: Cache) -> Any:
        await cache.remove(key)
        return await flushed(cache)

    @app.post("/batch/set")
    async def batch_set(cache: Cache, body: JsonBody) -> Any:
        for key, value in body["items"].items():
            await cache.set(key, value)
        return await flushed(cache)

    @app.post("/batch/delete")
    async def batch_delete(cache: Cache, body: JsonBody) -> Any:
        await cache.remove_many(body["keys"])
        return await flushed(cache)

    @app.post("/clear")
    async def clear(cache: Cache) -> Any:
        await cache.clear()
        return await flushed(cache)

    @app.get("/products/{pid}")
    async def get_product(pid: int) -> dict[str, Any]:
        return {"product": await load_product(pid), **loads}

    @app.put("/products/{pid}")
    async def put_product(pid: int, cache: Cache, body: JsonBody) -> Any:
        write_price(source, pid, body["price"])
        await load_product.invalidate(pid)
        return await flushed(cache)

    @app.get("/stats")
    async def stats(cache: Cache) -> dict[str, Any]:
        return {
            "backplane": cache.stats().backplane,
            "pid": os.getpid(),
            "instance": cache.instance_id,
        }

    return app
