"""A Flask app on ``nearcache.flask``, made by an app factory (gunicorn ``--preload`` ready):
``gunicorn --preload -w 2 'tests.apps.flask_app:create_app()'`` with ``NEARCACHE_TEST_*``
in the environment. It speaks the JSON protocol of tests/apps/host.py."""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify, request

from nearcache import MISSING
from nearcache.flask import FlaskNearCache, current_cache
from tests.apps.source import read_price, write_price

nearcache = FlaskNearCache()
routes = Blueprint("shop", __name__)
LOADS = {"count": 0}


@nearcache.cached(region="products")
def load_product(pid: int) -> dict[str, Any]:
    """The product, from the source (a cached function of the current app's cache)."""
    LOADS["count"] += 1
    return {"id": pid, "price": read_price(current_app.config["SOURCE"], pid)}


def create_app(
    connection: str | None = None, channel: str | None = None, source: str | None = None
) -> Flask:
    """The app factory: the cache comes from the config, made in init_app."""
    app = Flask("shop")
    app.config["NEARCACHE_CONNECTION"] = connection or os.environ["NEARCACHE_TEST_CONNECTION"]
    app.config["NEARCACHE_OPTIONS"] = {
        "channel": channel or os.environ["NEARCACHE_TEST_CHANNEL"],
        "max_staleness": 2.0,
    }
    app.config["SOURCE"] = source or os.environ["NEARCACHE_TEST_SOURCE"]
    nearcache.init_app(app)
    app.register_blueprint(routes)
    return app


def _flushed() -> Any:
    current_cache.flush(5.0)
    return jsonify(flushed_at=time.monotonic())


@routes.route("/items/<key>", methods=["GET", "PUT", "DELETE"])
def item(key: str) -> Any:
    """GET: read; PUT: set (``ttl`` optional); DELETE: remove."""
    if request.method == "GET":
        value = current_cache.get(key, MISSING)
        found = value is not MISSING
        return jsonify(found=found, value=value if found else None)
    if request.method == "PUT":
        body = request.get_json()
        current_cache.set(key, body["value"], ttl=body.get("ttl"))
        return _flushed()
    current_cache.remove(key)
    return _flushed()


@routes.post("/batch/set")
def batch_set() -> Any:
    """Several sets."""
    for key, value in request.get_json()["items"].items():
        current_cache.set(key, value)
    return _flushed()


@routes.post("/batch/delete")
def batch_delete() -> Any:
    """remove_many."""
    current_cache.remove_many(request.get_json()["keys"])
    return _flushed()


@routes.post("/clear")
def clear() -> Any:
    """clear."""
    current_cache.clear()
    return _flushed()


@routes.route("/products/<int:pid>", methods=["GET", "PUT"])
def product(pid: int) -> Any:
    """GET: through the cached function; PUT: change the price, invalidate everywhere."""
    if request.method == "PUT":
        write_price(current_app.config["SOURCE"], pid, request.get_json()["price"])
        load_product.invalidate(pid)
        return _flushed()
    return jsonify(product=load_product(pid), count=LOADS["count"], pid=os.getpid())


@routes.get("/stats")
def stats() -> Any:
    """This process's cache."""
    return jsonify(
        backplane=current_cache.stats().backplane,
        pid=os.getpid(),
        instance=current_cache.instance_id,
    )
