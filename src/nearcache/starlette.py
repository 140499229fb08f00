"""Starlette integration: an :class:`~nearcache.AsyncNearCache` opened and closed by the app's
lifespan, reached from requests (``pip install 'nearcache[starlette]'``; FastAPI users:
:mod:`nearcache.fastapi`, docs/fastapi.md).

::

    from starlette.applications import Starlette
    from nearcache.starlette import CacheLifespan, request_cache

    app = Starlette(routes=[...], lifespan=CacheLifespan(
        lambda: AsyncNearCache("redis://127.0.0.1:6379/0", channel="shop")))

    async def product(request):
        cache = request_cache(request)
        ...

The cache starts (connects, subscribes) at startup, before the first request, and closes at
shutdown after delivering what is queued. It is created in each worker process's lifespan,
never shared across ``fork()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

try:
    from starlette.requests import HTTPConnection
except ImportError as exc:  # pragma: no cover - exercised by test_extras_missing
    raise ImportError(
        "nearcache.starlette needs Starlette: pip install 'nearcache[starlette]' "
        "(or 'nearcache[fastapi]')"
    ) from exc

from nearcache._drivers.aio import AsyncNearCache

__all__ = ["STATE_KEY", "CacheLifespan", "request_cache"]

#: The name of the cache in the lifespan state (``request.state.nearcache``) and on
#: ``app.state``.
STATE_KEY = "nearcache"


class CacheLifespan:
    """A lifespan that starts an :class:`~nearcache.AsyncNearCache` and closes it at shutdown.

    Args:
        cache: the cache, or a function making one at each startup (a test client may start
            the app several times; a closed cache cannot be reopened). A cache created at
            import is what ``@cache.cached`` functions need: it does no I/O until started.
        lifespan: the app's own lifespan, run inside this one (the cache is open during its
            startup and shutdown); the state it yields is merged.
        close_timeout: seconds to deliver queued invalidations at shutdown.

    The cache is put in the lifespan state (``request.state.nearcache``, see
    :func:`request_cache`) and on ``app.state.nearcache``.
    """

    def __init__(
        self,
        cache: AsyncNearCache | Callable[[], AsyncNearCache],
        *,
        lifespan: Callable[[Any], AbstractAsyncContextManager[Mapping[str, Any] | None]]
        | None = None,
        close_timeout: float = 1.0,
    ) -> None:
        if not isinstance(cache, AsyncNearCache) and not callable(cache):
            raise TypeError(
                f"CacheLifespan takes an AsyncNearCache or a function making one, not {cache!r}"
            )
        self._cache = cache
        self._inner = lifespan
        self._close_timeout = close_timeout

    def __call__(self, app: Any) -> AbstractAsyncContextManager[Mapping[str, Any]]:
        return self._run(app)

    @asynccontextmanager
    async def _run(self, app: Any) -> AsyncIterator[Mapping[str, Any]]:
        cache = self._cache if isinstance(self._cache, AsyncNearCache) else self._cache()
        if not isinstance(cache, AsyncNearCache):
            raise TypeError(f"the CacheLifespan factory returned {cache!r}, not an AsyncNearCache")
        await cache.start()
        state = getattr(app, "state", None)
        if state is not None:
            setattr(state, STATE_KEY, cache)
        try:
            if self._inner is None:
                yield {STATE_KEY: cache}
            else:
                async with self._inner(app) as inner_state:
                    yield {**(inner_state or {}), STATE_KEY: cache}
        finally:
            await cache.aclose(timeout=self._close_timeout)


def request_cache(connection: HTTPConnection) -> AsyncNearCache:
    """The app's cache, from a request or websocket (a clear error without the lifespan)."""
    cache = getattr(connection.state, STATE_KEY, None)
    if cache is None:
        app_state = getattr(connection.app, "state", None)
        cache = getattr(app_state, STATE_KEY, None)
    if not isinstance(cache, AsyncNearCache):
        raise RuntimeError(
            "nearcache: no cache in this app's lifespan state: create the app with "
            "lifespan=CacheLifespan(...) (and run it with its lifespan, e.g. "
            "`with TestClient(app)`)"
        )
    return cache
