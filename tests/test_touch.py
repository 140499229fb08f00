"""``touch``: a new time to live for one entry, here only, that never makes it fresher."""

from __future__ import annotations

import asyncio
import math

import pytest

from nearcache import (
    MISSING,
    AsyncNearCache,
    CacheClosedError,
    MemoryBackplane,
    MemoryBroker,
    NearCache,
)
from nearcache._core.store import L1Store
from tests.clock import FakeClock


def make_store(clock: FakeClock, **kwargs: float) -> L1Store:
    return L1Store(clock=clock, max_staleness=kwargs.pop("max_staleness", math.inf), **kwargs)


def test_touch_extends_an_entry_past_its_first_ttl() -> None:
    """A touched entry lives ``ttl`` seconds from the touch, not from the set."""
    clock = FakeClock(100.0)
    store = make_store(clock)
    store.set("k", "v", ttl=1.0)
    clock.advance(0.5)
    assert store.touch("k", ttl=4.0) is True
    clock.advance(3.0)
    assert store.get("k") == "v"
    clock.advance(1.0)
    assert store.get("k", MISSING) is MISSING


def test_touch_can_shorten_an_entry() -> None:
    """touch with a shorter ttl makes the entry expire sooner."""
    clock = FakeClock(100.0)
    store = make_store(clock)
    store.set("k", "v", ttl=100.0)
    assert store.touch("k", ttl=1.0) is True
    clock.advance(1.0)
    assert store.get("k", MISSING) is MISSING


def test_touch_of_a_missing_or_expired_entry_is_false() -> None:
    """Nothing to touch: a key never set, or one that already expired."""
    clock = FakeClock(100.0)
    store = make_store(clock)
    assert store.touch("nope", ttl=1.0) is False
    store.set("k", "v", ttl=1.0)
    clock.advance(1.0)
    assert store.touch("k", ttl=10.0) is False
    assert store.get("k", MISSING) is MISSING


def test_touch_never_extends_past_max_age_from_when_the_value_was_current() -> None:
    """max_age is the backstop for a missed invalidation: touch cannot move it."""
    clock = FakeClock(100.0)
    store = make_store(clock, max_age=10.0)
    store.set("k", "v")
    clock.advance(8.0)
    assert store.touch("k", ttl=100.0) is True
    clock.advance(1.9)
    assert store.get("k") == "v"
    clock.advance(0.1)
    assert store.get("k", MISSING) is MISSING


def test_touch_does_not_make_an_entry_fresher_under_the_staleness_rule() -> None:
    """With the backplane silent, a touched entry ages out when the untouched one would."""
    clock = FakeClock(100.0)
    store = make_store(clock, max_staleness=2.0)
    store.set("k", "v")
    clock.advance(1.5)
    assert store.touch("k", ttl=60.0) is True
    clock.advance(0.6)  # 2.1 s after the set: past the 2 s bound
    assert store.get("k", MISSING) is MISSING


def test_touch_none_uses_the_default_ttl_and_keeps_sliding() -> None:
    """ttl=None means the store's default ttl; a sliding window still applies."""
    clock = FakeClock(100.0)
    store = make_store(clock, ttl=5.0)
    store.set("k", "v", sliding=1.0, ttl=1.5)
    assert store.touch("k") is True
    clock.advance(0.9)
    assert store.get("k") == "v"  # slides to now + 1
    clock.advance(0.9)
    assert store.get("k") == "v"
    clock.advance(1.0)
    assert store.get("k", MISSING) is MISSING


def test_near_cache_touch_is_local_and_refuses_bad_input() -> None:
    """NearCache.touch changes this instance only; bad ttl and closed caches raise."""
    broker = MemoryBroker()
    a = NearCache(backplane=MemoryBackplane(broker, "t"))
    b = NearCache(backplane=MemoryBackplane(broker, "t"))
    try:
        a.set("k", 1, ttl=30)
        assert a.touch("k", ttl=60) is True
        assert b.touch("k", ttl=60) is False
        a.flush()
        assert a.stats().invalidations_sent == 1
        with pytest.raises(ValueError, match="ttl must be a positive number"):
            a.touch("k", ttl=0)
        with pytest.raises(TypeError):
            a.touch(1.5)  # type: ignore[arg-type]
    finally:
        a.close()
        b.close()
    with pytest.raises(CacheClosedError):
        a.touch("k")


def test_async_near_cache_touch() -> None:
    """AsyncNearCache.touch is the same, as a coroutine."""

    async def main() -> None:
        cache = AsyncNearCache()
        await cache.set("k", 1, ttl=1)
        assert await cache.touch("k", ttl=60) is True
        assert await cache.touch("other") is False
        with pytest.raises(ValueError, match="ttl"):
            await cache.touch("k", ttl=-1)
        await cache.aclose()
        with pytest.raises(CacheClosedError):
            await cache.touch("k")

    asyncio.run(main())
