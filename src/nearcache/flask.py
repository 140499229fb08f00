"""Flask integration: one :class:`~nearcache.NearCache` per app, from its config
(``pip install 'nearcache[flask]'``; see docs/flask.md).

::

    from flask import Flask
    from nearcache.flask import FlaskNearCache, current_cache

    nearcache = FlaskNearCache()

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["NEARCACHE_CONNECTION"] = "redis://127.0.0.1:6379/0"
        app.config["NEARCACHE_OPTIONS"] = {"channel": "shop", "max_staleness": 2.0}
        nearcache.init_app(app)
        return app

    @nearcache.cached(region="products", ttl=300)   # the current app's cache, at call time
    def load_product(pid: int) -> dict: ...

In a view, ``current_cache`` is the current app's NearCache. The cache lives as long as the
process: it is not closed at the end of a request or an app context; it is closed, delivering
what is queued, at interpreter exit. Created before ``fork()`` (``gunicorn --preload``), it
reconnects in each worker in the background.
"""

from __future__ import annotations

import atexit
import weakref
from collections.abc import Callable, Hashable
from typing import cast

try:
    from flask import Flask, current_app
    from werkzeug.local import LocalProxy
except ImportError as exc:  # pragma: no cover - exercised by test_extras_missing
    raise ImportError("nearcache.flask needs Flask: pip install 'nearcache[flask]'") from exc

from nearcache._cached import Cached
from nearcache._drivers.sync import NearCache
from nearcache._exceptions import ConfigurationError

__all__ = ["EXTENSION_KEY", "FlaskNearCache", "current_cache", "current_nearcache"]

#: Where the app's NearCache lives: ``app.extensions["nearcache"]``.
EXTENSION_KEY = "nearcache"
_NOT_OPTIONS = {"connection": "NEARCACHE_CONNECTION", "backplane": None, "clock": None}


def _close_at_exit(cache_ref: weakref.ref[NearCache]) -> None:
    cache = cache_ref()
    if cache is not None:
        cache.close()


class FlaskNearCache:
    """The Flask extension: ``FlaskNearCache(app)`` or ``init_app(app)`` in a factory.

    Config keys:
        ``NEARCACHE_CONNECTION``: the connection string or URL (unset or ``None``: a local
        cache with no Redis).
        ``NEARCACHE_OPTIONS``: a dict of :class:`~nearcache.NearCache` keyword arguments
        (``channel``, ``max_staleness``, ``max_entries``, ``ttl``, ``secret``, ...).
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Create the app's NearCache from its config (no request or app context needed)."""
        connection = app.config.get("NEARCACHE_CONNECTION")
        if connection is not None and not isinstance(connection, str):
            raise ConfigurationError(
                "NEARCACHE_CONNECTION must be a connection string or URL, not "
                f"{type(connection).__name__}",
                option="NEARCACHE_CONNECTION",
            )
        options = app.config.get("NEARCACHE_OPTIONS") or {}
        if not isinstance(options, dict):
            raise ConfigurationError(
                "NEARCACHE_OPTIONS must be a dict of NearCache arguments",
                option="NEARCACHE_OPTIONS",
            )
        for name in options:
            if name in _NOT_OPTIONS:
                raise ConfigurationError(
                    f"NEARCACHE_OPTIONS[{name!r}] is not allowed here"
                    + (f": use {_NOT_OPTIONS[name]}" if _NOT_OPTIONS[name] else ""),
                    option=name,
                )
        try:
            cache = NearCache(connection, **options)
        except TypeError as exc:
            raise ConfigurationError(
                f"NEARCACHE_OPTIONS: {exc}", option="NEARCACHE_OPTIONS"
            ) from exc
        app.extensions[EXTENSION_KEY] = cache
        # Deliver what is queued when the process ends; an invalidation lost at exit would
        # leave the other instances stale until max_age.
        atexit.register(_close_at_exit, weakref.ref(cache))

    @property
    def cache(self) -> NearCache:
        """The current app's NearCache (needs an app context)."""
        return current_nearcache()

    def cached(
        self,
        *,
        region: str | None = None,
        ttl: float | None = None,
        sliding: float | None = None,
        key: Callable[..., Hashable] | None = None,
    ) -> Cached:
        """:meth:`NearCache.cached <nearcache.NearCache.cached>` on the current app's cache,
        looked up at each call (so it can decorate functions before the app exists)."""
        return Cached(current_nearcache, region=region, ttl=ttl, sliding=sliding, key=key)


def current_nearcache() -> NearCache:
    """The current app's NearCache; a clear error outside an app context or without
    ``init_app``."""
    try:
        cache = current_app.extensions.get(EXTENSION_KEY)
    except RuntimeError as exc:  # working outside of application context
        raise RuntimeError(
            "nearcache.flask: no Flask app context (use the cache inside a request, or "
            "within `with app.app_context():`)"
        ) from exc
    if cache is None:
        raise RuntimeError(
            f"nearcache.flask: app {current_app.name!r} has no NearCache: call "
            "FlaskNearCache().init_app(app) in its factory"
        )
    return cast(NearCache, cache)


#: The current app's NearCache, as a proxy usable in views (``current_cache.get(...)``).
current_cache: NearCache = cast(NearCache, LocalProxy(current_nearcache))
