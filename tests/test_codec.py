"""Unit tests of the backplane message format v1: roundtrips, signatures, hostile input."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearcache._core.codec import (
    HEADER,
    MAGIC,
    VERSION,
    Invalidation,
    Kind,
    Message,
    channel_name,
    decode,
    encode,
    split,
)
from nearcache._exceptions import MessageError, NearCacheError

SENDER = bytes(range(16))
SECRETS = {"k1": b"first-secret", "k2": b"second-secret"}
Signing = tuple[str, bytes] | None
Secrets = dict[str, bytes] | None


def roundtrip(ops: list[Invalidation], **kwargs: Any) -> Message:
    secrets = kwargs.pop("secrets", None)
    return decode(encode(SENDER, 7, ops, **kwargs), secrets)


# -- roundtrips ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "plain",
        "",
        "ünïcødé ✓ 漢字 🚀",
        b"",
        b"\x00\xff binary",
        0,
        1,
        -1,
        2**63,
        -(2**64) - 1,
        10**300,
        -(10**300),
    ],
    ids=repr,
)
@pytest.mark.parametrize("region", [None, "", "products", "régiön 🚀"])
def test_key_invalidation_roundtrips(key: str | bytes | int, region: str | None) -> None:
    """A key invalidation comes back with the same key type, value and region."""
    message = roundtrip([Invalidation(Kind.KEY, region, key)])
    (op,) = message.operations
    assert op == Invalidation(Kind.KEY, region, key)
    assert type(op.key) is type(key)
    assert op.region == region


def test_default_region_and_empty_region_differ() -> None:
    """The default region None and the empty region "" are told apart on the wire."""
    message = roundtrip([Invalidation(Kind.REGION, None), Invalidation(Kind.REGION, "")])
    assert [op.region for op in message.operations] == [None, ""]


def test_every_op_kind_roundtrips_with_header_fields() -> None:
    """A message with key, region and clear operations decodes to the same message."""
    ops = [
        Invalidation(Kind.KEY, "r", "k"),
        Invalidation(Kind.REGION, "r"),
        Invalidation(Kind.CLEAR),
        Invalidation(Kind.REGION, None),
        Invalidation(Kind.KEY, None, 42),
    ]
    payload = encode(SENDER, 2**64 - 1, ops)
    assert payload[:2] == MAGIC
    assert payload[2] == VERSION
    assert decode(payload) == Message(SENDER, 2**64 - 1, tuple(ops), None)


def test_empty_message_roundtrips() -> None:
    """A message with no operations is valid and is exactly one header long."""
    payload = encode(SENDER, 1, [])
    assert len(payload) == HEADER.size
    assert decode(payload) == Message(SENDER, 1, (), None)


def test_bool_key_travels_as_int() -> None:
    """A bool key (an int) is sent as its int value, which hashes like the bool."""
    (op,) = roundtrip([Invalidation(Kind.KEY, None, True)]).operations
    assert op.key == 1
    assert type(op.key) is int


def test_region_name_too_long_is_refused_by_encode() -> None:
    """A region name of 65535 bytes or more cannot be encoded."""
    with pytest.raises(ValueError, match="too long"):
        encode(SENDER, 1, [Invalidation(Kind.REGION, "x" * 65535)])
    assert roundtrip([Invalidation(Kind.REGION, "x" * 65534)]).operations[0].region == "x" * 65534


def test_describe() -> None:
    """describe gives a short readable form of each kind."""
    assert Invalidation(Kind.KEY, "products", "42").describe() == "key products/'42'"
    assert Invalidation(Kind.KEY, None, 1).describe() == "key <default>/1"
    assert Invalidation(Kind.REGION, "r").describe() == "region r"
    assert Invalidation(Kind.CLEAR).describe() == "clear"


def test_message_error_is_a_nearcache_error() -> None:
    """MessageError sits under the library's root error (and ValueError)."""
    assert issubclass(MessageError, NearCacheError)
    assert issubclass(MessageError, ValueError)


# -- signing ------------------------------------------------------------------------------------


def test_signed_roundtrip_reports_key_id() -> None:
    """A signed message decodes with any configured secret set holding its key id."""
    ops = [Invalidation(Kind.KEY, "r", "k"), Invalidation(Kind.CLEAR)]
    message = roundtrip(ops, signing_key=("k2", SECRETS["k2"]), secrets=SECRETS)
    assert message.operations == tuple(ops)
    assert message.key_id == "k2"
    assert message.sender == SENDER
    assert message.sequence == 7


