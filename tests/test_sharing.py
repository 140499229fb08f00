"""Unit tests of the I/O-free side of sharing values: the outbox carrying values, the
publish plans, received values, and the read path's steps (driven here step by step)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from nearcache import SafeSerializer, SerializationError
from nearcache._core import l2
from nearcache._core.cache import CacheCore, CacheOptions
from nearcache._core.codec import Invalidation, Kind, Update, decode, encode
from nearcache._core.l2 import L2Options
from nearcache._core.outbox import Outbox
from nearcache._core.sharing import (
    Absent,
    Fill,
    Get,
    Load,
    Loaded,
    Read,
    Release,
    Sharing,
    Wait,
)
from nearcache._core.store import MISSING
from tests.clock import FakeClock

SENDER = bytes(16)
OTHER = bytes(range(16))


def update(key: str, data: bytes = b"v", region: str | None = "r") -> Update:
    op = Update(region, key, data)
    op.since = (b"e", "5-0")
    return op


def sharing(clock: FakeClock | None = None, **options: Any) -> Sharing:
    opts = L2Options(**{"l2": True, "propagate": "update", **options})
    return Sharing(opts, max_age=3600, default_ttl=None, secrets={}, clock=clock or FakeClock())


# -- the outbox ---------------------------------------------------------------------------


def test_a_repeated_key_is_sent_once_with_its_latest_operation() -> None:
    """set, set, remove of one key: one operation, at the first position, the remove."""
    box = Outbox()
    box.add(update("k", b"1"))
    box.add(Invalidation(Kind.REGION, "s"))
    box.add(update("k", b"2"))
    assert box.value_bytes == 1
    box.add(Invalidation(Kind.KEY, "r", "k"))
    assert box.value_bytes == 0
    taken = box.take(100)
    assert taken == [Invalidation(Kind.KEY, "r", "k"), Invalidation(Kind.REGION, "s")]
    assert type(taken[0]) is Invalidation


def test_a_later_value_replaces_a_waiting_invalidation() -> None:
    """remove then set: the set's value travels, at the remove's position."""
    box = Outbox()
    box.add(Invalidation(Kind.KEY, "r", "k"))
    box.add(update("k", b"new"))
    (op,) = box.take(100)
    assert isinstance(op, Update) and op.data == b"new"


def test_plain_bulk_keys_override_waiting_values() -> None:
    """remove_many after a set sends the plain invalidation, not the value."""
    box = Outbox()
    box.add(update("k", b"v"))
    box.add_keys([Invalidation(Kind.KEY, "r", "k"), Invalidation(Kind.KEY, "r", "j")])
    assert [type(op) for op in box.take(100)] == [Invalidation, Invalidation]
    assert box.value_bytes == 0


def test_values_past_the_byte_bound_travel_as_invalidations() -> None:
    """Waiting values are bounded in bytes; past the bound a set is a plain invalidation."""
    box = Outbox(max_value_bytes=10)
    box.add(update("a", b"x" * 6))
    box.add(update("b", b"x" * 6))
    assert box.values_dropped == 1 and box.value_bytes == 6
    box.add(update("a", b"x" * 9))  # replacing a's value stays within the bound
    assert box.value_bytes == 9
    ops = box.take(100)
    assert [type(op) for op in ops] == [Update, Invalidation]
    assert box.value_bytes == 0


def test_a_clear_drops_waiting_values() -> None:
    """A clear supersedes waiting values too; their bytes are released."""
    box = Outbox()
    box.add(update("a", b"xyz"))
    box.add(Invalidation(Kind.CLEAR))
    assert box.value_bytes == 0
    assert box.take(100) == [Invalidation(Kind.CLEAR)]


def test_holds_knows_waiting_and_in_flight_keys() -> None:
    """An own write counts as pending until its batch is committed."""
    box = Outbox()
    box.track_in_flight = True
    box.add(update("k"))
    assert box.holds("r", "k") and not box.holds(None, "k")
    box.take(100)
    assert box.holds("r", "k")
    box.commit()
    assert not box.holds("r", "k")


def test_holds_counts_own_clears_as_writes_of_their_keys() -> None:
    """A waiting or in-flight clear_region holds every key of its region, a clear every key;
    a partial take moves only what it took."""
    box = Outbox()
    box.track_in_flight = True
    box.add(Invalidation(Kind.REGION, "r"))
    box.add(Invalidation(Kind.KEY, "s", "j"))
    assert box.holds("r", "k") and not box.holds("s", "k") and not box.holds(None, "k")
    assert box.take(1) == [Invalidation(Kind.REGION, "r")]
    assert box.holds("r", "k")  # in flight
    box.commit()
    assert not box.holds("r", "k") and box.holds("s", "j")
    box.take(100)
    box.commit()
    box.add(Invalidation(Kind.CLEAR))
    assert box.holds("s", "k") and box.holds(None, "k")
    box.take(100)
    box.commit()
    assert not box.holds("s", "k")


# -- publish plans ------------------------------------------------------------------------


def test_plans_send_values_with_a_plain_fallback_and_l2_operations() -> None:
    """A message with a value has its invalidation form as fallback; L2 operations follow
    the operations in order; the batch's position is the oldest of its values."""
    s = sharing()
    old = update("a", b"1")
    old.since = (b"e", "3-1")
    chunks = [
        [old, Invalidation(Kind.KEY, "r", "b")],
        [Invalidation(Kind.REGION, "s"), Invalidation(Kind.CLEAR), update("c", b"2")],
    ]
    plans, since = s.plans(chunks, 7, SENDER)
    assert since == (b"e", "3-1")
    first, second = plans
    assert decode(first.message).operations[0] == old
    assert decode(first.fallback).operations == (
        Invalidation(Kind.KEY, "r", "a"),
        Invalidation(Kind.KEY, "r", "b"),
    )
    assert decode(first.fallback).sequence == decode(first.message).sequence == 7
    assert decode(second.message).sequence == 8
    assert [type(op).__name__ for op in first.operations] == ["StoreValue", "DeleteValue"]
    assert [type(op).__name__ for op in second.operations] == [
        "ClearRegion",
        "ClearAll",
        "StoreValue",
    ]
    assert s.stats.updates_sent == 2


