"""The I/O-free heart shared by the threaded and the asyncio drivers.

``CacheCore`` holds the L1 store, the outbox of invalidations to publish and the receiving
side's bookkeeping (own-message suppression, per-sender sequence gaps, malformed messages).
The drivers add only what needs I/O: locks or a loop, threads or tasks, and the backplane.
"""

from __future__ import annotations

import logging
import math
import os
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from nearcache._core.codec import Invalidation, Kind, Update, decode, encode, split
from nearcache._core.flights import Flights
from nearcache._core.l2 import MessagePlan
from nearcache._core.outbox import EVERY_KEY, REGION_KEYS, Outbox, written_ident
from nearcache._core.publishing import Publishing
from nearcache._core.sharing import Sharing
from nearcache._core.store import HIT_PATH, L1Store, Reservation
from nearcache._exceptions import ConfigurationError, MessageError

__all__ = [
    "APPLY_LATENCY_BOUNDS",
    "PLAIN_KEY_TYPES",
    "SENDER_IDLE",
    "SENDER_MEMORY",
    "UNECHOED_MAX",
    "BackplaneStats",
    "Batch",
    "CacheCore",
    "CacheOptions",
    "LatencyHistogram",
    "LatencySnapshot",
    "check_key",
    "check_region",
    "check_ttl",
]

log = logging.getLogger("nearcache")
_KEY = Kind.KEY  # read once: an Enum member read through its class costs ~50-80 ns
MESSAGE_MAX_OPS = 256  # operations per message: a few KiB, one TCP segment or a handful
BATCH_MAX_OPS = 8192  # operations taken per publish round trip (pipelined messages)


# A sender that has published nothing for SENDER_IDLE seconds says farewell (an empty message
# with its next sequence number) and takes a new id; a receiver forgets a sender it has not
# heard from for SENDER_MEMORY seconds of confirmed time. See docs/protocol.md, "Sender id and
# sequence numbers", for why this neither hides a gap nor causes a needless repair.
SENDER_IDLE = 60.0
SENDER_MEMORY = 600.0

# Own batches awaiting their echo (only while the subscription lags or is away): past this many
# they collapse into one that covers every key, until the latest one comes back.
UNECHOED_MAX = 4096

# Keys remembered as dropped by an invalidation (see CacheCore.dropped); past this many the
# memory starts over (a forgotten key's next miss only costs a plain GET more).
DROPPED_MAX = 4096

MAX_INT_KEY_BITS = 13_000  # at most 3,914 decimal digits: well inside the wire format's 4,000


# Key types whose every value (within the size limits, which no stored key can exceed) may be
# cached. get_or_set checks the key's type against this before its lookup, so that a key of
# another type that merely equals a cached one (1.0 == 1) is refused on a hit as on a miss;
# everything else goes through check_key.
PLAIN_KEY_TYPES = frozenset((str, int, bytes, bool))


def check_key(key: object, region: object) -> None:
    """Raise ``TypeError`` or ``ValueError`` unless ``key`` and ``region`` can travel on the
    backplane (str, bytes or int keys; str or None regions; encodable, within limits)."""
    if region is None and type(key) is str and key.isascii():
        return  # the common case, on every set: ASCII always encodes (isascii is O(1))
    if isinstance(key, str):
        try:
            key.encode()
        except UnicodeEncodeError:
            raise ValueError(f"key {key!r} is not valid Unicode (lone surrogate)") from None
    elif isinstance(key, int):
        if key.bit_length() > MAX_INT_KEY_BITS:
            raise ValueError(f"int key too large ({key.bit_length()} bits, at most 13,000)")
    elif not isinstance(key, bytes):
        raise TypeError(
            f"nearcache keys are str, bytes or int; got {type(key).__name__} (region {region!r})"
        )
    check_region(region)


def check_region(region: object) -> None:
    """Raise ``TypeError`` or ``ValueError`` unless ``region`` is None or an encodable str of
    at most 65,534 UTF-8 bytes."""
    if region is None:
        return
    if not isinstance(region, str):
        raise TypeError(f"nearcache regions are str or None; got {type(region).__name__}")
    try:
        size = len(region.encode())
    except UnicodeEncodeError:
        raise ValueError(f"region {region!r} is not valid Unicode (lone surrogate)") from None
    if size > 65_534:
        raise ValueError(f"region name too long ({size} bytes, at most 65,534)")


