"""Publishing that Redis refuses: visible at once and bounded, never silent (issue 8, defect 6).

Against real servers: an ACL user without ``XADD`` (the publish script's stream append) and a
server at ``maxmemory`` with ``noeviction``. Each test failed on the code before the fix,
where a refused publish was retried every second forever without a log record, ``flush()``
only timed out, and ``stats()`` showed a failure count at most.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from nearcache import MISSING, AsyncNearCache, NearCache, PublishRefusedError
from nearcache._core.publishing import Publishing
from tests.conftest import DEFAULT_USER_PASSWORD
from tests.servers import RedisServer, wait_until

LIMITED_USER, LIMITED_PASSWORD = "no-xadd", "no-xadd-pass"


@pytest.fixture
def limited_user(acl_redis: RedisServer) -> Iterator[str]:
    """A connection string for an ACL user allowed everything but XADD."""
    admin = redis.Redis(host=acl_redis.host, port=acl_redis.port, password=DEFAULT_USER_PASSWORD)
    admin.acl_setuser(
        LIMITED_USER,
        enabled=True,
        passwords=[f"+{LIMITED_PASSWORD}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-xadd"],
    )
    yield f"{acl_redis.host}:{acl_redis.port},user={LIMITED_USER},password={LIMITED_PASSWORD}"
    admin.acl_deluser(LIMITED_USER)
    admin.close()


class Driver:
    """Runs the same steps on a NearCache or an AsyncNearCache (on a private loop)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.loop = asyncio.new_event_loop() if kind == "async" else None

    def make(self, connection: str, **kwargs: Any) -> Any:
        if self.loop is None:
            return NearCache(connection, **kwargs)
        cache = AsyncNearCache(connection, **kwargs)
        self.run(cache.start())
        return cache

    def run(self, value: Any) -> Any:
        if self.loop is not None and asyncio.iscoroutine(value):
            return self.loop.run_until_complete(value)
        return value

    def read(self, cache: Any, key: str, region: str | None = None) -> Any:
        """``cache.get(key, MISSING, region)``, awaited for an AsyncNearCache."""
        value = cache.get(key, MISSING, region)
        if self.loop is None:
            return value

        async def awaited() -> Any:
            return await value

        return self.loop.run_until_complete(awaited())

    def until(self, condition: Callable[[], bool], timeout: float = 10.0) -> None:
        """Poll ``condition`` with a deadline, letting the loop run meanwhile."""
        if self.loop is None:
            wait_until(condition, timeout)
            return

        async def poll() -> None:
            deadline = asyncio.get_running_loop().time() + timeout
            while not condition():
                assert asyncio.get_running_loop().time() < deadline, "condition not met"
                await asyncio.sleep(0.01)

        self.run(poll())

    def close(self, cache: Any) -> None:
        self.run(cache.aclose() if self.kind == "async" else cache.close())

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def driver(request: pytest.FixtureRequest) -> Iterator[Driver]:
    d = Driver(request.param)
    yield d
    d.stop()


def _errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "nearcache" and r.levelno >= logging.ERROR]


