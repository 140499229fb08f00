"""The I/O-free topology decisions (nearcache._core.topology): hash slots, the cluster
channel name, what a majority of Sentinels says, and the replies they are read from."""

from __future__ import annotations

from typing import Any

import pytest

from nearcache._config import Endpoint
from nearcache._core.commands import (
    AskSentinels,
    ConfirmPrimary,
    Disconnect,
    Locate,
    Ping,
    Receive,
    Subscribe,
)
from nearcache._core.subscription import Subscription
from nearcache._core.topology import (
    Placement,
    PrimaryClaim,
    SentinelQuorum,
    ServerTraits,
    cluster_channel,
    key_slot,
    parse_hello,
    parse_sentinel_master,
    parse_switch_master,
    slot_primary,
)
from nearcache._exceptions import ConfigurationError
from tests.clock import FakeClock

X = PrimaryClaim(Endpoint("10.0.0.1", 6379), 1)
Y = PrimaryClaim(Endpoint("10.0.0.2", 6379), 2)
X_AGAIN = PrimaryClaim(Endpoint("10.0.0.1", 6379), 3)


@pytest.mark.parametrize(
    ("key", "slot"),
    [("foo", 12182), ("{user1000}.following", key_slot("user1000")), ("{}x", key_slot("{}x"))],
)
def test_key_slot_known_values(key: str, slot: int) -> None:
    """key_slot gives Redis's slot (12182 for 'foo') and hashes only a non-empty hash tag."""
    assert key_slot(key) == slot
    assert key_slot(key.encode()) == slot


def test_cluster_channel_keeps_channel_and_log_in_one_slot() -> None:
    """The tagged channel and its replay log keys hash to one slot."""
    tagged = cluster_channel("app:nearcache:v1:orders")
    assert tagged == "{app:nearcache:v1:orders}"
    assert key_slot(tagged) == key_slot(tagged + ":log") == key_slot(tagged + ":epoch")


@pytest.mark.parametrize("channel", ["a{b", "a}b", "{a}", "pre{fix}:nearcache:v1:x"])
def test_cluster_channel_refuses_braces(channel: str) -> None:
    """A channel whose braces would change the hash tag is refused, naming the channel."""
    with pytest.raises(ConfigurationError, match="cannot be used on a Redis Cluster") as info:
        cluster_channel(channel)
    assert info.value.option == "channel"


def test_slot_primary_reads_cluster_slots() -> None:
    """slot_primary finds the range holding the slot and its primary; '?' means unknown."""
    reply = [
        [0, 5460, [b"10.0.0.1", 7000, b"id1"], [b"10.0.0.4", 7003, b"id4"]],
        [5461, 16383, [b"?", 7001, b"id2"]],
    ]
    assert slot_primary(reply, 0) == ("10.0.0.1", 7000, "id1")
    assert slot_primary(reply, 12182) == ("", 7001, "id2")
    assert slot_primary(reply[:1], 12182) is None


def test_parse_hello_resp2_and_resp3() -> None:
    """HELLO replies in both protocols give version, mode and role."""
    flat = [b"server", b"redis", b"version", b"7.0.15", b"mode", b"cluster", b"role", b"master"]
    traits = parse_hello(flat)
    assert traits == ServerTraits((7, 0, 15), "cluster", "master")
    assert traits.sharded_pubsub
    old = parse_hello({"version": "6.2.14", "mode": "standalone", "role": "replica"})
    assert old.version == (6, 2, 14) and not old.sharded_pubsub and old.role == "replica"


def test_parse_sentinel_master_and_switch_master() -> None:
    """SENTINEL MASTER gives the claim (address and epoch); +switch-master is read or
    rejected when malformed."""
    reply = [b"name", b"m", b"ip", b"10.0.0.2", b"port", b"6379", b"config-epoch", b"2"]
    assert parse_sentinel_master(reply) == Y
    assert parse_switch_master(b"m 10.0.0.1 6379 10.0.0.2 6379") == (
        "m",
        X.endpoint,
        Y.endpoint,
    )
    assert parse_switch_master(b"m 10.0.0.1 6379") is None
    assert parse_switch_master("m a b c d") is None


