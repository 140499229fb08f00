"""The backplane message format, version 1 (documented byte for byte in docs/protocol.md).

A message is one batch of invalidations from one sender, in the order they happened::

    offset size  field
    0      2     magic  b"NC"
    2      1     version 0x01
    3      1     flags  bit 0: signed (a trailer follows the operations); other bits 0
    4      16    sender instance id (random per cache instance and per process)
    20     8     sequence, unsigned big-endian, per sender, starts at 1, +1 per message
    28     4     operation count, unsigned big-endian
    32     ...   operations
    [trailer when signed: key id (UTF-8, 1-255 bytes), key-id length (1 byte),
     HMAC-SHA256 (32 bytes) of every byte before it]

An operation is a kind byte then its fields::

    0x01 KEY     region, key     drop one key of one region
    0x02 REGION  region          drop every key of a region
    0x03 CLEAR   (nothing)       drop everything
    0x04 UPDATE  region, key, ttl, sliding, serializer, value
                                 replace one key's value (propagate="update")

    region: u16 length then UTF-8 bytes; length 0xFFFF means the default region (no bytes)
    key:    type byte (0x01 str as UTF-8, 0x02 bytes, 0x03 int as ASCII decimal in the
            canonical form str(int): no leading zero, no "+", no "-0"), u32 length, the bytes
    ttl, sliding: u32 milliseconds each, 0 = none
    serializer: u8 id; value: u32 length then the serialized bytes

Nothing here does I/O. ``decode`` raises ``MessageError`` for anything it cannot read.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import struct
from collections.abc import Hashable, Iterable, Mapping, Sequence
from enum import IntEnum
from typing import Any, NamedTuple

from nearcache._exceptions import MessageError

__all__ = [
    "HEADER",
    "MAGIC",
    "VERSION",
    "WIRE_ACCELERATED",
    "Invalidation",
    "Kind",
    "Message",
    "Update",
    "channel_name",
    "decode",
    "encode",
    "key_entries",
]

MAGIC = b"NC"
VERSION = 1
FLAG_SIGNED = 0x01
HEADER = struct.Struct(">2sBB16sQI")
_U16 = struct.Struct(">H")
_KEY_HEAD = struct.Struct(">BI")
_DEFAULT_REGION = 0xFFFF
_KEY_STR, _KEY_BYTES, _KEY_INT = 1, 2, 3
_MAC_SIZE = 32
_MAX_INT_KEY_CHARS = 4000
_UPDATE_HEAD = struct.Struct(">IIBI")  # ttl ms, sliding ms, serializer id, value length
_MAX_MS = 0xFFFFFFFF

Key = str | bytes | int
Region = str | None


class Kind(IntEnum):
    """What an invalidation drops."""

    KEY = 1
    REGION = 2
    CLEAR = 3
    UPDATE = 4


class Invalidation(NamedTuple):
    """One invalidation: a key of a region, a whole region, or everything."""

    kind: Kind
    region: Region = None
    key: Key | None = None

    def describe(self) -> str:
        """A short human-readable form, e.g. ``key products/'42'``."""
        where = "<default>" if self.region is None else self.region
        if self.kind is Kind.KEY:
            return f"key {where}/{self.key!r}"
        if self.kind is Kind.REGION:
            return f"region {where}"
        if self.kind is Kind.UPDATE:
            return f"update {where}/{self.key!r}"
        return "clear"


def _ms(seconds: float | None) -> int:
    """Seconds as whole milliseconds on the wire (rounded up; 0 = none; capped at ~49 days)."""
    if seconds is None:
        return 0
    return min(max(1, math.ceil(seconds * 1000)), _MAX_MS)


class Update(Invalidation):
    """A key invalidation that carries the key's new value (``propagate="update"``): receivers
    replace their copy instead of dropping it.

    It unpacks and compares like the ``(Kind.UPDATE, region, key)`` invalidation it extends,
    so code that only invalidates treats it as one; the value rides along in ``data``
    (serialized by the serializer whose id is ``serializer``), with the writer's ``ttl`` and
    ``sliding`` in seconds.
    """

    data: bytes
    ttl: float | None
    sliding: float | None
    serializer: int
    #: Not sent: the writer's log position (epoch, entry id) when the value was set, which
    #: the publish script checks for other instances' writes (None: unknown).
    since: tuple[bytes, str] | None
    #: Not sent: the writer's outbox sequence when its write began (``write()``), to tell a
    #: concurrent write of the same key by another caller of this instance (None: ``set``).
    started: int | None

    def __new__(
        cls,
        region: Region,
        key: Key,
        data: bytes,
        ttl: float | None = None,
        sliding: float | None = None,
        serializer: int = 1,
    ) -> Update:
        self = tuple.__new__(cls, (Kind.UPDATE, region, key))
        self.data = data
        self.ttl = ttl
        self.sliding = sliding
        self.serializer = serializer
        self.since = None
        self.started = None
        return self

    def __repr__(self) -> str:
        return (
            f"Update(region={self.region!r}, key={self.key!r}, data=<{len(self.data)} bytes>, "
            f"ttl={self.ttl!r}, sliding={self.sliding!r}, serializer={self.serializer})"
        )

    def invalidation(self) -> Invalidation:
        """The plain invalidation of the same key (what is sent when the value cannot be)."""
        return Invalidation(Kind.KEY, self.region, self.key)


def _load_wire() -> Any:
    """The C codec (``_core/_wire.c``), or None: not built, a stale build, or
    ``NEARCACHE_PURE_PYTHON`` set."""
    if os.environ.get("NEARCACHE_PURE_PYTHON"):
        return None
    try:
        from nearcache._core import _wire
    except ImportError:  # no compiler where the package was installed
        return None
    if getattr(_wire, "API", None) != _WIRE_API:  # pragma: no cover - a stale in-place build
        return None
    _wire.configure(Invalidation, Kind.KEY, Kind.REGION, Kind.CLEAR)
    return _wire


_WIRE_API = 2  # bumped with every change of _wire's interface
_wire: Any = _load_wire()
#: Whether messages are encoded and decoded in C where they can be.
WIRE_ACCELERATED = _wire is not None


def key_entries(seq: int, idents: list[tuple[Region, Hashable]]) -> list[tuple[int, Invalidation]]:
    """``(seq, Invalidation(Kind.KEY, region, key))`` for each ``(region, key)`` of
    ``idents``: the outbox's queue entries for the key invalidations it folds in at once."""
    if _wire is not None:
        return _wire.key_entries(seq, idents)  # type: ignore[no-any-return]
    new, key = tuple.__new__, Kind.KEY
    return [(seq, new(Invalidation, (key, region, k))) for region, k in idents]