def test_plans_without_values_have_no_fallback() -> None:
    """A message of plain invalidations is sent as is."""
    plans, since = sharing().plans([[Invalidation(Kind.KEY, "r", "b")]], 1, SENDER)
    assert plans[0].fallback == b"" and since is None


@pytest.mark.parametrize(
    ("options", "message_kind", "l2_op"),
    [
        ({"propagate": "invalidate"}, Kind.KEY, "StoreValue"),
        ({"l2": False}, Kind.UPDATE, "CheckValue"),
        ({"update_max_bytes": 2}, Kind.KEY, "StoreValue"),
        ({"l2_max_bytes": 2}, Kind.UPDATE, "DeleteValue"),
    ],
)
def test_what_a_value_becomes_depends_on_the_options(
    options: dict[str, Any], message_kind: Kind, l2_op: str
) -> None:
    """L2 only, updates only, and the size caps decide message form and L2 operation."""
    plans, _ = sharing(**options).plans([[update("k", b"abc")]], 1, SENDER)
    assert decode(plans[0].message).operations[0].kind is message_kind
    assert type(plans[0].operations[0]).__name__ == l2_op


def test_unknown_or_mixed_positions_give_none() -> None:
    """One value without a position, or positions in two epochs: check from nowhere."""
    a, b = update("a"), update("b")
    b.since = None
    assert sharing().plans([[a, b]], 1, SENDER)[1] is None
    b.since = (b"other", "1-0")
    assert sharing().plans([[a, b]], 1, SENDER)[1] is None


def test_operation_refuses_oversized_values() -> None:
    """A value larger than both caps is kept in L1 only: a plain invalidation, counted."""
    s = sharing(l2_max_bytes=4, update_max_bytes=2)
    assert isinstance(s.operation("k", None, b"abcd", None, None, None), Update)
    assert type(s.operation("k", None, b"abcde", None, None, None)) is Invalidation
    assert s.stats.l2_oversized == 1


def test_serialize_names_the_key_and_wraps_any_error() -> None:
    """A refused value, or a serializer raising anything, is a SerializationError with the key."""

    class Broken(SafeSerializer):
        def dumps(self, value: object) -> bytes:
            raise RuntimeError("boom")

    with pytest.raises(SerializationError, match="'k'"):
        sharing().serialize(object(), "k", None)
    with pytest.raises(SerializationError, match="RuntimeError: boom"):
        sharing(serializer=Broken()).serialize(1, "k", None)


