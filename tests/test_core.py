"""Unit tests of CacheCore (receive, sequences, batches) and CacheOptions validation."""

from __future__ import annotations

import math
from typing import Any

import pytest

from nearcache._core.cache import (
    BATCH_MAX_OPS,
    MESSAGE_MAX_OPS,
    SENDER_IDLE,
    SENDER_MEMORY,
    CacheCore,
    CacheOptions,
    CacheStats,
    check_key,
    check_region,
    snapshot,
)
from nearcache._core.codec import Invalidation, Kind, decode, encode
from nearcache._core.store import MISSING
from nearcache._exceptions import ConfigurationError
from tests.clock import FakeClock

ME = b"\x01" * 16
OTHER = b"\x02" * 16
THIRD = b"\x03" * 16
CLEAR = Invalidation(Kind.CLEAR)
Signing = tuple[str, bytes] | None


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(500.0)


def make_core(
    clock: FakeClock, *, networked: bool = True, instance_id: bytes = ME, **options: Any
) -> CacheCore:
    return CacheCore(
        CacheOptions(**options), clock=clock, instance_id=instance_id, networked=networked
    )


def key(k: object, region: str | None = None) -> Invalidation:
    return Invalidation(Kind.KEY, region, k)  # type: ignore[arg-type]


def message(
    sequence: int, *ops: Invalidation, sender: bytes = OTHER, signing: Signing = None
) -> bytes:
    return encode(sender, sequence, list(ops), signing_key=signing)


def fill(core: CacheCore, *keys: object) -> None:
    for k in keys:
        core.store.set(k, f"value-{k}")


def held(core: CacheCore, k: object, region: str | None = None) -> bool:
    return core.store.get(k, MISSING, region) is not MISSING


# -- receive ------------------------------------------------------------------------------------


def test_receive_applies_key_invalidation_from_another_instance(clock: FakeClock) -> None:
    """A key invalidation from another instance drops the key here and is counted."""
    core = make_core(clock)
    fill(core, "a", "b")
    core.receive(message(1, key("a")))
    assert not held(core, "a")
    assert held(core, "b")
    assert core.stats.messages_received == 1
    assert core.stats.invalidations_received == 1
    assert core.store.stats().invalidations == 1


def test_receive_applies_region_and_clear(clock: FakeClock) -> None:
    """Region and clear invalidations from another instance are applied in order."""
    core = make_core(clock)
    core.store.set("a", 1, "r")
    core.store.set("a", 2, "s")
    core.store.set("a", 3)
    core.receive(message(1, Invalidation(Kind.REGION, "r")))
    assert not held(core, "a", "r")
    assert held(core, "a", "s")
    assert held(core, "a")
    core.receive(message(2, CLEAR))
    assert len(core.store) == 0
    assert core.stats.invalidations_received == 2


def test_receive_ignores_own_messages(clock: FakeClock) -> None:
    """This instance's own messages, echoed by Redis, are counted and not applied."""
    core = make_core(clock)
    fill(core, "a")
    core.receive(message(1, CLEAR, sender=ME))
    assert held(core, "a")
    assert core.stats.own_messages == 1
    assert core.stats.messages_received == 0
    assert core.stats.invalidations_received == 0


def test_own_messages_never_count_as_gaps(clock: FakeClock) -> None:
    """Own messages with jumping sequences never trigger a repair."""
    core = make_core(clock)
    fill(core, "a")
    core.receive(message(1, sender=ME))
    core.receive(message(9, sender=ME))
    assert core.stats.sequence_gaps == 0
    assert held(core, "a")


@pytest.mark.parametrize(
    "payload",
    [b"", b"garbage", b"NC\x02\x00" + bytes(28), message(1, key("a"))[:-1], b"\xff" * 64],
)
def test_receive_counts_malformed_messages_and_never_raises(
    clock: FakeClock, payload: bytes
) -> None:
    """A malformed message is counted, remembered as last_error, and changes nothing."""
    core = make_core(clock)
    fill(core, "a")
    core.receive(payload)
    assert core.stats.malformed_messages == 1
    assert core.stats.messages_received == 0
    assert core.last_error is not None
    assert core.last_error.startswith("malformed message")
    assert held(core, "a")


