"""Unit tests of the serializers of L2 values and update messages: roundtrips, refusals, and
hostile bytes (which may only fail to load, never do anything else)."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import math
import pickle
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearcache import PickleSerializer, SafeSerializer, SerializationError, Serializer
from nearcache._core.l2 import L2Options
from nearcache._exceptions import ConfigurationError

SAFE = SafeSerializer()

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.binary().map(bytearray)
    | st.datetimes()
    | st.datetimes(timezones=st.timezones().map(lambda _: datetime.timezone.utc))
    | st.dates()
    | st.times()
    | st.timedeltas()
    | st.decimals(allow_nan=False)
    | st.uuids()
)
hashables = st.none() | st.booleans() | st.integers() | st.text() | st.binary() | st.uuids()
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=5).map(tuple)
        | st.dictionaries(hashables, inner, max_size=5)
        | st.sets(hashables, max_size=5)
        | st.frozensets(hashables, max_size=5)
    ),
    max_leaves=30,
)


def same(a: Any, b: Any) -> bool:
    """Equal and of the same type, all the way down (1 == 1.0 == True would hide a bug)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


@given(values)
@settings(max_examples=300, deadline=None)
def test_safe_roundtrip_keeps_value_and_types(value: Any) -> None:
    """Every supported value comes back equal and of the same types."""
    assert same(SAFE.loads(SAFE.dumps(value)), value)


def test_safe_roundtrip_of_special_values() -> None:
    """NaN, infinities, lone surrogates, huge ints and aware datetimes survive exactly."""
    tz = datetime.timezone(datetime.timedelta(hours=-5, minutes=-30))
    value = (
        math.nan,
        -math.inf,
        "\ud800 lone",
        -(2**1000),
        2**63,
        datetime.datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=tz),
        datetime.time(1, 2, tzinfo=datetime.timezone.utc),
        decimal.Decimal("-0.00"),
        decimal.Decimal("NaN"),
        {1: "int", "1": "str", None: b""},
    )
    back = SAFE.loads(SAFE.dumps(value))
    assert same(back[:8], value[:8])
    assert back[5].utcoffset() == value[5].utcoffset()
    assert str(back[7]) == "-0.00"
    assert back[8].is_nan()


class Color(enum.Enum):
    RED = 1


class Label(str, enum.Enum):
    A = "a"


@pytest.mark.parametrize(
    "value",
    [
        object(),
        Color.RED,
        Label.A,
        collections.namedtuple("P", "x")(1),
        collections.OrderedDict(a=1),
        [1, {2: [object()]}],
        datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc).astimezone(
            __import__("zoneinfo").ZoneInfo("Europe/Paris")
        ),
        decimal.Decimal("1." + "9" * 300),
        lambda: 1,
    ],
    ids=lambda v: type(v).__name__,
)
def test_safe_refuses_what_would_not_come_back_the_same(value: object) -> None:
    """Other types, subclasses and zone-aware times are refused with an error naming why."""
    with pytest.raises(SerializationError) as info:
        SAFE.dumps(value)
    assert str(info.value)


def test_safe_refuses_deep_nesting_both_ways() -> None:
    """Nesting beyond 64 levels is refused when dumping and when loading."""
    deep: Any = []
    for _ in range(70):
        deep = [deep]
    with pytest.raises(SerializationError, match="deeper"):
        SAFE.dumps(deep)
    forged = b"\x01" + b"l\x00\x00\x00\x01" * 70 + b"N"
    with pytest.raises(SerializationError, match="deeper"):
        SAFE.loads(forged)


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_safe_loads_of_arbitrary_bytes_only_fails_cleanly(data: bytes) -> None:
    """Random bytes load as a value or raise SerializationError; nothing else."""
    try:
        SAFE.loads(data)
    except SerializationError:
        pass


@given(values, st.data())
@settings(max_examples=300, deadline=None)
def test_safe_loads_of_mutated_values_only_fails_cleanly(value: Any, data: st.DataObject) -> None:
    """A valid value with bytes flipped, cut or appended loads or raises SerializationError."""
    raw = bytearray(SAFE.dumps(value))
    how = data.draw(st.sampled_from(["flip", "cut", "append"]))
    if how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=8))
    try:
        SAFE.loads(bytes(raw))
    except SerializationError:
        pass