# -- received values ----------------------------------------------------------------------


def core(clock: FakeClock, **options: Any) -> CacheCore:
    s = sharing(clock, **options)
    c = CacheCore(CacheOptions(), clock=clock, instance_id=SENDER, networked=True, sharing=s)
    c.confirmed(clock())
    return c


def message(sequence: int, *ops: Invalidation) -> bytes:
    return encode(OTHER, sequence, list(ops))


def test_a_received_value_replaces_the_copy_and_ages_with_confirmations() -> None:
    """The next message of a known sender installs its value, current as of the last
    confirmation: without further confirmations it ages out S after it."""
    clock = FakeClock()
    c = core(clock)
    data = SafeSerializer().dumps("new")
    c.store.set("k", "old", "r")
    c.receive(message(1, Invalidation(Kind.KEY, "r", "x")))
    c.receive(message(2, Update("r", "k", data)))
    assert c.store.get("k", MISSING, "r") == "new"
    assert c.sharing is not None and c.sharing.stats.updates_received == 1
    clock.advance(c.options.max_staleness + 0.01)
    assert c.store.get("k", MISSING, "r") is MISSING


@pytest.mark.parametrize("case", ["first", "replayed", "own pending", "serializer", "corrupt"])
def test_received_values_that_cannot_be_trusted_evict(case: str) -> None:
    """A first message of a sender, a repeated sequence, an own unacknowledged write, another
    serializer or bytes that fail to load: the key is dropped, never replaced."""
    clock = FakeClock()
    c = core(clock)
    c.store.set("k", "old", "r")
    data = SafeSerializer().dumps("new")
    if case != "first":
        c.receive(message(1, Invalidation(Kind.KEY, "r", "x")))
    op = Update("r", "k", data)
    sequence = 2
    if case == "replayed":
        c.receive(message(2, Invalidation(Kind.KEY, "r", "y")))
    elif case == "own pending":
        assert c.sharing is not None
        c.set("k", "mine", "r", None, None, data, None)
        sequence = 2
    elif case == "serializer":
        op = Update("r", "k", data, serializer=9)
    elif case == "corrupt":
        op = Update("r", "k", b"\x01garbage")
    c.receive(message(sequence, op))
    assert c.store.get("k", MISSING, "r") is MISSING
    assert c.sharing is not None
    rejected = case in ("serializer", "corrupt")
    assert c.sharing.stats.updates_rejected == int(rejected)


# -- the read path ------------------------------------------------------------------------


def drive(flow: Generator[Any, Any, Loaded], replies: list[Any]) -> tuple[list[Any], Loaded]:
    """Run the flow, answering each step with the next reply (an exception is thrown in)."""
    steps: list[Any] = []
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = flow.send(send) if error is None else flow.throw(error)
        except StopIteration as stop:
            return steps, stop.value
        steps.append(step)
        reply = replies.pop(0)
        send, error = (None, reply) if isinstance(reply, BaseException) else (reply, None)


def result(status: int, record: bytes = b"", pttl: float | None = None) -> l2.ReadResult:
    return l2.ReadResult(status, record, pttl, b"g", b"r")


def record(value: object, key: str = "k", region: str | None = "r") -> bytes:
    payload = l2.encode_payload(1, region, key, SafeSerializer().dumps(value))
    return b"\x01g\x01r" + payload


def test_an_l2_hit_needs_no_factory() -> None:
    """One read: the value and what it has left in L2."""
    s = sharing()
    steps, loaded = drive(s.load_flow("k", "r", "t"), [result(l2.VALUE, record(41), 9.5)])
    assert [type(x) for x in steps] == [Read]
    assert loaded == Loaded(41, 9.5)
    assert s.stats.l2_hits == 1 and s.stats.loads == 0


