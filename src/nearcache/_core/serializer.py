"""The built-in serializers of values kept in the L2 and sent in update messages.

``SafeSerializer`` (id 1, the default) writes a tagged binary format of plain data: loading it
builds only the types below and runs no code, so bytes from a shared Redis cannot do more than
fail to load. Format: one version byte ``01``, then one tagged item::

    N None   T True   F False
    q int in 64 bits (8 bytes, signed big-endian)
    I int beyond 64 bits (u32 length, signed big-endian bytes)
    f float (8 bytes, IEEE 754 big-endian)
    s str (u32 length, UTF-8; lone surrogates kept)   b bytes (u32 length, raw)
    y bytearray (u32 length, raw)
    l list / t tuple / S set / Z frozenset (u32 count, items)
    d dict (u32 count, key item then value item per entry)
    D datetime / a date / h time (u8 length, ISO 8601; a tzinfo must be datetime.timezone)
    e timedelta (days, seconds, microseconds: 3 signed 8-byte)
    M Decimal (u8 length, ASCII)   U UUID (16 bytes)

Only these exact types are accepted (a subclass, e.g. a named tuple or an enum, would come back
as its base type: it is refused instead), nested at most 64 deep.

``PickleSerializer`` (id 2) carries any picklable value, and may run code when loading: the
cache accepts it only with ``secret=`` and loads only bytes whose HMAC it verified.
No I/O here.
"""

from __future__ import annotations

import datetime
import decimal
import pickle
import struct
import uuid
from collections.abc import Callable
from typing import Any

from nearcache._exceptions import SerializationError

__all__ = ["PickleSerializer", "SafeSerializer"]

_FORMAT = 1
_MAX_DEPTH = 64
_Q = struct.Struct(">q")
_D = struct.Struct(">d")
_U32 = struct.Struct(">I")
_DELTA = struct.Struct(">qqq")
_Q_MIN, _Q_MAX = -(2**63), 2**63 - 1


def _fixed_offset(value: datetime.datetime | datetime.time) -> None:
    tz = value.tzinfo
    if tz is not None and type(tz) is not datetime.timezone:
        raise SerializationError(
            f"a {type(value).__name__} with tzinfo {type(tz).__name__} cannot be stored "
            "exactly (only datetime.timezone offsets are); convert it to UTC first"
        )


def _dump(out: bytearray, value: Any, depth: int) -> None:
    kind = type(value)
    if value is None:
        out += b"N"
    elif kind is bool:
        out += b"T" if value else b"F"
    elif kind is int:
        if _Q_MIN <= value <= _Q_MAX:
            out += b"q"
            out += _Q.pack(value)
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
            out += b"I"
            out += _U32.pack(len(raw))
            out += raw
    elif kind is str:
        raw = value.encode("utf-8", "surrogatepass")
        out += b"s"
        out += _U32.pack(len(raw))
        out += raw
    elif kind is bytes or kind is bytearray:
        out += b"b" if kind is bytes else b"y"
        out += _U32.pack(len(value))
        out += value
    elif kind is float:
        out += b"f"
        out += _D.pack(value)
    elif kind in _CONTAINERS:
        if depth >= _MAX_DEPTH:
            raise SerializationError(f"value nested deeper than {_MAX_DEPTH} levels")
        out += _CONTAINERS[kind]
        out += _U32.pack(len(value))
        if kind is dict:
            for key, item in value.items():
                _dump(out, key, depth + 1)
                _dump(out, item, depth + 1)
        else:
            for item in value:
                _dump(out, item, depth + 1)
    elif kind in _SCALARS:
        tag, encode = _SCALARS[kind]
        out += tag
        out += encode(value)
    else:
        raise SerializationError(
            f"SafeSerializer cannot store a {kind.__module__}.{kind.__qualname__} (plain data "
            "only: None, bool, int, float, str, bytes, list, tuple, dict, set, datetime, "
            "Decimal, UUID...); pass serializer=PickleSerializer() with secret=, or your own"
        )


def _iso(value: datetime.datetime | datetime.date | datetime.time) -> bytes:
    if not isinstance(value, datetime.date) or isinstance(value, datetime.datetime):
        _fixed_offset(value)
    raw = value.isoformat().encode()
    return bytes([len(raw)]) + raw


def _decimal(value: decimal.Decimal) -> bytes:
    raw = str(value).encode()
    if len(raw) > 255:
        raise SerializationError(f"Decimal too long to store ({len(raw)} characters, max 255)")
    return bytes([len(raw)]) + raw


_CONTAINERS: dict[type, bytes] = {
    list: b"l",
    tuple: b"t",
    dict: b"d",
    set: b"S",
    frozenset: b"Z",
}
_SCALARS: dict[type, tuple[bytes, Callable[[Any], bytes]]] = {
    datetime.datetime: (b"D", _iso),
    datetime.date: (b"a", _iso),
    datetime.time: (b"h", _iso),
    datetime.timedelta: (b"e", lambda v: _DELTA.pack(v.days, v.seconds, v.microseconds)),
    decimal.Decimal: (b"M", _decimal),
    uuid.UUID: (b"U", lambda v: v.bytes),
}


