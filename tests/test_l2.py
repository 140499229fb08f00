"""Unit tests of the L2's I/O-free parts (update operations in the codec, key layout, value
records, lease waits) and of its Lua scripts, run on a real Redis."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from nearcache._core import l2
from nearcache._core.codec import Invalidation, Kind, Update, decode, encode
from nearcache._core.l2 import (
    ClearAll,
    ClearRegion,
    DeleteValue,
    LeaseWait,
    MessagePlan,
    StoreValue,
    decode_record,
    encode_payload,
    generation_keys,
    value_keys,
)
from nearcache._core.log import log_keys, parse_entries
from nearcache._exceptions import MessageError
from tests.servers import RedisServer

SENDER = bytes(range(16))
OTHER = bytes(range(16, 32))
SECRETS = {"k1": b"first-secret", "k2": b"second-secret"}
keys_st = st.text() | st.binary() | st.integers(-(10**30), 10**30)
regions_st = st.none() | st.text()


# -- update operations in the message codec ----------------------------------------------


@given(regions_st, keys_st, st.binary(max_size=300), st.booleans())
@settings(max_examples=200, deadline=None)
def test_update_roundtrips_signed_and_unsigned(
    region: str | None, key: Any, data: bytes, signed: bool
) -> None:
    """An update keeps region, key, value, serializer and ttl (whole milliseconds)."""
    op = Update(region, key, data, ttl=1.2345, sliding=None, serializer=7)
    kwargs: dict[str, Any] = {"signing_key": ("k1", SECRETS["k1"])} if signed else {}
    message = decode(
        encode(SENDER, 3, [op, Invalidation(Kind.KEY, region, key)], **kwargs),
        SECRETS if signed else None,
    )
    back, plain = message.operations
    assert isinstance(back, Update)
    assert (back.kind, back.region, back.key, back.data) == (Kind.UPDATE, region, key, data)
    assert (back.ttl, back.sliding, back.serializer) == (1.235, None, 7)
    assert type(plain) is Invalidation


def test_update_unpacks_like_an_invalidation() -> None:
    """Code that only invalidates sees (kind, region, key); the value rides along."""
    op = Update("r", "k", b"v", sliding=0.0001)
    kind, region, key = op
    assert (kind, region, key) == (Kind.UPDATE, "r", "k")
    assert op.invalidation() == Invalidation(Kind.KEY, "r", "k")
    assert op.describe() == "update r/'k'"
    assert "3" not in repr(op) and "1 bytes" in repr(op)
    assert decode(encode(SENDER, 1, [op])).operations[0].sliding == 0.001  # type: ignore[union-attr]


def test_update_bytes_on_the_wire() -> None:
    """The documented layout: kind 04, region, key, ttl ms, sliding ms, serializer, value."""
    message = encode(SENDER, 1, [Update(None, "k", b"\x01N", ttl=2.0, serializer=1)])
    assert message[32:].hex() == (
        "04" + "ffff" + "01" + "00000001" + "6b" + "000007d0" + "00000000" + "01" + "00000002014e"
    )


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_truncated_update_messages_are_rejected(data: st.DataObject) -> None:
    """Cutting a message anywhere inside an update raises MessageError."""
    op = Update("reg", b"key", b"some value bytes", ttl=5)
    message = encode(SENDER, 1, [op])
    cut = data.draw(st.integers(32, len(message) - 1))
    body = bytearray(message[:cut])
    with pytest.raises(MessageError):
        decode(bytes(body))


# -- key layout ---------------------------------------------------------------------------


def test_value_keys_are_namespaced_hash_tagged_and_distinct() -> None:
    """Keys live under the channel, with a hash tag on the digest; type and region count."""
    value, lease = value_keys("nearcache:v1:shop", "r", "1")
    assert value.startswith("nearcache:v1:shop:l2:{") and value.endswith("}")
    assert lease == value + ":lease"
    assert len(value.split("{")[1].rstrip("}")) == 32
    names = {
        value_keys("nearcache:v1:shop", region, key)[0]
        for region in (None, "", "r")
        for key in ("1", 1, b"1")
    }
    assert len(names) == 9
    assert value_keys("nearcache:v1:other", "r", "1")[0] != value
    braced = value_keys("{nearcache:v1:shop}", "r", "1")[0]
    assert braced.count("{") == 1  # the channel's own tag is dropped: values spread


def test_generation_keys_follow_the_log() -> None:
    """The generations sit beside the log, in its slot, and never collide with it."""
    channel = "nearcache:v1:shop"
    gen, rgen = generation_keys(channel)
    assert (gen, rgen) == (f"{channel}:gen", f"{channel}:rgen")
    assert {gen, rgen}.isdisjoint(log_keys(channel))
    assert not value_keys(channel, None, "gen")[0].endswith(":gen")


# -- value records ------------------------------------------------------------------------


def record(payload: bytes, gen: bytes = b"g", rgen: bytes = b"r") -> bytes:
    return bytes([len(gen)]) + gen + bytes([len(rgen)]) + rgen + payload


@pytest.mark.parametrize("signed", [False, True])
def test_record_roundtrip(signed: bool) -> None:
    """A record read back for its own region, key and serializer gives the value bytes."""
    signing = ("k2", SECRETS["k2"]) if signed else None
    payload = encode_payload(1, "r", 42, b"\x01data", signing)
    secrets = SECRETS if signed else None
    assert decode_record(record(payload), "r", 42, 1, secrets) == b"\x01data"
    assert l2.split_record(record(payload, b"0-0.ab", b"5-1")) == (b"0-0.ab", b"5-1", payload)


@pytest.mark.parametrize(
    ("payload", "region", "key", "serializer", "secrets", "match"),
    [
        (encode_payload(1, "r", "k", b"x"), "r", "k2", 1, None, "another region or key"),
        (encode_payload(1, "r", "k", b"x"), None, "k", 1, None, "another region or key"),
        (encode_payload(1, "r", "1", b"x"), "r", 1, 1, None, "another region or key"),
        (encode_payload(2, "r", "k", b"x"), "r", "k", 1, None, "serializer 2"),
        (encode_payload(1, "r", "k", b"x"), "r", "k", 1, SECRETS, "not signed"),
        (encode_payload(1, "r", "k", b"x", ("k1", b"s")), "r", "k", 1, None, "signed"),
        (encode_payload(1, "r", "k", b"x", ("k1", b"s")), "r", "k", 1, SECRETS, "signature"),
        (encode_payload(1, "r", "k", b"x", ("k9", b"s")), "r", "k", 1, SECRETS, "unknown key"),
        (b"NC\x01\x00\x01", "r", "k", 1, None, "bad magic"),
        (b"NV\x02\x00\x01", "r", "k", 1, None, "version 2"),
        (encode_payload(1, "r", "k", b"x") + b"!", "r", "k", 1, None, "length"),
        (encode_payload(1, "r", "k", b"xy")[:-1], "r", "k", 1, None, "length"),
    ],
)
def test_foreign_or_corrupt_records_are_refused(
    payload: bytes, region: Any, key: Any, serializer: int, secrets: Any, match: str
) -> None:
    """Another key's value, another serializer, wrong signing or bad bytes: MessageError."""
    with pytest.raises(MessageError, match=match):
        decode_record(record(payload), region, key, serializer, secrets)