def test_a_leased_miss_loads_and_fills_with_the_read_generations() -> None:
    """With the lease: the factory, then the fill tagged with the generations read."""
    s = sharing()
    steps, loaded = drive(s.load_flow("k", "r", "t", ttl=30), [result(l2.LEASED), "db", True])
    assert [type(x) for x in steps] == [Read, Load, Fill]
    fill = steps[2]
    assert (fill.token, fill.ttl, fill.gen, fill.rgen) == ("t", 30, b"g", b"r")
    assert l2.decode_record(b"\x01g\x01r" + fill.payload, "r", "k", 1) == SafeSerializer().dumps(
        "db"
    )
    assert loaded.value == "db" and s.stats.l2_fills == 1


def test_a_failed_factory_gives_the_lease_up() -> None:
    """The factory's error propagates after the lease is released."""
    s = sharing()
    flow = s.load_flow("k", "r", "t")
    with pytest.raises(KeyError):
        drive(flow, [result(l2.LEASED), KeyError("db down"), None])


def test_a_held_lease_is_waited_for_then_the_value_is_used() -> None:
    """Without the lease: wait, read again, use the holder's fill."""
    clock = FakeClock()
    s = sharing(clock)
    steps, loaded = drive(
        s.load_flow("k", "r", "t"),
        [result(l2.LEASE_HELD), True, result(l2.LEASE_HELD), True, result(l2.VALUE, record(7))],
    )
    assert [type(x) for x in steps] == [Read, Wait, Read, Wait, Read]
    assert loaded.value == 7 and s.stats.l2_lease_waits == 1 and s.stats.loads == 0


def test_a_wait_that_runs_out_loads_without_the_lease() -> None:
    """The holder never fills: after l2_lease_wait the process loads itself, no fill."""
    clock = FakeClock()
    s = sharing(clock, l2_lease_wait=0.01)
    flow = s.load_flow("k", "r", "t")
    steps: list[Any] = [flow.send(None)]
    reply: Any = result(l2.LEASE_HELD)
    while True:
        step = flow.send(reply)
        steps.append(step)
        if type(step) is Wait:
            clock.advance(step.seconds)
            reply = True
        elif type(step) is Read:
            reply = result(l2.LEASE_HELD)
        else:
            break
    assert type(steps[-1]) is Load
    with pytest.raises(StopIteration) as stop:
        flow.send("db")
    assert stop.value.value == Loaded("db")


@pytest.mark.parametrize("reply", [None, result(l2.VALUE, b"junk")])
def test_l2_down_or_corrupt_goes_to_the_factory(reply: Any) -> None:
    """No L2 (down, skipped) or a value that does not decode: the factory, no fill."""
    s = sharing()
    steps, loaded = drive(s.load_flow("k", "r", "t"), [reply, "db"])
    assert [type(x) for x in steps] == [Read, Load]
    assert loaded.value == "db"
    assert s.stats.l2_corrupt == (0 if reply is None else 1)


def test_a_value_that_cannot_be_shared_is_not_filled() -> None:
    """A loaded value the serializer refuses, or too large, gives the lease up."""
    s = sharing(l2_max_bytes=3)
    for value, counter in ((object(), "l2_unserializable"), ("long", "l2_oversized")):
        steps, loaded = drive(s.load_flow("k", "r", "t"), [result(l2.LEASED), value, None])
        assert [type(x) for x in steps] == [Read, Load, Release]
        assert loaded.value is value and getattr(s.stats, counter) == 1


def test_a_closing_cache_stops_waiting() -> None:
    """A Wait answered False (closing) loads at once."""
    steps, _ = drive(sharing().load_flow("k", "r", "t"), [result(l2.LEASE_HELD), False, "db"])
    assert [type(x) for x in steps] == [Read, Wait, Load]


def test_received_value_store_time_is_minus_infinity() -> None:
    """(Documented) a received value is known current only as of a confirmation."""
    clock = FakeClock()
    c = core(clock)
    c.receive(message(1, Invalidation(Kind.KEY, None, "x")))
    c.receive(message(2, Update(None, "k", SafeSerializer().dumps(1))))
    assert c.store.get("k") == 1
    c.confirmed(clock() + 100)
    clock.advance(101)
    assert c.store.get("k") == 1  # confirmations keep it


