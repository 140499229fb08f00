"""``nearcache.flask``: the extension's config, contexts and lifetime, in this process
(two processes and gunicorn --preload: test_frameworks.py, test_gunicorn.py)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("flask", reason="the flask extra is not installed")

from flask import Flask

from nearcache import CacheState, ConfigurationError
from nearcache.flask import EXTENSION_KEY, FlaskNearCache, current_cache, current_nearcache
from tests.servers import RedisServer, wait_until


def make_app(**config: Any) -> Flask:
    app = Flask("t")
    app.config.update(config)
    return app


def test_init_app_makes_one_cache_per_app_and_requests_never_close_it(
    redis_server: RedisServer, channel: str
) -> None:
    """Each app gets its cache from its config; the end of a request leaves it open."""
    ext = FlaskNearCache()
    app = make_app(NEARCACHE_CONNECTION=redis_server.url, NEARCACHE_OPTIONS={"channel": channel})
    ext.init_app(app)
    other = make_app()
    FlaskNearCache(other)  # the one-step form; no connection: a local cache

    @app.get("/")
    def index() -> str:
        current_cache.set("k", "v")
        return str(current_cache.get("k"))

    cache = app.extensions[EXTENSION_KEY]
    try:
        wait_until(lambda: cache.stats().backplane == "connected", 5.0)
        assert app.test_client().get("/").text == "v"
        assert cache.state is CacheState.OPEN
        with app.app_context():
            assert current_nearcache() is cache
            assert ext.cache is cache
        with other.app_context():
            assert current_nearcache() is not cache
            assert current_nearcache().backplane_state is None
    finally:
        cache.close()
        other.extensions[EXTENSION_KEY].close()


def test_cached_uses_the_current_apps_cache() -> None:
    """ext.cached decorates before any app exists and uses the app of the call."""
    ext = FlaskNearCache()
    runs: list[str] = []

    @ext.cached(region="r")
    def name(n: int) -> str:
        runs.append(n)
        return f"n{n}"

    first, second = make_app(), make_app()
    ext.init_app(first)
    ext.init_app(second)
    try:
        with first.app_context():
            assert [name(1), name(1)] == ["n1", "n1"]
        with second.app_context():
            assert name(1) == "n1"  # another app, another cache: loads again
            name.invalidate(1)
        assert runs == [1, 1]
        with pytest.raises(RuntimeError, match="no Flask app context"):
            name(1)
    finally:
        first.extensions[EXTENSION_KEY].close()
        second.extensions[EXTENSION_KEY].close()


def test_bad_config_names_the_setting() -> None:
    """Wrong config raises ConfigurationError naming the key or option."""
    with pytest.raises(ConfigurationError, match="NEARCACHE_CONNECTION must be") as info:
        FlaskNearCache(make_app(NEARCACHE_CONNECTION=5))
    assert info.value.option == "NEARCACHE_CONNECTION"
    with pytest.raises(ConfigurationError, match="NEARCACHE_OPTIONS must be a dict"):
        FlaskNearCache(make_app(NEARCACHE_OPTIONS=["channel"]))
    with pytest.raises(ConfigurationError, match=r"NEARCACHE_OPTIONS\['connection'\].*"):
        FlaskNearCache(make_app(NEARCACHE_OPTIONS={"connection": "x"}))
    with pytest.raises(ConfigurationError, match="unexpected keyword argument 'chanel'"):
        FlaskNearCache(make_app(NEARCACHE_OPTIONS={"chanel": "x"}))
    with pytest.raises(ConfigurationError, match="max_staleness") as info:
        FlaskNearCache(make_app(NEARCACHE_OPTIONS={"max_staleness": 0}))
    assert info.value.option == "max_staleness"


def test_an_app_without_init_app_says_so() -> None:
    """current_cache in an app that never called init_app: a clear error."""
    with make_app().app_context(), pytest.raises(RuntimeError, match="call FlaskNearCache"):
        current_cache.get("k")


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"channel": 5}, "channel"),
        ({"abort_connect": "yes"}, "abort_connect"),
        ({"secret": 5}, "secret"),
    ],
)
def test_a_wrongly_typed_option_names_it(options: dict[str, Any], option: str) -> None:
    """A wrong type is refused with ConfigurationError naming the option (it was accepted,
    or failed with an AttributeError)."""
    with pytest.raises(ConfigurationError, match=option) as info:
        FlaskNearCache(make_app(NEARCACHE_OPTIONS=options))
    assert info.value.option == option