@given(st.binary(max_size=120))
@settings(max_examples=400, deadline=None)
def test_arbitrary_records_only_fail_cleanly(raw: bytes) -> None:
    """Random bytes never decode for a signed cache, and only raise MessageError."""
    with pytest.raises(MessageError):
        decode_record(raw, "r", "k", 1, SECRETS)
    try:
        decode_record(raw, "r", "k", 1, None)
    except MessageError:
        pass


@given(st.binary(max_size=64), st.data())
@settings(max_examples=400, deadline=None)
def test_mutated_signed_records_never_verify(data: bytes, draw: st.DataObject) -> None:
    """Flipping any byte of a signed payload, or cutting it, makes the record a miss."""
    payload = bytearray(encode_payload(1, "r", "k", data, ("k1", SECRETS["k1"])))
    if draw.draw(st.booleans()):
        i = draw.draw(st.integers(0, len(payload) - 1))
        payload[i] ^= draw.draw(st.integers(1, 255))
    else:
        del payload[draw.draw(st.integers(0, len(payload) - 1)) :]
    with pytest.raises(MessageError):
        decode_record(record(bytes(payload)), "r", "k", 1, SECRETS)


def test_truncated_tags_are_refused() -> None:
    """A record cut inside its generation tags is malformed."""
    for raw in (b"", b"\x05ab", b"\x01a", b"\x01a\x04xy"):
        with pytest.raises(MessageError, match="truncated"):
            l2.split_record(raw)


