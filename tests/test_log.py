"""The replay log's decisions (no Redis): envelopes, the cursor, the resync plan, reconcile."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearcache._core.heartbeat import Heartbeat, Receiver, StalledError
from nearcache._core.log import Cursor, EntryId, Envelope, parse_id, reconcile, unwrap
from nearcache._exceptions import MessageError
from nearcache._typing import BackplaneState


def envelope(epoch: bytes, entry: str, message: bytes = b"NC-message") -> bytes:
    return b"NL" + bytes([len(epoch)]) + epoch + bytes([len(entry)]) + entry.encode() + message


class Recorder:
    def __init__(self, accept: bool = True) -> None:
        self.events: list[tuple[str, Any]] = []
        self.accept = accept

    def on_message(self, payload: bytes) -> bool:
        self.events.append(("message", payload))
        return self.accept

    def on_subscribed(self, as_of: float, complete: bool) -> None:
        self.events.append(("subscribed", complete))

    def on_confirmed(self, as_of: float) -> None:
        self.events.append(("confirmed", as_of))

    def on_loss(self, reason: str) -> None:
        self.events.append(("loss", reason))

    def on_state(self, state: BackplaneState, reason: str | None) -> None:
        self.events.append(("state", state))


def test_unwrap_reads_an_envelope_and_passes_bare_messages() -> None:
    """An envelope yields epoch, entry id and message; a bare message yields None."""
    assert unwrap(envelope(b"e1", "17-3", b"NCxyz")) == Envelope(b"e1", EntryId(17, 3), b"NCxyz")
    assert unwrap(b"NCxyz") is None


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_unwrap_raises_only_message_error(data: bytes) -> None:
    """Arbitrary bytes after the envelope magic never raise anything but MessageError."""
    try:
        unwrap(b"NL" + data)
    except MessageError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_the_receiver_survives_any_payload(data: bytes) -> None:
    """Whatever arrives on the channel, the receiver hands it on or drops it; it never raises."""
    listener = Recorder()
    receiver = Receiver(listener, Cursor(), Heartbeat(1.0, 2.0, 0.0))
    for payload in (data, b"NL" + data):
        receiver.handle({"type": "message", "channel": b"c", "data": payload, "pattern": None})


def test_parse_id_rejects_garbage() -> None:
    """Entry ids are 'ms-seq' with digits only."""
    assert parse_id(b"1700000000000-12") == EntryId(1700000000000, 12)
    for bad in (b"", b"12", b"a-1", b"1-", b"-1", b"1-2-3"):
        with pytest.raises(MessageError):
            parse_id(bad)


def test_live_copies_of_replayed_entries_are_skipped() -> None:
    """After a replay of entries 4-5, their live copies are not applied twice; an entry that
    was not replayed is applied even if it is behind the cursor."""
    listener = Recorder()
    cursor = Cursor()
    cursor.reset(b"e", EntryId(3, 0), "run")
    assert cursor.plan(
        b"e", [(EntryId(3, 0), b"3"), (EntryId(4, 0), b"4"), (EntryId(5, 0), b"5")], "run"
    ) == [b"4", b"5"]
    receiver = Receiver(listener, cursor, Heartbeat(1.0, 2.0, 0.0))
    for entry in ("4-0", "5-0", "2-0", "6-0"):
        receiver.handle({"type": "message", "data": envelope(b"e", entry, entry.encode())})
    assert listener.events == [("message", b"2-0"), ("message", b"6-0")]
    assert cursor.last == EntryId(6, 0)


def test_a_forged_far_future_entry_id_cannot_make_real_messages_skipped() -> None:
    """The envelope is written by Redis and not signed: an authentic message re-wrapped with a
    far-future entry id moves the cursor, but later genuine messages are still applied (the
    next resubscription then finds the cursor missing from the log and drops L1)."""
    listener = Recorder()
    cursor = Cursor()
    cursor.reset(b"e", EntryId(5, 0), "run")
    receiver = Receiver(listener, cursor, Heartbeat(1.0, 2.0, 0.0))
    receiver.handle({"type": "message", "data": envelope(b"e", "99999999999999-0", b"replayed")})
    receiver.handle({"type": "message", "data": envelope(b"e", "6-0", b"genuine")})
    assert listener.events == [("message", b"replayed"), ("message", b"genuine")]
    assert cursor.plan(b"e", [(EntryId(5, 0), b"x"), (EntryId(6, 0), b"y")], "run") is None


def test_a_new_epoch_on_a_live_message_is_a_loss() -> None:
    """A message from a new epoch means Redis lost its log: apply it, then report a loss."""
    listener = Recorder()
    cursor = Cursor()
    cursor.reset(b"old", EntryId(5, 0))
    receiver = Receiver(listener, cursor, Heartbeat(1.0, 2.0, 0.0))
    receiver.handle({"type": "message", "data": envelope(b"new", "1-0", b"m")})
    assert [kind for kind, _ in listener.events] == ["message", "loss"]
    assert (cursor.epoch, cursor.last) == (b"new", EntryId(1, 0))


def test_the_receiver_matches_pongs_and_raises_on_unsubscribe() -> None:
    """Only the pong of the outstanding ping confirms; an unsubscribe is a stall."""
    listener = Recorder()
    heartbeat = Heartbeat(1.0, 2.0, 10.0)
    receiver = Receiver(listener, Cursor(), heartbeat)
    token = heartbeat.due(10.0)
    assert token is not None
    assert not receiver.handle({"type": "pong", "data": b"other"})
    assert receiver.handle({"type": "pong", "data": token.encode()})
    assert listener.events == [("confirmed", 10.0)]
    with pytest.raises(StalledError):
        receiver.handle({"type": "unsubscribe", "data": 0})


def test_plan_replays_when_the_log_covers_the_cursor() -> None:
    """If the cursor's entry is still the first one read, on the same server, the entries
    after it are replayed."""
    cursor = Cursor()
    cursor.reset(b"e", EntryId(5, 0), "run-1")
    entries = [(EntryId(5, 0), b"a"), (EntryId(6, 0), b"b"), (EntryId(7, 1), b"c")]
    assert cursor.plan(b"e", entries, "run-1") == [b"b", b"c"]
    assert cursor.last == EntryId(7, 1)


def test_plan_gives_up_after_a_server_restart_or_unknown_server() -> None:
    """A restarted server may have come back with an older log: always drop L1."""
    for server in ("run-2", None):
        cursor = Cursor()
        cursor.reset(b"e", EntryId(5, 0), "run-1")
        assert cursor.plan(b"e", [(EntryId(5, 0), b"a")], server) is None


def test_plan_gives_up_once_a_bare_message_was_seen() -> None:
    """Messages published without the log cannot be replayed: once one was seen on the
    channel, every new subscription drops L1."""
    listener = Recorder()
    cursor = Cursor()
    cursor.reset(b"e", EntryId(5, 0), "run-1")
    Receiver(listener, cursor, Heartbeat(1.0, 2.0, 0.0)).handle({"type": "message", "data": b"NC"})
    assert cursor.plan(b"e", [(EntryId(5, 0), b"a")], "run-1") is None


def test_a_rejected_message_does_not_move_the_cursor() -> None:
    """A forged or malformed message inside a valid-looking envelope neither moves the cursor
    nor reveals an epoch change, so it cannot make this instance skip real entries."""
    listener = Recorder(accept=False)
    cursor = Cursor()
    cursor.reset(b"e", EntryId(5, 0), "run-1")
    receiver = Receiver(listener, cursor, Heartbeat(1.0, 2.0, 0.0))
    receiver.handle({"type": "message", "data": envelope(b"e", "99999999999999-0", b"forged")})
    receiver.handle({"type": "message", "data": envelope(b"evil", "1-0", b"forged")})
    assert (cursor.epoch, cursor.last) == (b"e", EntryId(5, 0))
    assert [kind for kind, _ in listener.events] == ["message", "message"]


@pytest.mark.parametrize(
    ("epoch", "entries"),
    [
        (b"other", [(EntryId(5, 0), b"a")]),  # Redis lost its data
        (b"e", [(EntryId(6, 0), b"b")]),  # trimmed past the cursor
        (b"e", []),  # the log is gone or lost its tail
        (b"e", None),  # too long to replay
    ],
)
def test_plan_gives_up_when_the_log_cannot_cover_the_gap(
    epoch: bytes, entries: list[tuple[EntryId, bytes]] | None
) -> None:
    """A new epoch, a trimmed log, an empty log or an oversized gap means L1 must be dropped."""
    cursor = Cursor()
    cursor.reset(b"e", EntryId(5, 0))
    assert cursor.plan(epoch, entries) is None


def test_plan_without_a_cursor_gives_up() -> None:
    """A first subscription has nothing to replay from."""
    assert Cursor().plan(b"e", []) is None


def test_reconcile() -> None:
    """Reconciliation replays what the log has past the cursor, accepts a tail at or behind
    the cursor, and reports a loss on a new epoch."""
    cursor = Cursor()
    cursor.reset(b"e", EntryId(5, 0))
    assert reconcile(cursor, (b"e", EntryId(5, 0)), lambda _: pytest.fail("no read")) == []
    log = [(EntryId(5, 0), b"a"), (EntryId(9, 0), b"lost")]
    assert reconcile(cursor, (b"e", EntryId(9, 0)), lambda _: log) == [b"lost"]
    assert cursor.last == EntryId(9, 0)
    assert reconcile(cursor, (b"x", EntryId(1, 0)), lambda _: []) is None
    assert (cursor.epoch, cursor.last) == (b"x", EntryId(1, 0))


# -- rejected messages change no receiver state (issue 8, defect 7) -----------------------------


@pytest.mark.parametrize(
    "payload",
    [
        envelope(b"e", "99999999999999-0", b"forged"),  # far-future id, rejected message
        envelope(b"evil", "1-0", b"forged"),  # another epoch, rejected message
        b"NL\x00\x0399-0NCxyz",  # empty epoch: unparseable envelope
        envelope(b"e", "99-x", b"forged"),  # bad entry-id syntax: unparseable envelope
        b"NL\x01e\x30" + b"9" * 8,  # truncated envelope
    ],
)
def test_a_rejected_live_message_moves_neither_the_cursor_nor_the_epoch(payload: bytes) -> None:
    """Whatever a rejected live message's envelope claims, the cursor and its epoch stay, no
    loss is reported, and the entries after the cursor are still replayed."""
    listener = Recorder(accept=False)
    cursor = Cursor()
    cursor.reset(b"e", EntryId(5, 0), "run")
    Receiver(listener, cursor, Heartbeat(1.0, 2.0, 0.0)).handle(
        {"type": "message", "data": payload}
    )
    assert (cursor.epoch, cursor.last) == (b"e", EntryId(5, 0))
    assert [kind for kind, _ in listener.events] == ["message"]
    assert cursor.plan(b"e", [(EntryId(5, 0), b"a"), (EntryId(6, 0), b"b")], "run") == [b"b"]


def test_a_rejected_entry_in_a_replay_moves_the_cursor_only_along_the_log() -> None:
    """A replayed entry is placed by the log's own order (Redis assigns the ids), not by what
    it holds: an entry whose message is itself a forged envelope (another epoch, a far-future
    id) leaves the epoch alone and the cursor at the last entry read."""
    forged = envelope(b"evil", "99999999999999-0", b"forged")
    cursor = Cursor()
    cursor.reset(b"e", EntryId(5, 0), "run")
    log = [(EntryId(5, 0), b"a"), (EntryId(6, 0), forged), (EntryId(7, 0), b"c")]
    assert cursor.plan(b"e", log, "run") == [forged, b"c"]
    assert (cursor.epoch, cursor.last) == (b"e", EntryId(7, 0))
    # reconciliation: the same, and the epoch is the log's epoch key, never a message's
    log.append((EntryId(8, 0), forged))
    assert reconcile(cursor, (b"e", EntryId(8, 0)), lambda _: log[2:]) == [forged]
    assert (cursor.epoch, cursor.last) == (b"e", EntryId(8, 0))


def test_a_message_rejected_live_is_not_counted_again_when_reconciled() -> None:
    """A forgery published through the log is rejected live (counted once) and, since it did
    not move the cursor, met again by reconciliation: it is not handed on a second time. An
    entry with the same id but other bytes (the live copy was forged) still is."""
    listener = Recorder(accept=False)
    cursor = Cursor()
    cursor.reset(b"e", EntryId(5, 0), "run")
    receiver = Receiver(listener, cursor, Heartbeat(1.0, 2.0, 0.0))
    receiver.handle({"type": "message", "data": envelope(b"e", "6-0", b"forged")})
    receiver.handle({"type": "message", "data": envelope(b"e", "7-0", b"spoofed copy")})
    log = [(EntryId(5, 0), b"a"), (EntryId(6, 0), b"forged"), (EntryId(7, 0), b"genuine")]
    assert reconcile(cursor, (b"e", EntryId(7, 0)), lambda _: log) == [b"genuine"]
    assert cursor.last == EntryId(7, 0)
    assert cursor.plan(b"e", log[2:], "run") == []  # nothing left over for a later replay