def test_receive_with_secrets_applies_signed_messages(clock: FakeClock) -> None:
    """With secrets configured, a message signed with one of them is applied."""
    core = make_core(clock, secrets={"old": b"s1", "new": b"s2"})
    fill(core, "a")
    core.receive(message(1, key("a"), signing=("new", b"s2")))
    assert not held(core, "a")
    assert core.stats.malformed_messages == 0


@pytest.mark.parametrize(
    ("secrets", "signing"),
    [
        pytest.param({"k": b"s"}, None, id="unsigned-while-secret"),
        pytest.param({"k": b"s"}, ("k", b"wrong"), id="wrong-secret"),
        pytest.param({"k": b"s"}, ("other", b"s"), id="unknown-key-id"),
        pytest.param({}, ("k", b"s"), id="signed-while-no-secret"),
    ],
)
def test_receive_rejects_unverifiable_messages(
    clock: FakeClock, secrets: dict[str, bytes], signing: Signing
) -> None:
    """Messages that fail signature policy are counted as malformed and not applied."""
    core = make_core(clock, secrets=secrets)
    fill(core, "a")
    core.receive(message(1, key("a"), signing=signing))
    assert held(core, "a")
    assert core.stats.malformed_messages == 1


def test_sequence_gap_repairs_the_store(clock: FakeClock) -> None:
    """A skipped sequence from a sender drops L1, counts a gap, then applies the message."""
    core = make_core(clock)
    core.receive(message(1))
    fill(core, "a", "b")
    core.store.set("c", 1, "r")
    reservation = core.store.reserve("d")
    core.receive(message(3, key("zz")))
    assert core.stats.sequence_gaps == 1
    assert core.store.stats().repairs == 1
    assert len(core.store) == 0
    assert core.store.commit(reservation, "loaded") is False
    assert core.stats.invalidations_received == 1


def test_consecutive_sequences_are_not_gaps(clock: FakeClock) -> None:
    """Messages 1, 2, 3 from one sender apply without any repair."""
    core = make_core(clock)
    fill(core, "keep")
    for seq in (1, 2, 3):
        core.receive(message(seq, key(seq)))
    assert core.stats.sequence_gaps == 0
    assert core.store.stats().repairs == 0
    assert held(core, "keep")


def test_duplicate_and_old_sequences_are_applied_without_gap(clock: FakeClock) -> None:
    """Repeated or older sequence numbers are applied but are not gaps."""
    core = make_core(clock)
    core.receive(message(1))
    core.receive(message(2))
    fill(core, "a", "b", "keep")
    core.receive(message(2, key("a")))
    core.receive(message(1, key("b")))
    assert not held(core, "a")
    assert not held(core, "b")
    core.receive(message(3))  # the highest seen is still 2
    assert core.stats.sequence_gaps == 0
    assert held(core, "keep")


def test_gaps_are_tracked_per_sender(clock: FakeClock) -> None:
    """Each sender has its own sequence: interleaved senders are not gaps."""
    core = make_core(clock)
    core.receive(message(1, sender=OTHER))
    core.receive(message(40, sender=THIRD))
    core.receive(message(2, sender=OTHER))
    core.receive(message(41, sender=THIRD))
    assert core.stats.sequence_gaps == 0
    core.receive(message(4, sender=OTHER))
    assert core.stats.sequence_gaps == 1


def test_first_message_of_a_sender_is_never_a_gap(clock: FakeClock) -> None:
    """The first message seen from a sender may have any sequence number."""
    core = make_core(clock)
    fill(core, "a")
    core.receive(message(1000))
    assert core.stats.sequence_gaps == 0
    assert held(core, "a")


