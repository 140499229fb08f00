"""Regressions found in review: each test failed on the code it was written against."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

from nearcache._core import store as _store
from nearcache._core.cache import CacheCore, CacheOptions
from nearcache._core.codec import Invalidation, Kind
from tests.servers import RedisServer, wait_until

needs_c = pytest.mark.skipif(not _store.ACCELERATED, reason="the C accelerator is not in use")


def _run_isolated(script: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter (a crash must not take pytest down)."""
    env = {k: v for k, v in os.environ.items() if k != "NEARCACHE_PURE_PYTHON"}
    env["PYTHONMALLOC"] = "debug"  # freed memory is poisoned: a use-after-free fails every time
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


# -- _speedups.c: reader_lookup uses borrowed bucket references across Python code -------------


@needs_c
@pytest.mark.parametrize("region", [None, "r"])
def test_c_reader_survives_the_buckets_being_replaced_during_a_lookup(region: str | None) -> None:
    """reader_lookup keeps *borrowed* references to the bucket (default_bucket, or the dict
    found in ``regions``) while PyDict_GetItemWithError hashes/compares the key, which may run
    Python code (a str-subclass key passes check_key) and so switch threads. A clear() or
    clear_region() on another thread then frees the bucket under the lookup: use-after-free.
    The Python reader holds strong references and returns the value being invalidated (the
    documented outcome of a read overlapping an invalidation)."""
    result = _run_isolated(
        f"""
        from nearcache import NearCache
        from nearcache._core import store as _store
        assert _store.ACCELERATED
        cache = NearCache()
        region = {region!r}

        class Key(str):
            armed = False

            def __hash__(self):
                if Key.armed:
                    Key.armed = False
                    # What a writer thread may do while this frame runs without the lock.
                    if region is None:
                        cache.clear()
                    else:
                        cache.clear_region(region)
                return str.__hash__(self)

            def __eq__(self, other):
                return str.__eq__(self, other)

        for i in range(50):
            cache.set(f"k{{i}}", i, region=region)
        key = Key("k1")
        cache.set(key, "v", region=region)
        Key.armed = True
        print(repr(cache.get(key, "miss", region)))
        """
    )
    assert result.returncode == 0, f"interpreter died (rc {result.returncode}): {result.stderr}"
    assert result.stdout.strip() in ("'v'", "'miss'")


# -- _speedups.c: the reused ``spare`` awaitable is handed out while its old result is freed -----