class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise SerializationError(f"truncated value at byte {self.pos}")
        raw = self.data[self.pos : end]
        self.pos = end
        return raw

    def u32(self) -> int:
        (n,) = _U32.unpack(self.take(4))
        return int(n)

    def item(self, depth: int) -> Any:
        tag = self.take(1)
        if tag == b"N":
            return None
        if tag == b"T":
            return True
        if tag == b"F":
            return False
        if tag == b"q":
            return _Q.unpack(self.take(8))[0]
        if tag == b"s":
            return self.take(self.u32()).decode("utf-8", "surrogatepass")
        if tag == b"b":
            return bytes(self.take(self.u32()))
        if tag == b"f":
            return _D.unpack(self.take(8))[0]
        if tag in b"ltdSZ":
            if depth >= _MAX_DEPTH:
                raise SerializationError(f"value nested deeper than {_MAX_DEPTH} levels")
            count = self.u32()
            if count > len(self.data) - self.pos:  # every item takes at least one byte
                raise SerializationError(f"item count {count} exceeds the value's size")
            if tag == b"d":
                pairs = [(self.item(depth + 1), self.item(depth + 1)) for _ in range(count)]
                return dict(pairs)
            items = [self.item(depth + 1) for _ in range(count)]
            if tag == b"l":
                return items
            if tag == b"t":
                return tuple(items)
            return set(items) if tag == b"S" else frozenset(items)
        if tag == b"I":
            return int.from_bytes(self.take(self.u32()), "big", signed=True)
        if tag == b"y":
            return bytearray(self.take(self.u32()))
        if tag in b"Dah":
            text = self.take(self.take(1)[0]).decode("ascii")
            parse = {
                b"D": datetime.datetime.fromisoformat,
                b"a": datetime.date.fromisoformat,
                b"h": datetime.time.fromisoformat,
            }[tag]
            return parse(text)
        if tag == b"e":
            days, seconds, micros = _DELTA.unpack(self.take(24))
            return datetime.timedelta(days=days, seconds=seconds, microseconds=micros)
        if tag == b"M":
            return decimal.Decimal(self.take(self.take(1)[0]).decode("ascii"))
        if tag == b"U":
            return uuid.UUID(bytes=bytes(self.take(16)))
        raise SerializationError(f"unknown tag {tag!r} at byte {self.pos - 1}")


class SafeSerializer:
    """The default serializer: plain data types in a tagged binary format (see the module).

    Loading runs no code, whoever wrote the bytes. Refuses any other type with a
    :class:`~nearcache.SerializationError` naming it.
    """

    id = 1
    needs_signing = False

    def dumps(self, value: object) -> bytes:
        """Serialize ``value`` (raises :class:`~nearcache.SerializationError`)."""
        out = bytearray(b"\x01")
        try:
            _dump(out, value, 0)
        except (OverflowError, struct.error) as exc:
            raise SerializationError(f"SafeSerializer cannot store this value: {exc}") from None
        return bytes(out)

    def loads(self, data: bytes) -> object:
        """Deserialize; raises :class:`~nearcache.SerializationError` for bad input."""
        if not data or data[0] != _FORMAT:
            raise SerializationError("not a SafeSerializer value (bad format byte)")
        reader = _Reader(bytes(data))
        reader.pos = 1
        try:
            value = reader.item(0)
        except SerializationError:
            raise
        except (ValueError, TypeError, ArithmeticError, IndexError, struct.error) as exc:
            # A malformed date, a non-ASCII decimal, an unhashable set item...
            raise SerializationError(f"malformed SafeSerializer value: {exc}") from None
        if reader.pos != len(data):
            raise SerializationError(f"{len(data) - reader.pos} bytes after the value")
        return value

    def __repr__(self) -> str:
        return "SafeSerializer()"


class PickleSerializer:
    """Any picklable value. Loading a pickle can run code, so a cache accepts this serializer
    only together with ``secret=``, and loads only bytes whose HMAC it has verified: whoever
    can write to Redis cannot make the application run code.

    Args:
        protocol: the pickle protocol (default 5).
    """

    id = 2
    needs_signing = True

    def __init__(self, protocol: int = 5) -> None:
        self._protocol = protocol

    def dumps(self, value: object) -> bytes:
        """Pickle ``value`` (raises :class:`~nearcache.SerializationError`)."""
        try:
            return pickle.dumps(value, protocol=self._protocol)
        except Exception as exc:  # pickling user objects can raise anything
            raise SerializationError(f"cannot pickle a {type(value).__qualname__}: {exc}") from None

    def loads(self, data: bytes) -> object:
        """Unpickle bytes the cache has verified."""
        return pickle.loads(data)  # noqa: S301 - only ever called on HMAC-verified bytes

    def __repr__(self) -> str:
        return f"PickleSerializer(protocol={self._protocol})"
