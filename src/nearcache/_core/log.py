"""The replay log: where a subscriber is in Redis's record of recent invalidations.

Publishers do not PUBLISH directly: one Lua script appends each message to a capped Redis
stream (``XADD ... MAXLEN ~ N``, ids from Redis's own clock) and publishes it wrapped in an
*envelope* that carries the log's epoch and the entry id. Because both happen in one script,
the log and the channel carry the same messages in the same order.

A subscriber remembers the epoch and the id of the last entry it applied (the cursor). After a
new subscription it reads the log from the cursor: if the cursor's own entry is still there and
the epoch is unchanged, replaying the entries after it makes L1 whole again — no wipe. If the
log was trimmed past the cursor or the epoch changed (Redis lost its data: restart without
persistence, FLUSHALL), it cannot know what it missed and L1 is dropped instead.

Envelope (see docs/protocol.md)::

    b"NL" | epoch length (1 byte) | epoch (ASCII) | id length (1 byte) | id (ASCII "ms-seq")
          | message (the ``_codec`` format)

No I/O here: the backplanes read the log and call these decisions.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from nearcache._core.commands import Call, Pipeline, RunScript
from nearcache._exceptions import MessageError

__all__ = [
    "ENVELOPE_MAGIC",
    "EPOCH_SCRIPT",
    "PUBLISH_SCRIPT",
    "REFRESH_EVERY",
    "SHARDED_EPOCH_SCRIPT",
    "SHARDED_PUBLISH_SCRIPT",
    "Cursor",
    "EntryId",
    "Envelope",
    "epoch_script_call",
    "log_keys",
    "new_epoch",
    "parse_entries",
    "parse_epoch_reply",
    "parse_id",
    "publish_command",
    "publish_script_call",
    "published_to",
    "reconcile",
    "unwrap",
]

ENVELOPE_MAGIC = b"NL"
# Live messages rejected ahead of the cursor that are remembered so that meeting them again in
# the log does not count them twice; past this many (a flood of forgeries) they are not.
REJECTED_REMEMBERED = 256

# KEYS[1] log stream, KEYS[2] epoch key. ARGV[1] channel, ARGV[2] max log length,
# ARGV[3] a fresh random epoch to use if none exists, ARGV[4] '1' to refresh the keys' expiry
# ('0' otherwise), ARGV[5...] messages. Returns {epoch, last id, receivers of the last publish}.
# Both keys expire a week after their last refresh: when either was just created, and when
# the publisher asks, which a publisher does at least once an hour while it publishes
# (REFRESH_EVERY), so that the common publish runs no EXPIRE. A log that went missing while
# its epoch stayed (deleted, evicted) shows as XADD NOMKSTREAM's nil reply, at no extra call;
# Redis before 6.2 refuses NOMKSTREAM (caught by pcall), so there every publish refreshes.
PUBLISH_SCRIPT = """
local epoch = redis.call('GET', KEYS[2])
local refresh = ARGV[4] == '1'
if not epoch then
  redis.call('SET', KEYS[2], ARGV[3])
  epoch = ARGV[3]
  refresh = true