def test_safe_loads_refuses_huge_counts_without_allocating() -> None:
    """A count larger than the bytes left is refused before any list is built."""
    with pytest.raises(SerializationError, match="exceeds"):
        SAFE.loads(b"\x01l\xff\xff\xff\xff")


def test_pickle_serializer_roundtrips_anything_picklable() -> None:
    """PickleSerializer carries what SafeSerializer refuses; unpicklable values raise."""
    s = PickleSerializer()
    value = collections.OrderedDict(a=Color.RED)
    assert s.loads(s.dumps(value)) == value
    with pytest.raises(SerializationError, match="pickle"):
        s.dumps(lambda: 1)
    assert pickle.loads(s.dumps(1)) == 1  # noqa: S301 - our own bytes


def test_serializers_satisfy_the_protocol() -> None:
    """Both built-ins are Serializers with distinct ids; only pickle needs signing."""
    assert isinstance(SAFE, Serializer)
    assert isinstance(PickleSerializer(), Serializer)
    assert (SAFE.id, SAFE.needs_signing) == (1, False)
    assert (PickleSerializer.id, PickleSerializer.needs_signing) == (2, True)


def check(options: L2Options, *, signed: bool = False, networked: bool = True) -> None:
    options.check(signed=signed, networked=networked, replay_log=10)


def test_pickle_is_refused_without_a_secret() -> None:
    """A serializer that can run code is accepted only with secret= (signed values)."""
    with pytest.raises(ConfigurationError, match="secret") as info:
        check(L2Options(l2=True, serializer=PickleSerializer()))
    assert info.value.option == "serializer"
    check(L2Options(l2=True, serializer=PickleSerializer()), signed=True)
    check(L2Options(propagate="update", serializer=PickleSerializer()), signed=True)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        (L2Options(l2=1), "l2"),  # type: ignore[arg-type]
        (L2Options(propagate="push"), "propagate"),  # type: ignore[arg-type]
        (L2Options(l2=True, serializer=object()), "serializer"),  # type: ignore[arg-type]
        (L2Options(l2=True, l2_max_bytes=0), "l2_max_bytes"),
        (L2Options(l2=True, update_max_bytes=True), "update_max_bytes"),
        (L2Options(l2=True, l2_ttl=-1), "l2_ttl"),
        (L2Options(l2=True, l2_lease_ttl=math.inf), "l2_lease_ttl"),
        (L2Options(l2=True, l2_lease_wait=0), "l2_lease_wait"),
        (L2Options(l2=True, l2_timeout="1"), "l2_timeout"),  # type: ignore[arg-type]
    ],
)
def test_bad_l2_options_name_the_option(options: L2Options, option: str) -> None:
    """Each bad setting raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError) as info:
        check(options)
    assert info.value.option == option


def test_l2_needs_a_connection_and_the_log() -> None:
    """A local cache refuses l2/update, and so does a cache without the replay log."""
    with pytest.raises(ConfigurationError, match="connection"):
        check(L2Options(l2=True), networked=False)
    with pytest.raises(ConfigurationError, match="replay_log"):
        L2Options(propagate="update").check(signed=False, networked=True, replay_log=0)
    check(L2Options(), networked=False)  # off: nothing to check


def test_serializer_ids_out_of_range_are_refused() -> None:
    """A custom serializer's id must fit the one byte stored with every value."""

    class Bad(SafeSerializer):
        id = 256

    with pytest.raises(ConfigurationError, match="id"):
        check(L2Options(l2=True, serializer=Bad()))


def test_uuid_and_timedelta_roundtrip() -> None:
    """UUIDs and negative timedeltas come back equal."""
    value = [uuid.UUID(int=0), datetime.timedelta(days=-1, microseconds=1)]
    assert SAFE.loads(SAFE.dumps(value)) == value
