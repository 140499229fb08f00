"""``nearcache.django``: the backend's sharing, copies, options, timeouts and model
invalidation, in this process on a real Redis (two processes: test_frameworks.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("django", reason="the django extra is not installed")

from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

from nearcache import CacheState, NearCache
from nearcache.django import NearCacheBackend, evict_on_change, model_key
from tests.servers import RedisServer, free_port, wait_until


@pytest.fixture(scope="module", autouse=True)
def django_site(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Django configured once for this process, on the shared Redis, with the shop table."""
    from django.conf import settings

    from tests.apps import django_site

    if not settings.configured:
        db = tmp_path_factory.mktemp("django") / "db.sqlite3"
        django_site.configure(redis_server.url, "django-inprocess", str(db))
        django_site.create_tables()
    yield


@pytest.fixture
def cache() -> Iterator[Any]:
    c = caches["default"]
    yield c
    c.clear()


def backend(location: str, **options: Any) -> NearCacheBackend:
    return NearCacheBackend(location, {"OPTIONS": options})


def test_aliases_and_threads_share_one_nearcache(cache: Any) -> None:
    """Every alias on one LOCATION + OPTIONS, on every thread, uses one NearCache."""
    other: list[Any] = []
    t = threading.Thread(target=lambda: other.append(caches["default"]))
    t.start()
    t.join()
    assert other[0] is not cache  # Django makes one backend instance per thread
    assert other[0].nearcache is cache.nearcache
    assert caches["other"].nearcache is cache.nearcache
    cache.set("k", 1)
    assert caches["other"].get("k") is None  # KEY_PREFIX still separates the aliases
    assert other[0].get("k") == 1


def test_close_after_a_request_leaves_the_cache_open(cache: Any) -> None:
    """Django calls close() after every request: the shared NearCache stays open."""
    cache.set("k", "v")
    cache.close()
    asyncio.run(cache.aclose())
    assert cache.nearcache.state is CacheState.OPEN
    assert cache.get("k") == "v"


def test_different_options_get_their_own_nearcache(redis_server: RedisServer) -> None:
    """Another channel (or any other option) is another NearCache."""
    a = backend(redis_server.url, channel="django-a")
    b = backend(redis_server.url, channel="django-b")
    assert a.nearcache is not b.nearcache
    assert backend(redis_server.url, channel="django-a").nearcache is a.nearcache


def test_values_are_copies_like_locmem(cache: Any) -> None:
    """Neither the caller's object nor a returned one is shared with the cache."""
    value = {"items": [1, 2]}
    cache.set("k", value)
    value["items"].append(3)
    got = cache.get("k")
    assert got == {"items": [1, 2]}
    got["items"].append(4)
    assert cache.get("k") == {"items": [1, 2]}
    assert cache.get_many(["k"])["k"] is not cache.get_many(["k"])["k"]


def test_incr_keeps_the_remaining_timeout(cache: Any) -> None:
    """incr does not reset the key's timeout: the key still expires on time."""
    # Long enough that incr surely runs before it expires on a loaded machine (at 0.3 s a
    # pause there made incr find no key); a reset timeout (Django's default 300 s) would
    # still outlive the wait.
    cache.set("n", 1, 2.0)
    assert cache.incr("n") == 2
    wait_until(lambda: not cache.has_key("n"), 10.0, message="n expired")


def test_a_write_through_one_instance_evicts_the_other(redis_server: RedisServer) -> None:
    """Two NearCaches (different options: separate instances) on one channel stay in sync;
    touch is local."""
    a = backend(redis_server.url, channel="django-pair", max_entries=1000)
    b = backend(redis_server.url, channel="django-pair", max_entries=2000)
    for c in (a, b):
        wait_until(lambda c=c: c.nearcache.stats().backplane == "connected", 5.0)
    b.set("k", "old")
    a.set("k", "new")
    a.nearcache.flush()
    wait_until(lambda: not b.has_key("k"), 10.0, message="b dropped k")
    b.set("t", 1)
    b.nearcache.flush()
    wait_until(lambda: a.nearcache.stats().invalidations_received >= 2, 10.0)
    sent = b.nearcache.stats().invalidations_sent
    assert b.touch("t", 60) is True
    b.nearcache.flush()
    assert b.nearcache.stats().invalidations_sent == sent


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"chanel": "x"}, r"unknown option OPTIONS\['chanel'\]"),
        ({"MAX_ENTRIES": 10}, r"OPTIONS\['MAX_ENTRIES'\] \(did you mean 'max_entries'\?\)"),
        ({"CULL_FREQUENCY": 3}, r"OPTIONS\['CULL_FREQUENCY'\].*no culling"),
        ({"ttl": 5}, r"OPTIONS\['ttl'\] is not allowed: the alias's TIMEOUT"),
        ({"max_entries": "many"}, r"OPTIONS\['max_entries'\]: max_entries must be a positive"),
        ({"max_staleness": -1}, r"OPTIONS\['max_staleness'\]"),
        ({"channel": 5}, r"OPTIONS\['channel'\] must be a non-empty str"),
        ({"abort_connect": "yes"}, r"OPTIONS\['abort_connect'\] must be True, False or None"),
        ({"secret": {"": b"x"}}, r"OPTIONS\['secret'\]"),
        ({"secret": 5}, r"OPTIONS\['secret'\]: secret must be"),
        # Django values travel as pickles: only signed ones are loaded.
        ({"l2": True}, r"OPTIONS\['l2'\] = True needs OPTIONS\['secret'\]"),
        ({"propagate": "update"}, r"OPTIONS\['propagate'\] = 'update' needs OPTIONS\['secret'\]"),
        ({"serializer": None}, r"OPTIONS\['serializer'\] is not allowed: .*pickled values"),
    ],
)
def test_bad_options_are_improperly_configured(
    redis_server: RedisServer, options: dict[str, Any], message: str
) -> None:
    """A wrong OPTIONS key, type or value names the option."""
    with pytest.raises(ImproperlyConfigured, match=message):
        backend(redis_server.url, **options)