def test_concurrent_writes_of_a_key_here_send_no_value() -> None:
    """A write whose change ran while another caller here wrote the same key (both waiting
    in the outbox) is sent as a plain invalidation: which value is newer is unknown."""
    box = Outbox()
    box.track_writes = True
    started = box.accepted
    box.add(update("k", b"other caller's"))
    late = update("k", b"mine")
    late.started = started
    box.add(late)
    (op,) = box.take(100)
    assert type(op) is Invalidation
    box.commit()
    sequential = update("j", b"1")
    box.add(sequential)
    after = update("j", b"2")
    after.started = box.accepted  # began after the first write was accepted
    box.add(after)
    (op,) = box.take(100)
    assert isinstance(op, Update) and op.data == b"2"


@pytest.mark.parametrize(
    "clear", [Invalidation(Kind.REGION, "r"), Invalidation(Kind.CLEAR)], ids=["region", "all"]
)
def test_a_write_whose_change_ran_across_a_clear_here_sends_no_value(clear: Invalidation) -> None:
    """Another caller here cleared the key's region (or everything) while the write's change
    ran, and the clear still waits: the two may have reached the source in either order, so
    the value goes as an invalidation. (It went as a value, right behind the clear in the same
    batch: the publish script only sees clears already logged, so every instance and L2 kept
    it even when the clear's source write was the later one.) A clear made before the change
    began leaves the value alone."""
    box = Outbox()
    box.track_writes = True
    started = box.accepted
    box.add(clear)
    late = update("k", b"mine")
    late.started = started
    box.add(late)
    assert [type(op) for op in box.take(100)] == [Invalidation, Invalidation]
    box.commit()
    box.add(clear)
    after = update("k", b"2")
    after.started = box.accepted  # began after the clear was accepted
    box.add(after)
    assert [type(op) for op in box.take(100)] == [Invalidation, Update]


def test_a_value_received_before_an_own_write_comes_back_only_evicts() -> None:
    """Until this instance's own message for a key has come back on the subscription, a
    received value of the key (it may precede the own write in the channel) only evicts."""
    clock = FakeClock()
    c = core(clock)
    c.receive(message(1, Invalidation(Kind.KEY, None, "x")))
    data = SafeSerializer().dumps("mine")
    c.set("k", "mine", "r", None, None, data, None)
    taken = c.take_ops()
    c.batch_sent([b"sent"])  # acknowledged, not yet echoed
    c.receive(message(2, Update("r", "k", SafeSerializer().dumps("theirs"))))
    assert c.store.get("k", MISSING, "r") is MISSING
    own = encode(SENDER, taken.first, [Invalidation(Kind.KEY, "r", "k")])
    c.receive(own)  # the own echo: later values apply again
    c.receive(message(3, Update("r", "k", SafeSerializer().dumps("later"))))
    assert c.store.get("k", MISSING, "r") == "later"


@pytest.mark.parametrize("stage", ["waiting", "in flight", "acknowledged"])
@pytest.mark.parametrize("own", ["clear_region", "clear"])
def test_a_value_received_before_an_own_clear_comes_back_only_evicts(own: str, stage: str) -> None:
    """An own clear_region or clear is a write of every key it covers: until its message has
    come back, a received value of such a key (published before it, so older than the write
    behind it) only evicts. Otherwise it stayed here for good: the echo of the clear, which
    drops it everywhere else, is skipped here."""
    clock = FakeClock()
    c = core(clock)
    c.receive(message(1, Invalidation(Kind.KEY, None, "x")))
    op = Invalidation(Kind.REGION, "r") if own == "clear_region" else Invalidation(Kind.CLEAR)
    c.local(op)
    taken = None
    if stage != "waiting":
        taken = c.take_ops()
    if stage == "acknowledged":
        c.batch_sent([b"sent"])
    c.receive(message(2, Update("r", "k", SafeSerializer().dumps("theirs"))))
    assert c.store.get("k", MISSING, "r") is MISSING
    if taken is None:
        taken = c.take_ops()
    if stage != "acknowledged":
        c.batch_sent([b"sent"])
    c.receive(encode(SENDER, taken.first, [op]))  # the own echo: later values apply again
    c.receive(message(3, Update("r", "k", SafeSerializer().dumps("later"))))
    assert c.store.get("k", MISSING, "r") == "later"


# -- plain reads: an L2 hit as GET, with the generations known here ---------------------