def test_malformed_message_does_not_advance_the_sequence(clock: FakeClock) -> None:
    """A lost-to-garbage message leaves the sender's sequence where it was (a later gap shows)."""
    core = make_core(clock)
    core.receive(message(1))
    core.receive(message(2, key("a"))[:-1])
    core.receive(message(3))
    assert core.stats.malformed_messages == 1
    assert core.stats.sequence_gaps == 1


@pytest.mark.parametrize(
    "forged",
    [
        pytest.param(message(1000, key("a"), signing=("k", b"wrong")), id="bad-signature"),
        pytest.param(message(1000, key("a")), id="unsigned"),
        pytest.param(message(1000, key("a"), signing=("k", b"s"))[:-1], id="truncated"),
    ],
)
def test_a_rejected_message_never_moves_its_senders_sequence(
    clock: FakeClock, forged: bytes
) -> None:
    """A rejected message naming a known sender and a far higher sequence changes nothing:
    had it moved the sender's expected sequence, the real gap that follows would be hidden."""
    core = make_core(clock, secrets={"k": b"s"})
    core.receive(message(1, signing=("k", b"s")))
    fill(core, "a")
    assert not core.receive(forged)
    assert held(core, "a")
    core.receive(message(3, signing=("k", b"s")))  # message 2 never arrived
    assert core.stats.sequence_gaps == 1
    assert core.stats.malformed_messages == 1


# -- forgetting senders (docs/protocol.md, "Sender id and sequence numbers") -------------------


def _confirmed_core(clock: FakeClock) -> CacheCore:
    core = make_core(clock)
    core.subscribed(clock(), complete=False)
    core.confirmed(clock())
    return core


def _idle(core: CacheCore, clock: FakeClock, seconds: float) -> None:
    """Let ``seconds`` pass with heartbeats confirming every second."""
    for _ in range(int(seconds)):
        clock.advance(1.0)
        core.confirmed(clock())


def test_a_forgotten_sender_that_comes_back_shows_its_gap(clock: FakeClock) -> None:
    """Forgetting opens no hole: a sender silent for SENDER_MEMORY is forgotten (within an
    eighth of it more), and its next message (whose predecessor this instance never got)
    counts as a gap and repairs."""
    core = _confirmed_core(clock)
    core.receive(message(1))
    _idle(core, clock, SENDER_MEMORY * 1.13)
    assert core.senders == 0
    fill(core, "a")
    core.receive(message(3))  # message 2 was lost
    assert core.stats.sequence_gaps == 1
    assert not held(core, "a")


def test_a_sender_heard_within_sender_memory_is_remembered(clock: FakeClock) -> None:
    """A sender heard SENDER_MEMORY - 1 seconds ago is kept: its next message is no gap."""
    core = _confirmed_core(clock)
    core.receive(message(1))
    _idle(core, clock, SENDER_MEMORY - 1)
    assert core.senders == 1
    fill(core, "a")
    core.receive(message(2))
    assert core.stats.sequence_gaps == 0
    assert held(core, "a")


def test_nothing_is_forgotten_while_no_heartbeat_confirms(clock: FakeClock) -> None:
    """Forgetting runs on confirmed time: during an outage the clock moves but nothing is
    forgotten, so a replay after it finds every sender (no needless repair)."""
    core = _confirmed_core(clock)
    core.receive(message(1))
    clock.advance(SENDER_MEMORY * 3)  # disconnected: no confirmation
    fill(core, "a")
    core.receive(message(2))  # replayed from the log
    core.subscribed(clock(), complete=True)
    assert core.stats.sequence_gaps == 0
    assert held(core, "a")


