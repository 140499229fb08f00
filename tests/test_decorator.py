"""The ``cached`` decorator: stable keys, stampede protection, invalidation everywhere."""

from __future__ import annotations

import asyncio
import datetime
import decimal
import enum
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nearcache import AsyncNearCache, CacheClosedError, NearCache
from nearcache._cached import MAX_READABLE_KEY, call_key, region_loads
from tests.servers import RedisServer, wait_until

ROOT = Path(__file__).resolve().parent.parent


class Color(enum.Enum):
    RED = "red"


def lookup(pid, flags=(), *rest, when=None, **extra):  # type: ignore[no-untyped-def]
    return pid


SAMPLE_CALLS = [
    ((42,), {}),
    (("42",), {}),
    ((42.0,), {}),
    ((True,), {}),
    ((None,), {"when": datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.timezone.utc)}),
    ((b"\x00\xff", [1, (2, 3)], "x", "y"), {"z": {"b": 2, "a": {1, 2, 3}}}),
    ((decimal.Decimal("1.10"),), {"when": datetime.date(2024, 1, 2)}),
    ((uuid.UUID(int=7), frozenset({"q", "p"})), {"color": Color.RED}),
]


def sample_keys() -> list[str]:
    return [call_key(lookup, args, kwargs) for args, kwargs in SAMPLE_CALLS]


@pytest.fixture
def cache() -> Iterator[NearCache]:
    c = NearCache()
    yield c
    c.close()


def test_keys_are_the_same_in_another_process_with_another_hash_seed() -> None:
    """Keys never depend on hash() or id(): a process with another PYTHONHASHSEED agrees."""
    code = "from tests.test_decorator import sample_keys; print('\\n'.join(sample_keys()))"
    keys = []
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
            check=True,
        ).stdout.splitlines()
        keys.append(out)
    assert keys[0] == keys[1] == sample_keys()


def test_keys_name_the_call_and_tell_types_apart() -> None:
    """A key reads as the call; 42, '42', 42.0 and True are four keys; sets and dicts sort."""
    keys = sample_keys()
    assert keys[0] == "tests.test_decorator.lookup(pid=42, flags=(), rest=(), when=None, extra={})"
    assert len(set(keys[:4])) == 4
    assert call_key(lookup, ({1, 2, 3},), {}) == call_key(lookup, ({3, 2, 1},), {})
    assert call_key(lookup, ({"a": 1, "b": 2},), {}) == call_key(lookup, ({"b": 2, "a": 1},), {})


def test_positional_keyword_and_default_arguments_give_one_key() -> None:
    """f(1), f(pid=1) and f(1, ()) are the same call."""
    assert call_key(lookup, (1,), {}) == call_key(lookup, (), {"pid": 1})
    assert call_key(lookup, (1,), {}) == call_key(lookup, (1, ()), {})


def test_long_keys_are_hashed_stably() -> None:
    """A key past MAX_READABLE_KEY characters is the function's name and a SHA-256."""
    key = call_key(lookup, ("x" * MAX_READABLE_KEY,), {})
    assert key.startswith("tests.test_decorator.lookup#sha256:")
    assert key == call_key(lookup, ("x" * MAX_READABLE_KEY,), {})
    assert key != call_key(lookup, ("y" * MAX_READABLE_KEY,), {})


def test_unkeyable_argument_raises_at_call_time_naming_it(cache: NearCache) -> None:
    """An object that cannot be keyed raises TypeError naming the argument (nested too)."""

    @cache.cached()
    def load(pid: int, options: object = None) -> int:
        return pid

    with pytest.raises(TypeError, match=r"argument 'options' \(a object\).*key=\.\.\."):
        load(1, object())
    with pytest.raises(TypeError, match=r"argument 'options'\[1\] \(a lock\)"):
        load(1, [1, threading.Lock()])
    with pytest.raises(TypeError, match=r"missing a required argument: 'pid'"):
        load()  # type: ignore[call-arg]
    assert load(1) == 1


def test_sync_caches_results_and_invalidates_one_call(cache: NearCache) -> None:
    """The function runs once per distinct call; invalidate drops that call's entry only."""
    calls: list[int] = []

    @cache.cached(ttl=60)
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    assert [square(2), square(2), square(n=2), square(3)] == [4, 4, 4, 9]
    assert calls == [2, 3]
    square.invalidate(2)
    assert square(2) == 4
    assert square(3) == 9
    assert calls == [2, 3, 2]
    square.invalidate_all()
    square(3)
    assert calls == [2, 3, 2, 3]
    assert square.region.endswith(
        "test_sync_caches_results_and_invalidates_one_call.<locals>.square"
    )
    assert square.__name__ == "square"
    loads = region_loads(cache)[square.region]
    assert (loads.calls, loads.loads, loads.load_errors) == (7, 4, 0)


def test_key_function_and_region(cache: NearCache) -> None:
    """key= builds the key, so other code can invalidate the same entry by hand."""

    @cache.cached(region="products", key=lambda pid: f"product:{pid}")
    def product(pid: int) -> dict[str, int]:
        return {"pid": pid}

    assert product(7) == {"pid": 7}
    assert cache.get("product:7", region="products") == {"pid": 7}
    cache.remove("product:7", region="products")
    assert cache.get("product:7", region="products") is None


def test_errors_are_not_cached_and_are_counted(cache: NearCache) -> None:
    """An exception reaches the caller, nothing is cached, the load error is counted."""
    attempts: list[int] = []

    @cache.cached()
    def flaky(n: int) -> int:
        attempts.append(n)
        if len(attempts) == 1:
            raise RuntimeError("database down")
        return n

    with pytest.raises(RuntimeError, match="database down"):
        flaky(1)
    assert flaky(1) == 1
    assert region_loads(cache)[flaky.region].load_errors == 1


