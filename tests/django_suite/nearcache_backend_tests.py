"""Django's generic ``BaseCacheTests`` against ``NearCacheBackend``, configured as Django
configures them for its own Redis backend (``RedisCacheTests`` in ``cache/tests.py``)."""

from __future__ import annotations

import os

from cache.tests import BaseCacheTests, caches_setting_for_tests
from django.test import TestCase, override_settings

OPTIONS: dict[str, object] = {"channel": os.environ.get("NEARCACHE_DJANGO_CHANNEL", "django-suite")}
# NEARCACHE_DJANGO_SHARE: "l2" (a shared L2) or "l2+update" (and values in update messages).
SHARE = os.environ.get("NEARCACHE_DJANGO_SHARE", "")
if SHARE:
    OPTIONS |= {"l2": True, "secret": "django-suite-secret"}
if SHARE == "l2+update":
    OPTIONS["propagate"] = "update"
NEARCACHE_PARAMS = {
    "BACKEND": "nearcache.django.NearCacheBackend",
    "LOCATION": os.environ["NEARCACHE_DJANGO_LOCATION"],
    "OPTIONS": OPTIONS,
}
# As for Django's Redis backend: the size bound is not a cull of a third of the entries.
nearcache_excluded_caches = {"cull", "zero_cull"}


@override_settings(
    CACHES=caches_setting_for_tests(base=NEARCACHE_PARAMS, exclude=nearcache_excluded_caches)
)
class NearCacheBackendTests(BaseCacheTests, TestCase):
    """Every test of Django's BaseCacheTests, on nearcache over a real Redis."""
