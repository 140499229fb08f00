"""FastAPI integration: an :class:`~nearcache.AsyncNearCache` opened and closed by the app's
lifespan and injected as a dependency (``pip install 'nearcache[fastapi]'``; see
docs/fastapi.md).

::

    from fastapi import FastAPI
    from nearcache import AsyncNearCache
    from nearcache.fastapi import Cache, CacheLifespan

    cache = AsyncNearCache("redis://127.0.0.1:6379/0", channel="shop")  # no I/O yet
    app = FastAPI(lifespan=CacheLifespan(cache))

    @cache.cached(region="products", ttl=300)
    async def load_product(pid: int) -> dict: ...

    @app.get("/products/{pid}")
    async def product(pid: int, cache: Cache) -> dict:
        return await load_product(pid)
"""

from __future__ import annotations

from typing import Annotated

try:
    from fastapi import Depends
except ImportError as exc:  # pragma: no cover - exercised by test_extras_missing
    raise ImportError("nearcache.fastapi needs FastAPI: pip install 'nearcache[fastapi]'") from exc

from nearcache._drivers.aio import AsyncNearCache
from nearcache.starlette import STATE_KEY, CacheLifespan, request_cache

__all__ = ["STATE_KEY", "Cache", "CacheLifespan", "get_cache"]


#: The dependency: ``Depends(get_cache)`` gives the app's :class:`~nearcache.AsyncNearCache`.
get_cache = request_cache

#: ``cache: Cache`` in a path operation's parameters injects the app's AsyncNearCache.
Cache = Annotated[AsyncNearCache, Depends(request_cache)]