def learned(clock: FakeClock, **options: Any) -> CacheCore:
    """A core whose sharing learned region r's generations (g, r) from a read-script reply
    and then heard a confirmation."""
    c = core(clock, **options)
    assert c.sharing is not None
    steps, _ = drive(
        c.sharing.load_flow("a", "r", "t", plain=True), [result(l2.VALUE, record(1, "a"))]
    )
    assert [type(x) for x in steps] == [Read]  # nothing known yet: the script
    clock.advance(0.1)
    c.confirmed(clock())
    return c


def plain_steps(
    c: CacheCore, replies: list[Any], region: str | None = "r"
) -> tuple[list[Any], Loaded]:
    assert c.sharing is not None
    return drive(c.sharing.load_flow("k", region, "t", plain=True), replies)


def test_a_hit_with_known_generations_is_one_plain_get_current_as_of_the_confirmation() -> None:
    """After a script reply taught the generations, a hit is one Get; its value counts as
    current as of the last confirmation (the Get says so), with the PTTL it had left."""
    clock = FakeClock()
    c = learned(clock)
    confirmed = clock()
    clock.advance(0.5)
    steps, loaded = plain_steps(c, [(record(42), 9_500)])
    assert [type(x) for x in steps] == [Get]
    assert steps[0].as_of == confirmed
    assert loaded == Loaded(42, 9.5)
    assert c.sharing is not None and c.sharing.stats.l2_hits == 2


@pytest.mark.parametrize(("pttl", "left"), [(-1, None), (0, 0.001), (-2, 0.001)])
def test_a_plain_hit_on_a_value_about_to_expire_keeps_its_expiry(
    pttl: int, left: float | None
) -> None:
    """PTTL 0 (under a millisecond left) or -2 (the value expired between the GET and the
    PTTL) gives the L1 copy a millisecond; only -1 means no expiry. (Both were "no expiry": on
    a loaded machine a Django key set with a 0.5 s timeout was still served from B's L1 after
    5 s.) The script's reply is read the same way."""
    clock = FakeClock()
    c = learned(clock)
    steps, loaded = plain_steps(c, [(record(42), pttl)])
    assert [type(x) for x in steps] == [Get]
    assert loaded == Loaded(42, left)
    assert l2.parse_read([l2.VALUE, record(42), pttl, b"g", b"r"]).pttl == left


@pytest.mark.parametrize(
    "found",
    [None, (None, -2), (b"\x01G\x01r" + record(42)[4:], 100), (record(42, key="other"), 100)],
    ids=["l2-failed", "no-value", "other-generation", "other-key"],
)
def test_a_plain_read_that_finds_no_usable_value_asks_the_script(found: Any) -> None:
    """Nothing, another generation's record or a record that does not decode: the script
    decides (lease, stale records, counting), as without plain reads."""
    clock = FakeClock()
    c = learned(clock)
    steps, loaded = plain_steps(c, [found, result(l2.LEASED), "db", True])
    assert [type(x) for x in steps] == [Get, Read, Load, Fill]
    assert loaded.value == "db"


def unplain(c: CacheCore, region: str | None = "r") -> list[type]:
    """The steps of one hit: a Get answered with the record, or a Read answered likewise."""
    assert c.sharing is not None
    flow = c.sharing.load_flow("k", region, "t", plain=True)
    steps: list[type] = []
    step = flow.send(None)
    while True:
        steps.append(type(step))
        reply: Any = (
            (record(5, region=region), 100)
            if type(step) is Get
            else result(l2.VALUE, record(5, region=region))
        )
        try:
            step = flow.send(reply)
        except StopIteration:
            return steps


def test_generations_are_forgotten_on_every_clear_and_possible_loss() -> None:
    """A clear received or made here (region or everything), a clear delivered, a lost or
    new subscription and a sequence gap each send the next hit through the script."""
    clock = FakeClock()
    events: list[Any] = [
        lambda c: c.receive(message(1, Invalidation(Kind.REGION, "other"))),
        lambda c: c.receive(message(1, Invalidation(Kind.CLEAR))),
        lambda c: c.local(Invalidation(Kind.REGION, "r")),
        lambda c: c.local(Invalidation(Kind.CLEAR)),
        lambda c: c.lost("gone"),
        lambda c: c.subscribed(clock(), True),
        lambda c: c.subscribed(clock(), False),
        lambda c: (c.receive(message(1, Invalidation(Kind.KEY, None, "x"))),
                   c.receive(message(5, Invalidation(Kind.KEY, None, "y")))),  # a gap
    ]  # fmt: skip
    for event in events:
        c = learned(clock)
        assert unplain(c) == [Get]
        event(c)
        c.confirmed(clock())
        assert unplain(c) == [Read]  # and the reply teaches them again:
        assert unplain(c) == [Get]