def check_ttl(value: object, name: str = "ttl") -> None:
    """Raise ``ValueError`` unless ``value`` is None or a positive number of seconds."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
    ):
        raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")


def _positive(name: str, value: float | None, *, allow_none: bool = True) -> None:
    if value is None:
        if allow_none:
            return
        raise ConfigurationError(f"{name} must be set", option=name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigurationError(f"{name} must be a positive number, got {value!r}", option=name)


@dataclass(frozen=True)
class CacheOptions:
    """Tuning of one cache. Every field has a safe default.

    Args:
        max_entries: size bound of L1; past it the least recently useful entry is evicted.
        ttl: default absolute time to live of an entry, seconds (``None``: ``max_age`` only).
        sliding: default sliding expiration, seconds (``None``: none).
        max_age: hard limit on any entry's age, seconds: the backstop for anything missed.
        max_staleness: the staleness bound, seconds (see docs/guarantees.md).
        heartbeat_interval: how often the subscriber connection is pinged, seconds
            (default: a quarter of ``max_staleness``).
        max_pending: invalidations kept while Redis is unreachable; past it they collapse
            into one clear-all sent when Redis is back.
        secrets: key id → secret for signing messages (the first one signs, all verify).
        replay_log: messages kept in Redis for reconnecting instances to replay (0: none).
        reconcile_interval: seconds between comparisons of the log's tail with this instance.
    """

    max_entries: int = 100_000
    ttl: float | None = None
    sliding: float | None = None
    max_age: float = 3600.0
    max_staleness: float = 2.0
    heartbeat_interval: float | None = None
    max_pending: int = 100_000
    secrets: Mapping[str, bytes] = field(default_factory=dict)
    replay_log: int = 10_000
    reconcile_interval: float = 5.0

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_entries, bool)
            or not isinstance(self.max_entries, int)
            or self.max_entries < 1
        ):
            raise ConfigurationError(
                f"max_entries must be a positive int, got {self.max_entries!r}",
                option="max_entries",
            )
        if isinstance(self.max_pending, bool) or not isinstance(self.max_pending, int):
            raise ConfigurationError("max_pending must be an int", option="max_pending")
        if self.max_pending < 1:
            raise ConfigurationError("max_pending must be at least 1", option="max_pending")
        _positive("ttl", self.ttl)
        _positive("sliding", self.sliding)
        _positive("max_age", self.max_age, allow_none=False)
        _positive("max_staleness", self.max_staleness, allow_none=False)
        _positive("heartbeat_interval", self.heartbeat_interval)
        _positive("reconcile_interval", self.reconcile_interval, allow_none=False)
        if (
            isinstance(self.replay_log, bool)
            or not isinstance(self.replay_log, int)
            or self.replay_log < 0
        ):
            raise ConfigurationError(
                f"replay_log must be an int >= 0, got {self.replay_log!r}", option="replay_log"
            )
        if self.heartbeat_interval is not None and self.heartbeat_interval > self.max_staleness:
            raise ConfigurationError(
                "heartbeat_interval must not exceed max_staleness", option="heartbeat_interval"
            )
        problem = "secrets must map key ids (str, 1-255 bytes) to non-empty bytes secrets"
        if not isinstance(self.secrets, Mapping):
            raise ConfigurationError(problem, option="secrets")
        for key_id, secret in self.secrets.items():
            if (
                not isinstance(key_id, str)
                or not 1 <= len(key_id.encode(errors="replace")) <= 255
                or not isinstance(secret, bytes)
                or not secret
            ):
                raise ConfigurationError(problem, option="secrets")

    @property
    def heartbeat(self) -> float:
        """The effective heartbeat interval in seconds."""
        return self.heartbeat_interval or self.max_staleness / 4


@dataclass
class BackplaneStats:
    """Counters of the backplane side of one cache."""

    messages_sent: int = 0
    invalidations_sent: int = 0
    messages_received: int = 0
    invalidations_received: int = 0
    own_messages: int = 0
    malformed_messages: int = 0
    sequence_gaps: int = 0
    resubscriptions: int = 0
    listener_errors: int = 0
    replays: int = 0
    losses: int = 0
    publish_failures: int = 0


#: Upper bounds, in seconds, of the apply-latency buckets (a last bucket takes the rest).
APPLY_LATENCY_BOUNDS: tuple[float, ...] = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip


@dataclass(frozen=True)
class LatencySnapshot:
    """Durations counted by bucket: ``counts[i]`` are those ``<= bounds[i]`` (and above the
    bound before); the last count is those above every bound. ``sum`` is in seconds."""

    bounds: tuple[float, ...] = APPLY_LATENCY_BOUNDS
    counts: tuple[int, ...] = (0,) * (len(APPLY_LATENCY_BOUNDS) + 1)
    sum: float = 0.0

    @property
    def count(self) -> int:
        """How many durations were observed."""
        return sum(self.counts)


def _observe(observer: Callable[[float], None], seconds: float) -> None:
    try:
        observer(seconds)
    except Exception:  # an exporter's bug must never stop invalidations
        log.exception("nearcache: a latency observer failed")


class LatencyHistogram:
    """Counts durations into fixed buckets; ``observers`` are also called with each one
    (the metrics exporters that record every observation themselves)."""

    __slots__ = ("bounds", "counts", "observers", "sum")

    def __init__(self, bounds: tuple[float, ...] = APPLY_LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.observers: list[Callable[[float], None]] = []

    def observe(self, seconds: float) -> None:
        """Count one duration."""
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        for observer in self.observers:
            _observe(observer, seconds)

    def snapshot(self) -> LatencySnapshot:
        """The counts so far."""
        return LatencySnapshot(self.bounds, tuple(self.counts), self.sum)


class Batch(NamedTuple):
    """What the sender took: message-sized chunks of operations, the sequence number of the
    first message, and the sender id they go out under."""

    chunks: list[list[Invalidation]]
    first: int
    sender: bytes
    farewell: bool = False


class _Unechoed:
    """An own batch whose message has not come back on the subscription yet: its position
    (id generation, first sequence), the keys it wrote (outbox.written_ident) and when Redis
    acknowledged it (None: not yet)."""

    __slots__ = ("acknowledged", "idents", "position")

    def __init__(
        self, position: tuple[int, int], idents: list[tuple[str | None, Hashable]]
    ) -> None:
        self.position = position
        self.idents = idents
        self.acknowledged: float | None = None


class CacheCore:
    """Store + outbox + receive bookkeeping. Callers serialize every method but reads."""

    def __init__(
        self,
        options: CacheOptions,
        *,
        clock: Callable[[], float],
        instance_id: bytes,
        networked: bool,
        sharing: Sharing | None = None,
        channel: str = "",
    ) -> None:
        self.options = options
        self.clock = clock
        self.networked = networked
        self.store = L1Store(
            clock=clock,
            max_entries=options.max_entries,
            ttl=options.ttl,
            sliding=options.sliding,
            max_age=options.max_age,
            max_staleness=options.max_staleness if networked else math.inf,
        )
        self.outbox = Outbox(options.max_pending)
        self.flights = Flights(lambda: self.store, clock)
        self.publishing = Publishing(channel, clock)
        self.stats = BackplaneStats()
        self.instance_id = instance_id
        self._signing = next(iter(options.secrets.items()), None)
        self._sequence = 0  # last message sequence number used
        self._batch_first_sequence = 0
        self._last_taken = -math.inf  # when the latest batch under this id was taken
        self._former_ids: tuple[bytes, ...] = ()  # ids this instance said farewell to
        self._id_generation = 0  # how many ids this instance said farewell to
        # Sender id -> (highest sequence seen, when last heard), for every sender heard since
        # the table was last reset (``_senders_since``), minus the forgotten ones.
        self._senders: dict[bytes, tuple[int, float]] = {}
        self._senders_since = clock()
        self._confirmed_at = -math.inf  # as_of of the latest confirmation
        self._next_sweep = self._senders_since + SENDER_MEMORY / 8
        self.last_error: str | None = None
        # Called with each invalidation received from another instance, once applied: by
        # notify(), which the driver calls after releasing its lock, so that a callback may
        # use the cache (close it, even) without waiting on the thread it runs on.
        self.listeners: list[Callable[[Invalidation], None]] = []
        self.received: list[Invalidation] = []  # applied, not yet passed to the listeners
        # From a message's arrival to its invalidations applied (one clock: this process's).
        self.apply_latency = LatencyHistogram()
        # Values shared through the L2 and update messages (None: plain invalidations only).
        self.sharing = sharing
        if sharing is not None:
            sharing.max_staleness = options.max_staleness if networked else math.inf
        #: Where a driver's ``set`` stages its key invalidation itself (the outbox's
        #: ``staged``; see Outbox.staged for the rules), or None: a local cache, or values
        #: travel (every write then goes through the outbox's methods).
        self.staged = self.outbox.staged if networked and sharing is None else None
        # Own writes whose message has not come back on the subscription yet, by the first
        # sequence number of their batch: a received value never replaces them (it may have
        # been published before them, and their own echo is skipped), it only evicts.
        # (Positions are (id generation, sequence): an id's echo ends the wait of every batch
        # published before it, under that id or a former one.)
        self._unechoed: deque[_Unechoed] = deque()
        self._unechoed_keys: dict[tuple[str | None, Hashable], int] = {}
        # A received value never replaces an own write still waiting, in flight or unechoed
        # (update messages), and an L2 read never runs while one waits or is in flight (L2
        # changes with the publish; see own_write_pending).
        self._awaits_echo = sharing is not None and sharing.update
        if sharing is not None:
            self.outbox.track_writes = True  # concurrent writes of a key here send no value
            self.outbox.track_in_flight = True
        # Keys an invalidation dropped from L1 (with l2=True), until their next miss: L2's copy
        # went in the same atomic step (or was replaced by the writer's value), so that miss
        # asks the read script at once (one round trip: the value, or the lease) instead of a
        # plain GET that would find nothing first.
        self.dropped: dict[tuple[str | None, Hashable], None] | None = (
            {} if sharing is not None and sharing.l2 else None
        )

    # -- local operations: apply here, queue for the others ----------------------------------

    def local(self, op: Invalidation) -> bool:
        """Apply an invalidation made on this instance; return whether the sender must wake."""
        if op.kind is _KEY:
            return self.remove(op.key, op.region)
        self.apply(op)
        if not self.networked:
            return False
        was_idle = self.outbox.waiting == 0
        self.outbox.add(op)
        return was_idle

    def remove(self, key: Hashable, region: str | None) -> bool:
        """:meth:`local` for one key (the path of ``remove``, without building an
        Invalidation here: the outbox makes the one it queues)."""
        if self.store.remove(key, region) and self.dropped is not None:
            self._mark_dropped(region, key)
        return self.networked and self.outbox.add_key(region, key)

    def _mark_dropped(self, region: str | None, key: Hashable) -> None:
        dropped = self.dropped
        assert dropped is not None
        if len(dropped) >= DROPPED_MAX:
            dropped.clear()
        dropped[(region, key)] = None

    def take_dropped(self, region: str | None, key: Hashable) -> bool:
        """Whether an invalidation dropped this key from L1 since its last miss (forgotten
        now: see :attr:`dropped`)."""
        dropped = self.dropped
        return dropped is not None and dropped.pop((region, key), 0) is None

    def local_many(self, ops: list[Invalidation]) -> bool:
        """:meth:`local` for several invalidations at once."""
        for op in ops:
            self.apply(op)
        if not self.networked or not ops:
            return False
        was_idle = self.outbox.waiting == 0
        if all(op.kind is Kind.KEY for op in ops):
            self.outbox.add_keys(ops)
        else:
            for op in ops:
                self.outbox.add(op)
        return was_idle

    def set(
        self,
        key: Hashable,
        value: object,
        region: str | None,
        ttl: float | None,
        sliding: float | None,
        data: bytes | None = None,
        since: tuple[bytes, str] | None = None,
    ) -> bool:
        """Store a value written on this instance; return whether the sender must wake.

        ``data``: the value serialized, to share it (L2, update message); ``since``: the log
        position this instance had applied (see :meth:`Sharing.operation`)."""
        self.store.set(key, value, region, ttl, sliding)
        if not self.networked:
            return False  # (checked here too: a local set is cheaper than a cachetools one)
        return self._queue_write(key, region, ttl, sliding, data, since)

    def write(
        self,
        reservation: Reservation,
        value: object,
        ttl: float | None,
        sliding: float | None,
        data: bytes | None = None,
        since: tuple[bytes, str] | None = None,
        started: int | None = None,
    ) -> bool:
        """:meth:`set` for a value produced by a write of the source that ran under
        ``reservation`` (``NearCache.write``): kept in L1 only if nothing invalidated the key
        meanwhile (it could be older than what arrived), sent to the others either way."""
        self.store.commit(reservation, value, ttl=ttl, sliding=sliding)
        return self._queue_write(
            reservation.key, reservation.region, ttl, sliding, data, since, started
        )

    def _queue_write(
        self,
        key: Hashable,
        region: str | None,
        ttl: float | None,
        sliding: float | None,
        data: bytes | None,
        since: tuple[bytes, str] | None,
        started: int | None = None,
    ) -> bool:
        if not self.networked:
            return False
        if data is None or self.sharing is None:
            return self.outbox.add_key(region, key)
        was_idle = self.outbox.waiting == 0
        op = self.sharing.operation(key, region, data, ttl, sliding, since)  # type: ignore[arg-type]
        if isinstance(op, Update):
            op.started = started
        self.outbox.add(op)
        return was_idle

    def apply(self, op: Invalidation) -> None:
        """Apply one invalidation to the store (a value it carries only evicts here)."""
        if op.kind is Kind.KEY or op.kind is Kind.UPDATE:
            self.store.remove(op.key, op.region)
        elif op.kind is Kind.REGION:
            self.store.clear_region(op.region)
            self._generations_changed()
        else:
            self.store.clear()
            self._generations_changed()

    def _generations_changed(self) -> None:
        if self.sharing is not None:
            self.sharing.generations_changed()

    # -- sending ------------------------------------------------------------------------------

    def next_send(self) -> float | None:
        """When the sender has something to publish: 0 (now: invalidations wait, or this
        id's farewell is due), in that many seconds (the farewell), or None (nothing until
        the next invalidation)."""
        if self.outbox.waiting:
            return 0.0
        if not self._sequence:
            return None  # this id has published nothing: no farewell to say
        return max(self._last_taken + SENDER_IDLE - self.clock(), 0.0)

    def take_batch(self) -> list[bytes]:
        """Take what waits in the outbox and encode it as messages (empty: nothing waits)."""
        return self.encode_batch(self.take_ops())

    def take_ops(self) -> Batch:
        """Take what waits (caller holds the lock); :meth:`encode_batch` may then run
        without the lock.

        A sender id that published nothing for SENDER_IDLE seconds first says farewell: one
        empty message with its next sequence number, after which (see :meth:`batch_sent`)
        this instance publishes under a new id from sequence 1. Receivers that remember the
        old id check the farewell's sequence number like any other, so a lost last message
        still shows as a gap, and no receiver ever meets the old id again after forgetting
        it (docs/protocol.md, "Sender id and sequence numbers").
        """
        assert not self.outbox.in_flight, "commit the batch in flight first"
        now = self.clock()
        if self._sequence and now - self._last_taken >= SENDER_IDLE:
            first = self._batch_first_sequence = self._sequence + 1
            self._sequence = first
            return Batch([[]], first, self.instance_id, farewell=True)
        batch = self._take_numbered(now)
        self._batch_first_sequence = batch.first
        return batch

    def take_more_ops(self) -> Batch:
        """Take what waits to publish behind the batch in flight, on the same connection
        (:meth:`Outbox.take` grows the batch in flight; a plain outbox only, and never behind
        a farewell, after which the id changes). Its sequence numbers follow the batch in
        flight's; the batch in flight keeps its first one, so a superseded or acknowledged
        batch covers both (:meth:`batch_superseded`, :meth:`batch_sent`)."""
        assert self.outbox.in_flight, "nothing in flight to publish behind"
        return self._take_numbered(self.clock())

    def _take_numbered(self, now: float) -> Batch:
        """Take what waits (into the batch in flight), cut it into messages and give them the
        next sequence numbers."""
        self._last_taken = now
        chunks = split(self.outbox.take(BATCH_MAX_OPS), MESSAGE_MAX_OPS)
        first = self._sequence + 1
        self._sequence += len(chunks)
        if self._awaits_echo:
            self._await_echo(first, chunks)
        return Batch(chunks, first, self.instance_id)

    def _await_echo(self, first: int, chunks: list[list[Invalidation]]) -> None:
        # A clear_region or clear writes every key it covers (outbox.written_ident).
        idents: list[tuple[str | None, Hashable]] = [
            written_ident(op) for chunk in chunks for op in chunk
        ]
        if not idents:
            return
        unechoed, counts = self._unechoed, self._unechoed_keys
        if len(unechoed) >= UNECHOED_MAX:
            # The subscription lags far behind (or is away): one wait, for every key, until
            # this batch comes back (received values only evict meanwhile).
            unechoed.clear()
            counts.clear()
            idents = [EVERY_KEY]
        unechoed.append(_Unechoed((self._id_generation, first), idents))
        for ident in idents:
            counts[ident] = counts.get(ident, 0) + 1

    def _echoed(self, sender: bytes, sequence: int) -> None:
        """This instance's own message ``sequence`` (under ``sender``, its id or a former
        one) came back: its batch (a script call puts a batch on the channel contiguously)
        and every one published before it are past."""
        if sender == self.instance_id:
            generation = self._id_generation
        elif sender in self._former_ids:
            generation = self._id_generation - 1 - self._former_ids.index(sender)
        else:
            return
        position = (generation, sequence)
        unechoed = self._unechoed
        while unechoed and unechoed[0].position <= position:
            self._uncount(unechoed.popleft())

    def _uncount(self, entry: _Unechoed) -> None:
        counts = self._unechoed_keys
        for ident in entry.idents:
            left = counts[ident] - 1
            if left:
                counts[ident] = left
            else:
                del counts[ident]

    def _forget_echoes(self, before: float) -> None:
        """A new subscription, made at ``before``, dropped L1: own writes acknowledged
        before then never come back on it (and what they replaced is gone), but the others
        are still to come, after values published before them."""
        kept: deque[_Unechoed] = deque()
        for entry in self._unechoed:
            if entry.acknowledged is not None and entry.acknowledged < before:
                self._uncount(entry)
            else:
                kept.append(entry)
        self._unechoed = kept

    def encode_batch(self, taken: Batch) -> list[bytes]:
        """Encode what :meth:`take_ops` took (reads only immutable state: no lock needed)."""
        chunks, first, sender, _ = taken
        try:
            return [
                encode(sender, first + i, chunk, signing_key=self._signing)
                for i, chunk in enumerate(chunks)
            ]
        except (ValueError, UnicodeError) as exc:
            # check_key keeps this from happening; should it anyway, a clear is the safe
            # substitute: the batch is never silently lost and the sender never wedges.
            # (Runs unlocked: the sequence numbers were reserved by take_ops.)
            self.last_error = f"could not encode a batch, sent a clear instead: {exc}"
            # Every reserved sequence number is used, so that receivers see no gap.
            clear = [Invalidation(Kind.CLEAR)]
            return [
                encode(sender, first + i, clear, signing_key=self._signing)
                for i in range(max(1, len(chunks)))
            ]

    def encode_plans(self, taken: Batch) -> tuple[list[MessagePlan], tuple[bytes, str] | None]:
        """:meth:`encode_batch` for a cache that shares values: the publish script's plans
        and the log position to check conflicting writes from (no lock needed)."""
        assert self.sharing is not None
        chunks, first, sender, _ = taken
        try:
            return self.sharing.plans(chunks, first, sender)
        except (ValueError, UnicodeError) as exc:
            # As in encode_batch: a clear in its place, every reserved sequence number used.
            self.last_error = f"could not encode a batch, sent a clear instead: {exc}"
            clear = [Invalidation(Kind.CLEAR)]
            return self.sharing.plans([clear] * max(1, len(chunks)), first, sender)

    def batch_sent(self, payloads: list[bytes], taken: Batch | None = None) -> None:
        """The batch in flight was acknowledged by Redis."""
        self.stats.messages_sent += len(payloads)
        self.stats.invalidations_sent += self.outbox.in_flight
        if self.sharing is not None:
            self.sharing.delivered()  # before flush() can return
        self.outbox.commit()
        self.publishing.succeeded()
        if self._unechoed:
            now = self.clock()
            for entry in reversed(self._unechoed):  # the batch's own (a dropped one's too)
                if entry.acknowledged is not None:
                    break
                entry.acknowledged = now
        if taken is not None and taken.farewell:
            # Its echo may still be on its way: it must still count as this instance's own.
            self._former_ids = (self.instance_id, *self._former_ids[:3])
            self.instance_id = os.urandom(16)
            self._id_generation += 1
            self._sequence = 0

    def publish_failed(self, exc: BaseException) -> float | None:
        """A publish attempt of the batch in flight failed: count it and return the seconds
        to wait before trying again, or None when the batch is dropped because a clear waits
        behind it (then send the clear next)."""
        self.stats.publish_failures += 1
        self.last_error = str(exc)
        delay = self.publishing.failed(exc, len(self.outbox))
        return None if self.batch_superseded() else delay

    def batch_superseded(self) -> bool:
        """If a clear waits behind the batch in flight, drop the batch (its sequence numbers
        are reused, so receivers see no gap) and return True."""
        if not self.outbox.superseded:
            return False
        self.outbox.drop_in_flight()
        self._sequence = self._batch_first_sequence - 1
        return True

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, payload: bytes) -> bool:
        """Decode and apply one message from the backplane; return whether it was valid.
        Never raises for bad input."""
        arrived = self.clock()
        if (
            not self.options.secrets
            and payload[4:20] == self.instance_id
            and payload[:2] == b"NC"
            and len(payload) >= 32
        ):
            # Redis echoes our own messages: drop them before decoding every operation.
            self.stats.own_messages += 1
            if self._unechoed:
                self._echoed(self.instance_id, int.from_bytes(payload[20:28], "big"))
            return True
        try:
            message = decode(payload, self.options.secrets or None)
        except MessageError as exc:
            self.stats.malformed_messages += 1
            self.last_error = f"malformed message: {exc}"
            return False
        if message.sender == self.instance_id or message.sender in self._former_ids:
            self.stats.own_messages += 1
            if self._unechoed:
                self._echoed(message.sender, message.sequence)
            return True
        self.stats.messages_received += 1
        sender, sequence = message.sender, message.sequence
        known = self._senders.get(sender)
        if known is not None and sequence == known[0] + 1 and arrived < self._next_sweep:
            # The common case inline (the listener's hot path): a known sender's next message.
            self._senders[sender] = (sequence, arrived)
            gap, trusted = False, True
        else:
            gap, trusted = self._sequence_check(sender, sequence, arrived)
        if gap:
            # A message of this sender never reached us while the subscription stayed up:
            # whatever it invalidated may be held here. Drop L1 (locally only).
            self.stats.sequence_gaps += 1
            self._generations_changed()
            self.store.repair()
        store = self.store
        remove, key_kind, sharing = store.remove, Kind.KEY, self.sharing
        dropped = self.dropped
        for op in message.operations:
            if op.kind is key_kind:
                if remove(op.key, op.region) and dropped is not None:
                    self._mark_dropped(op.region, op.key)
            elif op.kind is Kind.UPDATE and sharing is not None:
                own = self.own_write_pending(op.region, op.key)
                sharing.apply(store, op, trusted=trusted, own_pending=own)  # type: ignore[arg-type]
            else:
                self.apply(op)
        store.count_invalidation(len(message.operations))
        self.stats.invalidations_received += len(message.operations)
        self.apply_latency.observe(self.clock() - arrived)
        if self.listeners:
            self.received.extend(message.operations)
        return True

    def own_write_pending(self, region: str | None, key: Hashable) -> bool:
        """Whether a write of this key here (a set, write or remove of it, a clear_region of
        its region, a clear) waits, is in flight, or (with update messages) has not come back
        on the subscription. (Only with sharing: False otherwise.)

        Until it is published, L2 may still hold the value it replaced: a miss here must not
        read L2 then, since the write's own message, which drops what it replaced on every
        other instance, is skipped here (callers check under the lock, as the reservation of
        the load is taken: a write after that cancels the reservation)."""
        unechoed = self._unechoed_keys
        if unechoed and (
            (region, key) in unechoed or (region, REGION_KEYS) in unechoed or EVERY_KEY in unechoed
        ):
            return True
        return self.outbox.holds(region, key)

    def _sequence_check(self, sender: bytes, sequence: int, now: float) -> tuple[bool, bool]:
        """Record a sender's message; return whether messages of it were missed before it
        (a gap), and whether it is the next one of a sender known since L1 was last dropped
        (only such a message's values are trusted: a replayed or reordered one could carry
        an older value)."""
        known = self._senders.get(sender)
        if known is None:
            # Not heard since the table was reset, or forgotten. Its previous message (if it
            # is not its first) was published at most SENDER_IDLE before this one: once the
            # table is older than SENDER_MEMORY, that message should be in it. (A forgotten
            # sender never comes back under the same id without such a loss.)
            horizon = min(self._confirmed_at, now)
            gap = sequence != 1 and horizon - self._senders_since > SENDER_MEMORY
            self._senders[sender] = (sequence, now)
            trusted = False
        else:
            last = known[0]
            gap = sequence > last + 1
            trusted = sequence == last + 1
            self._senders[sender] = (sequence if sequence > last else last, now)
        if now >= self._next_sweep:
            self._forget_silent_senders(now)
        return gap, trusted

    def _forget_silent_senders(self, now: float) -> None:
        """Forget senders not heard from for SENDER_MEMORY seconds before the latest
        confirmation: a sender still using its id would have been heard since. (Confirmed
        time, not the clock: while disconnected nothing is forgotten, so that what a replay
        brings finds its senders.)"""
        oldest = min(self._confirmed_at, now) - SENDER_MEMORY
        silent = [sender for sender, (_, heard) in self._senders.items() if heard < oldest]
        for sender in silent:
            del self._senders[sender]
        self._next_sweep = now + SENDER_MEMORY / 8

    def _reset_senders(self) -> None:
        """L1 was just dropped: what any sender sent before now no longer matters."""
        self._senders.clear()
        self._senders_since = self.clock()

    def notify(self) -> None:
        """Pass what :meth:`receive` applied to the ``on_invalidation`` callbacks. The driver
        calls it without its lock held (and from one thread or task at a time)."""
        while self.received:
            operations, self.received = self.received, []
            for op in operations:
                for listener in list(self.listeners):
                    self._call(listener, op)

    def _call(self, listener: Callable[[Invalidation], None], op: Invalidation) -> None:
        try:
            listener(op)
        except Exception:  # a listener's bug must never stop invalidations
            self.stats.listener_errors += 1
            log.exception("nearcache: an on_invalidation callback failed")

    def subscribed(self, as_of: float, complete: bool) -> None:
        """A new subscription is up. ``complete``: what it missed was replayed from the log,
        so L1 is whole and current as of ``as_of``; otherwise messages may have been lost and
        L1 is dropped (locally: a repair is never broadcast)."""
        self.stats.resubscriptions += 1
        self._generations_changed()  # before the confirmation: see Sharing.generations_changed
        self._confirmed_at = max(self._confirmed_at, as_of)
        if self.sharing is not None:
            self.sharing.confirmed(as_of)
        if complete:
            self.stats.replays += 1
            self.store.confirm(as_of)
            return
        self._reset_senders()
        self._forget_echoes(as_of)
        self.store.repair(as_of)

    def lost(self, reason: str) -> None:
        """Messages may have been lost on a live subscription: drop L1 locally."""
        self.stats.losses += 1
        self.last_error = reason
        self._generations_changed()
        self._reset_senders()  # the repair covers whatever gap the next messages show
        # (Own writes awaiting their echo are still waited for: the subscription is live.)
        self.store.repair()

    def confirmed(self, as_of: float) -> None:
        """Everything published before ``as_of`` has been applied here."""
        self.store.confirm(as_of)
        if self.sharing is not None:
            self.sharing.confirmed(as_of)
        if as_of > self._confirmed_at:
            self._confirmed_at = as_of
            now = self.clock()
            if now >= self._next_sweep:
                self._forget_silent_senders(now)

    @property
    def senders(self) -> int:
        """How many senders' sequence numbers are remembered."""
        return len(self._senders)


