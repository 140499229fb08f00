"""Every operation propagates between separate processes, for both drivers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.instances import Instance
from tests.servers import RedisServer, wait_until

Spawn = Callable[..., Instance]


@pytest.fixture
def spawn(redis_server: RedisServer, channel: str) -> Iterator[Spawn]:
    started: list[Instance] = []

    def factory(driver: str = "sync", name: str = "instance", **kw: object) -> Instance:
        inst = Instance(
            str(kw.pop("connection", redis_server.url)), channel, driver=driver, name=name, **kw
        )  # type: ignore[arg-type]
        started.append(inst)
        inst.wait_state("connected")
        return inst

    yield factory
    for inst in started:
        inst.close()


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_every_operation_reaches_every_other_process(spawn: Spawn, driver: str) -> None:
    """set, remove, clear_region and clear on one process evict on two others."""
    a, b, c = (spawn(driver, name) for name in "ABC")
    for inst in (a, b, c):
        inst.call("get_or_set", key="42", region="products", value="v1")
        inst.call("get_or_set", key="7", region="prices", value="p7")
        inst.call("get_or_set", key="8", region="prices", value="p8")
        inst.call("get_or_set", key="x", value="in default region")

    a.call("set", key="42", region="products", value="v2")
    a.call("flush")
    for other in (b, c):
        assert other.call("wait_gone", key="42", region="products") is not None
        assert other.call("get", key="7", region="prices") == {"value": "p7"}
    assert a.call("get", key="42", region="products") == {"value": "v2"}  # its own write stays

    b.call("get_or_set", key="42", region="products", value="v2")
    a.call("remove", key="42", region="products")
    a.call("flush")
    assert b.call("wait_gone", key="42", region="products") is not None
    assert c.call("get", key="42", region="products") == {"missing": True}

    c.call("clear_region", region="prices")
    c.call("flush")
    for other in (a, b):
        assert other.call("wait_gone", key="7", region="prices") is not None
        assert other.call("get", key="8", region="prices") == {"missing": True}
        assert other.call("get", key="x") == {"value": "in default region"}

    b.call("clear")
    b.call("flush")
    for other in (a, c):
        assert other.call("wait_gone", key="x") is not None
    for inst in (a, b, c):
        stats = inst.call("stats")
        assert stats["malformed_messages"] == 0
        assert stats["sequence_gaps"] == 0


def test_sync_and_async_instances_interoperate(spawn: Spawn) -> None:
    """A threaded and an asyncio instance speak the same protocol both ways."""
    s, a = spawn("sync", "sync"), spawn("async", "async")
    for inst in (s, a):
        inst.call("get_or_set", key=1, value="one")
    s.call("remove", key=1)
    s.call("flush")
    assert a.call("wait_gone", key=1) is not None
    s.call("get_or_set", key=1, value="one")
    a.call("remove", key=1)
    a.call("flush")
    assert s.call("wait_gone", key=1) is not None


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_own_messages_are_ignored(spawn: Spawn, driver: str) -> None:
    """An instance keeps the value it just wrote: Redis echoes its message but it is skipped."""
    a, b = spawn(driver, "A"), spawn(driver, "B")
    a.call("set", key="k", value="mine")
    a.call("flush")
    wait_until(lambda: a.call("stats")["own_messages"] >= 1)
    wait_until(lambda: b.call("stats")["messages_received"] >= 1)
    assert a.call("get", key="k") == {"value": "mine"}
    assert a.call("stats")["messages_received"] == 0


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_a_burst_is_batched_and_nothing_is_lost(spawn: Spawn, driver: str) -> None:
    """10,000 removes travel in far fewer messages, and every receiver counts all of them."""
    a, b, c = (spawn(driver, name) for name in "ABC")
    a.call("burst", prefix="key-", count=10_000)
    sent = a.call("stats")
    assert sent["invalidations_sent"] == 10_000
    assert sent["messages_sent"] <= 10_000 // 50
    for other in (b, c):
        wait_until(lambda o=other: o.call("stats")["invalidations_received"] == 10_000, 20)