@needs_c
def test_async_get_returns_its_own_value_when_a_finalizer_reads_the_cache() -> None:
    """Reader_aget reuses ``spare`` when its refcount is 1 and does
    ``Py_XSETREF(spare->result, value)`` *before* taking its own reference to ``spare``. If
    dropping the previous result runs Python code (a ``__del__`` or weakref callback) that
    reads the cache with ``get`` again, the nested call sees refcount 1 too, reuses the same
    object and overwrites ``result``: the outer ``await cache.get("c")`` returns the nested
    call's value."""
    result = _run_isolated(
        """
        import asyncio
        from nearcache import AsyncNearCache
        from nearcache._core import store as _store
        assert _store.ACCELERATED

        async def main():
            cache = AsyncNearCache()
            nested = []

            class Value:
                def __del__(self):
                    nested.append(cache.get("b"))  # e.g. a finalizer that logs a lookup

            await cache.set("a", Value())
            assert await cache.get("a") is not None  # the spare awaitable holds the Value
            await cache.clear()  # ...and now the only reference to it
            await cache.set("b", "B")
            await cache.set("c", "C")
            print(repr(await cache.get("c")))

        asyncio.run(main())
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "'C'"


# -- _speedups.c: argument parsing accepts a parameter twice -----------------------------------


@needs_c
@pytest.mark.parametrize(
    ("args", "kwargs"),
    [(("a",), {"key": "b"}), (("b", None, None), {"region": "r"}), (("a", 0), {"default": 5})],
)
def test_c_reader_refuses_an_argument_given_twice(args: tuple, kwargs: dict) -> None:
    """parse_get_args lets a keyword silently override a positional argument:
    ``cache.get("a", key="b")`` looks up "b". The Python reader (and any Python function)
    raises TypeError: the two readers disagree."""
    from nearcache import NearCache

    cache = NearCache()
    cache.set("a", 1)
    cache.set("b", 2, region="r")
    with pytest.raises(TypeError):
        cache.get(*args, **kwargs)
    with pytest.raises(TypeError):
        cache._store._reader.get(*args, **kwargs)


# -- _core.encode_batch: the clear substituted for an unencodable batch leaves a sequence gap --


def test_a_batch_replaced_by_a_clear_leaves_no_sequence_gap() -> None:
    """take_ops reserves one sequence number per 256-op chunk; when encoding fails,
    encode_batch sends ONE clear under the first of them, so the next batch starts
    ``len(chunks) - 1`` numbers later and every receiver sees a sequence gap (counted, and L1
    dropped a second time). docs/guarantees.md: "with the batch's sequence number, so no gap"."""
    clock = time.monotonic
    sender = CacheCore(CacheOptions(), clock=clock, instance_id=b"A" * 16, networked=True)
    receiver = CacheCore(CacheOptions(), clock=clock, instance_id=b"B" * 16, networked=True)
    # check_key keeps this out of the public API; the core must still stay consistent.
    sender.local(Invalidation(Kind.KEY, None, "\ud800"))
    for i in range(300):  # two chunks of at most 256 operations
        sender.local(Invalidation(Kind.KEY, None, f"k{i}"))
    first = sender.take_batch()
    assert sender.last_error and "clear" in sender.last_error
    for payload in first:
        assert receiver.receive(payload)
    sender.batch_sent(first)

    sender.local(Invalidation(Kind.KEY, None, "x"))
    receiver.store.set("kept", 1)
    for payload in sender.take_batch():
        assert receiver.receive(payload)
    assert receiver.stats.sequence_gaps == 0
    assert receiver.store.peek("kept") == 1


# -- issue 8, defect 5: keys were validated only on a miss -------------------------------------


class _LooksLike:
    """An object of a type nearcache refuses that equals (and hashes like) a valid key."""

    def __init__(self, twin: object) -> None:
        self.twin = twin

    def __eq__(self, other: object) -> bool:
        return other == self.twin

    def __hash__(self) -> int:
        return hash(self.twin)


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize(
    ("bad_key", "bad_region", "key", "region"),
    [
        (1.0, None, 1, None),
        (_LooksLike(1), None, 1, None),
        (memoryview(b"k"), None, b"k", None),
        ("k", _LooksLike("r"), "k", "r"),
    ],
    ids=["float", "int-look-alike", "memoryview", "region-look-alike"],
)
def test_get_or_set_refuses_a_bad_key_on_a_hit_as_on_a_miss(
    kind: str, bad_key: object, bad_region: object, key: object, region: str | None
) -> None:
    """get_or_set(1.0, f) returned the value cached under 1 while 1 was cached and raised
    TypeError once it was gone: the answer must not depend on what happens to be cached."""
    import asyncio

    from nearcache import AsyncNearCache, NearCache

    cache: Any = NearCache() if kind == "sync" else AsyncNearCache()

    def run(result: object) -> object:
        return asyncio.run(result) if asyncio.iscoroutine(result) else result  # type: ignore[arg-type]

    with pytest.raises(TypeError):
        run(cache.get_or_set(bad_key, lambda: "loaded", region=bad_region))  # a miss
    run(cache.set(key, "cached", region=region))
    with pytest.raises(TypeError):
        run(cache.get_or_set(bad_key, lambda: "loaded", region=bad_region))  # a hit
    assert run(cache.get_or_set(key, lambda: "loaded", region=region)) == "cached"


# -- issue 8, defect 3: close() from an on_invalidation callback --------------------------------


def test_close_from_an_on_invalidation_callback_neither_waits_nor_blocks_the_cache(
    redis_server: RedisServer, channel: str
) -> None:
    """The callback ran on the listener thread holding the cache's lock, so close() joined the
    sender thread (which needs that lock to see the close) for its full 5 s timeout while every
    other call on the instance waited. Now close() returns at once, other threads are not
    held up meanwhile, and every thread of the closed instance ends."""
    from nearcache import NearCache

    closed = threading.Event()
    stats_seen = threading.Event()
    with NearCache(redis_server.url, channel=channel, abort_connect=True) as writer:
        reader = NearCache(redis_server.url, channel=channel, abort_connect=True)
        threads = {reader._sender, reader._backplane._thread}  # type: ignore[union-attr]

        def on_invalidation(op: Invalidation) -> None:
            # While close() runs on this thread, another thread must still get through.
            probe = threading.Thread(target=lambda: (reader.stats(), stats_seen.set()))
            probe.start()
            reader.close()
            closed.set()

        reader.on_invalidation(on_invalidation)
        writer.set("k", 1)
        writer.flush()
        assert stats_seen.wait(4.0), "stats() was blocked while close() ran in a callback"
        assert closed.wait(4.0), "close() from a callback waited for a join timeout"
        wait_until(lambda: not any(t is not None and t.is_alive() for t in threads))
        assert reader.state.value == "closed"


# -- issue 8, defect 4: the per-sender sequence table only grew --------------------------------


def test_departed_senders_are_forgotten() -> None:
    """One entry per sender ever heard from, cleared only by a repair: a fleet that recycles
    its workers leaked about 100 B per worker in every instance. Senders silent for
    SENDER_MEMORY seconds of confirmed time are now forgotten (and the live ones kept)."""
    from nearcache._core.codec import encode
    from tests.clock import FakeClock

    sender_memory = 600.0  # SENDER_MEMORY

    clock = FakeClock(100.0)
    core = CacheCore(CacheOptions(), clock=clock, instance_id=b"R" * 16, networked=True)
    core.subscribed(clock(), complete=False)
    for worker in range(1000):
        core.receive(encode(worker.to_bytes(16, "big"), 1, [Invalidation(Kind.CLEAR)]))
    live = b"L" * 16
    for sequence in range(1, 40):
        clock.advance(sender_memory / 30)
        core.receive(encode(live, sequence, []))
        core.confirmed(clock())
    assert len(core._senders) == 1
    assert core.stats.sequence_gaps == 0