class Message(NamedTuple):
    """A decoded backplane message."""

    sender: bytes
    sequence: int
    operations: tuple[Invalidation, ...]
    key_id: str | None = None


def _encode_region(out: bytearray, region: Region) -> None:
    if region is None:
        out += _U16.pack(_DEFAULT_REGION)
        return
    raw = region.encode()
    if len(raw) >= _DEFAULT_REGION:
        raise ValueError(f"region name is too long ({len(raw)} bytes, at most 65534)")
    out += _U16.pack(len(raw))
    out += raw


def _encode_key(out: bytearray, key: Key) -> None:
    if isinstance(key, str):
        kind, raw = _KEY_STR, key.encode()
    elif isinstance(key, bytes):
        kind, raw = _KEY_BYTES, key
    else:
        kind, raw = _KEY_INT, str(int(key)).encode()
        if len(raw) > _MAX_INT_KEY_CHARS:
            raise ValueError(f"int key too long ({len(raw)} characters, at most 4000)")
    out += _KEY_HEAD.pack(kind, len(raw))
    out += raw


def encode(
    sender: bytes,
    sequence: int,
    operations: Sequence[Invalidation],
    *,
    signing_key: tuple[str, bytes] | None = None,
) -> bytes:
    """Encode one message. ``signing_key`` is ``(key_id, secret)`` to sign it."""
    if _wire is not None:
        body = _wire.encode(
            sender,
            sequence,
            operations if type(operations) is list else list(operations),
            FLAG_SIGNED if signing_key else 0,
        )
        if body is not None:
            return body if signing_key is None else _sign(bytearray(body), signing_key)
    out = bytearray(
        HEADER.pack(
            MAGIC, VERSION, FLAG_SIGNED if signing_key else 0, sender, sequence, len(operations)
        )
    )
    regions: dict[Region, bytes] = {}  # a batch usually names few regions: encode each once
    key_head, str_key, key_kind = _KEY_HEAD.pack, _KEY_STR, Kind.KEY
    for op in operations:
        kind, region, key = op
        out.append(kind)
        if kind is Kind.CLEAR:
            continue
        head = regions.get(region)
        if head is None:
            buffer = bytearray()
            _encode_region(buffer, region)
            head = regions[region] = bytes(buffer)
        out += head
        if kind is key_kind:
            if type(key) is str:  # the common case inline
                raw = key.encode()
                out += key_head(str_key, len(raw))
                out += raw
            else:
                assert key is not None
                _encode_key(out, key)
        elif kind is Kind.UPDATE:
            assert isinstance(op, Update) and key is not None
            _encode_key(out, key)
            data = op.data
            out += _UPDATE_HEAD.pack(_ms(op.ttl), _ms(op.sliding), op.serializer, len(data))
            out += data
    if signing_key is not None:
        return _sign(out, signing_key)
    return bytes(out)