# -- lease waits --------------------------------------------------------------------------


def test_lease_wait_backs_off_and_ends_at_the_deadline() -> None:
    """Polls come at 0.5, 1, 2 ... ms, never past 25 ms apart, and stop at the deadline."""
    wait = LeaseWait(100.0, 0.1)
    delays = []
    now = 100.0
    while (delay := wait.next_delay(now)) is not None:
        delays.append(delay)
        now += delay
    assert delays[:4] == [0.0005, 0.001, 0.002, 0.004]
    assert max(delays) <= LeaseWait.CAP
    assert now == pytest.approx(100.1)


# -- the scripts on a real Redis -----------------------------------------------------------


class Scripts:
    """The L2 scripts registered on one client, with a channel of their own."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.channel = f"nearcache:v1:t-{uuid.uuid4().hex[:8]}"
        self.read_script = client.register_script(l2.READ_SCRIPT)
        self.fill_script = client.register_script(l2.FILL_SCRIPT)
        self.release_script = client.register_script(l2.RELEASE_SCRIPT)
        self.publish_script = client.register_script(l2.PUBLISH_SCRIPT)

    def read(self, key: Any, token: str = "", region: str | None = "r") -> l2.ReadResult:
        keys, args = l2.read_call(self.channel, region, key, token, 5.0)
        return l2.parse_read(self.read_script(keys=keys, args=args))

    def fill(
        self, key: Any, token: str, got: l2.ReadResult, data: bytes = b"v", region: Any = "r"
    ) -> int:
        payload = encode_payload(1, region, key, data)
        keys, args = l2.fill_call(
            self.channel, region, key, token, payload, 60.0, got.gen, got.rgen
        )
        return int(self.fill_script(keys=keys, args=args))

    def value(self, key: Any, region: str | None = "r") -> bytes | None:
        got = self.read(key, region=region)
        if got.status != l2.VALUE:
            return None
        return decode_record(got.record, region, key, 1)

    def publish(
        self,
        plans: list[MessagePlan],
        since: tuple[bytes, str] | None = None,
        sender: bytes = SENDER,
    ) -> list[Any]:
        keys, args = l2.publish_call(self.channel, 100, sender, since, plans, "e" * 16)
        return list(self.publish_script(keys=keys, args=args))

    def position(self) -> tuple[bytes, str]:
        """The log position a subscriber that applied everything so far would have."""
        epoch = self.client.get(log_keys(self.channel)[1]) or b""
        tail = parse_entries(self.client.xrevrange(log_keys(self.channel)[0], count=1))
        return epoch, str(tail[0][0]) if tail else ""


@pytest.fixture
def scripts(redis_server: RedisServer) -> Iterator[Scripts]:
    client = redis.Redis(port=redis_server.port)
    yield Scripts(client)
    client.close()


def store(key: Any, data: bytes, region: str | None = "r") -> MessagePlan:
    """A set of ``key`` sent as an update, with its invalidation as the fallback."""
    update = Update(region, key, data)
    return MessagePlan(
        encode(SENDER, 1, [update]),
        encode(SENDER, 1, [update.invalidation()]),
        [StoreValue(region, key, encode_payload(1, region, key, data), 60.0)],
    )


def test_read_takes_the_lease_once(scripts: Scripts) -> None:
    """A miss grants the lease to the first process; others see it held; no token, no lease."""
    assert scripts.read("k").status == l2.NO_VALUE
    assert scripts.read("k", "t1").status == l2.LEASED
    assert scripts.read("k", "t2").status == l2.LEASE_HELD
    assert scripts.read("k", "").status == l2.NO_VALUE


def test_fill_needs_the_lease_and_stores_once(scripts: Scripts) -> None:
    """The lease holder's fill is stored with its TTL; a fill without the lease is refused."""
    got = scripts.read("k", "t1")
    assert scripts.fill("k", "t2", got) == 0
    assert scripts.fill("k", "t1", got, b"loaded") == 1
    found = scripts.read("k", "t3")
    assert found.status == l2.VALUE and found.pttl is not None and 0 < found.pttl <= 60
    assert scripts.value("k") == b"loaded"
    assert scripts.fill("k", "t1", got) == 0  # single use