def test_unicode_key_id_roundtrips() -> None:
    """A key id may be any UTF-8 string up to 255 bytes."""
    key_id = "clé-🔑" + "x" * 200
    message = roundtrip([], signing_key=(key_id, b"s"), secrets={key_id: b"s"})
    assert message.key_id == key_id


def test_signature_covers_every_byte() -> None:
    """Changing any single byte of a signed message makes decode reject it."""
    payload = encode(SENDER, 3, [Invalidation(Kind.KEY, "r", "k")], signing_key=("k1", b"s"))
    for i in range(len(payload)):
        tampered = bytearray(payload)
        tampered[i] ^= 0x01
        with pytest.raises(MessageError):
            decode(bytes(tampered), {"k1": b"s"})


def test_tampered_operations_rejected_with_bad_signature() -> None:
    """A forged operation in a signed message is reported as a bad signature."""
    payload = encode(SENDER, 1, [Invalidation(Kind.KEY, None, "a")], signing_key=("k1", b"s"))
    at = HEADER.size + 1 + 2 + 5  # kind, default region, key type and length
    assert payload[at : at + 1] == b"a"
    forged = payload[:at] + b"b" + payload[at + 1 :]
    with pytest.raises(MessageError, match="bad signature"):
        decode(forged, {"k1": b"s"})


def test_wrong_secret_rejected() -> None:
    """A message signed with another secret under the same key id is rejected."""
    payload = encode(SENDER, 1, [], signing_key=("k1", b"attacker"))
    with pytest.raises(MessageError, match="bad signature"):
        decode(payload, SECRETS)


def test_unknown_key_id_rejected() -> None:
    """A message signed under a key id that is not configured is rejected."""
    payload = encode(SENDER, 1, [], signing_key=("k9", b"whatever"))
    with pytest.raises(MessageError, match="unknown key id"):
        decode(payload, SECRETS)


def test_unsigned_rejected_when_secret_configured() -> None:
    """With secrets configured, an unsigned message is rejected."""
    payload = encode(SENDER, 1, [Invalidation(Kind.CLEAR)])
    with pytest.raises(MessageError, match="unsigned"):
        decode(payload, SECRETS)


@pytest.mark.parametrize("secrets", [None, {}])
def test_signed_rejected_when_no_secret_configured(secrets: dict[str, bytes] | None) -> None:
    """Without secrets, a signed message is rejected rather than trusted blindly."""
    payload = encode(SENDER, 1, [], signing_key=("k1", SECRETS["k1"]))
    with pytest.raises(MessageError, match="no secret"):
        decode(payload, secrets)


def test_stripped_signature_rejected() -> None:
    """Clearing the signed flag and dropping the trailer does not get past a configured secret."""
    payload = bytearray(encode(SENDER, 1, [], signing_key=("k1", SECRETS["k1"])))
    payload[3] = 0
    with pytest.raises(MessageError):
        decode(bytes(payload[: HEADER.size]), SECRETS)


def test_mac_is_hmac_sha256_of_everything_before_it() -> None:
    """The trailer is key id, key-id length, then HMAC-SHA256 of all preceding bytes."""
    payload = encode(SENDER, 1, [Invalidation(Kind.CLEAR)], signing_key=("id", b"secret"))
    body, mac = payload[:-32], payload[-32:]
    assert mac == hmac.new(b"secret", body, hashlib.sha256).digest()
    assert body.endswith(b"id\x02")


# -- malformed input ----------------------------------------------------------------------------