def test_majority_names_the_primary() -> None:
    """The primary is the claim of a majority of the configured Sentinels, no fewer."""
    quorum = SentinelQuorum(3)
    quorum.record(0, 1.0, X)
    assert quorum.primary() is None
    quorum.record(1, 1.0, Y)
    assert quorum.primary() is None
    quorum.record(2, 1.0, Y)
    assert quorum.primary() == Y
    assert quorum.primary(since=1.5) is None  # only answers to questions asked since then


def test_confirmed_is_the_time_a_majority_still_named_the_claim() -> None:
    """confirmed(claim) is the latest question time answered with the claim by a majority."""
    quorum = SentinelQuorum(3)
    quorum.record(0, 5.0, X)
    quorum.record(1, 4.0, X)
    assert quorum.confirmed(X) == 4.0
    quorum.record(2, 6.0, X)
    assert quorum.confirmed(X) == 5.0
    quorum.record(0, 7.0, Y)  # one Sentinel switched: the others still hold a majority
    assert quorum.confirmed(X) == 4.0
    assert quorum.contradicted(X)
    quorum.record(1, 8.0, Y)
    assert quorum.confirmed(X) is None
    assert quorum.primary() == Y


def test_a_primary_promoted_again_is_another_reign() -> None:
    """The same address under a newer epoch does not confirm the older claim."""
    quorum = SentinelQuorum(3)
    for index in range(3):
        quorum.record(index, 1.0, X)
    for index in range(3):
        quorum.record(index, 9.0, X_AGAIN)
    assert quorum.confirmed(X) is None
    assert quorum.confirmed(X_AGAIN) == 9.0
    assert not quorum.contradicted(X)  # same address: not an early signal, but no confirmation


def test_an_older_answer_never_replaces_a_newer_one() -> None:
    """Answers are kept by question time: a late answer to an old question is ignored."""
    quorum = SentinelQuorum(1)
    quorum.record(0, 5.0, Y)
    quorum.record(0, 3.0, X)
    assert quorum.primary() == Y


def test_unknown_service_needs_a_majority() -> None:
    """A majority answering 'no such master' means the service name is wrong."""
    quorum = SentinelQuorum(3)
    quorum.record(0, 1.0, None)
    assert not quorum.unknown_service()
    quorum.record(1, 1.0, None)
    assert quorum.unknown_service()
    assert quorum.answers() == ["unknown service", "unknown service", "no answer"]


def test_a_quorum_needs_a_sentinel() -> None:
    """An empty Sentinel list is a programming error."""
    with pytest.raises(ValueError, match="at least one"):
        SentinelQuorum(0)


# -- the subscription flow's topology decisions (driven without I/O) -------------------------


class _Listener:
    """Records what the flow reports."""

    def __init__(self) -> None:
        self.confirmed: list[float] = []
        self.subscribed: list[tuple[float, bool]] = []

    def on_message(self, payload: bytes) -> bool:
        return True

    def on_subscribed(self, as_of: float, complete: bool) -> None:
        self.subscribed.append((as_of, complete))

    def on_loss(self, reason: str) -> None:
        pass

    def on_confirmed(self, as_of: float) -> None:
        self.confirmed.append(as_of)

    def on_state(self, state: object, reason: str | None) -> None:
        pass

    def on_publish_refused(self, reason: str) -> None:
        pass


def _sentinel_flow(clock: FakeClock, quorum: SentinelQuorum, listener: _Listener) -> Any:
    """A subscription flow on primary X, driven up to its first Receive while listening."""
    placement = Placement(
        X.endpoint, "ch", ServerTraits((7, 0, 15), "standalone", "master"), claim=X, quorum=quorum
    )
    flow = Subscription(
        listener,  # type: ignore[arg-type]
        channel="ch",
        clock=clock,
        heartbeat=0.25,
        heartbeat_timeout=0.5,
        connect_timeout=1.0,
        log_length=0,
        reconcile=5.0,
        set_state=lambda state, reason: None,
    ).run()
    sent = clock.now
    assert isinstance(next(flow), Locate)
    assert flow.send(placement) == Subscribe("ch")
    assert isinstance(flow.send(None), Receive)
    clock.advance(0.01)
    confirm = flow.send({"type": "subscribe"})
    assert confirm == ConfirmPrimary(sent, 1.0)  # asked after the SUBSCRIBE was sent
    assert flow.send(True) == Ping("1")
    assert flow.send(None) == AskSentinels()
    assert isinstance(flow.send(None), Receive)
    return flow


