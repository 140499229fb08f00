"""A Django site on ``nearcache.django.NearCacheBackend``, for the integration tests.

``configure()`` sets Django up in this process (once); the views speak the JSON protocol
that every test app here shares (see tests/apps/host.py).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import django
from django.conf import settings


def configure(
    location: str, channel: str, db_path: str, *, max_staleness: float = 2.0, share: str = ""
) -> None:
    """Configure Django for this process: the site, the shop app, two cache aliases.
    ``share``: "l2" (a shared L2) or "l2+update" (and values in update messages)."""
    options: dict[str, Any] = {"channel": channel, "max_staleness": max_staleness}
    if share:
        options |= {"l2": True, "secret": "django-tests-secret"}
    if share == "l2+update":
        options["propagate"] = "update"
    cache = {
        "BACKEND": "nearcache.django.NearCacheBackend",
        "LOCATION": location,
        "TIMEOUT": 300,
        "OPTIONS": options,
    }
    settings.configure(
        DEBUG=False,
        SECRET_KEY="nearcache-tests",
        ALLOWED_HOSTS=["testserver"],
        USE_TZ=True,
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": db_path}},
        INSTALLED_APPS=["django.contrib.contenttypes", "tests.apps.shop.apps.ShopConfig"],
        CACHES={"default": cache, "other": {**cache, "KEY_PREFIX": "other"}},
        ROOT_URLCONF="tests.apps.django_site",
        MIDDLEWARE=[],
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
    )
    django.setup()


def create_tables() -> None:
    """Create the shop's table (the app has no migrations)."""
    from django.core.management import call_command

    call_command("migrate", run_syncdb=True, verbosity=0)


def watch_products() -> None:
    """Evict a product's cached entry everywhere when it is saved or deleted."""
    from nearcache.django import evict_on_change
    from tests.apps.shop.models import Product

    evict_on_change(Product)


# -- views ------------------------------------------------------------------------------

from django.core.cache import caches  # noqa: E402 - after configure() in this module's users
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402
from django.views.decorators.cache import cache_page  # noqa: E402

_MISSING = object()


def _body(request: HttpRequest) -> Any:
    return json.loads(request.body or b"{}")


def _flushed() -> JsonResponse:
    caches["default"].nearcache.flush(5.0)
    return JsonResponse({"flushed_at": time.monotonic()})


def item(request: HttpRequest, key: str) -> JsonResponse:
    """GET: read; PUT: set (``timeout`` as Django takes it); DELETE: delete."""
    cache = caches["default"]
    if request.method == "GET":
        value = cache.get(key, _MISSING)
        found = value is not _MISSING
        return JsonResponse({"found": found, "value": value if found else None})
    if request.method == "PUT":
        body = _body(request)
        if "timeout" in body:
            cache.set(key, body["value"], body["timeout"])
        else:
            cache.set(key, body["value"])
        return _flushed()
    if request.method == "DELETE":
        cache.delete(key)
        return _flushed()
    return JsonResponse({"error": "method"}, status=405)


def batch_set(request: HttpRequest) -> JsonResponse:
    """set_many."""
    body = _body(request)
    caches["default"].set_many(body["items"], body.get("timeout", 300))
    return _flushed()


def batch_delete(request: HttpRequest) -> JsonResponse:
    """delete_many."""
    caches["default"].delete_many(_body(request)["keys"])
    return _flushed()


def clear(request: HttpRequest) -> JsonResponse:
    """clear."""
    caches["default"].clear()
    return _flushed()


LOADS = {"count": 0}


def product(request: HttpRequest, pid: int) -> JsonResponse:
    """GET: the product through the cache (loads counted); PUT: change its price."""
    from nearcache.django import model_key
    from tests.apps.shop.models import Product

    cache = caches["default"]
    if request.method == "PUT":
        p = Product.objects.get(pk=pid)
        p.price = _body(request)["price"]
        p.save()  # evict_on_change drops it on every process
        return _flushed()

    def load() -> dict[str, object]:
        LOADS["count"] += 1
        return Product.objects.get(pk=pid).as_dict()

    return JsonResponse({"product": cache.get_or_set(model_key(Product, pid), load), **LOADS})


RENDERS = {"count": 0}


def _render(request: HttpRequest) -> JsonResponse:
    RENDERS["count"] += 1
    return JsonResponse({"rendered_by": os.getpid()})


_PAGE: list[Any] = []


def page(request: HttpRequest) -> Any:
    """A page Django's cache middleware keeps (a pickled response object); renders counted.
    (``cache_page`` reads the settings: applied at the first request, after configure().)"""
    if not _PAGE:
        _PAGE.append(cache_page(300)(_render))
    return _PAGE[0](request)


def renders(request: HttpRequest) -> JsonResponse:
    """How often this process rendered ``page``."""
    return JsonResponse(RENDERS)


def stats(request: HttpRequest) -> JsonResponse:
    """This process's cache: backplane state, pid, instance id."""
    nc = caches["default"].nearcache
    s = nc.stats()
    return JsonResponse(
        {
            "backplane": s.backplane,
            "pid": os.getpid(),
            "instance": nc.instance_id,
            "l2_hits": getattr(s, "l2_hits", 0),
            "own_messages": s.own_messages,
        }
    )


urlpatterns = [
    path("items/<str:key>", item),
    path("batch/set", batch_set),
    path("batch/delete", batch_delete),
    path("clear", clear),
    path("products/<int:pid>", product),
    path("stats", stats),
    path("page", page),
    path("renders", renders),
]
