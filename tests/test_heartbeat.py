"""Unit tests of the subscriber heartbeat and of routing pub/sub messages to the listener."""

from __future__ import annotations

from typing import Any

import pytest

from nearcache._core.heartbeat import Heartbeat, Receiver, StalledError
from nearcache._core.log import ENVELOPE_MAGIC, Cursor, EntryId

# -- Heartbeat ----------------------------------------------------------------------------------


def test_first_ping_is_due_at_once() -> None:
    """A new heartbeat wants a ping immediately, to confirm the new subscription."""
    heartbeat = Heartbeat(interval=1.0, timeout=2.0, now=100.0)
    assert heartbeat.wait(100.0) == 0.0
    assert heartbeat.due(100.0) == "1"


def test_no_second_ping_while_one_is_outstanding() -> None:
    """Only one ping is outstanding at a time, even past the interval."""
    heartbeat = Heartbeat(interval=1.0, timeout=5.0, now=0.0)
    assert heartbeat.due(0.0) == "1"
    assert heartbeat.due(0.5) is None
    assert heartbeat.due(3.0) is None


def test_wait_counts_down_to_the_pong_deadline() -> None:
    """With a ping outstanding, wait returns the time left until the pong is overdue."""
    heartbeat = Heartbeat(interval=1.0, timeout=2.0, now=10.0)
    heartbeat.due(10.0)
    assert heartbeat.wait(10.0) == 2.0
    assert heartbeat.wait(11.5) == 0.5


def test_overdue_pong_raises_stalled() -> None:
    """No pong within timeout raises StalledError, exactly at the deadline."""
    heartbeat = Heartbeat(interval=1.0, timeout=2.0, now=10.0)
    heartbeat.due(10.0)
    heartbeat.wait(11.75)
    with pytest.raises(StalledError, match="stalled"):
        heartbeat.wait(12.0)
    with pytest.raises(StalledError):
        heartbeat.wait(50.0)


def test_matching_pong_returns_when_the_ping_was_sent() -> None:
    """A pong carrying the outstanding token returns the ping's send time and clears it."""
    heartbeat = Heartbeat(interval=1.0, timeout=2.0, now=10.0)
    token = heartbeat.due(10.0)
    assert token is not None
    assert heartbeat.pong(token.encode()) == 10.0
    assert heartbeat.wait(10.25) == 0.75  # back to waiting for the next ping
    assert heartbeat.wait(99.0) == 0.0


def test_next_ping_is_due_one_interval_after_the_last() -> None:
    """After a pong the next ping is due interval seconds after the previous ping."""
    heartbeat = Heartbeat(interval=1.0, timeout=2.0, now=0.0)
    heartbeat.pong(heartbeat.due(0.0).encode())  # type: ignore[union-attr]
    assert heartbeat.due(0.5) is None
    assert heartbeat.due(1.0) == "2"
    assert heartbeat.pong(b"2") == 1.0
    assert heartbeat.due(2.0) == "3"


@pytest.mark.parametrize("data", [b"2", b"0", b"", "2", 1, None, b"1 "], ids=repr)
def test_mismatched_pong_is_ignored(data: object) -> None:
    """A pong that does not carry the outstanding token proves nothing and changes nothing."""
    heartbeat = Heartbeat(interval=1.0, timeout=2.0, now=0.0)
    heartbeat.due(0.0)
    assert heartbeat.pong(data) is None
    assert heartbeat.due(5.0) is None  # still outstanding
    assert heartbeat.pong(b"1") == 0.0


def test_pong_without_outstanding_ping_is_ignored() -> None:
    """A pong when no ping is outstanding (late duplicate) returns None."""
    heartbeat = Heartbeat(interval=1.0, timeout=2.0, now=0.0)
    assert heartbeat.pong(b"0") is None
    heartbeat.due(0.0)
    assert heartbeat.pong(b"1") == 0.0
    assert heartbeat.pong(b"1") is None


def test_stale_pong_of_an_earlier_ping_is_ignored() -> None:
    """An answer to an earlier ping does not confirm the current one."""
    heartbeat = Heartbeat(interval=1.0, timeout=2.0, now=0.0)
    heartbeat.pong(heartbeat.due(0.0).encode())  # type: ignore[union-attr]
    assert heartbeat.due(1.0) == "2"
    assert heartbeat.pong(b"1") is None
    assert heartbeat.pong(b"2") == 1.0


# -- Receiver -----------------------------------------------------------------------------------


