"""Run Django's BaseCacheTests against NearCacheBackend: ``run.py REDIS_URL``.

Configured as Django's own ``tests/runtests.py`` configures the ``cache`` test app: sqlite
databases ``default`` and ``other``, the ``cache`` app installed, ``USE_TZ=False``. Exit
status 0 when every test passed (skips are listed by the runner, one line each).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> int:
    location = sys.argv[1]
    os.environ["NEARCACHE_DJANGO_LOCATION"] = location
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the `cache` app, this suite

    import django
    from django.conf import settings
    from django.test.runner import DiscoverRunner

    settings.configure(
        DATABASES={
            "default": {"ENGINE": "django.db.backends.sqlite3"},
            "other": {"ENGINE": "django.db.backends.sqlite3"},
        },
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "cache"],
        SECRET_KEY="django_tests_secret_key",
        USE_TZ=False,
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        CACHES={"default": {"BACKEND": "nearcache.django.NearCacheBackend", "LOCATION": location}},
        MIDDLEWARE=[],
        ROOT_URLCONF=__name__,
    )
    django.setup()
    runner = DiscoverRunner(verbosity=2, interactive=False, failfast=False)
    failures = runner.run_tests(["nearcache_backend_tests"])
    return 1 if failures else 0


urlpatterns: list[object] = []

if __name__ == "__main__":
    sys.exit(main())
