"""The integrations are optional: ``import nearcache`` imports none of their frameworks, and
each module names its pip extra when its framework is missing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INTEGRATIONS = {
    "nearcache.django": ("django", "nearcache[django]"),
    "nearcache.flask": ("flask", "nearcache[flask]"),
    "nearcache.starlette": ("starlette", "nearcache[starlette]"),
    "nearcache.fastapi": ("fastapi", "nearcache[fastapi]"),
    "nearcache.prometheus": ("prometheus_client", "nearcache[prometheus]"),
    "nearcache.opentelemetry": ("opentelemetry", "nearcache[opentelemetry]"),
}


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )


def test_import_nearcache_imports_no_framework() -> None:
    """Nothing of Django, Flask, Starlette, FastAPI, prometheus_client or OpenTelemetry is
    imported by ``import nearcache`` (nor a NearCache and its decorator)."""
    frameworks = sorted({top for top, _ in INTEGRATIONS.values()})
    code = (
        "import sys, nearcache\n"
        "c = nearcache.NearCache()\n"
        "c.cached()(lambda: 1)\n"
        f"print([m for m in {frameworks!r} if m in sys.modules])"
    )
    proc = run(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("module", sorted(INTEGRATIONS))
def test_a_missing_framework_names_the_extra(module: str) -> None:
    """With its framework absent, the integration's ImportError says what to install."""
    framework, extra = INTEGRATIONS[module]
    # None in sys.modules makes every import of the framework fail, as if not installed.
    code = f"import sys\nsys.modules[{framework!r}] = None\nimport {module}"
    proc = run(code)
    assert proc.returncode != 0
    assert f"pip install '{extra}'" in proc.stderr, proc.stderr[-2000:]