class RecordingListener:
    """A BackplaneListener that records every call in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_message(self, payload: bytes) -> bool:
        self.calls.append(("message", payload))
        return True

    def on_subscribed(self, as_of: float, complete: bool) -> None:
        self.calls.append(("subscribed", (as_of, complete)))

    def on_loss(self, reason: str) -> None:
        self.calls.append(("loss", reason))

    def on_confirmed(self, as_of: float) -> None:
        self.calls.append(("confirmed", as_of))

    def on_state(self, state: object, reason: str | None) -> None:
        self.calls.append(("state", (state, reason)))


def make_receiver(now: float = 0.0) -> tuple[Receiver, RecordingListener, Heartbeat, Cursor]:
    listener = RecordingListener()
    heartbeat = Heartbeat(interval=1.0, timeout=2.0, now=now)
    cursor = Cursor()
    return Receiver(listener, cursor, heartbeat), listener, heartbeat, cursor


def envelope(epoch: bytes, entry: str, message: bytes) -> bytes:
    raw_id = entry.encode()
    return ENVELOPE_MAGIC + bytes([len(epoch)]) + epoch + bytes([len(raw_id)]) + raw_id + message


@pytest.mark.parametrize("kind", ["message", "smessage"])
def test_bare_message_goes_to_the_listener(kind: str) -> None:
    """A bare (unlogged) pub/sub message is passed to on_message unchanged."""
    receiver, listener, _, _ = make_receiver()
    assert receiver.handle({"type": kind, "data": b"NC payload"}) is False
    assert listener.calls == [("message", b"NC payload")]


def test_garbage_message_still_reaches_the_listener() -> None:
    """Bytes that are no message at all reach on_message, where the cache counts them."""
    receiver, listener, _, _ = make_receiver()
    receiver.handle({"type": "message", "data": b"\x00garbage"})
    receiver.handle({"type": "message", "data": b"NL\x09ab"})  # truncated envelope
    assert listener.calls == [("message", b"\x00garbage"), ("message", b"NL\x09ab")]


def test_logged_message_is_unwrapped_and_advances_the_cursor() -> None:
    """A message published through the log reaches on_message without its envelope."""
    receiver, listener, _, cursor = make_receiver()
    receiver.handle({"type": "message", "data": envelope(b"e1", "5-0", b"NC inner")})
    assert listener.calls == [("message", b"NC inner")]
    assert (cursor.epoch, cursor.last) == (b"e1", EntryId(5, 0))


def test_live_copy_of_a_replayed_entry_is_skipped() -> None:
    """The live copy of an entry replayed from the log is not applied twice."""
    receiver, listener, _, cursor = make_receiver()
    cursor.reset(b"e1", EntryId(6, 9), "run")
    assert cursor.plan(b"e1", [(EntryId(6, 9), b"older"), (EntryId(7, 1), b"old")], "run")
    receiver.handle({"type": "message", "data": envelope(b"e1", "7-1", b"old")})
    receiver.handle({"type": "message", "data": envelope(b"e1", "7-2", b"new")})
    assert listener.calls == [("message", b"new")]


def test_epoch_change_is_reported_as_a_loss_after_the_message() -> None:
    """A logged message from a new epoch is applied (it proves authentic), then reported as a
    loss, which drops L1."""
    receiver, listener, _, cursor = make_receiver()
    cursor.epoch, cursor.last = b"e1", EntryId(9, 0)
    receiver.handle({"type": "message", "data": envelope(b"e2", "1-0", b"m")})
    assert [c[0] for c in listener.calls] == ["message", "loss"]
    assert listener.calls[0] == ("message", b"m")
    assert (cursor.epoch, cursor.last) == (b"e2", EntryId(1, 0))


def test_matching_pong_confirms_and_returns_true() -> None:
    """A pong answering the outstanding ping calls on_confirmed with the ping's send time."""
    receiver, listener, heartbeat, _ = make_receiver(now=3.0)
    token = heartbeat.due(3.0)
    assert token is not None
    assert receiver.handle({"type": "pong", "data": token.encode()}) is True
    assert listener.calls == [("confirmed", 3.0)]


def test_mismatched_pong_confirms_nothing() -> None:
    """A pong with another token makes no listener call and returns False."""
    receiver, listener, heartbeat, _ = make_receiver()
    heartbeat.due(0.0)
    assert receiver.handle({"type": "pong", "data": b"42"}) is False
    assert listener.calls == []


@pytest.mark.parametrize("kind", ["unsubscribe", "sunsubscribe"])
def test_unsubscribe_raises_stalled(kind: str) -> None:
    """The server ending the subscription raises StalledError naming the message type."""
    receiver, listener, _, _ = make_receiver()
    with pytest.raises(StalledError, match=kind):
        receiver.handle({"type": kind, "data": 0})
    assert listener.calls == []


@pytest.mark.parametrize("kind", ["subscribe", "ssubscribe", "psubscribe", "pmessage"])
def test_other_message_types_are_ignored(kind: str) -> None:
    """Subscription confirmations and other message types make no listener call."""
    receiver, listener, _, _ = make_receiver()
    assert receiver.handle({"type": kind, "data": 1}) is False
    assert listener.calls == []