def test_a_write_between_lease_and_fill_refuses_the_fill(scripts: Scripts) -> None:
    """memcache's lease rule: a load that started before a write never reaches L2."""
    for plan in (
        store("k", b"new"),
        MessagePlan(
            encode(OTHER, 1, [Invalidation(Kind.KEY, "r", "k")]), b"", [DeleteValue("r", "k")]
        ),
    ):
        got = scripts.read("k", "loader")
        assert got.status == l2.LEASED
        scripts.publish([plan], sender=OTHER)
        assert scripts.fill("k", "loader", got, b"old") == 0
        assert scripts.value("k") in (None, b"new")
        scripts.client.delete(*value_keys(scripts.channel, "r", "k"))


@pytest.mark.parametrize("clear", [ClearRegion("r"), ClearAll()])
def test_clears_make_values_unreachable_and_refuse_older_fills(
    scripts: Scripts, clear: Any
) -> None:
    """After a clear, stored values are misses and a fill of a load begun before is refused;
    other regions survive a region clear."""
    got = scripts.read("a", "t")
    scripts.fill("a", "t", got, b"a1")
    other = scripts.read("b", "t", region="s")
    scripts.fill("b", "t", other, b"b1", region="s")
    pending = scripts.read("c", "t")
    kind = Kind.REGION if isinstance(clear, ClearRegion) else Kind.CLEAR
    op = Invalidation(kind, "r") if kind is Kind.REGION else Invalidation(kind)
    scripts.publish([MessagePlan(encode(OTHER, 1, [op]), b"", [clear])], sender=OTHER)
    assert scripts.value("a") is None
    assert scripts.fill("c", "t", pending) == 0
    assert (scripts.value("b", region="s") is None) == isinstance(clear, ClearAll)
    again = scripts.read("a", "t2")
    assert again.status == l2.LEASED
    assert scripts.fill("a", "t2", again, b"a2") == 1
    assert scripts.value("a") == b"a2"


def test_a_lost_generation_makes_older_values_unreachable(scripts: Scripts) -> None:
    """If the generation keys vanish (eviction), they come back new: no old value returns."""
    got = scripts.read("k", "t")
    scripts.fill("k", "t", got, b"v")
    scripts.client.delete(*generation_keys(scripts.channel))
    assert scripts.value("k") is None


def test_release_gives_up_only_our_lease(scripts: Scripts) -> None:
    """Releasing with another token does nothing; with ours, the next reader gets the lease."""
    scripts.read("k", "mine")
    lease = value_keys(scripts.channel, "r", "k")[1]
    assert scripts.release_script(keys=[lease], args=["other"]) == 0
    assert scripts.release_script(keys=[lease], args=["mine"]) == 1
    assert scripts.read("k", "next").status == l2.LEASED


def test_publish_logs_and_sends_like_the_plain_script(scripts: Scripts) -> None:
    """Messages go to the log and the channel in order, in envelopes; values reach L2."""
    pubsub = scripts.client.pubsub()
    pubsub.subscribe(scripts.channel)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"
    scripts.publish([store("k", b"v1")], since=scripts.position())  # empty log: no position
    plan = store("k", b"v2")
    epoch, last, receivers, fell_back = scripts.publish([plan], since=scripts.position())
    assert (receivers, fell_back) == (1, 0)
    assert scripts.value("k") == b"v2"
    got = [pubsub.get_message(timeout=5) for _ in range(2)]
    assert got[1]["data"].endswith(plan.message)
    assert got[0]["data"].endswith(store("k", b"v1").fallback)  # no position: invalidation
    entries = parse_entries(scripts.client.xrange(log_keys(scripts.channel)[0]))
    assert [m for _, m in entries] == [store("k", b"v1").fallback, plan.message]
    assert str(entries[-1][0]) == last.decode() and epoch == b"e" * 16
    pubsub.close()


