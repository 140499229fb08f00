"""Django's own generic cache tests (``BaseCacheTests``, vendored from Django's source release
in tests/django_suite/) pass against ``nearcache.django.NearCacheBackend`` on a real Redis."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import RedisServer

pytest.importorskip("django", reason="the django extra is not installed")

SUITE = Path(__file__).resolve().parent / "django_suite"
# Skipped by Django's own skipTest, exactly as for Django's Redis backend.
EXPECTED_SKIPS = {
    "test_cull": "Culling isn't implemented.",
    "test_zero_cull": "Culling isn't implemented.",
    "test_cull_delete_when_store_empty": "Culling isn't implemented.",
}


@pytest.mark.parametrize("share", ["", "l2", "l2+update"], ids=["l1", "l2", "l2+update"])
def test_django_base_cache_tests_pass(redis_server: RedisServer, channel: str, share: str) -> None:
    """Every test of Django's BaseCacheTests passes; only the three culling tests skip. Also
    with the shared L2 (values pickled, signed), and with values in update messages."""
    env = {**os.environ, "NEARCACHE_DJANGO_CHANNEL": channel, "NEARCACHE_DJANGO_SHARE": share}
    proc = subprocess.run(
        [sys.executable, str(SUITE / "run.py"), redis_server.url],
        capture_output=True,
        text=True,
        timeout=110,
        env=env,
        cwd=SUITE.parent.parent,
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    ran = re.search(r"^Ran (\d+) tests", output, re.MULTILINE)
    assert ran is not None, output[-3000:]
    skipped = dict(re.findall(r"^(test_\w+) \(.*\) \.\.\. skipped [\"'](.*)[\"']$", output, re.M))
    assert skipped == EXPECTED_SKIPS, output[-3000:]
    assert int(ran.group(1)) >= 50  # BaseCacheTests of Django 5.2 has 54
    assert re.search(r"^OK \(skipped=3\)$", output, re.MULTILINE), output[-3000:]