def test_an_own_clear_forgets_the_generations_again_when_delivered() -> None:
    """A read sent between an own clear and its delivery may learn the old generation: the
    delivery forgets what was learned meanwhile (flush() returns after it)."""
    clock = FakeClock()
    c = learned(clock)
    c.local(Invalidation(Kind.REGION, "r"))
    assert unplain(c) == [Read]  # learns, under the new version, what Redis still has
    assert unplain(c) == [Get]
    taken = c.take_ops()
    c.encode_plans(taken)
    c.batch_sent([b"sent"], taken)
    assert unplain(c) == [Read]


def test_a_reply_sent_before_a_clear_arrived_teaches_nothing() -> None:
    """A read-script reply sent before a clear was received may carry the old generation:
    it is not used, whatever order the reply and the clear arrive in."""
    clock = FakeClock()
    c = core(clock)
    assert c.sharing is not None
    flow = c.sharing.load_flow("k", "r", "t", plain=True)
    assert type(flow.send(None)) is Read
    c.receive(message(1, Invalidation(Kind.REGION, "r")))  # arrives while the read travels
    with pytest.raises(StopIteration):
        flow.send(result(l2.VALUE, record(1)))
    c.confirmed(clock())
    assert unplain(c) == [Read]


def test_no_plain_read_without_a_recent_confirmation() -> None:
    """Generations known as of a confirmation more than max_staleness old could hide a clear
    that a read starting now must see: the script reads them in Redis instead."""
    clock = FakeClock()
    c = learned(clock)
    clock.advance(CacheOptions().max_staleness - 0.01)
    assert unplain(c) == [Get]
    clock.advance(0.02)
    assert unplain(c) == [Read]
    c.confirmed(clock())
    assert unplain(c) == [Get]


def test_plain_reads_only_where_the_driver_can() -> None:
    """plain=False (a driver that cannot GET the value's key): always the script."""
    clock = FakeClock()
    c = learned(clock)
    assert c.sharing is not None
    steps, _ = drive(c.sharing.load_flow("k", "r", "t"), [result(l2.VALUE, record(5))])
    assert [type(x) for x in steps] == [Read]


def test_regions_learn_their_own_generation() -> None:
    """Another region's generation is not known from r's: its first hit is the script."""
    clock = FakeClock()
    c = learned(clock)
    assert unplain(c) == [Get]
    assert unplain(c, region=None) == [Read]
    assert unplain(c, region=None) == [Get]


def test_an_echo_under_a_former_id_ends_the_wait() -> None:
    """An own write whose echo came back only after this instance said farewell and took a
    new id (its subscriber was away for a minute while publishing worked) still counts as
    come back: it no longer makes received values of its key only evict. (It did until the
    new id's sequence numbers caught up with the old one's.)"""
    clock = FakeClock()
    c = core(clock)
    c.receive(message(1, Invalidation(Kind.KEY, None, "x")))
    for i in range(5):  # the old id's sequence numbers run ahead of the new one's
        c.local(Invalidation(Kind.KEY, None, f"z{i}"))
        c.take_ops()
        c.batch_sent([b"sent"])
    data = SafeSerializer().dumps("mine")
    c.set("k", "mine", "r", None, None, data, None)
    taken = c.take_ops()
    c.batch_sent([b"sent"])
    old_id = taken.sender
    clock.advance(61)
    farewell = c.take_ops()
    assert farewell.farewell
    c.batch_sent([b""], farewell)
    assert c.instance_id != old_id
    c.confirmed(clock())
    c.receive(encode(old_id, taken.first, [Invalidation(Kind.KEY, "r", "k")]))  # the echo
    c.receive(message(2, Update("r", "k", SafeSerializer().dumps("later"))))
    assert c.store.get("k", MISSING, "r") == "later"