def test_an_unknown_sender_is_a_gap_only_once_the_table_is_old_enough(clock: FakeClock) -> None:
    """Right after a reset, a sender's first message may have any sequence number (what it
    sent before is covered by the repair). Once the table has been complete for
    SENDER_MEMORY, a sender that is not in it and is not at sequence 1 lost a message here:
    its previous one was published at most SENDER_IDLE earlier."""
    core = _confirmed_core(clock)
    core.receive(message(40, sender=OTHER))
    assert core.stats.sequence_gaps == 0
    _idle(core, clock, SENDER_MEMORY + 2)
    core.receive(message(1, sender=THIRD))
    assert core.stats.sequence_gaps == 0
    core.receive(message(7, sender=b"\x04" * 16))
    assert core.stats.sequence_gaps == 1


def _send(sender: CacheCore) -> list[bytes]:
    taken = sender.take_ops()
    payloads = sender.encode_batch(taken)
    sender.batch_sent(payloads, taken)
    return payloads


def test_an_idle_sender_says_farewell_and_takes_a_new_id(clock: FakeClock) -> None:
    """SENDER_IDLE after its last batch a sender publishes one empty message with its next
    sequence number, then sends under a new id from 1: receivers see no gap and never meet
    the old id again; the farewell's echo still counts as the sender's own."""
    sender = make_core(clock, instance_id=OTHER)
    receiver = _confirmed_core(clock)
    assert sender.next_send() is None  # nothing sent yet: no farewell to say
    sender.local(key("a"))
    for payload in _send(sender):
        receiver.receive(payload)
    assert sender.next_send() == SENDER_IDLE
    clock.advance(SENDER_IDLE)
    assert sender.next_send() == 0
    farewell = _send(sender)
    assert [(decode(p).sender, decode(p).sequence, decode(p).operations) for p in farewell] == [
        (OTHER, 2, ())
    ]
    assert sender.instance_id != OTHER and sender.next_send() is None
    assert sender.receive(farewell[0]) and sender.stats.own_messages == 1
    receiver.receive(farewell[0])
    sender.local(key("b"))
    (payload,) = _send(sender)
    assert (decode(payload).sender, decode(payload).sequence) == (sender.instance_id, 1)
    _idle(receiver, clock, SENDER_MEMORY * 1.2)  # the old id is forgotten meanwhile
    receiver.receive(payload)
    assert receiver.stats.sequence_gaps == 0
    assert receiver.store.stats().repairs == 1  # only the first subscription's


def test_the_farewell_shows_a_lost_last_message(clock: FakeClock) -> None:
    """A sender's last message lost before it fell silent is found at its farewell, not
    hidden by the new id."""
    sender = make_core(clock, instance_id=OTHER)
    receiver = _confirmed_core(clock)
    sender.local(key("a"))
    for payload in _send(sender):
        receiver.receive(payload)
    sender.local(key("b"))
    _send(sender)  # lost on the way to this receiver
    clock.advance(SENDER_IDLE)
    fill(receiver, "b")
    for payload in _send(sender):
        receiver.receive(payload)
    assert receiver.stats.sequence_gaps == 1
    assert not held(receiver, "b")


def test_a_busy_sender_keeps_its_id(clock: FakeClock) -> None:
    """A sender that publishes at least every SENDER_IDLE seconds never says farewell."""
    sender = make_core(clock, instance_id=OTHER)
    for i in range(5):
        sender.local(key(i))
        _send(sender)
        clock.advance(SENDER_IDLE - 1)
        assert sender.next_send() == 1
    assert sender.instance_id == OTHER


def test_incomplete_subscription_clears_l1_and_forgets_senders(clock: FakeClock) -> None:
    """A new subscription without replay drops L1, and a known sender's next message is no gap."""
    core = make_core(clock, max_staleness=2.0)
    core.receive(message(1))
    fill(core, "a")
    reservation = core.store.reserve("b")
    core.subscribed(clock.now, False)
    assert len(core.store) == 0
    assert core.store.commit(reservation, "loaded") is False
    assert core.stats.resubscriptions == 1
    assert core.stats.replays == 0
    assert core.store.stats().repairs == 1
    assert core.store.fresh_until == clock.now + 2.0
    core.receive(message(10))
    assert core.stats.sequence_gaps == 0
    assert core.store.stats().repairs == 1