def test_bad_location_is_improperly_configured_without_the_password() -> None:
    """A broken LOCATION says so and never shows the password."""
    with pytest.raises(ImproperlyConfigured, match="LOCATION") as info:
        backend("127.0.0.1:6379,password=hunter2,ssl=maybe")
    assert "hunter2" not in str(info.value)
    with pytest.raises(ImproperlyConfigured, match="one connection string"):
        NearCacheBackend(["a:1", "b:2"], {})


def test_unreachable_redis_with_abort_connect_is_improperly_configured() -> None:
    """abortConnect=true and no Redis: a clear error naming the option, no password."""
    location = f"127.0.0.1:{free_port()},password=hunter2,abortConnect=true,connectTimeout=300"
    with pytest.raises(ImproperlyConfigured, match=r"abort_connect.*abortConnect") as info:
        backend(location)
    assert "hunter2" not in str(info.value)


def test_local_location_is_a_plain_local_cache() -> None:
    """An empty LOCATION: a local cache with no Redis, still shared per process."""
    a = backend("")
    assert a.nearcache.backplane_state is None
    assert backend("").nearcache is a.nearcache
    a.set("k", [1])
    assert a.get("k") == [1]


def test_nearcache_is_reachable_for_decorators_and_regions(cache: Any) -> None:
    """The backend's NearCache caches decorated functions beside Django's entries."""
    nc: NearCache = cache.nearcache

    @nc.cached(region="catalog")
    def catalog() -> list[str]:
        return ["a"]

    assert catalog() == ["a"]
    cache.set("k", 1)
    nc.clear_region("catalog")
    assert cache.get("k") == 1


def test_async_methods_run_inline(cache: Any) -> None:
    """The async API works from an event loop without a thread hop."""

    async def main() -> None:
        await cache.aset("k", {"a": 1})
        assert await cache.aget("k") == {"a": 1}
        assert await cache.aadd("k", 2) is False
        assert await cache.ahas_key("k") is True
        assert await cache.atouch("k", 10) is True
        await cache.aset_many({"x": 1, "y": 2})
        assert await cache.aget_many(["x", "y", "z"]) == {"x": 1, "y": 2}
        assert await cache.aincr("x") == 2
        await cache.adelete_many(["x", "y"])
        assert await cache.adelete("k") is True
        assert await cache.aget_or_set("g", lambda: 7) == 7
        await cache.aclear()
        assert await cache.aget("g") is None

    asyncio.run(main())


@pytest.fixture
def products() -> Iterator[Any]:
    from tests.apps.shop.models import Product

    yield Product
    Product.objects.all().delete()


def test_model_save_and_delete_evict_the_instance(cache: Any, products: Any) -> None:
    """evict_on_change drops model_key(instance) on save and on delete."""
    disconnect = evict_on_change(products)
    try:
        p = products.objects.create(name="lamp", price=10)
        key = model_key(p)
        assert key == f"shop.product:{p.pk}" == model_key(products, p.pk)
        cache.set(key, p.as_dict())
        p.price = 12
        p.save()
        assert cache.get(key) is None
        cache.set(key, p.as_dict())
        p.delete()
        assert cache.get(key) is None
    finally:
        disconnect()
    p = products.objects.create(name="desk", price=1)
    cache.set(model_key(p), "kept")
    p.save()
    assert cache.get(model_key(p)) == "kept"  # disconnected


