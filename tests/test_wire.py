"""The C message codec (``_core/_wire.c``) agrees byte for byte with the Python codec it
accelerates: the same bytes out of ``encode``, the same operations (or a MessageError) out of
``decode``, for valid, mutated and truncated messages."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearcache._core import codec
from nearcache._core.codec import Invalidation, Kind, Update, decode, encode
from nearcache._exceptions import MessageError

if codec._wire is None:  # pragma: no cover - no compiler, or the pure-Python pass
    if os.environ.get("CI") and not os.environ.get("NEARCACHE_PURE_PYTHON"):
        raise RuntimeError("CI must build the C codec: a silent fallback leaves it untested")
    pytest.skip("the C codec is not in use", allow_module_level=True)

SENDER = bytes(range(16))
SECRETS = {"k1": b"secret"}


@pytest.fixture
def python_codec() -> Iterator[None]:
    """Run the block with the C codec switched off."""
    wire = codec._wire
    codec._wire = None
    try:
        yield
    finally:
        codec._wire = wire


def both(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """fn's result (or exception type and text) with the C codec, then with Python's."""
    results = []
    for wire in (codec._wire, None):
        saved, codec._wire = codec._wire, wire
        try:
            results.append(("ok", fn(*args, **kwargs)))
        except (MessageError, ValueError, UnicodeError) as exc:
            results.append((type(exc).__name__, str(exc)))
        finally:
            codec._wire = saved
    return results[0], results[1]


regions = st.one_of(st.none(), st.sampled_from(["", "products", "régiön 🚀"]), st.text(max_size=8))
keys = st.one_of(
    st.text(max_size=12),
    st.binary(max_size=12),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.booleans(),  # not exact ints: the Python codec takes them
)
operations = st.one_of(
    st.builds(lambda r, k: Invalidation(Kind.KEY, r, k), regions, keys),
    st.builds(lambda r: Invalidation(Kind.REGION, r), regions),
    st.just(Invalidation(Kind.CLEAR)),
    st.builds(lambda r, k: Update(r, k, b"value", 1.5, None, 1), regions, st.text(max_size=5)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(operations, max_size=20), st.integers(min_value=1, max_value=2**64 - 1))
def test_encode_agrees(ops: list[Invalidation], sequence: int) -> None:
    """Both codecs encode any operation list to the same bytes (signed or not), and both
    decode it back to the same operations."""
    for signing in (None, ("k1", b"secret")):
        fast, slow = both(encode, SENDER, sequence, ops, signing_key=signing)
        assert fast == slow
        if fast[0] == "ok":
            secrets = SECRETS if signing else None
            assert both(decode, fast[1], secrets)[0] == both(decode, fast[1], secrets)[1]
            assert decode(fast[1], secrets).operations == tuple(ops)


@settings(max_examples=500, deadline=None)
@given(
    st.lists(operations, min_size=1, max_size=8),
    st.data(),
)
def test_decode_agrees_on_mutated_and_truncated_messages(
    ops: list[Invalidation], data: st.DataObject
) -> None:
    """Flipped bytes, cut or extended messages and wrong counts: the same operations or the
    same MessageError from both decoders."""
    message = bytearray(encode(SENDER, 1, ops))
    action = data.draw(st.sampled_from(["flip", "cut", "extend", "count"]))
    if action == "flip":
        at = data.draw(st.integers(min_value=32, max_value=len(message) - 1))
        message[at] = data.draw(st.integers(min_value=0, max_value=255))
    elif action == "cut":
        del message[data.draw(st.integers(min_value=32, max_value=len(message) - 1)) :]
    elif action == "extend":
        message += data.draw(st.binary(min_size=1, max_size=6))
    else:
        message[28:32] = data.draw(st.integers(min_value=0, max_value=40)).to_bytes(4, "big")
    fast, slow = both(decode, bytes(message))
    assert fast == slow


@pytest.mark.parametrize(
    "raw",
    [b"0", b"7", b"-7", b"9" * 4000, b"007", b"-0", b"+7", b"", b"-", b" 7", b"9" * 4001, b"\xff"],
)
def test_int_keys_agree(raw: bytes) -> None:
    """Canonical decimal int keys decode alike; every other spelling is refused alike."""
    good = encode(SENDER, 1, [Invalidation(Kind.KEY, None, 1)])
    head = good[:32] + b"\x01\xff\xff\x03"
    message = head + len(raw).to_bytes(4, "big") + raw
    fast, slow = both(decode, message)
    assert fast == slow


def test_regions_are_decoded_once_per_run() -> None:
    """Keys of one region share one region string (decoded once), as far as C can tell."""
    ops = [Invalidation(Kind.KEY, "products", str(i)) for i in range(3)]
    got = decode(encode(SENDER, 1, ops)).operations
    assert got == tuple(ops)
    assert got[0].region is got[2].region


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(regions, keys), max_size=20), st.integers(0, 2**64))
def test_key_entries_agree(idents: list[tuple[str | None, Any]], seq: int) -> None:
    """The outbox's queue entries for staged keys: the same (seq, Invalidation) pairs, of the
    Invalidation type itself, from C and from Python."""
    fast, slow = both(codec.key_entries, seq, idents)
    assert fast == slow
    _, entries = fast
    assert all(type(op) is Invalidation and op.kind is Kind.KEY for _, op in entries)
    assert all(s is seq for s, _ in entries)


def test_key_entries_refuses_what_is_not_an_ident() -> None:
    """Bad input to the C helper is an error, not a crash."""
    with pytest.raises(TypeError, match="ident"):
        codec._wire.key_entries(1, [("region", "key", "extra")])
    with pytest.raises(TypeError):
        codec._wire.key_entries(1, (("region", "key"),))


def test_the_python_codec_stands_alone(python_codec: None) -> None:
    """With the C codec off, messages still round-trip (the fallback every platform has)."""
    ops = [Invalidation(Kind.KEY, "r", "k"), Invalidation(Kind.CLEAR)]
    assert codec._wire is None
    assert decode(encode(SENDER, 3, ops)).operations == tuple(ops)
