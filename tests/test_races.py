"""Races around loads: joining a load under the staleness rule, a cancelled loader, fork."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from typing import Any

import pytest

from nearcache import (
    AsyncNearCache,
    BackplaneListener,
    BackplaneState,
    MemoryBackplane,
    MemoryBroker,
    NearCache,
)
from tests.clock import FakeClock
from tests.servers import RedisServer, wait_until


class SilentBackplane:
    """Subscribed once, then silent: no message and no confirmation ever arrives."""

    channel = "silent"
    state = BackplaneState.CONNECTED

    def start(self, listener: BackplaneListener) -> None:
        listener.on_subscribed(100.0, False)

    def wait_connected(self, timeout: float) -> bool:
        return True

    def publish(self, payloads: Sequence[bytes]) -> int:
        return 0

    def close(self) -> None:
        pass


def test_a_caller_does_not_join_a_load_older_than_the_bound() -> None:
    """While the backplane is silent, a caller arriving more than max_staleness after a load
    started runs its own load instead of waiting for a value that may predate a write."""
    clock = FakeClock(100.0)
    cache = NearCache(backplane=SilentBackplane(), max_staleness=1.0, clock=clock)
    release = threading.Event()
    started = threading.Event()

    def slow() -> str:
        started.set()
        assert release.wait(10)
        return "loaded at 100"

    first: Future[str] = Future()
    threading.Thread(target=lambda: first.set_result(cache.get_or_set("k", slow))).start()
    assert started.wait(10)
    clock.now = 100.5  # within the bound: joining is fine
    joined: Future[str] = Future()
    threading.Thread(target=lambda: joined.set_result(cache.get_or_set("k", slow))).start()
    wait_until(lambda: cache._core.flights[(None, "k")].waiters == 1)
    clock.now = 101.5  # past the bound: a new caller must load for itself
    assert cache.get_or_set("k", lambda: "loaded at 101.5") == "loaded at 101.5"
    release.set()
    assert first.result(10) == "loaded at 100"
    assert joined.result(10) == "loaded at 100"
    cache.close(timeout=0)


def test_a_cancelled_loader_does_not_cancel_its_waiters() -> None:
    """When the task running an async factory is cancelled, tasks waiting on that load start
    their own load instead of being cancelled too."""

    async def main() -> None:
        async with AsyncNearCache() as cache:
            gate = asyncio.Event()

            async def never() -> str:
                await gate.wait()
                return "never"

            leader = asyncio.ensure_future(cache.get_or_set("k", never))
            while (None, "k") not in cache._core.flights:
                await asyncio.sleep(0)
            waiter = asyncio.ensure_future(cache.get_or_set("k", lambda: "waiter's own"))
            while cache._core.flights[(None, "k")].waiters == 0:
                await asyncio.sleep(0)
            leader.cancel()
            assert await asyncio.wait_for(waiter, 5) == "waiter's own"
            with pytest.raises(asyncio.CancelledError):
                await leader

    asyncio.run(main())


Spawn = Callable[[Coroutine[Any, Any, object]], "asyncio.Task[object]"]


async def _leader_and_waiter(
    cache: AsyncNearCache, calls: list[str], spawn: Spawn
) -> tuple[asyncio.Task[object], asyncio.Task[object]]:
    """A task loading "k" (its factory blocks) and a task waiting on that load."""
    gate = asyncio.Event()

    async def factory() -> str:
        calls.append("load")
        if len(calls) == 1:
            await gate.wait()  # the first load never ends by itself
        return f"load #{len(calls)}"

    leader = spawn(cache.get_or_set("k", factory))
    while (None, "k") not in cache._core.flights:
        await asyncio.sleep(0)
    waiter = spawn(cache.get_or_set("k", factory))
    while cache._core.flights[(None, "k")].waiters == 0:
        await asyncio.sleep(0)
    return leader, waiter


def test_a_waiter_cancelled_with_its_loader_by_gather_does_not_load() -> None:
    """When gather(loader, waiter) is cancelled, the waiter raises CancelledError too instead
    of taking the loader's cancellation for its cue to load: the factory ran once."""

    async def main() -> None:
        async with AsyncNearCache() as cache:
            calls: list[str] = []
            leader, waiter = await _leader_and_waiter(cache, calls, asyncio.ensure_future)
            both = asyncio.gather(leader, waiter)
            both.cancel()
            with pytest.raises(asyncio.CancelledError):
                await both
            assert leader.cancelled()
            assert waiter.cancelled()
            assert calls == ["load"]

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.TaskGroup is new in 3.11")
def test_a_waiter_in_an_aborted_task_group_does_not_load() -> None:
    """When a TaskGroup aborts because a sibling failed, a waiter in it is cancelled with its
    loader and does not run the factory itself."""

    async def failing() -> None:
        raise KeyError("a sibling failed")

    async def main() -> None:
        async with AsyncNearCache() as cache:
            calls: list[str] = []
            with pytest.raises(ExceptionGroup):  # noqa: F821 (a 3.11 builtin, like TaskGroup)
                async with asyncio.TaskGroup() as group:
                    leader, waiter = await _leader_and_waiter(cache, calls, group.create_task)
                    group.create_task(failing())
            assert leader.cancelled()
            assert waiter.cancelled()
            assert calls == ["load"]

    asyncio.run(main())


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+: fork with threads
def test_fork_never_waits_for_redis(redis_factory: type, channel: str) -> None:
    """With abortConnect=True and Redis gone, fork() returns at once in the child: the child
    joins the backplane in the background instead of blocking inside the fork hook."""
    server: RedisServer = redis_factory()  # type: ignore[operator]
    cache = NearCache(f"127.0.0.1:{server.port},connectTimeout=3000", channel=channel)
    server.stop()
    read_fd, write_fd = os.pipe()
    before = time.monotonic()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.write(write_fd, json.dumps({"after_fork": time.monotonic()}).encode() + b"\n")
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as reports:
        report = json.loads(reports.readline())
    os.waitpid(pid, 0)
    assert report["after_fork"] - before < 1.5
    cache.close(timeout=0)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # 3.12+: fork with threads
def test_a_forked_child_without_its_backplane_ages_its_entries_out() -> None:
    """A custom backplane is not restarted in a forked child, so the inherited entries are
    served only until max_staleness has passed, never forever. (The clock is the test's: a
    fork that took longer than max_staleness on a loaded machine must not decide it.)"""
    broker = MemoryBroker()
    clock = FakeClock(100.0)
    cache = NearCache(backplane=MemoryBackplane(broker, "c"), max_staleness=0.2, clock=clock)
    cache.set("k", "inherited")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        first = cache.get("k")
        clock.advance(0.15)  # within the bound of the fork
        within = cache.get("k")
        clock.advance(0.1)  # past it, and no confirmation can come
        os.write(write_fd, json.dumps([first, within, cache.get("k")]).encode() + b"\n")
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as reports:
        assert json.loads(reports.readline()) == ["inherited", "inherited", None]
    os.waitpid(pid, 0)
    clock.advance(0.25)  # the parent's clock too (the child's moved only in the child)
    assert cache.get("k") == "inherited"  # the parent's backplane still confirms
    cache.close()
