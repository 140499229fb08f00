"""Who is in charge: the I/O-free decisions about Sentinel and Redis Cluster topologies.

A pong proves that every message published on the *answering node* before the ping has
arrived; it proves nothing about messages published elsewhere. After a failover the old
primary can stay up, writable and answering pings (a Sentinel failover leaves it a master for
about ten seconds; a primary cut off from the Sentinels stays one), so a confirmation must also
show that the answering node is still the one every writer writes to.

**Sentinel.** :class:`SentinelQuorum` keeps each Sentinel's latest answer to "who is the
primary of this service?" together with when the question was asked. Writers and subscribers
follow the primary named by a majority of the configured Sentinels, and :meth:`confirmed`
gives the latest time as of which a majority still named the same primary *with the same
configuration epoch* (so a primary demoted and promoted again between two questions is not
taken for the same reign). A subscriber's pong confirms ``min(ping time, confirmed(claim))``;
a writer's publish counts as delivered once a majority asked after its acknowledgement still
names the writer's primary. Any two majorities share a Sentinel, and a Sentinel's epoch never
goes backwards, so a writer and a subscriber that both pass these checks were on the same
node during the same reign (docs/guarantees.md gives the argument).

**Cluster.** The wire channel is wrapped in one hash tag (``{nearcache:v1:orders}``), so the
channel (``SPUBLISH`` / ``SSUBSCRIBE``) and the replay log keys (``{...}:log``,
``{...}:epoch``) live in one slot, on one shard; :func:`key_slot` computes it and
:func:`slot_primary` reads its owner from ``CLUSTER SLOTS``.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from nearcache._config import Endpoint
from nearcache._exceptions import ConfigurationError

__all__ = [
    "SLOTS",
    "Placement",
    "PrimaryClaim",
    "SentinelQuorum",
    "ServerTraits",
    "cluster_channel",
    "key_slot",
    "parse_hello",
    "parse_sentinel_master",
    "parse_switch_master",
    "slot_primary",
]

SLOTS = 16384
SHARDED_PUBSUB_VERSION = (7, 0, 0)


# --------------------------------------------------------------------------- Cluster


def key_slot(key: str | bytes) -> int:
    """Redis Cluster's hash slot of ``key``: CRC16 (XMODEM) of its hash tag, or of the whole
    key when it has none, modulo 16384."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


def cluster_channel(channel: str) -> str:
    """The wire channel on a Redis Cluster: the whole name in one hash tag, so that the
    channel and every per-channel key (``{channel}:log``, ``{channel}:epoch``) hash to one
    slot. A name containing ``{`` or ``}`` would change the tag: refused."""
    if "{" in channel or "}" in channel:
        raise ConfigurationError(
            f"channel {channel!r}: '{{' and '}}' cannot be used on a Redis Cluster (nearcache "
            "puts the whole channel name, prefix included, in one hash tag so that the "
            "channel and its replay log share a slot)",
            option="channel",
        )
    return "{" + channel + "}"


def slot_primary(slots_reply: Sequence[Any], slot: int) -> tuple[str, int, str] | None:
    """``(host, port, node id)`` of the primary serving ``slot`` in a ``CLUSTER SLOTS``
    reply (host ``""`` when the node does not know its own address), or None if no range
    covers it."""
    for entry in slots_reply:
        low, high, primary = int(entry[0]), int(entry[1]), entry[2]
        if low <= slot <= high:
            host = _text(primary[0])
            node_id = _text(primary[2]) if len(primary) > 2 else ""
            return ("" if host == "?" else host), int(primary[1]), node_id
    return None


@dataclass(frozen=True)
class ServerTraits:
    """What a server says about itself in ``HELLO``: version, mode and role."""

    version: tuple[int, ...]
    mode: str  # "standalone", "cluster" or "sentinel"
    role: str  # "master" or "replica"

    @property
    def sharded_pubsub(self) -> bool:
        """Whether the server has SSUBSCRIBE / SPUBLISH (Redis 7.0 or later)."""
        return self.version >= SHARDED_PUBSUB_VERSION


def parse_hello(reply: Any) -> ServerTraits:
    """Read a ``HELLO`` reply (a RESP2 flat list or a RESP3 map)."""
    if isinstance(reply, dict):
        fields = {_text(k): v for k, v in reply.items()}
    else:
        items = list(reply)
        fields = {_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}
    version = tuple(
        int(part) for part in _text(fields.get("version", "0")).split(".")[:3] if part.isdigit()
    )
    return ServerTraits(
        version=version or (0,),
        mode=_text(fields.get("mode", "standalone")),
        role=_text(fields.get("role", "master")),
    )


# --------------------------------------------------------------------------- Sentinel


@dataclass(frozen=True)
class PrimaryClaim:
    """One Sentinel's answer: the primary's address and the configuration epoch under which
    it was promoted (every failover raises the epoch)."""

    endpoint: Endpoint
    epoch: int


def parse_sentinel_master(reply: Any) -> PrimaryClaim:
    """A ``SENTINEL MASTER <name>`` reply (flat list or dict) as a claim."""
    if isinstance(reply, dict):
        fields = {_text(k): v for k, v in reply.items()}
    else:
        items = list(reply)
        fields = {_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}
    return PrimaryClaim(
        Endpoint(_text(fields["ip"]), int(fields["port"])), int(fields.get("config-epoch", 0))
    )