def test_a_pong_confirms_no_later_than_the_sentinel_majority() -> None:
    """With Sentinel, a pong confirms min(ping time, the latest time a majority still named
    the primary): an answer from the node alone proves nothing about the others."""
    clock, quorum, listener = FakeClock(10.0), SentinelQuorum(3), _Listener()
    flow = _sentinel_flow(clock, quorum, listener)
    assert listener.subscribed == [(10.0, False)]
    quorum.record(0, 9.5, X)
    quorum.record(1, 9.7, X)
    quorum.record(2, 10.5, Y)
    flow.send({"type": "pong", "data": "1"})
    assert listener.confirmed == [9.5]  # the ping went at 10.01; the majority vouches to 9.5


def test_a_pong_from_a_primary_the_majority_left_ends_the_subscription() -> None:
    """Once a majority names another primary, the old one's pong ends the subscription
    instead of confirming anything."""
    clock, quorum, listener = FakeClock(10.0), SentinelQuorum(3), _Listener()
    flow = _sentinel_flow(clock, quorum, listener)
    quorum.record(0, 10.2, Y)
    quorum.record(1, 10.2, Y)
    quorum.record(2, 10.2, X)
    assert flow.send({"type": "pong", "data": "1"}) == Disconnect()
    assert listener.confirmed == []


def test_a_subscription_the_majority_no_longer_confirms_is_not_used() -> None:
    """If the Sentinels, asked after SUBSCRIBE, no longer name the node, the subscription
    is dropped before it confirms or replays anything."""
    clock, listener = FakeClock(10.0), _Listener()
    placement = Placement(
        X.endpoint, "ch", ServerTraits((7,), "standalone", "master"), claim=X, quorum=None
    )
    flow = Subscription(
        listener,  # type: ignore[arg-type]
        channel="ch",
        clock=clock,
        heartbeat=0.25,
        heartbeat_timeout=0.5,
        connect_timeout=1.0,
        log_length=0,
        reconcile=5.0,
        set_state=lambda state, reason: None,
    ).run()
    next(flow)
    flow.send(placement)
    flow.send(None)
    assert isinstance(flow.send({"type": "subscribe"}), ConfirmPrimary)
    assert flow.send(False) == Disconnect()
    assert listener.subscribed == []


def test_the_cursor_records_the_sentinel_epoch_with_the_run_id() -> None:
    """A primary promoted again keeps its run id but not its epoch: the server id differs,
    so the log is never replayed across the reigns."""
    traits = ServerTraits((7,), "standalone", "master")
    first = Placement(X.endpoint, "ch", traits, claim=X)
    again = Placement(X.endpoint, "ch", traits, claim=X_AGAIN)
    assert first.server_id("run1") == "run1@1" != again.server_id("run1")
    assert Placement(X.endpoint, "ch", traits).server_id("run1") == "run1"
    assert first.server_id(None) is None


def test_a_cluster_placement_uses_the_sharded_scripts() -> None:
    """On a cluster shard the publish goes through SPUBLISH (script and plain forms)."""
    from nearcache._core.commands import Call, RunScript
    from nearcache._core.log import SHARDED_PUBLISH_SCRIPT, publish_command

    script = publish_command("{ch}", 100, [b"m"], sharded=True)
    assert isinstance(script, RunScript) and script.source == SHARDED_PUBLISH_SCRIPT
    assert "SPUBLISH" in SHARDED_PUBLISH_SCRIPT
    assert publish_command("{ch}", 0, [b"m"], sharded=True) == Call("spublish", ("{ch}", b"m"))