def test_own_writes_awaiting_their_echo_are_bounded() -> None:
    """While the subscription is away and publishing works, the own writes awaiting their
    echo collapse past a bound into one that covers every key (received values only evict
    until the latest echo is back) instead of growing without limit."""
    from nearcache._core.cache import UNECHOED_MAX

    clock = FakeClock()
    c = core(clock)
    c.receive(message(1, Invalidation(Kind.KEY, None, "x")))
    last = None
    for i in range(UNECHOED_MAX + 10):
        c.local(Invalidation(Kind.KEY, "r", f"z{i}"))
        last = c.take_ops()
        c.batch_sent([b"sent"])
    assert len(c._unechoed) <= UNECHOED_MAX
    c.receive(message(2, Update("r", "k", SafeSerializer().dumps("theirs"))))
    assert c.store.get("k", MISSING, "r") is MISSING  # any key: only evicts
    assert last is not None
    c.receive(encode(last.sender, last.first, [Invalidation(Kind.KEY, "r", "z")]))
    c.receive(message(3, Update("r", "k", SafeSerializer().dumps("later"))))
    assert c.store.get("k", MISSING, "r") == "later"


@pytest.mark.parametrize("drop", ["new subscription", "loss"])
def test_dropping_l1_keeps_waiting_for_own_writes_still_to_come_back(drop: str) -> None:
    """An own write published after the new subscription was made (or on a live one that
    found a loss) comes back on it later; until then a received value of its key, published
    before it, must only evict. Dropping L1 forgot the wait, and the sender's second message
    after the drop (trusted again) left its older value here for good."""
    clock = FakeClock()
    c = core(clock)
    c.receive(message(1, Invalidation(Kind.KEY, None, "x")))
    data = SafeSerializer().dumps("mine")
    c.set("k", "mine", "r", None, None, data, None)
    taken = c.take_ops()
    subscribed_at = clock()
    clock.advance(0.01)
    c.batch_sent([b"sent"])  # published after the new SUBSCRIBE was sent
    if drop == "new subscription":
        c.subscribed(subscribed_at, complete=False)
    else:
        c.lost("reconciliation")
    c.receive(message(2, Invalidation(Kind.KEY, None, "y")))  # its first since the drop
    c.receive(message(3, Update("r", "k", SafeSerializer().dumps("theirs"))))
    assert c.store.get("k", MISSING, "r") is MISSING
    c.receive(encode(SENDER, taken.first, [Invalidation(Kind.KEY, "r", "k")]))  # the echo
    c.receive(message(4, Update("r", "k", SafeSerializer().dumps("later"))))
    assert c.store.get("k", MISSING, "r") == "later"


def test_a_new_subscription_forgets_own_writes_published_before_it() -> None:
    """An own write acknowledged before the new subscription was made never comes back on
    it (it was missed, and L1 was dropped): its key is not waited for."""
    clock = FakeClock()
    c = core(clock)
    c.receive(message(1, Invalidation(Kind.KEY, None, "x")))
    c.set("k", "mine", "r", None, None, SafeSerializer().dumps("mine"), None)
    c.take_ops()
    c.batch_sent([b"sent"])
    clock.advance(0.01)
    c.subscribed(clock(), complete=False)
    c.receive(message(2, Invalidation(Kind.KEY, None, "y")))
    c.receive(message(3, Update("r", "k", SafeSerializer().dumps("theirs"))))
    assert c.store.get("k", MISSING, "r") == "theirs"


def test_a_lookup_takes_no_lease_and_loads_nothing() -> None:
    """get_or_set(key, lookup): the read script without the lease; no value means the factory
    (lookup raises Absent) at once, counted as an L2 miss, not a load; a value is a hit."""
    s = sharing()
    flow = s.load_flow("k", "r", "t", looking=True)
    step = flow.send(None)
    assert step == Read("")
    assert type(flow.send(result(l2.NO_VALUE))) is Load
    with pytest.raises(Absent):
        flow.throw(Absent())
    assert (s.stats.l2_misses, s.stats.loads, s.stats.l2_lease_waits) == (1, 0, 0)
    steps, loaded = drive(s.load_flow("k", "r", "t", looking=True), [result(l2.VALUE, record(3))])
    assert [type(x) for x in steps] == [Read] and loaded.value == 3
