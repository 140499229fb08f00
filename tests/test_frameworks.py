"""Two app processes per framework (Django, Flask forked as by ``gunicorn --preload``,
FastAPI), on one real Redis, driven through each framework's test client: a write in one is
seen by the other within the staleness bound."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apps.host import AppProcess, start, start_forked
from tests.servers import RedisServer, wait_until

MAX_STALENESS = 2.0  # the apps' max_staleness
FRAMEWORK_MODULES = {"django": "django", "flask": "flask", "fastapi": "fastapi"}


@pytest.fixture(params=sorted(FRAMEWORK_MODULES))
def apps(
    request: pytest.FixtureRequest, redis_server: RedisServer, channel: str, tmp_path: Path
) -> Iterator[tuple[str, AppProcess, AppProcess]]:
    """Processes A and B of one framework's app, both subscribed."""
    framework: str = request.param
    pytest.importorskip(FRAMEWORK_MODULES[framework], reason=f"the {framework} extra")
    source = tmp_path / "prices.json"
    source.write_text(json.dumps({"1": 100}))
    common = ["--connection", redis_server.url, "--channel", channel, "--source", str(source)]
    common += ["--db", str(tmp_path / "db.sqlite3")]
    started: list[AppProcess] = []
    try:
        if framework == "flask":
            a, b = start_forked("flask", *common)
            started += [b, a]  # the child first: the parent waits for it at exit
        else:
            extra = ["--create-tables"] if framework == "django" else []
            a = start(framework, *common, *extra, name="A")
            started.append(a)
            if framework == "django":
                a.call("seed", pid=1, name="lamp", price=100)
            b = start(framework, *common, name="B")
            started.append(b)
        for app in (a, b):
            wait_until(lambda app=app: app.http("GET", "/stats")["backplane"] == "connected", 10)
        yield framework, a, b
    finally:
        for app in started:
            app.close()


def assert_dropped(b: AppProcess, key: str, flushed_at: float) -> None:
    """B stops returning its copy of ``key``: no read that starts more than the staleness
    bound after A's flush returned may return it."""
    while True:
        started = time.monotonic()
        if not b.http("GET", f"/items/{key}")["found"]:
            return
        assert started <= flushed_at + MAX_STALENESS, f"{key} still cached on B"


def test_writes_in_one_process_reach_the_other(apps: tuple[str, AppProcess, AppProcess]) -> None:
    """set, delete, delete_many, set_many, clear (and Django's timeout 0) on A each make B
    drop its copy within the staleness bound; a product change reaches B's cached function
    (Django: through post_save and evict_on_change)."""
    framework, a, b = apps
    assert a.pid != b.pid
    ids = {a.http("GET", "/stats")["instance"], b.http("GET", "/stats")["instance"]}
    assert len(ids) == 2

    def b_holds(*keys: str) -> None:
        for key in keys:
            b.http("PUT", f"/items/{key}", {"value": f"b's {key}"})
            assert b.http("GET", f"/items/{key}") == {"found": True, "value": f"b's {key}"}

    b_holds("set")
    flushed = a.http("PUT", "/items/set", {"value": "a's"})["flushed_at"]
    assert_dropped(b, "set", flushed)
    assert a.http("GET", "/items/set") == {"found": True, "value": "a's"}

    b_holds("delete")
    assert_dropped(b, "delete", a.http("DELETE", "/items/delete")["flushed_at"])

    b_holds("many1", "many2")
    flushed = a.http("POST", "/batch/delete", {"keys": ["many1", "many2"]})["flushed_at"]
    assert_dropped(b, "many1", flushed)
    assert_dropped(b, "many2", flushed)

    b_holds("setmany")
    flushed = a.http("POST", "/batch/set", {"items": {"setmany": 1}})["flushed_at"]
    assert_dropped(b, "setmany", flushed)

    b_holds("clear1", "clear2")
    flushed = a.http("POST", "/clear")["flushed_at"]
    assert_dropped(b, "clear1", flushed)
    assert_dropped(b, "clear2", flushed)

    if framework == "django":
        b_holds("zero")
        flushed = a.http("PUT", "/items/zero", {"value": "x", "timeout": 0})["flushed_at"]
        assert_dropped(b, "zero", flushed)
        assert a.http("GET", "/items/zero")["found"] is False

    first_a = a.http("GET", "/products/1")
    first_b = b.http("GET", "/products/1")
    assert first_a["product"]["price"] == first_b["product"]["price"] == 100
    assert b.http("GET", "/products/1")["product"]["price"] == 100  # cached on B
    flushed = a.http("PUT", "/products/1", {"price": 120})["flushed_at"]
    while True:
        started = time.monotonic()
        if b.http("GET", "/products/1")["product"]["price"] == 120:
            break
        assert started <= flushed + MAX_STALENESS, "B still serves the old price"


PRODUCT = {"id": 1, "name": "lamp", "price": 100}


@pytest.mark.parametrize("share", ["l2", "l2+update"])
def test_django_with_the_l2_a_new_process_warms_from_l2_not_the_database(
    redis_server: RedisServer, channel: str, tmp_path: Path, share: str
) -> None:
    """Django on the L2 (pickled values, signed): A loads a product from the database,
    caches a value and a page (a response object); B, started afterwards, serves all three
    from L2 without querying the database or rendering the page; then A's writes reach B
    within the staleness bound."""
    pytest.importorskip("django", reason="the django extra")
    common = ["--connection", redis_server.url, "--channel", channel, "--share", share]
    common += ["--db", str(tmp_path / "db.sqlite3")]
    started: list[AppProcess] = []
    try:
        a = start("django", *common, "--create-tables", name="A")
        started.append(a)
        a.call("seed", pid=1, name="lamp", price=100)
        wait_until(lambda: a.http("GET", "/stats")["backplane"] == "connected", 10)
        # The seed's eviction has come back: A knows a log position to share values from (on
        # a brand-new channel a value is sent as an invalidation until it does).
        wait_until(lambda: a.http("GET", "/stats")["own_messages"] >= 1, 10)
        a.http("PUT", "/items/x", {"value": {"nested": [1, 2]}})
        # And the set's: A's own writes no longer keep its loads away from L2.
        wait_until(lambda: a.http("GET", "/stats")["own_messages"] >= 2, 10)
        assert a.http("GET", "/products/1") == {"product": PRODUCT, "count": 1}
        a_pid = a.http("GET", "/page")["rendered_by"]

        b = start("django", *common, name="B")
        started.append(b)
        wait_until(lambda: b.http("GET", "/stats")["backplane"] == "connected", 10)
        assert b.http("GET", "/products/1") == {"product": PRODUCT, "count": 0}  # no query
        assert b.http("GET", "/items/x") == {"found": True, "value": {"nested": [1, 2]}}
        assert b.http("GET", "/page")["rendered_by"] == a_pid
        assert b.http("GET", "/renders")["count"] == 0
        assert b.http("GET", "/stats")["l2_hits"] >= 3

        flushed = a.http("PUT", "/items/x", {"value": "new"})["flushed_at"]
        while True:
            started_at = time.monotonic()
            if b.http("GET", "/items/x")["value"] == "new":
                break
            assert started_at <= flushed + MAX_STALENESS, "B still serves the old value"
        flushed = a.http("PUT", "/products/1", {"price": 120})["flushed_at"]
        while True:
            started_at = time.monotonic()
            if b.http("GET", "/products/1")["product"]["price"] == 120:
                break
            assert started_at <= flushed + MAX_STALENESS, "B still serves the old price"
    finally:
        for app in started:
            app.close()