def _header(**fields: Any) -> bytes:
    values = {"magic": MAGIC, "version": VERSION, "flags": 0, "count": 0, **fields}
    return HEADER.pack(
        values["magic"], values["version"], values["flags"], SENDER, 1, values["count"]
    )


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "too short"),
        (b"NC\x01", "too short"),
        (_header(magic=b"XX"), "bad magic"),
        (_header(version=2), "version"),
        (_header(flags=0x02), "flags"),
        (_header(count=1), "exceeds"),
        (_header(count=1) + b"\x09", "unknown operation kind"),
        (_header(count=1) + b"\x02\x00", "truncated region"),
        (_header(count=1) + b"\x02\x00\x05ab", "truncated region"),
        (_header(count=1) + b"\x02\x00\x02\xff\xfe", "malformed"),
        (_header(count=1) + b"\x01\xff\xff\x01", "truncated key"),
        (_header(count=1) + b"\x01\xff\xff\x01\x00\x00\x00\x09ab", "truncated key"),
        (_header(count=1) + b"\x01\xff\xff\x09\x00\x00\x00\x00", "unknown key type"),
        (_header(count=1) + b"\x01\xff\xff\x03\x00\x00\x00\x00", "malformed int"),
        (_header(count=1) + b"\x01\xff\xff\x03\x00\x00\x00\x01-", "malformed int"),
        (_header(count=1) + b"\x01\xff\xff\x03\x00\x00\x00\x021a", "malformed int"),
        (_header(count=1) + b"\x01\xff\xff\x03\x00\x00\x00\x02\xc3\xa9", "malformed"),
        (_header(count=1) + b"\x03\x03", "unexpected bytes"),
        (_header(flags=1), "too short for its trailer"),
    ],
)
def test_malformed_messages_raise_message_error(payload: bytes, match: str) -> None:
    """Each kind of malformed message is rejected with a MessageError saying why."""
    secrets = SECRETS if payload[3:4] == b"\x01" else None
    with pytest.raises(MessageError, match=match):
        decode(payload, secrets)


def test_int_key_too_long_rejected() -> None:
    """An int key of more than 4000 characters is refused instead of converted."""
    payload = _header(count=1) + b"\x01\xff\xff\x03" + (5000).to_bytes(4, "big") + b"1" * 5000
    with pytest.raises(MessageError, match="too long"):
        decode(payload)


def _int_key_message(text: bytes) -> bytes:
    return _header(count=1) + b"\x01\xff\xff\x03" + len(text).to_bytes(4, "big") + text


@pytest.mark.parametrize("text", [b"0", b"7", b"-7", b"10", b"-120", b"9" * 4000])
def test_canonical_int_keys_are_read(text: bytes) -> None:
    """An int key in canonical form (what str(int) writes) is read back as that int."""
    assert decode(_int_key_message(text)).operations[0].key == int(text)


@pytest.mark.parametrize("text", [b"007", b"00", b"-0", b"-007", b"+7", b"", b"-", b" 7", b"7 "])
def test_int_keys_in_any_other_spelling_are_rejected(text: bytes) -> None:
    """Leading zeros, "-0", a sign other than "-" or spaces make the message malformed: one
    spelling per key (issue 8: "007" and "-0" used to be read as 7 and 0)."""
    with pytest.raises(MessageError, match="int key"):
        decode(_int_key_message(text))


def test_malformed_trailer_rejected() -> None:
    """A signed message whose key-id length is zero or reaches into the header is rejected."""
    body = _header(flags=1)
    for trailer in (b"\x00" + bytes(32), b"k\xff" + bytes(32)):
        with pytest.raises(MessageError, match="trailer"):
            decode(body + trailer, SECRETS)
    with pytest.raises(MessageError, match="key id"):
        decode(body + b"\xff\x01" + bytes(32), SECRETS)


# -- properties ---------------------------------------------------------------------------------

_text = st.text(max_size=20)
_keys = st.one_of(_text, st.binary(max_size=20), st.integers(-(10**40), 10**40), st.integers())
_regions = st.one_of(st.none(), _text)
_op_strategy = st.one_of(
    st.builds(lambda r, k: Invalidation(Kind.KEY, r, k), _regions, _keys),
    st.builds(lambda r: Invalidation(Kind.REGION, r), _regions),
    st.just(Invalidation(Kind.CLEAR)),
)
_signing = st.one_of(st.none(), st.sampled_from(sorted(SECRETS.items())))


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(_op_strategy, max_size=20),
    sequence=st.integers(0, 2**64 - 1),
    sender=st.binary(min_size=16, max_size=16),
    signing=_signing,
)
def test_any_operations_roundtrip(
    ops: list[Invalidation], sequence: int, sender: bytes, signing: Signing
) -> None:
    """Any list of operations, sender and sequence decodes to exactly what was encoded."""
    payload = encode(sender, sequence, ops, signing_key=signing)
    message = decode(payload, SECRETS if signing else None)
    assert message == Message(sender, sequence, tuple(ops), signing[0] if signing else None)
    for sent, received in zip(ops, message.operations, strict=True):
        assert type(sent.key) is type(received.key)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), secrets=st.sampled_from([None, SECRETS]))
def test_decode_of_arbitrary_bytes_raises_only_message_error(data: bytes, secrets: Secrets) -> None:
    """Decoding arbitrary bytes either succeeds or raises MessageError, nothing else."""
    with contextlib.suppress(MessageError):
        decode(data, secrets)