def test_complete_subscription_keeps_l1_and_confirms(clock: FakeClock) -> None:
    """After a complete replay L1 is kept, confirmed as of the subscription, and not repaired."""
    core = make_core(clock, max_staleness=2.0)
    core.receive(message(1))
    fill(core, "a", "b")
    clock.advance(10.0)  # disconnected long enough for entries to stop being servable
    assert not held(core, "a")
    core.receive(message(2, key("b")))  # replayed from the log
    core.subscribed(clock.now, True)
    assert held(core, "a")
    assert not held(core, "b")
    assert core.store.fresh_until == clock.now + 2.0
    assert (core.stats.resubscriptions, core.stats.replays) == (1, 1)
    assert core.store.stats().repairs == 0
    core.receive(message(3))
    assert core.stats.sequence_gaps == 0


def test_lost_repairs_and_records_the_reason(clock: FakeClock) -> None:
    """A loss on a live subscription drops L1 locally, counts it and keeps the reason."""
    core = make_core(clock)
    fill(core, "a")
    core.lost("the log's epoch changed")
    assert len(core.store) == 0
    assert core.stats.losses == 1
    assert core.last_error == "the log's epoch changed"
    assert core.store.stats().repairs == 1
    assert len(core.outbox) == 0  # a repair is never broadcast


def test_confirmed_extends_freshness(clock: FakeClock) -> None:
    """confirmed(as_of) makes L1 servable until as_of + max_staleness."""
    core = make_core(clock, max_staleness=2.0)
    fill(core, "a")
    clock.advance(1.0)
    core.confirmed(clock.now)
    clock.advance(2.0)
    assert held(core, "a")
    clock.advance(0.5)
    assert not held(core, "a")


def test_local_core_never_goes_stale(clock: FakeClock) -> None:
    """A core without a backplane serves entries regardless of max_staleness."""
    core = make_core(clock, networked=False, max_staleness=1.0)
    fill(core, "a")
    clock.advance(100.0)
    assert held(core, "a")


# -- local operations ---------------------------------------------------------------------------


def test_local_applies_and_queues(clock: FakeClock) -> None:
    """A local invalidation applies here and waits in the outbox; the first one wakes the sender."""
    core = make_core(clock)
    fill(core, "a", "b")
    assert core.local(key("a")) is True
    assert not held(core, "a")
    assert core.local(key("b")) is False  # the sender is already woken
    assert core.outbox.waiting == 2


def test_local_without_backplane_queues_nothing(clock: FakeClock) -> None:
    """Without a backplane, local invalidations apply but nothing is queued."""
    core = make_core(clock, networked=False)
    fill(core, "a")
    assert core.local(key("a")) is False
    assert core.local(CLEAR) is False
    assert not held(core, "a")
    assert len(core.outbox) == 0


def test_set_stores_and_queues_an_invalidation(clock: FakeClock) -> None:
    """set stores the value here and queues a key invalidation for the other instances."""
    core = make_core(clock)
    assert core.set("k", "v", "r", None, None) is True
    assert core.store.get("k", region="r") == "v"
    assert core.outbox.take(10) == [key("k", "r")]


def test_set_passes_ttl_and_sliding(clock: FakeClock) -> None:
    """set's ttl reaches the store."""
    core = make_core(clock, networked=False)
    assert core.set("k", "v", None, 1.0, None) is False
    clock.advance(1.0)
    assert not held(core, "k")


# -- sending ------------------------------------------------------------------------------------