def parse_switch_master(data: str | bytes) -> tuple[str, Endpoint, Endpoint] | None:
    """``+switch-master`` message data: ``<name> <old ip> <old port> <new ip> <new port>``,
    as ``(name, old, new)``; None if malformed."""
    parts = _text(data).split()
    if len(parts) != 5 or not parts[2].isdigit() or not parts[4].isdigit():
        return None
    return parts[0], Endpoint(parts[1], int(parts[2])), Endpoint(parts[3], int(parts[4]))


@dataclass(frozen=True)
class Placement:
    """Where one channel lives now: the node to subscribe on and publish to, and the
    channel's name there.

    ``endpoint`` is None for a Unix socket. ``claim`` is the Sentinel majority's claim the
    placement follows, with ``quorum`` the live answers it is checked against (both None
    without Sentinel); ``slot`` is the channel's hash slot on a cluster (None elsewhere).
    """

    endpoint: Endpoint | None
    channel: str
    traits: ServerTraits
    claim: PrimaryClaim | None = None
    slot: int | None = None
    node_id: str | None = None
    quorum: SentinelQuorum | None = field(default=None, compare=False, repr=False)

    @property
    def sharded(self) -> bool:
        """Whether the channel is a Redis Cluster shard channel (SSUBSCRIBE / SPUBLISH)."""
        return self.slot is not None

    def same_wire(self, other: Placement | None) -> bool:
        """Whether a publishing connection made for ``other`` serves this placement too: the
        same node, and the channel under the same name there."""
        return other is not None and (other.endpoint, other.channel) == (
            self.endpoint,
            self.channel,
        )

    def server_id(self, run_id: str | None) -> str | None:
        """What the replay log's cursor records as the server it read from: the run id,
        plus the Sentinel epoch, so that a primary promoted again after being replaced (it
        keeps its run id) is never taken for the same reign."""
        if run_id is None or self.claim is None:
            return run_id
        return f"{run_id}@{self.claim.epoch}"


@dataclass(frozen=True)
class _Answer:
    asked_at: float
    claim: PrimaryClaim | None  # None: the Sentinel does not know the service


class SentinelQuorum:
    """The latest answer of each of ``size`` Sentinels, and what a majority of them says.

    Answers carry the time the question was *asked* (before the answer could be known): an
    answer proves what the Sentinel believed at some moment no earlier than that.
    """

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a quorum needs at least one Sentinel")
        self.size = size
        self._answers: list[_Answer | None] = [None] * size

    @property
    def majority(self) -> int:
        """How many Sentinels make a majority of the configured ones."""
        return self.size // 2 + 1

    def record(self, index: int, asked_at: float, claim: PrimaryClaim | None) -> None:
        """Sentinel ``index`` answered ``claim`` to a question asked at ``asked_at`` (an
        answer to an older question than the one kept is ignored)."""
        previous = self._answers[index]
        if previous is None or asked_at >= previous.asked_at:
            self._answers[index] = _Answer(asked_at, claim)

    def primary(self, since: float = float("-inf")) -> PrimaryClaim | None:
        """The claim a majority of Sentinels made to questions asked at or after ``since``,
        or None if no claim has a majority."""
        counts: dict[PrimaryClaim, int] = {}
        for answer in self._answers:
            if answer is not None and answer.claim is not None and answer.asked_at >= since:
                counts[answer.claim] = counts.get(answer.claim, 0) + 1
        for claim, count in counts.items():
            if count >= self.majority:
                return claim
        return None

    def unknown_service(self, since: float = float("-inf")) -> bool:
        """Whether a majority answered (since ``since``) that they do not know the service."""
        count = sum(
            1
            for answer in self._answers
            if answer is not None and answer.claim is None and answer.asked_at >= since
        )
        return count >= self.majority

    def confirmed(self, claim: PrimaryClaim) -> float | None:
        """The latest time ``t`` such that a majority of Sentinels named ``claim`` in answer
        to questions asked at or after ``t`` (None: no majority names it now)."""
        times = sorted(
            (a.asked_at for a in self._answers if a is not None and a.claim == claim),
            reverse=True,
        )
        return times[self.majority - 1] if len(times) >= self.majority else None

    def contradicted(self, claim: PrimaryClaim) -> bool:
        """Whether any Sentinel now names another primary under a newer epoch: a failover
        away from ``claim`` has begun (an early signal, not a majority)."""
        return any(
            a is not None
            and a.claim is not None
            and a.claim.epoch > claim.epoch
            and a.claim.endpoint != claim.endpoint
            for a in self._answers
        )

    def answers(self) -> list[str]:
        """Each Sentinel's latest answer, in order, for error messages."""
        shown = []
        for answer in self._answers:
            if answer is None:
                shown.append("no answer")
            elif answer.claim is None:
                shown.append("unknown service")
            else:
                shown.append(f"{answer.claim.endpoint} (epoch {answer.claim.epoch})")
        return shown


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