@settings(max_examples=300, deadline=None)
@given(
    data=st.binary(max_size=120),
    count=st.integers(0, 8),
    flags=st.sampled_from([0, 1]),
    secrets=st.sampled_from([None, SECRETS]),
)
def test_decode_of_bytes_after_a_valid_header_raises_only_message_error(
    data: bytes, count: int, flags: int, secrets: Secrets
) -> None:
    """Arbitrary operations behind a valid header decode or raise MessageError, nothing else."""
    with contextlib.suppress(MessageError):
        decode(_header(count=count, flags=flags) + data, secrets)


_mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10_000), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 10_000), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 10_000), st.just(0)),
)


def _mutate(payload: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    data = bytearray(payload)
    for kind, where, value in mutations:
        pos = where % (len(data) + 1)
        if kind == "flip" and pos < len(data):
            data[pos] ^= value
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data.insert(pos, value)
        elif kind == "delete" and pos < len(data):
            del data[pos]
    return bytes(data)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(_op_strategy, min_size=1, max_size=8),
    mutations=st.lists(_mutation, min_size=1, max_size=4),
    signing=_signing,
    secrets=st.sampled_from([None, SECRETS]),
)
def test_decode_of_mutated_messages_raises_only_message_error(
    ops: list[Invalidation],
    mutations: list[tuple[str, int, int]],
    signing: Signing,
    secrets: Secrets,
) -> None:
    """Mutated or truncated valid messages decode to a Message or raise MessageError only."""
    payload = _mutate(encode(SENDER, 5, ops, signing_key=signing), mutations)
    try:
        message = decode(payload, secrets)
    except MessageError:
        return
    assert isinstance(message, Message)
    assert all(isinstance(op, Invalidation) for op in message.operations)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(_op_strategy, max_size=8),
    mutations=st.lists(_mutation, min_size=1, max_size=4),
)
def test_mutated_signed_messages_never_verify(
    ops: list[Invalidation], mutations: list[tuple[str, int, int]]
) -> None:
    """Any change to a signed message makes it fail verification."""
    payload = encode(SENDER, 5, ops, signing_key=("k1", SECRETS["k1"]))
    mutated = _mutate(payload, mutations)
    if mutated == payload:
        return
    with pytest.raises(MessageError):
        decode(mutated, SECRETS)


# -- helpers ------------------------------------------------------------------------------------


def test_channel_name_contains_the_version() -> None:
    """The wire channel embeds the protocol version and the optional prefix."""
    assert channel_name("orders") == f"nearcache:v{VERSION}:orders"
    assert channel_name("orders", prefix="app:") == f"app:nearcache:v{VERSION}:orders"
    assert f"v{VERSION}" in channel_name("x")


def test_split_keeps_order_and_chunk_size() -> None:
    """split cuts operations into chunks of at most max_ops, in order, with no empty chunk."""
    ops = [Invalidation(Kind.KEY, None, i) for i in range(7)]
    chunks = split(ops, 3)
    assert [len(c) for c in chunks] == [3, 3, 1]
    assert [op for chunk in chunks for op in chunk] == ops
    assert split([], 3) == []
    assert split(ops[:3], 3) == [ops[:3]]


# -- regressions: each fails until its bug is fixed ---------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        pytest.param(int("9" * 4000), id="4000-digits"),
        pytest.param(-int("9" * 4000), id="negative-4000-digits"),
        pytest.param(10**4100, id="4101-digits"),
    ],
)
def test_encoded_int_key_is_never_rejected_by_decode(key: int) -> None:
    """An int key the encoder accepts is one the decoder reads back (no undeliverable message)."""
    try:
        payload = encode(SENDER, 1, [Invalidation(Kind.KEY, None, key)])
    except ValueError:
        return  # refusing at the sender is fine: the caller learns about it
    assert decode(payload).operations[0].key == key


def test_channel_name_carries_a_non_default_database() -> None:
    """The replay log lives in one database while Pub/Sub spans them all, so a database other
    than 0 is part of the wire channel; db 0 keeps the plain name."""
    from nearcache._core.codec import channel_name

    assert channel_name("shop") == "nearcache:v1:shop"
    assert channel_name("shop", "tenant:", 0) == "tenant:nearcache:v1:shop"
    assert channel_name("shop", "", 3) == "nearcache:v1:db3:shop"