def test_take_batch_splits_into_messages_with_consecutive_sequences(clock: FakeClock) -> None:
    """A batch is cut into messages of at most MESSAGE_MAX_OPS with sequences 1, 2, 3..."""
    core = make_core(clock)
    ops = [key(i) for i in range(2 * MESSAGE_MAX_OPS + 88)]
    for op in ops:
        core.local(op)
    payloads = core.take_batch()
    decoded = [decode(p) for p in payloads]
    assert [m.sequence for m in decoded] == [1, 2, 3]
    assert [len(m.operations) for m in decoded] == [MESSAGE_MAX_OPS, MESSAGE_MAX_OPS, 88]
    assert all(m.sender == ME for m in decoded)
    assert [op for m in decoded for op in m.operations] == ops
    core.batch_sent(payloads)
    assert core.stats.messages_sent == 3
    assert core.stats.invalidations_sent == len(ops)
    assert core.outbox.delivered == core.outbox.accepted
    core.local(CLEAR)
    assert [decode(p).sequence for p in core.take_batch()] == [4]


def test_take_batch_of_nothing_uses_no_sequence(clock: FakeClock) -> None:
    """An empty take returns no message and burns no sequence number."""
    core = make_core(clock)
    assert core.take_batch() == []
    core.batch_sent([])
    core.local(CLEAR)
    assert [decode(p).sequence for p in core.take_batch()] == [1]


def test_take_batch_is_capped_at_batch_max_ops(clock: FakeClock) -> None:
    """One take moves at most BATCH_MAX_OPS invalidations; the rest wait for the next."""
    core = make_core(clock, max_pending=BATCH_MAX_OPS * 2)
    for i in range(BATCH_MAX_OPS + 10):
        core.local(key(i))
    payloads = core.take_batch()
    assert sum(len(decode(p).operations) for p in payloads) == BATCH_MAX_OPS
    assert len(payloads) == BATCH_MAX_OPS // MESSAGE_MAX_OPS
    core.batch_sent(payloads)
    rest = core.take_batch()
    assert [decode(p).sequence for p in rest] == [len(payloads) + 1]
    assert len(decode(rest[0]).operations) == 10


def test_take_batch_signs_with_the_first_secret(clock: FakeClock) -> None:
    """With secrets, every message is signed with the first key id and verifies."""
    secrets = {"current": b"s-new", "previous": b"s-old"}
    core = make_core(clock, secrets=secrets)
    core.local(key("a"))
    (payload,) = core.take_batch()
    assert decode(payload, secrets).key_id == "current"


def test_messages_between_two_cores_invalidate(clock: FakeClock) -> None:
    """Invalidations taken from one core and received by another drop its entries."""
    sender = make_core(clock, instance_id=OTHER)
    receiver = make_core(clock, instance_id=ME)
    receiver.store.set("a", 1)
    receiver.store.set("b", 2, "r")
    receiver.store.set("c", 3)
    sender.local(key("a"))
    sender.local(Invalidation(Kind.REGION, "r"))
    for payload in sender.take_batch():
        receiver.receive(payload)
        sender.receive(payload)  # its own echo
    assert not held(receiver, "a")
    assert not held(receiver, "b", "r")
    assert held(receiver, "c")
    assert sender.stats.own_messages == 1


def test_batch_superseded_reuses_sequence_numbers(clock: FakeClock) -> None:
    """A batch dropped for a clear gives its sequence numbers to the clear: no gap downstream."""
    sender = make_core(clock, instance_id=OTHER)
    receiver = make_core(clock, instance_id=ME)
    sender.local(key("a"))
    delivered = sender.take_batch()
    sender.batch_sent(delivered)
    receiver.receive(delivered[0])  # sequence 1
    sender.local(key("b"))
    dropped = sender.take_batch()  # sequence 2, publishing fails
    assert decode(dropped[0]).sequence == 2
    sender.local(CLEAR)
    assert sender.batch_superseded() is True
    assert sender.outbox.in_flight == 0
    assert sender.stats.messages_sent == 1
    (payload,) = sender.take_batch()
    assert decode(payload).sequence == 2
    assert decode(payload).operations == (CLEAR,)
    receiver.store.set("c", 1)
    receiver.receive(payload)
    assert receiver.stats.sequence_gaps == 0
    assert len(receiver.store) == 0