def _sign(out: bytearray, signing_key: tuple[str, bytes]) -> bytes:
    """Append the signature trailer (key id, its length, HMAC-SHA256 of all before it)."""
    key_id, secret = signing_key
    raw_id = key_id.encode()
    out += raw_id
    out.append(len(raw_id))
    out += hmac.new(secret, bytes(out), hashlib.sha256).digest()
    return bytes(out)


def _verify(data: bytes, secrets: Mapping[str, bytes], body: int = HEADER.size) -> tuple[int, str]:
    """Check the trailer of signed bytes (a message, or an L2 value whose fixed part is
    ``body`` bytes); return where the signed content ends and the key id."""
    size = len(data)
    if size < body + _MAC_SIZE + 2:
        raise MessageError("signed message too short for its trailer")
    mac_start = size - _MAC_SIZE
    id_len = data[mac_start - 1]
    id_start = mac_start - 1 - id_len
    if id_len == 0 or id_start < body:
        raise MessageError("malformed signature trailer")
    try:
        key_id = data[id_start : mac_start - 1].decode()
    except UnicodeDecodeError:
        raise MessageError("malformed key id in signature trailer") from None
    secret = secrets.get(key_id)
    if secret is None:
        raise MessageError(f"signed with unknown key id {key_id!r}")
    expected = hmac.new(secret, data[:mac_start], hashlib.sha256).digest()
    if not hmac.compare_digest(expected, data[mac_start:]):
        raise MessageError(f"bad signature (key id {key_id!r})")
    return id_start, key_id


def decode(data: bytes, secrets: Mapping[str, bytes] | None = None) -> Message:
    """Decode one message, raising ``MessageError`` if it is malformed, foreign or forged.

    With ``secrets`` (key id → secret), unsigned messages and messages whose signature does not
    match one of the keys are rejected.
    """
    size = len(data)
    if size < HEADER.size:
        raise MessageError(f"message too short ({size} bytes)")
    magic, version, flags, sender, sequence, count = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise MessageError("not a nearcache message (bad magic)")
    if version != VERSION:
        raise MessageError(f"unsupported message version {version}")
    if flags & ~FLAG_SIGNED:
        raise MessageError(f"unknown flags 0x{flags:02x}")
    end = size
    key_id: str | None = None
    if flags & FLAG_SIGNED:
        if secrets:
            end, key_id = _verify(data, secrets)
        else:
            raise MessageError("signed message but no secret is configured")
    elif secrets:
        raise MessageError("unsigned message but a secret is configured")
    if count > end - HEADER.size:
        raise MessageError(f"operation count {count} exceeds the message size")
    if _wire is not None:
        fast = _wire.decode(data, HEADER.size, end, count)
        if fast is not None:
            return Message(sender, sequence, fast, key_id)
    pos = HEADER.size
    ops: list[Invalidation] = []
    append, new_op = ops.append, tuple.__new__
    key_head, u16 = _KEY_HEAD.unpack_from, _U16.unpack_from
    try:
        for _ in range(count):
            kind = data[pos]
            pos += 1
            if kind == 1 and pos + 2 <= end:
                # The common case inline: one key of a region, no helper call per operation.
                (length,) = u16(data, pos)
                pos += 2
                region: Region = None
                if length != _DEFAULT_REGION:
                    if pos + length > end:
                        raise MessageError(f"truncated region at byte {pos}")
                    region = data[pos : pos + length].decode()
                    pos += length
                if pos + 5 > end:
                    raise MessageError(f"truncated key at byte {pos}")
                key_type, length = key_head(data, pos)
                if key_type == _KEY_STR and pos + 5 + length <= end:
                    pos += 5
                    key: Key = data[pos : pos + length].decode()
                    pos += length
                else:
                    key, pos = _decode_key(data, pos, end)
                append(new_op(Invalidation, (Kind.KEY, region, key)))
                continue
            if kind == Kind.CLEAR:
                ops.append(Invalidation(Kind.CLEAR))
                continue
            if kind not in (Kind.KEY, Kind.REGION, Kind.UPDATE):
                raise MessageError(f"unknown operation kind 0x{kind:02x}")
            region, pos = _decode_region(data, pos, end)
            if kind == Kind.REGION:
                ops.append(Invalidation(Kind.REGION, region))
                continue
            key, pos = _decode_key(data, pos, end)
            if kind == Kind.UPDATE:
                update, pos = _decode_update(data, pos, end, region, key)
                ops.append(update)
                continue
            ops.append(Invalidation(Kind.KEY, region, key))
    except (IndexError, struct.error, UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, MessageError):
            raise
        raise MessageError(f"truncated or malformed operation at byte {pos}: {exc}") from None
    if pos != end:
        raise MessageError(f"{end - pos} unexpected bytes after the operations")
    return Message(sender, sequence, tuple(ops), key_id)