def test_a_publish_refused_by_an_acl_is_reported_by_flush_stats_and_one_error_log(
    driver: Driver, limited_user: str, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    """With a user that may not XADD, flush() raises PublishRefusedError at once naming
    Redis's NOPERM reply, stats() says "refused", and the ERROR log is not repeated on every
    retry. The invalidation stays queued."""
    caplog.set_level(logging.WARNING, logger="nearcache")
    cache = driver.make(limited_user, channel=channel, abort_connect=False)
    try:
        driver.until(lambda: cache.backplane_state.value == "connected")
        # Found by the ACL check at subscription, before anything was published:
        assert cache.stats().publishing == "refused"
        assert "XADD" in (cache.stats().publish_error or "")
        driver.run(cache.set("k", 1))
        with pytest.raises(PublishRefusedError) as refused:
            driver.run(cache.flush(timeout=60))
        assert "NOPERM" in refused.value.reply and "XADD" in refused.value.reply
        assert refused.value.pending == 1
        assert channel in str(refused.value) and refused.value.reply in str(refused.value)
        driver.until(lambda: cache.stats().publish_failures >= 2)  # retried, at a slow pace
        stats = cache.stats()
        assert stats.publishing == "refused"
        # Redis's own words (7.0: "The user executing the script can't run this command",
        # later versions name the command), and what the check found:
        error = stats.publish_error or ""
        assert ("can't run this command" in error or "xadd" in error) and "XADD" in error
        assert stats.pending == 1
        assert len(_errors(caplog)) == 1
        assert "XADD" in _errors(caplog)[0].getMessage()
    finally:
        driver.close(cache)


def test_an_acl_without_the_publish_commands_is_refused_at_start_with_abort_connect(
    driver: Driver, limited_user: str, channel: str
) -> None:
    """With abortConnect=True the constructor (or start()) refuses an ACL user that lacks a
    command the publish script needs, naming it, instead of failing at the first write."""
    with pytest.raises(PublishRefusedError) as refused:
        driver.make(limited_user, channel=channel, abort_connect=True)
    assert "XADD" in str(refused.value) and "abortConnect=False" in str(refused.value)


def test_a_user_with_every_command_the_log_needs_passes_the_start_check(
    driver: Driver, acl_redis: RedisServer, channel: str
) -> None:
    """The ACL check refuses nothing for the ACL user that may run everything."""
    cache = driver.make(acl_redis.url, channel=channel, abort_connect=True)
    try:
        assert cache.stats().publishing == "ok"
        driver.run(cache.set("k", 1))
        driver.run(cache.flush())
    finally:
        driver.close(cache)


def test_a_publish_refused_for_memory_recovers_once_redis_accepts_it(
    driver: Driver, redis_factory: Callable[..., RedisServer], channel: str
) -> None:
    """At maxmemory with noeviction every publish is refused with OOM: flush() says so, and
    once memory is available again the queued invalidation is delivered, flush() returns and
    stats() shows "ok" again."""
    server = redis_factory(extra_args=["--maxmemory-policy", "noeviction"])
    with NearCache(server.url, channel=channel) as reader:
        writer = driver.make(server.url, channel=channel)
        admin = server.client()
        try:
            driver.until(lambda: writer.backplane_state.value == "connected")
            wait_until(lambda: reader.backplane_state.value == "connected")
            reader.set("k", "old")
            driver.run(writer.remove("warm-up"))
            driver.run(writer.flush())
            admin.config_set("maxmemory", 1)
            driver.run(writer.remove("k"))
            with pytest.raises(PublishRefusedError) as refused:
                driver.run(writer.flush(timeout=60))
            assert refused.value.reply.startswith("OOM")
            assert writer.stats().publishing == "refused"
            assert reader.get("k") == "old"  # the other instance still serves it
            admin.config_set("maxmemory", 0)
            # Retried every few seconds: flush() keeps saying "refused" until a retry passes.
            driver.until(lambda: writer.stats().publishing == "ok", 30)
            driver.run(writer.flush())
            wait_until(lambda: reader.get("k") is None)
        finally:
            admin.config_set("maxmemory", 0)
            admin.close()
            driver.close(writer)


@pytest.mark.parametrize("write", ["remove", "clear_region", "clear"])
def test_a_read_on_the_writer_before_its_write_is_published_never_keeps_the_l2_value(
    driver: Driver, limited_user: str, acl_redis: RedisServer, channel: str, write: str
) -> None:
    """With l2=True, a miss on the writer itself between its write and that write's publish
    (here held back by a refused XADD) read L2, which still held the value the write replaced,
    and kept it in L1 for good: the write's own message, which drops it on every other
    instance, is skipped on its sender. A read started more than max_staleness after flush()
    returned got the old value."""
    source = {"k": 1}
    cache = driver.make(
        limited_user, channel=channel, abort_connect=False, l2=True, max_staleness=0.5
    )
    admin = redis.Redis(host=acl_redis.host, port=acl_redis.port, password=DEFAULT_USER_PASSWORD)
    try:
        driver.until(lambda: cache.backplane_state.value == "connected")
        assert driver.run(cache.get_or_set("k", lambda: source["k"], region="r")) == 1
        driver.until(lambda: cache.stats().l2_fills == 1)  # L2 holds 1 (a fill needs no XADD)
        source["k"] = 2  # the source first, then the invalidation
        if write == "remove":
            driver.run(cache.remove("k", region="r"))
        elif write == "clear_region":
            driver.run(cache.clear_region("r"))
        else:
            driver.run(cache.clear())
        driver.run(cache.get_or_set("k", lambda: source["k"], region="r"))  # a miss here
        admin.acl_setuser(LIMITED_USER, enabled=True, commands=["+xadd"])
        driver.until(lambda: cache.stats().publishing == "ok", timeout=30)  # the retry went out
        driver.run(cache.flush(timeout=5))
        flushed = time.monotonic()
        # Past the bound, with the loop running (the heartbeats keep confirming):
        driver.until(lambda: time.monotonic() > flushed + 0.5 + 0.1)
        assert driver.read(cache, "k", region="r") in (2, MISSING)
    finally:
        driver.close(cache)
        admin.close()


def test_a_refusal_found_at_start_still_paces_the_retries() -> None:
    """After the start-up check found a refusal, the retries of a refused (or failing)
    publish kept a delay of 0 (doubling 0): a loop of publishes as fast as Redis answered
    (1,500 in 3 s against a real server with an ACL user without XADD)."""
    publishing = Publishing("c", lambda: 0.0)
    publishing.refused_at_start("NOPERM the Redis user may not run XADD c:log")
    refused = PublishRefusedError("refused", reply="NOPERM no XADD")
    delays = [publishing.failed(refused, 1) for _ in range(6)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    publishing = Publishing("c", lambda: 0.0)
    publishing.refused_at_start("NOPERM the Redis user may not run XADD c:log")
    assert publishing.failed(ConnectionError("down"), 1) >= 0.05


@pytest.mark.parametrize("clear", ["clear_region", "clear"])
def test_a_write_racing_a_clear_on_the_same_instance_never_leaves_the_older_value(
    limited_user: str, acl_redis: RedisServer, channel: str, clear: str
) -> None:
    """Thread Y's write(k) writes the source (1); thread X then writes the source (2) and
    clears k's region (or everything) while Y's change still runs; both wait in the outbox
    behind a batch whose publish Redis refuses (an ACL without XADD, granted afterwards),
    so they go out in one batch. Y's value must not outlive X's clear: it did, shared through
    L2 right behind the clear, and a read started after flush() + max_staleness got 1."""
    source = {"k": 0}
    admin = redis.Redis(host=acl_redis.host, port=acl_redis.port, password=DEFAULT_USER_PASSWORD)
    writer = NearCache(
        limited_user, channel=channel, abort_connect=False, l2=True, max_staleness=0.5
    )
    primer = NearCache(
        f"{acl_redis.host}:{acl_redis.port},password={DEFAULT_USER_PASSWORD}", channel=channel
    )
    try:
        wait_until(lambda: writer.backplane_state.value == "connected")
        primer.remove("prime")  # a logged message: the writer then has a log position
        primer.flush()
        wait_until(lambda: writer.stats().messages_received == 1)
        writer.remove("z")  # its publish is refused: in flight until XADD is granted
        wait_until(lambda: writer.stats().publish_failures >= 1)
        changed, release = threading.Event(), threading.Event()

        def change() -> int:
            source["k"] = 1
            changed.set()
            assert release.wait(10)
            return 1

        y = threading.Thread(target=lambda: writer.write("k", change, region="r"))
        y.start()
        assert changed.wait(10)
        source["k"] = 2  # X: the source first, then the clear
        writer.clear_region("r") if clear == "clear_region" else writer.clear()
        release.set()
        y.join(10)
        admin.acl_setuser(LIMITED_USER, enabled=True, commands=["+xadd"])
        wait_until(lambda: writer.stats().publishing == "ok", timeout=30)
        writer.flush(timeout=5)
        flushed = time.monotonic()
        wait_until(lambda: time.monotonic() > flushed + 0.5 + 0.1)  # past the bound
        assert writer.get_or_set("k", lambda: source["k"], region="r") == 2
    finally:
        writer.close()
        primer.close()
        admin.close()