def test_batch_superseded_after_partial_delivery_is_no_gap(clock: FakeClock) -> None:
    """If part of a superseded batch did arrive, the reused sequence still causes no gap."""
    sender = make_core(clock, instance_id=OTHER)
    receiver = make_core(clock, instance_id=ME)
    for i in range(MESSAGE_MAX_OPS + 1):
        sender.local(key(i))
    batch = sender.take_batch()
    assert len(batch) == 2
    receiver.receive(batch[0])  # arrived before the publish failed
    sender.local(CLEAR)
    assert sender.batch_superseded() is True
    for _ in range(2):
        payloads = sender.take_batch()
        for payload in payloads:
            receiver.receive(payload)
        sender.batch_sent(payloads)
        sender.local(key("x"))
    assert receiver.stats.sequence_gaps == 0
    assert receiver.stats.messages_received == 3


def test_batch_not_superseded_without_a_clear_behind(clock: FakeClock) -> None:
    """Without a clear waiting behind it, the batch in flight stays in flight."""
    core = make_core(clock)
    core.local(key("a"))
    assert core.batch_superseded() is False  # nothing in flight
    core.take_batch()
    core.local(key("b"))
    assert core.batch_superseded() is False
    assert core.outbox.in_flight == 1


# -- options ------------------------------------------------------------------------------------


def test_default_options_are_valid() -> None:
    """CacheOptions() is valid and its heartbeat defaults to a quarter of max_staleness."""
    options = CacheOptions()
    assert options.heartbeat == options.max_staleness / 4
    assert CacheOptions(max_staleness=8.0, heartbeat_interval=3.0).heartbeat == 3.0


def test_heartbeat_interval_may_equal_max_staleness() -> None:
    """heartbeat_interval equal to max_staleness is accepted."""
    assert CacheOptions(max_staleness=2.0, heartbeat_interval=2.0).heartbeat == 2.0


def test_replay_log_may_be_disabled() -> None:
    """replay_log=0 turns the replay log off and is valid."""
    assert CacheOptions(replay_log=0).replay_log == 0


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"ttl": -1.0}, "ttl"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": True}, "ttl"),
        ({"ttl": "5"}, "ttl"),
        ({"ttl": math.nan}, "ttl"),
        ({"sliding": -0.5}, "sliding"),
        ({"max_age": 0.0}, "max_age"),
        ({"max_age": None}, "max_age"),
        ({"max_staleness": -2.0}, "max_staleness"),
        ({"max_staleness": None}, "max_staleness"),
        ({"max_entries": 0}, "max_entries"),
        ({"max_entries": -5}, "max_entries"),
        ({"max_entries": True}, "max_entries"),
        ({"max_entries": 10.0}, "max_entries"),
        ({"max_pending": 0}, "max_pending"),
        ({"max_pending": False}, "max_pending"),
        ({"max_pending": 1.5}, "max_pending"),
        ({"heartbeat_interval": 0.0}, "heartbeat_interval"),
        ({"heartbeat_interval": True}, "heartbeat_interval"),
        ({"max_staleness": 2.0, "heartbeat_interval": 3.0}, "heartbeat_interval"),
        ({"secrets": {"": b"s"}}, "secrets"),
        ({"secrets": {"k" * 256: b"s"}}, "secrets"),
        ({"secrets": {"é" * 128: b"s"}}, "secrets"),
        ({"secrets": {"k": "not-bytes"}}, "secrets"),
        ({"replay_log": -1}, "replay_log"),
        ({"replay_log": True}, "replay_log"),
        ({"replay_log": 1.5}, "replay_log"),
        ({"reconcile_interval": 0}, "reconcile_interval"),
        ({"reconcile_interval": None}, "reconcile_interval"),
    ],
    ids=repr,
)
def test_options_reject_bad_values_naming_the_option(kwargs: dict[str, Any], option: str) -> None:
    """A bad option value raises ConfigurationError that names the option."""
    with pytest.raises(ConfigurationError) as info:
        CacheOptions(**kwargs)
    assert info.value.option == option
    assert option in str(info.value)