def test_model_change_in_a_transaction_evicts_again_at_commit(cache: Any, products: Any) -> None:
    """A value cached between the save and the commit (the old row) is evicted at commit."""
    disconnect = evict_on_change(products, keys=lambda p: [f"by-name:{p.name}"])
    try:
        p = products.objects.create(name="chair", price=5)
        with transaction.atomic():
            cache.set("by-name:chair", "before")
            p.price = 6
            p.save()
            assert cache.get("by-name:chair") is None
            cache.set("by-name:chair", "old row read by another process")
        assert cache.get("by-name:chair") is None
    finally:
        disconnect()


def test_model_change_clears_regions(cache: Any, products: Any) -> None:
    """regions= clears the NearCache regions of functions that read the model."""
    nc: NearCache = cache.nearcache
    loads: list[int] = []

    @nc.cached(region="catalog-page")
    def page(n: int) -> list[str]:
        loads.append(n)
        return [p.name for p in products.objects.all()]

    disconnect = evict_on_change(products, regions=["catalog-page"])
    try:
        assert page(1) == []
        products.objects.create(name="sofa", price=100)
        assert page(1) == ["sofa"]
        assert loads == [1, 1]
    finally:
        disconnect()


def test_evict_on_change_needs_a_nearcache_alias(products: Any) -> None:
    """Pointing the helper at an alias of another backend is a clear error."""
    from django.test import override_settings

    disconnect = evict_on_change(products, alias="locmem")
    try:
        with (
            override_settings(
                CACHES={
                    "default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
                    "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
                }
            ),
            pytest.raises(ImproperlyConfigured, match=r"CACHES\['locmem'\] is not a nearcache"),
        ):
            products.objects.create(name="x", price=1)
    finally:
        disconnect()


def test_close_caches_closes_the_shared_cache_for_good() -> None:
    """close_caches() delivers and closes; a backend still holding it refuses use, and a new
    backend instance opens a new cache."""
    from nearcache import CacheClosedError
    from nearcache.django import close_caches

    cache = caches["default"]
    old = cache.nearcache
    cache.set("k", 1)
    close_caches()
    assert old.state is CacheState.CLOSED
    with pytest.raises(CacheClosedError):
        cache.get("k")
    del caches["default"]  # Django's own way to drop this thread's backend instance
    fresh = caches["default"]
    assert fresh.nearcache is not old
    fresh.set("k", 2)
    assert fresh.get("k") == 2
    fresh.clear()


# -- with the shared L2 (values pickled, signed with the secret) ------------------------

LOADED: list[str] = []  # set if a planted pickle is ever loaded


class Planted:
    """Records that it was unpickled: the test fails if that ever happens."""

    def __reduce__(self) -> Any:
        return (LOADED.append, ("code ran",))


def shared_pair(redis_server: RedisServer, channel: str, **options: Any) -> tuple[Any, Any]:
    """Two NearCaches (other max_entries: separate instances, as in two processes) on one
    channel with the L2."""
    common = {"channel": channel, "l2": True, "secret": "s3cret", **options}
    a = backend(redis_server.url, max_entries=1000, **common)
    b = backend(redis_server.url, max_entries=2000, **common)
    for c in (a, b):
        wait_until(lambda c=c: c.nearcache.stats().backplane == "connected", 5.0)
    a.nearcache.remove("__prime__")  # a log position to share values from (a new channel)
    a.nearcache.flush()
    wait_until(lambda: a.nearcache._backplane.log_position() is not None, 5.0)
    return a, b


@pytest.mark.parametrize("propagate", ["invalidate", "update"])
def test_values_set_in_one_instance_are_read_from_l2_in_another(
    redis_server: RedisServer, channel: str, propagate: str
) -> None:
    """B never set the keys: get, get_many, has_key, add and incr find A's values in L2
    (copies, with A's expiry), and B's own writes reach A."""
    from django.http import HttpResponse

    a, b = shared_pair(redis_server, channel, propagate=propagate)
    page = HttpResponse(b"<p>cached</p>", headers={"X-Served": "a"})
    a.set("page", page)
    a.set("n", 1, 30)
    a.set("short", "v", 2.0)  # outlives B's reads below on a loaded machine (0.5 s did not)
    a.nearcache.flush()
    got = b.get("page")
    assert (got.content, got["X-Served"]) == (b"<p>cached</p>", "a")
    assert b.get("page") is not b.get("page")  # copies
    if propagate == "invalidate":  # from L2
        assert b.nearcache.stats().l2_hits >= 1
    else:  # A's messages carry the values (they may land just after B's first read)
        wait_until(lambda: b.nearcache.stats().updates_received >= 1, 10.0)
    assert b.get_many(["n", "missing"]) == {"n": 1}
    assert b.has_key("short") and not b.add("n", 5)
    assert b.incr("n") == 2  # from A's value; A's expiry (30 s) kept
    b.nearcache.flush()
    wait_until(lambda: a.get("n") == 2, 10.0)
    held = b.nearcache.get(b.make_key("n"))
    assert held is not None and 25 < held.expires - time.monotonic() <= 30
    wait_until(lambda: b.get("short") is None, 10.0)  # A's timeout applies in B too
    assert b.get("missing", "default") == "default"
    a.nearcache.set("direct", {"through": "the NearCache"})  # not a Django value: pickled
    a.nearcache.flush()
    assert b.nearcache.get_or_set("direct", lambda: "db") == {"through": "the NearCache"}