def _decode_region(data: bytes, pos: int, end: int) -> tuple[Region, int]:
    if pos + 2 > end:
        raise MessageError(f"truncated region at byte {pos}")
    (length,) = _U16.unpack_from(data, pos)
    pos += 2
    if length == _DEFAULT_REGION:
        return None, pos
    if pos + length > end:
        raise MessageError(f"truncated region at byte {pos}")
    return data[pos : pos + length].decode(), pos + length


def _decode_update(data: bytes, pos: int, end: int, region: Region, key: Key) -> tuple[Update, int]:
    if pos + _UPDATE_HEAD.size > end:
        raise MessageError(f"truncated update at byte {pos}")
    ttl, sliding, serializer, length = _UPDATE_HEAD.unpack_from(data, pos)
    pos += _UPDATE_HEAD.size
    if pos + length > end:
        raise MessageError(f"truncated update value at byte {pos}")
    value = bytes(data[pos : pos + length])
    update = Update(
        region, key, value, ttl / 1000 if ttl else None, sliding / 1000 if sliding else None,
        serializer,
    )  # fmt: skip
    return update, pos + length


def _decode_key(data: bytes, pos: int, end: int) -> tuple[Key, int]:
    if pos + _KEY_HEAD.size > end:
        raise MessageError(f"truncated key at byte {pos}")
    kind, length = _KEY_HEAD.unpack_from(data, pos)
    pos += _KEY_HEAD.size
    if pos + length > end:
        raise MessageError(f"truncated key at byte {pos}")
    raw = data[pos : pos + length]
    pos += length
    if kind == _KEY_STR:
        return raw.decode(), pos
    if kind == _KEY_BYTES:
        return bytes(raw), pos
    if kind == _KEY_INT:
        text = raw.decode("ascii")
        # Only the canonical form, str(int(...)): one spelling per key, so that "007" or "-0"
        # from a foreign publisher is a visible error, not a silent alias.
        digits = text[1:] if text[:1] == "-" else text
        if not digits.isdigit() or (digits[0] == "0" and text != "0"):
            raise MessageError(f"malformed int key (not canonical decimal) at byte {pos - length}")
        if len(text) > _MAX_INT_KEY_CHARS:
            raise MessageError("int key too long")
        return int(text), pos
    raise MessageError(f"unknown key type 0x{kind:02x}")


def split(operations: Iterable[Invalidation], max_ops: int) -> list[list[Invalidation]]:
    """Split operations into message-sized chunks, keeping their order."""
    if type(operations) is list:
        return [operations[i : i + max_ops] for i in range(0, len(operations), max_ops)]
    chunks: list[list[Invalidation]] = [[]]
    for op in operations:
        if len(chunks[-1]) >= max_ops:
            chunks.append([])
        chunks[-1].append(op)
    return [c for c in chunks if c]


def channel_name(channel: str, prefix: str = "", database: int = 0) -> str:
    """The wire channel of a logical channel: the protocol version is part of it, so
    instances speaking different versions never read each other's messages. Pub/Sub channels
    span every database of a server but the replay log is a key in one, so a database other
    than 0 is part of the name too."""
    where = f"db{database}:" if database else ""
    return f"{prefix}nearcache:v{VERSION}:{where}{channel}"