def test_options_accept_a_255_byte_key_id() -> None:
    """A key id of exactly 255 bytes is accepted."""
    CacheOptions(secrets={"k" * 255: b"s"})


def test_check_key_accepts_wire_types() -> None:
    """str, bytes and int keys in a str or default region may travel."""
    for k in ("k", b"k", 7, -(2**70)):
        check_key(k, None)
        check_key(k, "region")


@pytest.mark.parametrize("bad", [1.5, None, ("t",), object()], ids=repr)
def test_check_key_rejects_other_types(bad: object) -> None:
    """A key of another type raises TypeError naming the type and the region."""
    with pytest.raises(TypeError, match=type(bad).__name__) as info:
        check_key(bad, "the-region")
    assert "the-region" in str(info.value)


@pytest.mark.parametrize("bad", [1, b"r", object()], ids=repr)
def test_check_region_rejects_non_str(bad: object) -> None:
    """A region other than str or None raises TypeError."""
    with pytest.raises(TypeError):
        check_region(bad)
    with pytest.raises(TypeError):
        check_key("k", bad)


def test_snapshot_collects_counters(clock: FakeClock) -> None:
    """snapshot merges store, backplane and outbox counters into CacheStats."""
    core = make_core(clock)
    core.set("a", 1, None, None, None)
    core.store.get("a")
    core.store.get("missing")
    core.receive(b"junk")
    stats = snapshot(core, "connected")
    assert isinstance(stats, CacheStats)
    assert (stats.entries, stats.hits, stats.misses, stats.sets) == (1, 1, 1, 1)
    assert (stats.pending, stats.malformed_messages, stats.backplane) == (1, 1, "connected")
    assert stats.hit_ratio == 0.5
    assert snapshot(make_core(clock), "local").hit_ratio == 0.0


# -- regressions: each fails until its bug is fixed ---------------------------------------------


def test_superseded_batch_is_not_reported_delivered(clock: FakeClock) -> None:
    """A batch dropped for a clear never counts as acknowledged before that clear is.

    flush() waits until ``outbox.delivered`` reaches the ``accepted`` value it read; a flush
    begun before the clear must not return while neither the dropped key invalidation nor
    the clear has reached Redis.
    """
    core = make_core(clock)
    core.local(key("a"))
    core.take_batch()  # publishing it fails: Redis is down
    flush_target = core.outbox.accepted
    core.local(CLEAR)
    assert core.batch_superseded() is True
    assert core.outbox.delivered < flush_target


@pytest.mark.parametrize(
    ("k", "region"),
    [
        pytest.param("\ud800", None, id="surrogate-key"),
        pytest.param("k", "\udfff", id="surrogate-region"),
        pytest.param("k", "x" * 65535, id="region-too-long"),
        pytest.param(10**4001, None, id="int-key-too-long-to-decode"),
        pytest.param(10**5000, None, id="int-key-too-long-to-encode"),
    ],
)
def test_check_key_rejects_what_cannot_travel(k: object, region: object) -> None:
    """check_key refuses a key or region the codec cannot send (it would wedge the sender)."""
    with pytest.raises((TypeError, ValueError)):
        check_key(k, region)


@pytest.mark.parametrize(
    "secrets",
    [
        pytest.param({b"key-id": b"secret"}, id="bytes-key-id"),
        pytest.param({7: b"secret"}, id="int-key-id"),
        pytest.param({"k": b""}, id="empty-secret"),
        pytest.param([("k", b"secret")], id="not-a-mapping"),
    ],
)
def test_options_reject_bad_secrets_with_configuration_error(secrets: Any) -> None:
    """Every malformed secrets setting raises ConfigurationError naming ``secrets``."""
    with pytest.raises(ConfigurationError) as info:
        CacheOptions(secrets=secrets)
    assert info.value.option == "secrets"