@dataclass(frozen=True)
class CacheStats:
    """A snapshot of one cache's counters and state.

    ``hits``/``misses`` count L1 reads; ``invalidations_sent``/``_received`` count operations
    on the backplane; ``pending`` is what waits in the outbox; ``repairs`` counts how often L1
    was dropped because messages may have been lost (new subscription or sequence gap);
    ``publishing`` says how the latest publish attempt went (``"ok"``; ``"failing"``: no
    answer, retried quickly; ``"refused"``: Redis answered with an error, see
    ``publish_error``), ``publish_error`` is the latest publish failure;
    ``senders`` is how many other instances' sequence numbers are remembered (those heard in
    the last ten minutes).
    """

    entries: int
    hits: int
    misses: int
    sets: int
    evictions: int
    expirations: int
    rejected_loads: int
    repairs: int
    messages_sent: int
    invalidations_sent: int
    messages_received: int
    invalidations_received: int
    own_messages: int
    malformed_messages: int
    sequence_gaps: int
    resubscriptions: int
    listener_errors: int
    replays: int
    losses: int
    publish_failures: int
    publishing: str
    publish_error: str | None
    senders: int
    #: Invalidations waiting or in flight; a key set again before the sender took it counts
    #: once per set until the staged keys are folded (see Outbox.staged).
    pending: int
    degraded_to_clear: int
    backplane: str
    last_error: str | None
    #: From a message's arrival here to its invalidations applied, per message.
    apply_latency: LatencySnapshot = field(default_factory=LatencySnapshot)
    #: With ``l2=True`` / ``propagate="update"`` (0 otherwise): factory calls of get_or_set;
    #: L2 hits and misses; fills stored and refused (a write or clear came between); misses
    #: that waited for another process's load; L2 commands that failed; foreign, corrupt or
    #: undecodable L2 values (misses); values too large to share, or the serializer refused
    #: (kept in L1 only); values sent in messages, messages sent as invalidations because
    #: another instance wrote a key meanwhile, values received and applied, and refused.
    loads: int = 0
    l2_hits: int = 0
    l2_misses: int = 0
    l2_fills: int = 0
    l2_fills_refused: int = 0
    l2_lease_waits: int = 0
    l2_errors: int = 0
    l2_corrupt: int = 0
    l2_oversized: int = 0
    l2_unserializable: int = 0
    updates_sent: int = 0
    updates_fell_back: int = 0
    updates_received: int = 0
    updates_rejected: int = 0
    #: Which implementation of the L1 store runs: "C accelerator", or "pure Python" where the
    #: optional extension was not built (no compiler) or NEARCACHE_PURE_PYTHON=1 is set.
    l1_store: str = HIT_PATH

    @property
    def hit_ratio(self) -> float:
        """Hits over reads (0.0 before the first read)."""
        reads = self.hits + self.misses
        return self.hits / reads if reads else 0.0