def test_a_planted_pickle_in_l2_is_never_loaded(redis_server: RedisServer, channel: str) -> None:
    """Whoever can write to Redis cannot run code in the app: an unsigned record (or one
    signed with another secret) under a key's L2 name is a counted miss, never unpickled."""
    import pickle

    import redis

    from nearcache._core import l2
    from nearcache._core.codec import channel_name

    a, b = shared_pair(redis_server, channel)
    a.set("k", "real")
    a.nearcache.flush()
    name = l2.value_keys(channel_name(channel), None, b.make_key("k"))[0]
    admin = redis.Redis(port=redis_server.port)
    record = admin.get(name)
    assert record is not None
    tags = record[: 2 + record[0] + record[1 + record[0]]]
    evil = b"P" + pickle.dumps(Planted())
    for signing in (None, ("other", b"another secret")):
        payload = l2.encode_payload(3, None, b.make_key("k"), evil, signing)
        admin.set(name, tags + payload)
        assert b.get("k") is None
    admin.close()
    assert LOADED == [] and b.nearcache.stats().l2_corrupt == 2


@pytest.mark.parametrize("lookup", ["get", "has_key", "delete"])
def test_a_lookup_never_waits_for_nor_raises_another_callers_load(
    redis_server: RedisServer, channel: str, lookup: str
) -> None:
    """With the L2, a lookup on an L1 miss (get, has_key, delete ...) while another thread's
    get_or_set of the key is loading finds nothing at once (as without the L2): it does not
    wait for that load, nor raise its error when the default fails, and delete still makes
    every instance drop the key."""
    _, b = shared_pair(redis_server, channel)
    entered, release = threading.Event(), threading.Event()

    def failing() -> Any:
        entered.set()
        release.wait(10)
        raise RuntimeError("the database is down")

    def load() -> None:
        with pytest.raises(RuntimeError, match="database is down"):
            b.get_or_set("k", failing)

    loader = threading.Thread(target=load)
    loader.start()
    assert entered.wait(5)
    sent = b.nearcache.stats().invalidations_sent
    try:
        assert getattr(b, lookup)("k") == (None if lookup == "get" else False)
    finally:
        release.set()
        loader.join(5)
    b.nearcache.flush()
    assert b.nearcache.stats().invalidations_sent == sent + (lookup == "delete")


def test_a_default_using_add_while_incr_of_its_key_waits_does_not_deadlock(
    redis_server: RedisServer, channel: str
) -> None:
    """With the L2: thread A's get_or_set("k") runs a default that calls add() (which takes
    the backend's lock); thread B's incr("k") holds that lock and looks "k" up meanwhile. The
    lookup does not wait for A's load (it would wait for good: A waits for B's lock), so
    incr finds nothing and both threads finish."""
    _, b = shared_pair(redis_server, channel)
    entered, proceed = threading.Event(), threading.Event()

    def default() -> int:
        entered.set()
        proceed.wait(10)
        b.add("other", 1)
        return 5

    loaded: list[Any] = []
    loader = threading.Thread(target=lambda: loaded.append(b.get_or_set("k", default)), daemon=True)
    loader.start()
    assert entered.wait(5)
    incremented: list[Any] = []

    def incr() -> None:
        try:
            incremented.append(b.incr("k"))
        except ValueError as exc:
            incremented.append(exc)

    incrementer = threading.Thread(target=incr, daemon=True)
    incrementer.start()
    flights = b.nearcache._core.flights
    key = b.make_key("k")
    wait_until(
        lambda: (
            not incrementer.is_alive()
            or getattr(flights.joinable(key, None), "wake", None) is not None
        ),
        5.0,
    )
    proceed.set()  # A's add() now needs the lock
    loader.join(5)
    incrementer.join(5)
    assert not loader.is_alive() and not incrementer.is_alive(), "deadlocked"
    assert loaded == [5] and isinstance(incremented[0], ValueError)
