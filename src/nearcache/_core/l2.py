"""The shared Redis L2: key layout, value format, leases and the Lua scripts (documented byte
for byte in docs/protocol.md). No I/O: the drivers run the scripts.

Keys, with ``{wire}`` the wire channel (``nearcache:v1:shop``) and ``{ns}`` the same name
without hash-tag braces::

    {wire}:gen               string  generation token of the whole cache (a clear replaces it)
    {wire}:rgen              hash    region (its wire encoding) -> generation token
    {ns}:l2:{<32 hex>}        string  a value record
    {ns}:l2:{<32 hex>}:lease  string  lease token of the process loading that key (PX)

The generations sit beside the replay log (their names follow the log's, so a hash-tagged
log on a cluster takes them along); a value and its lease share a hash tag, so they are in one
slot, and values spread over the slots of a cluster. The 32 hex digits are BLAKE2b-128 of the
channel, region and key; the record repeats region and key, so a digest collision or a moved
value is detected and treated as a miss.

A generation token is the replay log's entry id of the clear that set it (``"ms-seq"``) or,
when the key or hash field was missing, ``"0-0."`` followed by 16 random hex digits. A value
record is tagged with the tokens current when it was written, and is reachable only while
they are: ``clear_region`` and ``clear`` make values unreachable in O(1), and a lost or evicted
generation makes every older value unreachable (it comes back with a new random token).

Record::

    u8 length, cache generation token; u8 length, region generation token;
    payload: "NV" | version 01 | flags (bit 0: signed) | serializer id (u8)
             | region | key (the message encodings) | u32 length, serialized value
             | [key id, key-id length (u8), HMAC-SHA256 of the payload before it]

The tags are written by the scripts, outside the signature (Redis, not the writer, knows
them); the signature covers what a reader must trust: serializer, region, key and value.

Topologies. On a standalone server every script runs where everything is, and the tags carry
the *reign* (the server's replication id, new after every restart): a restart from an older
copy of the data makes every older value and lease unusable, and the conflict check does not
trust a log position taken before the reign began. With Sentinel the same scripts run on the
primary, and the reign is the primary's replication id and the Sentinel epoch: a failover,
which may lose what was not replicated, has the same effect. On a Redis Cluster the
generations and the log live in the channel's slot and each value in its own, so the scripts
split: a read asks the channel's slot for the generations (``GENS_SCRIPT``) and then the
value's (``VREAD_SCRIPT``); a write marks its keys as being written and deletes their values
(``PREPARE_SCRIPT``), publishes with the conflict check on the channel's slot
(``PUBLISH_SCRIPT`` in split mode, which returns the tags), and then stores each value only
if no other write of the key overlapped it (``COMMIT_SCRIPT``). Each node's replication id
is part of the tags there too. The argument is in docs/guarantees.md, the bytes in
docs/protocol.md.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from nearcache._core.codec import (
    Key,
    Region,
    _encode_key,
    _encode_region,
    _verify,
)
from nearcache._core.log import EntryId, log_keys, parse_id
from nearcache._core.serializer import SafeSerializer
from nearcache._exceptions import ConfigurationError, MessageError
from nearcache._typing import Serializer

__all__ = [
    "COMMIT_SCRIPT",
    "FILL_SCRIPT",
    "GENS_SCRIPT",
    "PREPARE_SCRIPT",
    "PUBLISH_SCRIPT",
    "READ_SCRIPT",
    "RELEASE_SCRIPT",
    "SCAN_LIMIT",
    "SHARDED_PUBLISH_SCRIPT",
    "VFILL_SCRIPT",
    "VREAD_SCRIPT",
    "WRITE_MARK_TTL",
    "L2Options",
    "LeaseWait",
    "MessagePlan",
    "ReadResult",
    "commit_call",
    "decode_record",
    "encode_payload",
    "fill_call",
    "generation_keys",
    "gens_call",
    "key_encoding",
    "new_token",
    "oldest",
    "parse_read",
    "prepare_call",
    "publish_call",
    "read_call",
    "region_field",
    "reign_arg",
    "reign_key",
    "tagged",
    "ttl_left",
    "value_keys",
    "value_writes",
    "vfill_call",
    "vread_call",
    "write_token",
    "writers_key",
]

PAYLOAD_MAGIC = b"NV"
PAYLOAD_VERSION = 1
_FLAG_SIGNED = 0x01
_PAYLOAD_HEAD = 5  # magic, version, flags, serializer id
_U32 = struct.Struct(">I")
_DIGEST_PERSON = b"nearcache-l2"
SCAN_LIMIT = 1000  # log entries a publish examines for conflicting writes; past it: conflict


# -- options ------------------------------------------------------------------------------


@dataclass(frozen=True)
class L2Options:
    """The shared L2 and value-carrying updates of one cache (see docs/configuration.md).

    Args:
        l2: keep values in Redis too, between L1 and the factory.
        propagate: ``"invalidate"`` (others drop their copy on a write) or ``"update"``
            (``set`` sends the new value, up to ``update_max_bytes``, and others replace it).
        serializer: turns values into bytes for L2 and updates (default: SafeSerializer).
        l2_ttl: cap on the time a value lives in L2, seconds (default: the cache's max_age).
        l2_max_bytes: larger serialized values are kept in L1 only (counted).
        l2_lease_ttl: how long a process may hold the right to load a key, seconds.
        l2_lease_wait: how long a process waits for another one's load, seconds.
        l2_timeout: the timeout of every L2 command, seconds.
        update_max_bytes: larger values travel as invalidations.
    """

    l2: bool = False
    propagate: Literal["invalidate", "update"] = "invalidate"
    serializer: Serializer = field(default_factory=SafeSerializer)
    l2_ttl: float | None = None
    l2_max_bytes: int = 1 << 20
    l2_lease_ttl: float = 5.0
    l2_lease_wait: float = 1.0
    l2_timeout: float = 0.5
    update_max_bytes: int = 64 << 10

    @property
    def active(self) -> bool:
        """Whether anything here changes how the cache publishes."""
        return self.l2 or self.propagate == "update"

    def check(self, *, signed: bool, networked: bool, replay_log: int) -> None:
        """Raise ConfigurationError for a combination that cannot work."""
        if not isinstance(self.l2, bool):
            raise ConfigurationError(f"l2 must be True or False, got {self.l2!r}", option="l2")
        if self.propagate not in ("invalidate", "update"):
            raise ConfigurationError(
                f"propagate must be 'invalidate' or 'update', got {self.propagate!r}",
                option="propagate",
            )
        serializer = self.serializer
        if not isinstance(serializer, Serializer):
            raise ConfigurationError(
                "serializer must have id, needs_signing, dumps() and loads() "
                f"(got {type(serializer).__name__})",
                option="serializer",
            )
        if (
            isinstance(serializer.id, bool)
            or not isinstance(serializer.id, int)
            or not 1 <= serializer.id <= 255
        ):
            raise ConfigurationError(
                f"serializer id must be an int from 1 to 255, got {serializer.id!r}",
                option="serializer",
            )
        for name in ("l2_max_bytes", "update_max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"{name} must be a positive int, got {value!r}", option=name
                )
        for name in ("l2_ttl", "l2_lease_ttl", "l2_lease_wait", "l2_timeout"):
            value = getattr(self, name)
            if value is None and name == "l2_ttl":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value < math.inf
            ):
                raise ConfigurationError(
                    f"{name} must be a positive number of seconds, got {value!r}", option=name
                )
        if not self.active:
            return
        what = "l2=True" if self.l2 else 'propagate="update"'
        if not networked:
            raise ConfigurationError(
                f"{what} needs a Redis connection (a local cache has no one to share with)",
                option="l2" if self.l2 else "propagate",
            )
        if replay_log < 1:
            raise ConfigurationError(
                f"{what} needs the replay log (replay_log > 0): writes are checked against it",
                option="replay_log",
            )
        if serializer.needs_signing and not signed:
            raise ConfigurationError(
                f"{type(serializer).__name__} can run code when loading: it needs secret= so "
                "that only values this application signed are loaded",
                option="serializer",
            )


# -- names --------------------------------------------------------------------------------


def generation_keys(channel: str) -> tuple[str, str]:
    """The cache's generation key and the regions' generation hash of a wire channel.

    Named from the log's key, so that they stay in the log's slot whatever its name."""
    log_key, _ = log_keys(channel)
    base = log_key.removesuffix(":log")
    return f"{base}:gen", f"{base}:rgen"


def reign_key(channel: str) -> str:
    """Where the publish script records the reign it last saw and the log entry it began
    after, beside the generations."""
    log_key, _ = log_keys(channel)
    return log_key.removesuffix(":log") + ":reign"


def writers_key(value_key: str) -> str:
    """The marks of the writes of a key under way (Redis Cluster only), beside its value."""
    return f"{value_key}:writers"


def reign_arg(kind: Literal["standalone", "sentinel", "cluster"], epoch: int | None = None) -> str:
    """The scripts' reign argument: ``:s`` on a standalone server, ``:<epoch>`` with Sentinel
    (the configuration epoch of the primary's reign), ``:c`` on a cluster. A standalone server
    has a reign too: restarted with its data, it may come back with an older copy of it (an
    RDB snapshot, an AOF that lost its last second) and a new replication id. ('' = no reign
    remains for scripts run by hand.)"""
    if kind == "standalone":
        return ":s"
    return f":{epoch or 0}" if kind == "sentinel" else ":c"


def region_field(region: Region) -> bytes:
    """The region's field in the generation hash: its wire encoding (the default region is
    ``FF FF``; every name maps to one field)."""
    out = bytearray()
    _encode_region(out, region)
    return bytes(out)


def key_encoding(key: Key) -> bytes:
    """The key's wire encoding (type, u32 length, bytes), as in messages."""
    out = bytearray()
    _encode_key(out, key)
    return bytes(out)


def value_keys(channel: str, region: Region, key: Key) -> tuple[str, str]:
    """The Redis keys of one cached key's L2 value and of its lease."""
    digest = hashlib.blake2b(
        channel.encode() + b"\x00" + region_field(region) + key_encoding(key),
        digest_size=16,
        person=_DIGEST_PERSON,
    ).hexdigest()
    namespace = channel.replace("{", "").replace("}", "")
    value = f"{namespace}:l2:{{{digest}}}"
    return value, f"{value}:lease"


def oldest(positions: Sequence[tuple[bytes, str] | None]) -> tuple[bytes, str] | None:
    """The earliest of log positions (epoch, entry id); None if one is unknown, they span
    epochs, or there are none."""
    best: tuple[bytes, str] | None = None
    best_id: EntryId | None = None
    for position in positions:
        if position is None or (best is not None and position[0] != best[0]):
            return None
        try:
            entry = parse_id(position[1])
        except MessageError:
            return None
        if best_id is None or entry < best_id:
            best, best_id = position, entry
    return best


def new_token() -> str:
    """A random lease token, or the random part of a generation token."""
    return os.urandom(8).hex()


# -- the value record ---------------------------------------------------------------------


def encode_payload(
    serializer: int,
    region: Region,
    key: Key,
    data: bytes,
    signing_key: tuple[str, bytes] | None = None,
) -> bytes:
    """The signed part of a value record (the scripts prepend the generation tags)."""
    out = bytearray(PAYLOAD_MAGIC)
    out += bytes((PAYLOAD_VERSION, _FLAG_SIGNED if signing_key else 0, serializer))
    _encode_region(out, region)
    _encode_key(out, key)
    out += _U32.pack(len(data))
    out += data
    if signing_key is not None:
        key_id, secret = signing_key
        raw_id = key_id.encode()
        out += raw_id
        out.append(len(raw_id))
        out += hmac.new(secret, bytes(out), hashlib.sha256).digest()
    return bytes(out)


def split_record(record: bytes) -> tuple[bytes, bytes, bytes]:
    """The generation tags and the payload of a record; MessageError if malformed."""
    try:
        n = record[0]
        gen = record[1 : 1 + n]
        m = record[1 + n]
        rgen = record[2 + n : 2 + n + m]
    except IndexError:
        raise MessageError("truncated L2 record") from None
    if len(rgen) != m:
        raise MessageError("truncated L2 record")
    return bytes(gen), bytes(rgen), bytes(record[2 + n + m :])


def tagged(record: bytes, gen: bytes, rgen: bytes) -> bool:
    """Whether a record carries exactly these generation tags (what the read script checks
    against the current generations in Redis)."""
    n = len(gen)
    return (
        record[:1] == bytes((n,))
        and record[1 : 1 + n] == gen
        and record[1 + n : 2 + n] == bytes((len(rgen),))
        and record[2 + n : 2 + n + len(rgen)] == rgen
    )


def decode_record(
    record: bytes,
    region: Region,
    key: Key,
    serializer: int,
    secrets: Mapping[str, bytes] | None = None,
) -> bytes:
    """The serialized value of a record read for ``key`` of ``region``.

    Raise MessageError unless the record is well formed, written with ``serializer``, for
    this very region and key, and signed with one of ``secrets`` when there are any (and
    unsigned when there are none): a foreign, corrupt or forged value is a miss.
    """
    _, _, payload = split_record(record)
    head = bytearray(PAYLOAD_MAGIC)
    head += bytes((PAYLOAD_VERSION, _FLAG_SIGNED if secrets else 0, serializer))
    _encode_region(head, region)
    _encode_key(head, key)
    if not payload.startswith(head):
        if payload[:2] != PAYLOAD_MAGIC:
            raise MessageError("not a nearcache L2 value (bad magic)")
        if len(payload) >= _PAYLOAD_HEAD and payload[2] != PAYLOAD_VERSION:
            raise MessageError(f"unsupported L2 value version {payload[2]}")
        if len(payload) >= _PAYLOAD_HEAD and payload[3] != head[3]:
            raise MessageError("L2 value signed" if payload[3] else "L2 value not signed")
        if len(payload) >= _PAYLOAD_HEAD and payload[4] != serializer:
            raise MessageError(f"L2 value written by serializer {payload[4]}, not {serializer}")
        raise MessageError("L2 value of another region or key")
    end = len(payload)
    if secrets:
        end, _ = _verify(payload, secrets, len(head) + _U32.size)
    pos = len(head)
    if pos + _U32.size > end:
        raise MessageError("truncated L2 value")
    (length,) = _U32.unpack_from(payload, pos)
    pos += _U32.size
    if pos + length != end:
        raise MessageError("L2 value length does not match its record")
    return payload[pos:end]


# -- reads and fills ----------------------------------------------------------------------

# The reign suffix of the tags (a Lua function every script below starts with). ARGV reign
# '' (no reign: scripts run by hand): no suffix. Otherwise '@' + this node's replication id +
# the argument (':s' standalone, ':<Sentinel epoch>' with Sentinel, ':c' on a cluster): a
# restarted server and a promoted replica get a new replication id, a primary promoted again
# gets a new Sentinel epoch, so values written before a restart or a failover (which may have
# lost acknowledged writes) never match again.
# nil when INFO is not permitted: the reign is unknown and nothing may be trusted.
REIGN_LUA = """
local function reign(arg)
  if arg == '' then return '' end
  local ok, info = pcall(redis.call, 'INFO', 'replication')
  local id = ok and type(info) == 'string' and string.match(info, 'master_replid:(%w+)')
  if not id then return nil end
  return '@' .. id .. arg
end
"""
NO_REIGN = "return redis.error_reply('NOREIGN nearcache L2: INFO replication is not permitted')"

# KEYS[1] value, KEYS[2] lease, KEYS[3] cache generation, KEYS[4] region generations.
# ARGV[1] region field, ARGV[2] lease token ('' = do not take the lease), ARGV[3] lease ttl ms,
# ARGV[4] random hex for a generation found missing, ARGV[5] reign.
# Returns {status, record, pttl, tag, rgen}: status 1 a value (record, its PTTL), 0 no value,
# 2 no value and the lease is ours, 3 no value and another process holds the lease; tag is
# the cache generation with the reign suffix (what a record's first tag must be).
READ_SCRIPT = (
    REIGN_LUA
    + """local sfx = reign(ARGV[5])
if not sfx then """
    + NO_REIGN
    + """ end
local g = redis.call('GET', KEYS[3])
if not g then g = '0-0.' .. ARGV[4]; redis.call('SET', KEYS[3], g) end
g = g .. sfx
local r = redis.call('HGET', KEYS[4], ARGV[1])
if not r then r = '0-0.' .. ARGV[4]; redis.call('HSET', KEYS[4], ARGV[1], r) end
local v = redis.call('GET', KEYS[1])
if v then
  local n = string.byte(v, 1) or 0
  local m = string.byte(v, n + 2) or 0
  if string.sub(v, 2, n + 1) == g and string.sub(v, n + 3, n + 2 + m) == r then
    return {1, v, redis.call('PTTL', KEYS[1]), g, r}
  end
  -- Written under an older generation or reign: unreachable for good.
  redis.call('DEL', KEYS[1])
end
if ARGV[2] == '' then return {0, '', 0, g, r} end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then return {2, '', 0, g, r} end
return {3, '', 0, g, r}
"""
)

# KEYS as READ_SCRIPT. ARGV[1] lease token, ARGV[2] payload, ARGV[3] ttl ms, ARGV[4] region
# field, ARGV[5] and ARGV[6] the tags READ_SCRIPT returned with the lease, ARGV[7] reign.
# Stores the value only if the lease is still ours (a write of the key deletes it) and no
# clear or failover happened since; returns 1 if stored, else 0. The lease is given up either
# way.
FILL_SCRIPT = (
    REIGN_LUA
    + """if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
local sfx = reign(ARGV[7])
local g = redis.call('GET', KEYS[3])
if not sfx or not g or g .. sfx ~= ARGV[5] then return 0 end
if redis.call('HGET', KEYS[4], ARGV[4]) ~= ARGV[6] then return 0 end
redis.call('SET', KEYS[1],
  string.char(#ARGV[5]) .. ARGV[5] .. string.char(#ARGV[6]) .. ARGV[6] .. ARGV[2],
  'PX', ARGV[3])
return 1
"""
)

# -- the split read path of a Redis Cluster (see the module docstring) -------------------

# On the channel's slot. KEYS[1] cache generation, KEYS[2] region generations. ARGV[1] region
# field, ARGV[2] random hex for a generation found missing, ARGV[3] reign.
# Returns {tag, rgen}: the cache generation with this node's reign suffix, the region's.
GENS_SCRIPT = (
    REIGN_LUA
    + """local sfx = reign(ARGV[3])
if not sfx then """
    + NO_REIGN
    + """ end
local g = redis.call('GET', KEYS[1])
if not g then g = '0-0.' .. ARGV[2]; redis.call('SET', KEYS[1], g) end
local r = redis.call('HGET', KEYS[2], ARGV[1])
if not r then r = '0-0.' .. ARGV[2]; redis.call('HSET', KEYS[2], ARGV[1], r) end
return {g .. sfx, r}
"""
)

# On the value's slot. KEYS[1] value, KEYS[2] lease, KEYS[3] writers. ARGV[1] and ARGV[2] the
# tags GENS_SCRIPT returned, ARGV[3] lease token ('' = do not take the lease), ARGV[4] lease
# ttl ms, ARGV[5] reign. Returns what READ_SCRIPT returns (the tag with this node's reign
# appended). While a write of the key is under way (marked less than a lease ttl ago) no
# lease is given: its value comes in a moment.
VREAD_SCRIPT = (
    REIGN_LUA
    + """local sfx = reign(ARGV[5])
if not sfx then """
    + NO_REIGN
    + """ end
local g, r = ARGV[1] .. sfx, ARGV[2]
local v = redis.call('GET', KEYS[1])
if v then
  local n = string.byte(v, 1) or 0
  local m = string.byte(v, n + 2) or 0
  if string.sub(v, 2, n + 1) == g and string.sub(v, n + 3, n + 2 + m) == r then
    return {1, v, redis.call('PTTL', KEYS[1]), g, r}
  end
  redis.call('DEL', KEYS[1])
end
if ARGV[3] == '' then return {0, '', 0, g, r} end
local at = redis.call('HGET', KEYS[3], 'at')
if at then
  local t = redis.call('TIME')
  if t[1] * 1000 + math.floor(t[2] / 1000) - tonumber(at) < tonumber(ARGV[4]) then
    return {3, '', 0, g, r}
  end
end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[4]) then return {2, '', 0, g, r} end
return {3, '', 0, g, r}
"""
)

# On the value's slot. KEYS[1] value, KEYS[2] lease. ARGV[1] lease token, ARGV[2] payload,
# ARGV[3] ttl ms, ARGV[4] and ARGV[5] the tags VREAD_SCRIPT returned with the lease. Stores
# the value only if the lease is still ours; returns 1 if stored, else 0. A clear or a
# failover since the read left the tags stale: such a value is never reachable.
VFILL_SCRIPT = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[1],
  string.char(#ARGV[4]) .. ARGV[4] .. string.char(#ARGV[5]) .. ARGV[5] .. ARGV[2],
  'PX', ARGV[3])
return 1
"""

# KEYS[1] lease. ARGV[1] lease token. Gives the lease up if it is still ours.
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0
"""


class ReadResult(NamedTuple):
    """What :data:`READ_SCRIPT` found."""

    status: int  # 1 value, 0 none, 2 none and the lease is ours, 3 none, lease held elsewhere
    record: bytes
    pttl: float | None  # seconds the value has left in L2 (None: no expiry)
    gen: bytes
    rgen: bytes
    # The value is current only as of the subscription's confirmations (Sentinel: the node it
    # came from may have stopped being the primary; see docs/guarantees.md).
    confirmed_only: bool = False


VALUE, NO_VALUE, LEASED, LEASE_HELD = 1, 0, 2, 3


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def ttl_left(pttl: int) -> float | None:
    """Seconds a value just read has left in L2, from the ``PTTL`` that came with it: None
    only for -1 (no expiry). 0 (under a millisecond left) and -2 (it expired between the
    ``GET`` and the ``PTTL``) are a millisecond: the value was there when read, but an L1 copy
    must not outlive it (as "no expiry" it lived in L1 for good)."""
    return None if pttl == -1 else max(pttl, 1) / 1000


def read_call(
    channel: str, region: Region, key: Key, token: str, lease_ttl: float, reign: str = ""
) -> tuple[list[str], list[str | bytes | int]]:
    """The KEYS and ARGV of :data:`READ_SCRIPT` (``token`` '' = do not take the lease)."""
    value, lease = value_keys(channel, region, key)
    gen, rgen = generation_keys(channel)
    return [value, lease, gen, rgen], [
        region_field(region),
        token,
        _ms(lease_ttl),
        new_token(),
        reign,
    ]


def gens_call(
    channel: str, region: Region, reign: str
) -> tuple[list[str], list[str | bytes | int]]:
    """The KEYS and ARGV of :data:`GENS_SCRIPT` (a cluster read, on the channel's slot)."""
    return list(generation_keys(channel)), [region_field(region), new_token(), reign]


def vread_call(
    channel: str,
    region: Region,
    key: Key,
    tags: Sequence[bytes],
    token: str,
    lease_ttl: float,
    reign: str,
) -> tuple[list[str], list[str | bytes | int]]:
    """The KEYS and ARGV of :data:`VREAD_SCRIPT` (a cluster read, on the value's slot);
    ``tags`` is what :data:`GENS_SCRIPT` returned."""
    value, lease = value_keys(channel, region, key)
    return [value, lease, writers_key(value)], [tags[0], tags[1], token, _ms(lease_ttl), reign]


def parse_read(reply: Sequence[object]) -> ReadResult:
    """Turn the script's reply into a :class:`ReadResult` (MessageError if it is not one)."""
    try:
        status, record, pttl, gen, rgen = reply
        status, pttl = int(status), int(pttl)  # type: ignore[call-overload]
    except (TypeError, ValueError) as exc:
        raise MessageError(f"unexpected L2 read reply: {exc}") from None
    return ReadResult(
        status,
        bytes(record),  # type: ignore[call-overload]
        ttl_left(pttl),
        bytes(gen),  # type: ignore[call-overload]
        bytes(rgen),  # type: ignore[call-overload]
    )


def fill_call(
    channel: str,
    region: Region,
    key: Key,
    token: str,
    payload: bytes,
    ttl: float,
    gen: bytes,
    rgen: bytes,
    reign: str = "",
) -> tuple[list[str], list[str | bytes | int]]:
    """The KEYS and ARGV of :data:`FILL_SCRIPT`."""
    value, lease = value_keys(channel, region, key)
    gkey, rkey = generation_keys(channel)
    return [value, lease, gkey, rkey], [
        token,
        payload,
        _ms(ttl),
        region_field(region),
        gen,
        rgen,
        reign,
    ]


def vfill_call(
    channel: str,
    region: Region,
    key: Key,
    token: str,
    payload: bytes,
    ttl: float,
    gen: bytes,
    rgen: bytes,
) -> tuple[list[str], list[str | bytes | int]]:
    """The KEYS and ARGV of :data:`VFILL_SCRIPT` (a cluster fill, on the value's slot)."""
    value, lease = value_keys(channel, region, key)
    return [value, lease], [token, payload, _ms(ttl), gen, rgen]


class LeaseWait:
    """When a process that did not get the lease polls L2 again: 0.5, 1, 2 ... ms, capped, for
    at most ``wait`` seconds in all."""

    CAP = 0.025

    def __init__(self, now: float, wait: float) -> None:
        self.deadline = now + wait
        self._delay = 0.0005

    def next_delay(self, now: float) -> float | None:
        """Seconds to sleep before the next poll, or None when the wait is over."""
        left = self.deadline - now
        if left <= 0:
            return None
        delay = min(self._delay, left)
        self._delay = min(self._delay * 2, self.CAP)
        return delay


# -- the write path -----------------------------------------------------------------------

# The replay log's publish script (nearcache._core.log.PUBLISH_SCRIPT), extended with the L2
# and the conflict check of value-carrying writes; used when a cache has l2=True or
# propagate="update". KEYS[1] log, KEYS[2] epoch, KEYS[3] cache generation, KEYS[4] region
# generations, KEYS[5] reign, KEYS[6...] value and lease keys, in pairs. ARGV[1] channel,
# ARGV[2] max log length, ARGV[3] epoch candidate, ARGV[4] sender id (informative), ARGV[5]
# and ARGV[6] the log position (epoch, entry id) the writer had applied when its oldest value
# in this batch was set ('' if none), ARGV[7] scan limit, ARGV[8] random hex for missing
# generations, ARGV[9] reign, ARGV[10] '1' in split mode (a Redis Cluster: values live in
# other slots; their ops name no keys and their tags are returned instead), ARGV[11] message
# count, then per message: the message, its fallback ('' if none: the message carries no
# value), the operation count, and per operation its letter and fields:
#   S  value key index, payload, ttl ms, region field, key encoding   store a value
#   U  region field, key encoding                                     a value in the message only
#   D  value key index                                                delete a value
#   R  region field                                                   clear a region
#   C                                                                 clear everything
# A message's values are sent only if nobody (this instance's other callers included) wrote
# their key, or cleared its region or everything, after that position, and the position was
# taken in the current reign; otherwise the fallback (the same message with plain
# invalidations, same sender and sequence) is published and the values are deleted from L2.
# Returns {epoch, last entry id, receivers of the last publish, messages sent as fallback},
# followed in split mode by two tags per S operation ('' '' where it fell back).
PUBLISH_SCRIPT = (
    REIGN_LUA
    + """local epoch = redis.call('GET', KEYS[2])
if not epoch then
  redis.call('SET', KEYS[2], ARGV[3])
  epoch = ARGV[3]
end
local function position(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)')
  if not ms then return nil, nil end
  return tonumber(ms), tonumber(seq)
end
local since_ms, since_seq = position(ARGV[6])
local function after(id)
  local ms, seq = position(id)
  return ms == nil or ms > since_ms or (ms == since_ms and seq > since_seq)
end
local function gen()
  local g = redis.call('GET', KEYS[3])
  if not g then g = '0-0.' .. ARGV[8]; redis.call('SET', KEYS[3], g) end
  return g
end
local function rgen(field)
  local r = redis.call('HGET', KEYS[4], field)
  if not r then r = '0-0.' .. ARGV[8]; redis.call('HSET', KEYS[4], field, r) end
  return r
end
local sfx = reign(ARGV[9])
local split = ARGV[10] == '1'
-- Messages logged after the writer's position, its own included (another thread or task of
-- the same instance may have written the key meanwhile); nil if it cannot tell.
-- The reign began after the last entry logged before it; entries of an earlier reign may be
-- missing here (a failover loses what was not replicated): a position taken then cannot show
-- every write after it. Recorded by every publish, so that the first one of a reign sees it.
local began = '0-0'
if sfx and sfx ~= '' then
  local current = redis.call('GET', KEYS[5])
  local seen = nil
  if current then seen, began = string.match(current, '^(.*) (%S+)$') end
  if seen ~= sfx then
    local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
    began = last[1] and last[1][1] or '0-0'
    redis.call('SET', KEYS[5], sfx .. ' ' .. began)
  end
  redis.call('EXPIRE', KEYS[5], 604800)
end
-- Messages logged after the writer's position, its own included (another thread or task of
-- the same instance may have written the key meanwhile); nil if it cannot tell.
local others = nil
local limit = tonumber(ARGV[7])
local began_ms, began_seq = position(began)
if sfx and since_ms and ARGV[5] == epoch and began_ms
    and (since_ms > began_ms or (since_ms == began_ms and since_seq > began_seq)) then
  local entries = redis.call('XRANGE', KEYS[1], ARGV[6], '+', 'COUNT', limit + 1)
  if #entries > 0 and entries[1][1] == ARGV[6] and #entries <= limit then
    others = {}
    for i = 2, #entries do
      local fields = entries[i][2]
      others[#others + 1] = fields[2] or ''
    end
  end
end
local function conflict(field, key)
  if others == nil or after(gen()) or after(rgen(field)) then return true end
  local pattern = field .. key
  for _, m in ipairs(others) do
    if string.find(m, pattern, 1, true) then return true end
  end
  return false
end
-- First pass, before anything is written: which messages must fall back.
local fallback = {}
local a = 12
for n = 1, tonumber(ARGV[11]) do
  local count = tonumber(ARGV[a + 2])
  a = a + 3
  for _ = 1, count do
    local op = ARGV[a]
    if op == 'S' then
      if not fallback[n] and conflict(ARGV[a + 4], ARGV[a + 5]) then fallback[n] = true end
      a = a + 6
    elseif op == 'U' then
      if not fallback[n] and conflict(ARGV[a + 1], ARGV[a + 2]) then fallback[n] = true end
      a = a + 3
    elseif op == 'C' then
      a = a + 1
    else
      a = a + 2
    end
  end
end
local head = 'NL' .. string.char(#epoch) .. epoch
local id, receivers, fell_back = '', 0, 0
local tags = {}
a = 12
for n = 1, tonumber(ARGV[11]) do
  local message, alternative, count = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  a = a + 3
  if fallback[n] then
    fell_back = fell_back + 1
    if alternative ~= '' then message = alternative end
  end
  id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'm', message)
  receivers = redis.call('PUBLISH', ARGV[1], head .. string.char(#id) .. id .. message)
  for _ = 1, count do
    local op = ARGV[a]
    if op == 'S' then
      local k = tonumber(ARGV[a + 1])
      if split then
        if fallback[n] then
          tags[#tags + 1] = ''
          tags[#tags + 1] = ''
        else
          tags[#tags + 1] = gen() .. sfx
          tags[#tags + 1] = rgen(ARGV[a + 4])
        end
      elseif fallback[n] then
        redis.call('DEL', KEYS[k], KEYS[k + 1])
      else
        local g, r = gen() .. sfx, rgen(ARGV[a + 4])
        redis.call('SET', KEYS[k], string.char(#g) .. g .. string.char(#r) .. r .. ARGV[a + 2],
          'PX', ARGV[a + 3])
        redis.call('DEL', KEYS[k + 1])
      end
      a = a + 6
    elseif op == 'U' then
      a = a + 3
    elseif op == 'D' then
      if not split then
        local k = tonumber(ARGV[a + 1])
        redis.call('DEL', KEYS[k], KEYS[k + 1])
      end
      a = a + 2
    elseif op == 'R' then
      redis.call('HSET', KEYS[4], ARGV[a + 1], id)
      a = a + 2
    else
      redis.call('SET', KEYS[3], id)
      a = a + 1
    end
  end
end
redis.call('EXPIRE', KEYS[1], 604800)
redis.call('EXPIRE', KEYS[2], 604800)
local reply = {epoch, id, receivers, fell_back}
for _, tag in ipairs(tags) do reply[#reply + 1] = tag end
return reply
"""
)
# The same on a Redis Cluster's shard channel (SPUBLISH), as the log's publish script.
SHARDED_PUBLISH_SCRIPT = PUBLISH_SCRIPT.replace("redis.call('PUBLISH'", "redis.call('SPUBLISH'")

# -- the split write path of a Redis Cluster (see the module docstring) ------------------

# On the value's slot, before the publish. KEYS[1] value, KEYS[2] lease, KEYS[3] writers.
# ARGV[1] the writer's token (one per batch, the same on a retry), ARGV[2] the mark's ttl ms,
# ARGV[3] reign. Deletes the value and any lease, and marks the key as being written by this
# token: 'u' if no other write of the key is marked, else every mark present becomes 'c'
# (contended: none of them may store its value); the mark carries this node's reign, so that
# a write prepared before a failover never stores after it. 'at' is when the key was last
# marked (ms, this node's clock).
PREPARE_SCRIPT = (
    REIGN_LUA
    + """local sfx = reign(ARGV[3]) or '?'
redis.call('DEL', KEYS[1], KEYS[2])
local marks = redis.call('HGETALL', KEYS[3])
local contended = false
for i = 1, #marks, 2 do
  if marks[i] ~= 'at' and (marks[i] ~= ARGV[1] or string.sub(marks[i + 1], 1, 1) == 'c') then
    contended = true
  end
end
for i = 1, #marks, 2 do
  if contended and marks[i] ~= 'at' and marks[i] ~= ARGV[1] then
    redis.call('HSET', KEYS[3], marks[i], 'c')
  end
end
local t = redis.call('TIME')
redis.call('HSET', KEYS[3], ARGV[1], (contended and 'c' or 'u') .. sfx,
  'at', t[1] * 1000 + math.floor(t[2] / 1000))
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 1
"""
)

# On the value's slot, after the publish. KEYS as PREPARE_SCRIPT. ARGV[1] the writer's token,
# ARGV[2] 'S' to store the value, 'D' to leave the key empty, ARGV[3] payload, ARGV[4] ttl ms,
# ARGV[5] and ARGV[6] the tags the publish returned, ARGV[7] reign. Removes the mark; stores
# the value only if the mark is still there, uncontended and of this reign (no other write of
# the key was marked between this write's prepare and now, none was under way at its
# prepare, and no failover came between); otherwise deletes the value. Returns 1 if stored,
# else 0.
COMMIT_SCRIPT = (
    REIGN_LUA
    + """local mark = redis.call('HGET', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if redis.call('HLEN', KEYS[3]) <= 1 then redis.call('DEL', KEYS[3]) end
local sfx = reign(ARGV[7])
if ARGV[2] == 'S' and sfx and mark == 'u' .. sfx then
  local g, r = ARGV[5] .. sfx, ARGV[6]
  redis.call('SET', KEYS[1], string.char(#g) .. g .. string.char(#r) .. r .. ARGV[3],
    'PX', ARGV[4])
  redis.call('DEL', KEYS[2])
  return 1
end
redis.call('DEL', KEYS[1])
return 0
"""
)
WRITE_MARK_TTL = 60.0  # seconds a write's mark outlives a writer that died between steps


class StoreValue(NamedTuple):
    """Store a value in L2 (if no conflicting write is found) and drop its lease."""

    region: Region
    key: Key
    payload: bytes
    ttl: float


class CheckValue(NamedTuple):
    """A value sent in the message only (no L2): check it for conflicting writes."""

    region: Region
    key: Key


class DeleteValue(NamedTuple):
    """Delete a key's L2 value and lease."""

    region: Region
    key: Key


class ClearRegion(NamedTuple):
    """Make every L2 value of a region unreachable."""

    region: Region


class ClearAll(NamedTuple):
    """Make every L2 value unreachable."""


L2Operation = StoreValue | CheckValue | DeleteValue | ClearRegion | ClearAll


class MessagePlan(NamedTuple):
    """One message of a batch, the form to send if its values conflict, and its L2 work."""

    message: bytes
    fallback: bytes  # b"": the message carries no value
    operations: Sequence[L2Operation]


def publish_call(
    channel: str,
    log_length: int,
    sender: bytes,
    since: tuple[bytes, str] | None,
    plans: Sequence[MessagePlan],
    epoch_candidate: str,
    reign: str = "",
    split: bool = False,
) -> tuple[list[str], list[str | bytes | int]]:
    """The KEYS and ARGV of :data:`PUBLISH_SCRIPT` for a batch. ``since`` is the log position
    (epoch, entry id) this instance had applied when the batch's oldest value was set. In
    ``split`` mode (a Redis Cluster) no value key is named and no payload sent: the values
    are prepared and committed on their own slots (:func:`value_writes`)."""
    log_key, epoch_key = log_keys(channel)
    gen, rgen = generation_keys(channel)
    keys: list[str] = [log_key, epoch_key, gen, rgen, reign_key(channel)]
    since_epoch, since_id = since if since is not None else (b"", "")
    args: list[str | bytes | int] = [
        channel,
        log_length,
        epoch_candidate,
        sender,
        since_epoch,
        since_id,
        SCAN_LIMIT,
        new_token(),
        reign,
        "1" if split else "",
        len(plans),
    ]
    for plan in plans:
        args += (plan.message, plan.fallback, len(plan.operations))
        for op in plan.operations:
            if isinstance(op, StoreValue):
                if not split:
                    keys += value_keys(channel, op.region, op.key)
                args += (
                    "S",
                    0 if split else len(keys) - 1,
                    b"" if split else op.payload,
                    _ms(op.ttl),
                    region_field(op.region),
                    key_encoding(op.key),
                )
            elif isinstance(op, CheckValue):
                args += ("U", region_field(op.region), key_encoding(op.key))
            elif isinstance(op, DeleteValue):
                if not split:
                    keys += value_keys(channel, op.region, op.key)
                args += ("D", 0 if split else len(keys) - 1)
            elif isinstance(op, ClearRegion):
                args += ("R", region_field(op.region))
            else:
                args += ("C",)
    return keys, args


def value_writes(plans: Sequence[MessagePlan]) -> list[StoreValue | DeleteValue]:
    """The value operations of a batch, in order: what a cluster writer prepares before the
    publish and commits after it (the publish returns two tags per :class:`StoreValue`)."""
    return [
        op for plan in plans for op in plan.operations if isinstance(op, StoreValue | DeleteValue)
    ]


def write_token(plans: Sequence[MessagePlan]) -> str:
    """The token a cluster writer marks its keys with: one per batch, the same on every
    retry (derived from its first message, which names the sender and the sequence)."""
    return hashlib.blake2b(plans[0].message, digest_size=8, person=_DIGEST_PERSON).hexdigest()


def prepare_call(
    channel: str, op: StoreValue | DeleteValue, token: str, reign: str
) -> tuple[list[str], list[str | bytes | int]]:
    """The KEYS and ARGV of :data:`PREPARE_SCRIPT` for one value of a batch."""
    value, lease = value_keys(channel, op.region, op.key)
    return [value, lease, writers_key(value)], [token, _ms(WRITE_MARK_TTL), reign]


def commit_call(
    channel: str,
    op: StoreValue | DeleteValue,
    token: str,
    tags: tuple[bytes, bytes] | None,
    reign: str,
) -> tuple[list[str], list[str | bytes | int]]:
    """The KEYS and ARGV of :data:`COMMIT_SCRIPT` for one value of a batch: stored with the
    publish's ``tags`` (None, or empty tags: it fell back, or deletes the value)."""
    value, lease = value_keys(channel, op.region, op.key)
    keys = [value, lease, writers_key(value)]
    if isinstance(op, StoreValue) and tags is not None and tags[0]:
        return keys, [token, "S", op.payload, _ms(op.ttl), tags[0], tags[1], reign]
    return keys, [token, "D", b"", 0, b"", b"", reign]