def snapshot(core: CacheCore, backplane_state: str) -> CacheStats:
    """Collect a :class:`CacheStats` from a core (caller holds the driver's lock)."""
    store = core.store.stats()
    bp = core.stats
    return CacheStats(
        entries=store.entries,
        hits=store.hits,
        misses=store.misses,
        sets=store.sets,
        evictions=store.evictions,
        expirations=store.expirations,
        rejected_loads=store.rejected_loads,
        repairs=store.repairs,
        messages_sent=bp.messages_sent,
        invalidations_sent=bp.invalidations_sent,
        messages_received=bp.messages_received,
        invalidations_received=bp.invalidations_received,
        own_messages=bp.own_messages,
        malformed_messages=bp.malformed_messages,
        sequence_gaps=bp.sequence_gaps,
        resubscriptions=bp.resubscriptions,
        listener_errors=bp.listener_errors,
        replays=bp.replays,
        losses=bp.losses,
        publish_failures=bp.publish_failures,
        publishing=core.publishing.state.value,
        publish_error=core.publishing.error,
        senders=core.senders,
        pending=len(core.outbox),
        degraded_to_clear=core.outbox.degraded,
        backplane=backplane_state,
        last_error=core.last_error,
        apply_latency=core.apply_latency.snapshot(),
        l1_store=HIT_PATH,
        **(core.sharing.stats.as_dict() if core.sharing is not None else {}),
    )