def test_concurrent_callers_share_one_load(cache: NearCache) -> None:
    """Threads calling the same key while it loads wait for the one load (stampede)."""
    release = threading.Event()
    runs: list[int] = []

    @cache.cached()
    def slow(n: int) -> int:
        runs.append(n)
        release.wait(10)
        return n

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(slow(5))) for _ in range(8)]
    for t in threads:
        t.start()
    # Wait until the other seven joined the load in flight, then let it finish.
    wait_until(lambda: sum(f.waiters for f in cache._core.flights.values()) == 7, 10)
    release.set()
    for t in threads:
        t.join(10)
    assert runs == [5]
    assert results == [5] * 8


def test_decorator_refuses_the_wrong_kind_of_function(cache: NearCache) -> None:
    """A coroutine function needs AsyncNearCache.cached, a plain one NearCache.cached."""

    async def coro() -> int:
        return 1

    with pytest.raises(TypeError, match=r"AsyncNearCache\.cached"):
        cache.cached()(coro)
    with pytest.raises(TypeError, match="not a coroutine function"):
        AsyncNearCache().cached()(lambda: 1)
    with pytest.raises(ValueError, match="ttl must be a positive number"):
        cache.cached(ttl=0)
    with pytest.raises(TypeError, match="key must be a function"):
        cache.cached(key="k")  # type: ignore[arg-type]


def test_closed_cache_refuses_decorated_calls() -> None:
    """After close, a decorated call raises CacheClosedError instead of running silently."""
    cache = NearCache()

    @cache.cached()
    def f(n: int) -> int:
        return n

    assert f(1) == 1
    cache.close()
    with pytest.raises(CacheClosedError):
        f(2)


def test_invalidate_reaches_other_instances(redis_server: RedisServer, channel: str) -> None:
    """fn.invalidate on one instance drops the call's entry on another, over Redis."""
    source = {"v": "old"}

    def price(sku: str) -> str:
        return source["v"]

    with (
        NearCache(redis_server.url, channel=channel) as a,
        NearCache(redis_server.url, channel=channel) as b,
    ):
        price_a, price_b = a.cached()(price), b.cached()(price)
        assert price_a("x") == price_b("x") == "old"
        source["v"] = "new"
        price_a.invalidate("x")
        a.flush()
        wait_until(lambda: price_b("x") == "new", 10.0, message="b dropped its entry")


def test_async_decorator_caches_shares_loads_and_invalidates() -> None:
    """The async twin: one load for concurrent awaits, awaitable invalidate."""

    async def main() -> None:
        runs: list[int] = []
        async with AsyncNearCache() as cache:

            @cache.cached(ttl=30)
            async def fetch(n: int) -> int:
                runs.append(n)
                await asyncio.sleep(0)  # lets the other callers join this load
                return n * 10

            assert await asyncio.gather(*(fetch(1) for _ in range(5))) == [10] * 5
            assert runs == [1]
            await fetch.invalidate(1)
            assert await fetch(1) == 10
            assert runs == [1, 1]
            await fetch.invalidate_all()
            assert await fetch(n=1) == 10
            assert runs == [1, 1, 1]
            with pytest.raises(TypeError, match="argument 'n'"):
                await fetch(object())  # type: ignore[arg-type]
        with pytest.raises(CacheClosedError):
            await fetch(2)

    asyncio.run(main())


def test_str_keys_do_not_depend_on_the_unicode_database() -> None:
    """A str argument is written with every non-ASCII character escaped. repr() prints what
    the running Python's Unicode database calls printable and escapes the rest, and that
    changes between versions (U+1FAE8 is printed by 3.12, escaped by 3.11): processes of two
    Python versions (a rolling upgrade) would cache and invalidate one call under two keys."""
    key = call_key(lookup, ("\xe9\U0001fae8\n'\\",), {})
    assert key.isascii()
    assert key.startswith("tests.test_decorator.lookup(pid='\\xe9\\U0001fae8\\n\\'\\\\', ")
    assert call_key(lookup, ("a'",), {}) != call_key(lookup, ("a\\'",), {})


def test_a_method_is_cached_with_a_key_function(cache: NearCache) -> None:
    """A decorated method binds like a function (obj.method(...) passes obj), and key=
    leaves self out of the key, as docs/decorator.md says to do."""

    class Shop:
        def __init__(self) -> None:
            self.loads = 0

        @cache.cached(region="shop", key=lambda self, pid: f"product:{pid}")
        def product(self, pid: int) -> dict[str, int]:
            self.loads += 1
            return {"pid": pid}

    shop = Shop()
    assert shop.product(1) == shop.product(1) == {"pid": 1}
    assert shop.loads == 1
    assert shop.product.cache_key(1) == "product:1"
    assert cache.get("product:1", region="shop") == {"pid": 1}
    shop.product.invalidate(1)
    assert shop.product(pid=1) == {"pid": 1}
    assert shop.loads == 2
    assert Shop.product.region == shop.product.region == "shop"

    async def main() -> None:
        async with AsyncNearCache() as acache:

            class AsyncShop:
                @acache.cached(key=lambda self, pid: pid)
                async def product(self, pid: int) -> int:
                    return pid * 2

            ashop = AsyncShop()
            assert await ashop.product(2) == 4
            await ashop.product.invalidate(2)
            assert await acache.get(2, region=AsyncShop.product.region) is None

    asyncio.run(main())