end
local head = 'NL' .. string.char(#epoch) .. epoch
local id, receivers = '', 0
for i = 5, #ARGV do
  id = redis.pcall('XADD', KEYS[1], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[i])
  if type(id) ~= 'string' then
    -- No log yet (nil), or a Redis before 6.2 (an error: no NOMKSTREAM): create it.
    id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', ARGV[i])
    refresh = true
  end
  receivers = redis.call('PUBLISH', ARGV[1], head .. string.char(#id) .. id .. ARGV[i])
end
-- A channel nobody writes to for a week leaves nothing behind.
if refresh then
  redis.call('EXPIRE', KEYS[1], 604800)
  redis.call('EXPIRE', KEYS[2], 604800)
end
return {epoch, id, receivers}
"""
# A publisher asks the publish script to refresh the keys' expiry on its first publish on a
# connection and then on the first publish at least this many seconds after it last asked: the
# keys then expire between a week less this and a week after the last publish.
REFRESH_EVERY = 3600.0

# KEYS[1] epoch key, KEYS[2] log stream. ARGV[1] a fresh random epoch to use if none exists,
# ARGV[2] the channel. Returns {epoch, refused}: refused lists "COMMAND key-or-channel" for
# each command publishing through the log needs that the user's ACL forbids (checked with
# redis.acl_check_cmd, Redis 7.0 and later; always empty before).
EPOCH_SCRIPT = """
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', 604800)
  epoch = ARGV[1]
end
local refused = {}
if redis.acl_check_cmd then
  local needs = {
    {'XADD', KEYS[2], 'MAXLEN', '~', '1', '*', 'm', 'x'},
    {'PUBLISH', ARGV[2], 'x'},
    {'SET', KEYS[1], 'x'},
    {'EXPIRE', KEYS[2], '1'},
    {'EXPIRE', KEYS[1], '1'},
    {'XRANGE', KEYS[2], '-', '+'},
    {'XREVRANGE', KEYS[2], '+', '-'},
  }
  for _, command in ipairs(needs) do
    if not redis.acl_check_cmd(unpack(command)) then
      refused[#refused + 1] = command[1] .. ' ' .. command[2]
    end
  end
end
return {epoch, refused}
"""


# On a Redis Cluster the channel is a shard channel in the slot of the log's keys: the same
# scripts with SPUBLISH (one slot, so one script may write the log and publish).
SHARDED_PUBLISH_SCRIPT = PUBLISH_SCRIPT.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")
SHARDED_EPOCH_SCRIPT = EPOCH_SCRIPT.replace("{'PUBLISH', ARGV[2]", "{'SPUBLISH', ARGV[2]")


def log_keys(channel: str) -> tuple[str, str]:
    """The replay log's stream key and epoch key of a wire channel."""
    return f"{channel}:log", f"{channel}:epoch"


def new_epoch() -> str:
    """A fresh random epoch candidate (used by the scripts only if Redis has none)."""
    return os.urandom(8).hex()


def publish_script_call(
    channel: str, log_length: int, payloads: Sequence[bytes], *, refresh: bool = True
) -> tuple[list[str], list[str | int | bytes]]:
    """The KEYS and ARGV of :data:`PUBLISH_SCRIPT` for these messages; ``refresh``: whether
    the script refreshes the keys' expiry (see :data:`REFRESH_EVERY`; a publisher that does
    not keep track asks every time)."""
    flag = "1" if refresh else "0"
    return list(log_keys(channel)), [channel, log_length, new_epoch(), flag, *payloads]


def publish_command(
    channel: str, log_length: int, payloads: Sequence[bytes], *, sharded: bool = False
) -> RunScript | Call | Pipeline:
    """What publishing ``payloads`` in order takes, in one round trip: the publish script
    (through the log), or a plain ``PUBLISH`` per message when ``log_length`` is 0;
    ``SPUBLISH`` when ``sharded`` (a Redis Cluster shard channel). Its reply goes to
    :func:`published_to`."""
    if log_length:
        keys, args = publish_script_call(channel, log_length, payloads)
        return RunScript(SHARDED_PUBLISH_SCRIPT if sharded else PUBLISH_SCRIPT, keys, args)
    method = "spublish" if sharded else "publish"
    if len(payloads) == 1:
        return Call(method, (channel, payloads[0]))
    return Pipeline(tuple(Call(method, (channel, payload)) for payload in payloads))


def published_to(command: RunScript | Call | Pipeline, reply: Any) -> int:
    """How many subscribers received the last message, from the reply to
    :func:`publish_command`'s command."""
    if isinstance(command, RunScript):
        return int(reply[2])  # {epoch, last id, receivers}
    if isinstance(command, Pipeline):
        return int(reply[-1]) if reply else 0
    return int(reply)


def epoch_script_call(channel: str) -> tuple[list[str], list[str]]:
    """The KEYS and ARGV of :data:`EPOCH_SCRIPT` for a wire channel."""
    log_key, epoch_key = log_keys(channel)
    return [epoch_key, log_key], [new_epoch(), channel]


def parse_epoch_reply(reply: Any) -> tuple[bytes, list[str]]:
    """The epoch and the refused commands from :data:`EPOCH_SCRIPT`'s reply."""
    epoch, refused = reply
    return bytes(epoch), [r.decode() if isinstance(r, bytes) else str(r) for r in refused or ()]


class EntryId(NamedTuple):
    """A stream entry id: Redis server milliseconds and a sequence within them."""

    ms: int
    seq: int

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


ZERO = EntryId(0, 0)


def parse_id(raw: bytes | str) -> EntryId:
    """Parse ``b"1700000000000-3"``; raise MessageError if malformed."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    ms, sep, seq = text.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit():
        raise MessageError(f"malformed log entry id {text[:40]!r}")
    return EntryId(int(ms), int(seq))


class Envelope(NamedTuple):
    """A message as published through the log."""

    epoch: bytes
    entry: EntryId
    message: bytes


def unwrap(data: bytes) -> Envelope | None:
    """The envelope of a logged message, or None for a bare message (published without the
    log, e.g. by an older tool). Raise MessageError if an envelope is malformed."""
    if not data.startswith(ENVELOPE_MAGIC):
        return None
    try:
        pos = 2
        epoch_len = data[pos]
        epoch = bytes(data[pos + 1 : pos + 1 + epoch_len])
        pos += 1 + epoch_len
        id_len = data[pos]
        entry = parse_id(bytes(data[pos + 1 : pos + 1 + id_len]))
        pos += 1 + id_len
    except IndexError:
        raise MessageError("truncated envelope") from None
    if len(epoch) != epoch_len or not epoch:
        raise MessageError("truncated envelope epoch")
    return Envelope(epoch, entry, bytes(data[pos:]))


class Cursor:
    """The subscriber's position in the log: epoch and last applied entry."""

    def __init__(self) -> None:
        self.epoch: bytes | None = None
        self.last: EntryId | None = None
        self.server: str | None = None  # the Redis run id the cursor was read from
        self.bare = False  # a message published without the log was seen on the channel
        # Entries just replayed from the log, whose live copies may still be on their way.
        # Live messages are skipped only when they are one of these: never because of the
        # cursor's position, which an envelope (unsigned: Redis writes it) could push ahead.
        self._replayed: set[EntryId] = set()
        self._replayed_max: EntryId | None = None
        # Live envelopes ahead of the cursor whose message was rejected: entry id -> digest of
        # the message. Reconciliation or a replay that meets the same bytes at that id in the
        # log skips them (they would be rejected again, and counted twice); other bytes at that
        # id (the live copy was a forgery) are replayed as usual.
        self._rejected: dict[EntryId, bytes] = {}

    def saw_bare_message(self) -> None:
        """Someone publishes without the log: what they send during an outage cannot be
        replayed, so from now on every new subscription drops L1."""
        self.bare = True

    def accept(self, envelope: Envelope) -> bool:
        """Whether a live envelope should be applied: False only for the live copy of an
        entry that was just replayed from the log (applying it twice is harmless, but it is
        not new)."""
        if not self._replayed or envelope.epoch != self.epoch:
            return True
        if envelope.entry in self._replayed:
            self._replayed.discard(envelope.entry)
            return False
        if self._replayed_max is not None and envelope.entry > self._replayed_max:
            self._replayed.clear()  # live messages have caught up with the replay
        return True

    def rejected(self, envelope: Envelope) -> None:
        """A live envelope's message was rejected (it moves nothing): remember it, so that the
        same entry met in the log is not handed on, and counted, a second time."""
        if (
            envelope.epoch == self.epoch
            and (self.last is None or envelope.entry > self.last)
            and len(self._rejected) < REJECTED_REMEMBERED
        ):
            self._rejected[envelope.entry] = _digest(envelope.message)

    def epoch_changed(self, envelope: Envelope) -> bool:
        """Whether this envelope reveals that Redis lost its log (a new epoch)."""
        return self.epoch is not None and envelope.epoch != self.epoch

    def advance(self, envelope: Envelope) -> None:
        """Record that ``envelope`` was applied."""
        if envelope.epoch != self.epoch:
            self.epoch, self.last = envelope.epoch, envelope.entry
            self._rejected.clear()
        elif self.last is None or envelope.entry > self.last:
            self.last = envelope.entry
            if self._rejected:
                self._forget_rejected()

    def plan(
        self,
        epoch: bytes,
        entries: Sequence[tuple[EntryId, bytes]] | None,
        server: str | None = None,
    ) -> list[bytes] | None:
        """Decide the repair after a new subscription.

        ``entries`` are the log's entries from the cursor (inclusive) onwards, or None when the
        log was not read (no cursor). ``server`` is Redis's run id now: a restarted server
        (or a failover) may have come back with an older copy of the log that lacks entries
        this instance never received, so a change of server always drops L1. Return the
        messages to replay when the log covers every entry after the cursor, or None when L1
        must be dropped instead.
        """
        if (
            self.epoch is None
            or self.last is None
            or epoch != self.epoch
            or entries is None
            or self.bare
            or server is None
            or server != self.server
        ):
            return None
        return self.follow(entries)

    def follow(self, entries: Sequence[tuple[EntryId, bytes]] | None) -> list[bytes] | None:
        """The messages after the cursor in ``entries`` (the log read from the cursor, itself
        included), moving the cursor to the end; None if they do not start at the cursor."""
        if entries is None or not entries or entries[0][0] != self.last:
            return None  # the cursor's own entry is gone: trimmed past it, or a lost tail
        rejected = self._rejected
        replay = [
            message
            for entry, message in entries[1:]
            if not rejected or rejected.get(entry) != _digest(message)
        ]
        self._replayed = {entry for entry, _ in entries}
        self._replayed_max = entries[-1][0]
        self.last = entries[-1][0]
        if rejected:
            self._forget_rejected()
        return replay

    def position(self) -> tuple[bytes, str] | None:
        """The epoch and the last entry applied here (what a value set now is checked from by
        the publish script), or None before the first one. Read from any thread: the epoch
        and the entry are read once each, and a mixed pair is only ever older or unknown."""
        epoch, last = self.epoch, self.last
        if epoch is None or last is None:
            return None
        return epoch, str(last)

    def _forget_rejected(self) -> None:
        """Drop remembered rejections the cursor has passed: the log is never read there
        again."""
        last = self.last
        self._rejected = {e: d for e, d in self._rejected.items() if last is None or e > last}

    def reset(self, epoch: bytes, last: EntryId | None, server: str | None = None) -> None:
        """Start over at the log's current end (after L1 was dropped)."""
        self._replayed.clear()
        self._rejected.clear()
        self.epoch = epoch
        self.last = last
        if server is not None:
            self.server = server


def reconcile(
    cursor: Cursor,
    tail: tuple[bytes, EntryId | None],
    read_log: Callable[[EntryId], Sequence[tuple[EntryId, bytes]] | None],
) -> list[bytes] | None:
    """Compare the log's tail (read before a heartbeat whose pong has now arrived) with the
    cursor. Return the messages to replay (usually none), or None when the loss cannot be
    repaired from the log and L1 must be dropped; the cursor is moved either way."""
    epoch, last = tail
    if epoch != cursor.epoch:
        if cursor.epoch is None:
            cursor.reset(epoch, last)
            return []
        cursor.reset(epoch, last)
        return None
    if last is None or (cursor.last is not None and last <= cursor.last):
        return []
    if cursor.last is None:
        cursor.reset(epoch, last)
        return None
    replay = cursor.follow(read_log(cursor.last))  # same subscription: same server
    if replay is None:
        cursor.reset(epoch, last)
    return replay


def _digest(message: bytes) -> bytes:
    """Identifies a message's bytes (a forger cannot make other bytes match it)."""
    return hashlib.blake2b(message, digest_size=16).digest()


def parse_entries(page: Any) -> list[tuple[EntryId, bytes]]:
    """Entries of an XRANGE/XREVRANGE reply as (id, message); an entry without a message
    field (not written by nearcache) is kept with an empty message, which the cache counts
    as malformed."""
    return [(parse_id(eid), bytes((fields or {}).get(b"m", b""))) for eid, fields in page or ()]
