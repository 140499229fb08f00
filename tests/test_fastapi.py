"""``nearcache.fastapi`` / ``nearcache.starlette``: the lifespan opens and closes the cache,
the dependency reaches it, in this process (two processes: test_frameworks.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the fastapi extra is not installed")

from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nearcache import AsyncNearCache, BackplaneUnavailableError, CacheState
from nearcache.fastapi import Cache, CacheLifespan
from nearcache.starlette import request_cache
from tests.servers import RedisServer, free_port


def test_lifespan_starts_the_cache_before_requests_and_closes_it_after(
    redis_server: RedisServer, channel: str
) -> None:
    """The backplane is connected before the first request; shutdown closes the cache."""
    cache = AsyncNearCache(redis_server.url, channel=channel, abort_connect=True)
    app = FastAPI(lifespan=CacheLifespan(cache))

    @app.get("/state")
    async def state(c: Cache) -> dict[str, Any]:
        await c.set("k", 1)
        return {"same": c is cache, "backplane": c.stats().backplane, "k": await c.get("k")}

    with TestClient(app) as client:
        assert client.get("/state").json() == {"same": True, "backplane": "connected", "k": 1}
        assert app.state.nearcache is cache
    assert cache.state is CacheState.CLOSED


def test_a_factory_gives_a_fresh_cache_at_each_startup() -> None:
    """With a factory the app can start twice (test clients do); each run has its own cache."""
    made: list[AsyncNearCache] = []

    def factory() -> AsyncNearCache:
        made.append(AsyncNearCache())
        return made[-1]

    app = FastAPI(lifespan=CacheLifespan(factory))

    @app.get("/")
    async def index(c: Cache) -> int:
        return made.index(c)

    for run in range(2):
        with TestClient(app) as client:
            assert client.get("/").json() == run
    assert [c.state for c in made] == [CacheState.CLOSED, CacheState.CLOSED]


def test_the_apps_own_lifespan_runs_inside_with_the_cache_open() -> None:
    """An app lifespan passed in runs with the cache open; its state is merged."""
    seen: list[str] = []

    @asynccontextmanager
    async def own(app: Any) -> AsyncIterator[dict[str, Any]]:
        await app.state.nearcache.set("warm", "yes")
        seen.append("startup")
        yield {"db": "pool"}
        seen.append("shutdown")
        assert app.state.nearcache.state is CacheState.OPEN

    app = FastAPI(lifespan=CacheLifespan(AsyncNearCache, lifespan=own))

    @app.get("/")
    async def index(request: Request, c: Cache) -> list[Any]:
        return [request.state.db, await c.get("warm")]

    with TestClient(app) as client:
        assert client.get("/").json() == ["pool", "yes"]
    assert seen == ["startup", "shutdown"]


def test_plain_starlette_reaches_the_cache_with_request_cache() -> None:
    """Without FastAPI, request_cache(request) gives the cache."""

    async def index(request: Request) -> JSONResponse:
        cache = request_cache(request)
        await cache.set("k", [1])
        return JSONResponse(await cache.get("k"))

    app = Starlette(routes=[Route("/", index)], lifespan=CacheLifespan(AsyncNearCache()))
    with TestClient(app) as client:
        assert client.get("/").json() == [1]


def test_without_the_lifespan_the_dependency_says_what_is_missing() -> None:
    """An app without CacheLifespan (or run without its lifespan) gets a clear error."""
    app = FastAPI()

    @app.get("/")
    async def index(c: Cache) -> None:
        return None

    with TestClient(app) as client, pytest.raises(RuntimeError, match="lifespan=CacheLifespan"):
        client.get("/")
    with pytest.raises(TypeError, match="AsyncNearCache or a function"):
        CacheLifespan("redis://x")  # type: ignore[arg-type]


def test_unreachable_redis_with_abort_connect_fails_the_startup() -> None:
    """abortConnect=true and no Redis: the app does not start."""
    location = f"127.0.0.1:{free_port()},abortConnect=true,connectTimeout=300"
    app = FastAPI(lifespan=CacheLifespan(lambda: AsyncNearCache(location, channel="x")))
    with pytest.raises(BackplaneUnavailableError, match="abortConnect"), TestClient(app):
        pass