def test_a_write_by_another_instance_since_the_set_makes_the_value_fall_back(
    scripts: Scripts,
) -> None:
    """The value is sent only if nobody else wrote the key after the writer's position."""
    scripts.publish([store("seed", b"x")], since=None)
    before = scripts.position()
    scripts.publish(
        [MessagePlan(encode(OTHER, 1, [Invalidation(Kind.KEY, "r", "k")]), b"", [])],
        sender=OTHER,
    )
    *_, fell_back = scripts.publish([store("k", b"late")], since=before)
    assert fell_back == 1
    assert scripts.value("k") is None
    *_, fell_back = scripts.publish([store("other", b"fine")], since=before)
    assert fell_back == 0 and scripts.value("other") == b"fine"
    *_, fell_back = scripts.publish([store("k", b"now")], since=scripts.position())
    assert fell_back == 0 and scripts.value("k") == b"now"


def test_unrelated_keys_do_not_conflict_but_own_writes_do(scripts: Scripts) -> None:
    """Others' messages naming other keys are no conflict; this instance's own message for
    the key after the position is one (another of its threads or tasks may have written)."""
    scripts.publish([store("seed", b"x")])
    before = scripts.position()
    scripts.publish(
        [MessagePlan(encode(OTHER, 1, [Invalidation(Kind.KEY, "r", "kk")]), b"", [])],
        sender=OTHER,
    )
    *_, fell_back = scripts.publish([store("k", b"1")], since=before)
    assert fell_back == 0 and scripts.value("k") == b"1"
    *_, fell_back = scripts.publish([store("k", b"2")], since=before)
    assert fell_back == 1 and scripts.value("k") is None


@pytest.mark.parametrize("clear", ["region", "other region", "all"])
def test_a_clear_since_the_set_makes_values_fall_back(scripts: Scripts, clear: str) -> None:
    """A clear of the value's region or of everything after the position is a conflict."""
    scripts.publish([store("seed", b"x")])
    before = scripts.position()
    if clear == "all":
        op, l2op = Invalidation(Kind.CLEAR), ClearAll()
    else:
        region = "r" if clear == "region" else "s"
        op, l2op = Invalidation(Kind.REGION, region), ClearRegion(region)  # type: ignore[assignment]
    scripts.publish([MessagePlan(encode(OTHER, 1, [op]), b"", [l2op])], sender=OTHER)
    *_, fell_back = scripts.publish([store("k", b"v")], since=before)
    assert fell_back == (0 if clear == "other region" else 1)


def test_unknown_positions_fall_back(scripts: Scripts) -> None:
    """Another epoch, a trimmed or unknown entry, or too many entries since: fall back."""
    scripts.publish([store("seed", b"x")])
    epoch, last = scripts.position()
    for since in ((b"another-epoch", last), (epoch, "1-0"), (epoch, ""), None):
        *_, fell_back = scripts.publish([store("k", b"v")], since=since)
        assert fell_back == 1
    start = scripts.position()
    for _ in range(l2.SCAN_LIMIT):
        scripts.publish(
            [MessagePlan(encode(OTHER, 1, [Invalidation(Kind.KEY, "s", "x")]), b"", [])],
            sender=OTHER,
        )
    *_, fell_back = scripts.publish([store("k", b"v")], since=start)
    assert fell_back == 1


def test_a_fallen_back_message_still_clears_in_order(scripts: Scripts) -> None:
    """Regions and clears in a batch take effect in order; values set after them survive."""
    scripts.publish([store("seed", b"x")])
    since = scripts.position()
    batch = [
        MessagePlan(encode(SENDER, 2, [Invalidation(Kind.REGION, "r")]), b"", [ClearRegion("r")]),
        store("k", b"after the clear"),
    ]
    *_, fell_back = scripts.publish(batch, since=since)
    assert fell_back == 0
    assert scripts.value("k") == b"after the clear"
