"""Sharing values between instances: the L2's read path and the value-carrying writes. No I/O.

:class:`Sharing` holds the decisions both drivers share (with ``l2=True`` or
``propagate="update"``):

- what a ``set`` sends: its value serialized (once, by the caller), as an ``Update`` in the
  outbox, or a plain invalidation when it is too large;
- how a batch is published: per message the form with values, its plain fallback (chosen by
  the publish script when another instance wrote one of the keys since the value was set), and
  the L2 operations (see ``nearcache._core.l2.PUBLISH_SCRIPT``);
- what a received ``Update`` does to L1;
- the read path after an L1 miss, as a generator of I/O steps (:func:`Sharing.load_flow`)
  that the threaded and the asyncio drivers run, each with its own I/O: L2 read, lease, wait,
  factory, fill;
- the generation tokens known here (:meth:`Sharing.generations_changed`), which let an L2 hit
  be a plain ``GET`` instead of the read script (see :class:`Get`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Hashable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from nearcache._core import l2
from nearcache._core.codec import Invalidation, Key, Kind, Region, Update, encode
from nearcache._core.l2 import (
    CheckValue,
    ClearAll,
    ClearRegion,
    DeleteValue,
    L2Operation,
    L2Options,
    LeaseWait,
    MessagePlan,
    ReadResult,
    StoreValue,
)
from nearcache._core.store import L1Store
from nearcache._exceptions import ConfigurationError, SerializationError

__all__ = [
    "Absent",
    "Breaker",
    "Fill",
    "Get",
    "L2Stats",
    "Load",
    "Loaded",
    "Read",
    "Release",
    "Sharing",
    "Wait",
    "lookup",
]


@dataclass
class L2Stats:
    """Counters of the L2 and of value-carrying updates (approximate under contention)."""

    loads: int = 0  # factory calls of get_or_set
    l2_hits: int = 0
    l2_misses: int = 0
    l2_fills: int = 0
    l2_fills_refused: int = 0  # the lease was lost (a write) or a clear happened meanwhile
    l2_lease_waits: int = 0  # misses that waited for another process's load
    l2_errors: int = 0  # L2 commands that failed (Redis down, timeout): read from the factory
    l2_corrupt: int = 0  # foreign, corrupt, unsigned or undecodable values: misses
    l2_oversized: int = 0  # values larger than the caps: kept in L1 only
    l2_unserializable: int = 0  # loaded values the serializer refused: kept in L1 only
    updates_sent: int = 0
    updates_fell_back: int = 0  # messages sent as invalidations: another write came between
    updates_received: int = 0
    updates_rejected: int = 0  # received values not applied (evicted instead)

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Breaker:
    """Keeps a failing L2 from costing a timeout on every miss: after a failure, L2 is skipped
    for ``pause`` seconds (doubling up to ``MAX`` while failures go on)."""

    MIN, MAX = 0.5, 10.0

    def __init__(self) -> None:
        self._until = -math.inf
        self._pause = self.MIN

    def available(self, now: float) -> bool:
        """Whether L2 may be tried now."""
        return now >= self._until

    def failed(self, now: float) -> None:
        """An L2 command failed."""
        self._until = now + self._pause
        self._pause = min(self._pause * 2, self.MAX)

    def succeeded(self) -> None:
        """An L2 command worked."""
        self._pause = self.MIN


# -- the read path, as steps the drivers carry out ---------------------------------------


class Get(NamedTuple):
    """Read the key's record and its time to live with plain commands (``GET``, ``PTTL``, no
    script); send back ``(record or None, pttl in ms)``, or None if L2 failed or is skipped.

    Before sending, the driver lowers the load's reservation (its ``started``) to ``as_of``:
    the generations this read relies on are known current only as of the last confirmation
    (see :meth:`Sharing.generations_changed`), so a value read this way is current as of
    ``min(read start, as_of)``, and its L1 entry (and whoever joins the load) must say so.
    """

    as_of: float


class Read(NamedTuple):
    """Run the read script; send back a ReadResult, or None if L2 failed or is skipped."""

    token: str


class Wait(NamedTuple):
    """Sleep; send back False to stop waiting (the cache is closing)."""

    seconds: float


class Load(NamedTuple):
    """Call the factory; send back its result (or throw its exception in)."""


class Fill(NamedTuple):
    """Run the fill script; send back whether the value was stored (None: L2 failed)."""

    token: str
    payload: bytes
    ttl: float
    gen: bytes
    rgen: bytes

    def script_call(
        self, channel: str, region: Region, key: Key, reign: str | None
    ) -> tuple[str, list[str], list[str | bytes | int]]:
        """The script to run and its KEYS and ARGV: :data:`~nearcache._core.l2.FILL_SCRIPT`
        with the node's ``reign`` argument, or on a Redis Cluster (``reign`` None) the value's
        slot only, :data:`~nearcache._core.l2.VFILL_SCRIPT`."""
        if reign is None:
            keys, args = l2.vfill_call(
                channel, region, key, self.token, self.payload, self.ttl, self.gen, self.rgen
            )
            return l2.VFILL_SCRIPT, keys, args
        keys, args = l2.fill_call(
            channel, region, key, self.token, self.payload, self.ttl, self.gen, self.rgen, reign
        )
        return l2.FILL_SCRIPT, keys, args


class Release(NamedTuple):
    """Give the lease up (the load failed)."""

    token: str

    def script_call(
        self, channel: str, region: Region, key: Key
    ) -> tuple[str, list[str], list[str | bytes | int]]:
        """The release script and its KEYS and ARGV."""
        lease = l2.value_keys(channel, region, key)[1]
        return l2.RELEASE_SCRIPT, [lease], [self.token]


_NO_VALUE = object()


class Absent(LookupError):
    """What :func:`lookup` raises: L2 holds no value for the key (or L2 is not in use)."""


def lookup() -> Any:
    """The factory of a read that only looks (``get_or_set(key, lookup)``, for the Django
    backend's ``get``): L1, then L2 without taking the lease; nothing found raises
    :class:`Absent`, and no factory runs. Callers that joined such a read and have a factory
    of their own load again."""
    raise Absent


class Loaded(NamedTuple):
    """The outcome of a load: the value and, for a value found in L2, how long it has left
    there (its L1 entry lives no longer)."""

    value: object
    ttl_left: float | None = None
    # Current only as of L1's confirmations, not from the read's start (Sentinel: see
    # ``ReadResult.confirmed_only``); the driver stores it with ``stored = -inf``.
    confirmed_only: bool = False


Step = Get | Read | Wait | Load | Fill | Release

# Regions whose generation token is remembered; past it the memory starts over (a region
# forgotten only costs its next miss the read script).
_MAX_REGIONS = 4096


class Sharing:
    """The decisions of ``l2=True`` / ``propagate="update"`` for one cache (see the module)."""

    def __init__(
        self,
        options: L2Options,
        *,
        max_age: float,
        default_ttl: float | None,
        secrets: Mapping[str, bytes],
        clock: Callable[[], float],
    ) -> None:
        self.options = options
        self.l2 = options.l2
        self.update = options.propagate == "update"
        self.serializer = options.serializer
        self._ttl_cap = options.l2_ttl or max_age
        self._default_ttl = default_ttl
        self._secrets = dict(secrets) or None
        self._signing = next(iter(secrets.items()), None)
        self._clock = clock
        # The largest value worth carrying: to L2, or in an update message.
        self.max_bytes = max(
            options.l2_max_bytes if self.l2 else 0,
            options.update_max_bytes if self.update else 0,
        )
        self.stats = L2Stats()
        # The generation tokens learned from read-script replies, each with the version of
        # the generations it was learned under (see generations_changed); a token counts only
        # while its version is the current one.
        self.max_staleness = math.inf  # set by the cache core
        self.confirmed_at = -math.inf  # as_of of the latest confirmation (set by the core)
        self._version = 0
        self._gen: tuple[int, bytes] | None = None
        self._rgens: dict[Region, tuple[int, bytes]] = {}
        self._clearing = False  # the batch being published clears a region or everything

    # -- the generations known here ---------------------------------------------------------

    def generations_changed(self) -> None:
        """Forget the generation tokens learned so far: a clear of a region or of everything
        was received, made here or delivered, or messages may have been missed (a new
        subscription, a loss, a gap). The caller holds the cache's lock.

        Why a token may then be trusted as of the latest confirmation ``c``: it was learned
        from a read-script reply sent under the current version, so every clear applied
        before the send is in it; a clear published after the read ran but before ``c`` was
        received before ``c`` was confirmed, and changed the version. The core calls this
        *before* it raises ``confirmed_at`` (and readers read ``confirmed_at`` first), so a
        reader that sees a confirmation also sees every version change that preceded it.
        """
        self._version += 1

    def confirmed(self, as_of: float) -> None:
        """The core's latest confirmation (everything published before ``as_of`` is applied)."""
        self.confirmed_at = max(self.confirmed_at, as_of)

    def delivered(self) -> None:
        """The batch in flight was acknowledged: if it cleared a region or everything, the
        generations changed in Redis now (a read sent before may have learned the old ones)."""
        if self._clearing:
            self._clearing = False
            self.generations_changed()

    def _plain_tags(self, region: Region) -> tuple[float, bytes, bytes] | None:
        """``(as_of, gen, rgen)`` if the generations of ``region`` are known current as of
        a confirmation recent enough for the staleness bound, else None."""
        as_of = self.confirmed_at  # first: see generations_changed
        version = self._version
        gen, rgen = self._gen, self._rgens.get(region)
        if gen is None or rgen is None or gen[0] != version or rgen[0] != version:
            return None
        # A read must return a value current as of more than max_staleness before it starts.
        if not self._clock() < as_of + self.max_staleness:
            return None
        return as_of, gen[1], rgen[1]

    def _learn(self, version: int, region: Region, got: ReadResult) -> None:
        """Remember the generations a read-script reply carried (sent under ``version``)."""
        if len(self._rgens) >= _MAX_REGIONS:
            self._rgens.clear()
        self._gen = (version, got.gen)
        self._rgens[region] = (version, got.rgen)

    # -- writes ---------------------------------------------------------------------------

    def serialize(self, value: object, key: Hashable, region: Region) -> bytes:
        """The value's bytes; SerializationError naming the key if the serializer refuses."""
        try:
            data = self.serializer.dumps(value)
        except SerializationError as exc:
            raise SerializationError(
                f"cannot cache key {key!r} (region {region!r}): {exc}"
            ) from None
        except Exception as exc:  # a custom serializer may raise anything
            raise SerializationError(
                f"cannot cache key {key!r} (region {region!r}): the serializer raised "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if not isinstance(data, bytes):
            raise SerializationError(
                f"cannot cache key {key!r}: the serializer returned {type(data).__name__}, "
                "not bytes"
            )
        return data

    def operation(
        self,
        key: Key,
        region: Region,
        data: bytes,
        ttl: float | None,
        sliding: float | None,
        since: tuple[bytes, str] | None,
    ) -> Invalidation:
        """What the outbox carries for a ``set``: its value, or a plain invalidation for a
        value too large to share (then kept in the writer's L1 only)."""
        if len(data) > self.max_bytes:
            self.stats.l2_oversized += 1
            return Invalidation(Kind.KEY, region, key)
        op = Update(region, key, data, ttl, sliding, self.serializer.id)
        op.since = since
        return op

    def plans(
        self,
        chunks: Sequence[Sequence[Invalidation]],
        first: int,
        sender: bytes,
    ) -> tuple[list[MessagePlan], tuple[bytes, str] | None]:
        """Encode a batch for the publish script: per message its form with values, its
        plain fallback and its L2 operations; and the log position to check writes from (the
        oldest among the batch's values; None if one is unknown)."""
        plans: list[MessagePlan] = []
        positions: list[tuple[bytes, str] | None] = []
        signing = self._signing
        for i, chunk in enumerate(chunks):
            sent: list[Invalidation] = []
            plain: list[Invalidation] = []
            operations: list[L2Operation] = []
            carries = False
            for op in chunk:
                kind = op.kind
                if kind is Kind.UPDATE:
                    assert isinstance(op, Update)
                    region, key = op.region, op.key
                    assert key is not None
                    fallback = op.invalidation()
                    ship = self.update and len(op.data) <= self.options.update_max_bytes
                    sent.append(op if ship else fallback)
                    plain.append(fallback)
                    carries = carries or ship
                    if self.l2 and len(op.data) <= self.options.l2_max_bytes:
                        payload = l2.encode_payload(op.serializer, region, key, op.data, signing)
                        operations.append(StoreValue(region, key, payload, self._l2_ttl(op)))
                    elif self.l2:
                        operations.append(DeleteValue(region, key))
                    elif ship:
                        operations.append(CheckValue(region, key))
                    positions.append(op.since)
                    continue
                sent.append(op)
                plain.append(op)
                if kind is Kind.KEY:
                    if self.l2:
                        assert op.key is not None
                        operations.append(DeleteValue(op.region, op.key))
                elif kind is Kind.REGION:
                    operations.append(ClearRegion(op.region))
                    self._clearing = True
                else:
                    operations.append(ClearAll())
                    self._clearing = True
            sequence = first + i
            message = encode(sender, sequence, sent, signing_key=signing)
            alternative = encode(sender, sequence, plain, signing_key=signing) if carries else b""
            if carries:
                self.stats.updates_sent += sum(1 for op in sent if op.kind is Kind.UPDATE)
            plans.append(MessagePlan(message, alternative, operations))
        return plans, l2.oldest(positions)

    def _l2_ttl(self, op: Update) -> float:
        ttl = op.ttl if op.ttl is not None else self._default_ttl
        return self._ttl_cap if ttl is None else min(ttl, self._ttl_cap)

    # -- receiving --------------------------------------------------------------------------

    def apply(self, store: L1Store, op: Update, *, trusted: bool, own_pending: bool) -> None:
        """Apply a received value to L1, or evict the key instead.

        ``trusted``: the message is the next one of a sender known since L1 was last
        dropped (a replayed or reordered message could carry an older value). ``own_pending``:
        this instance's own write of the key is not acknowledged yet (it comes later in the
        channel's order). A value from another serializer, or one that fails to load, is
        counted and evicts too: never a wrong value.
        """
        region, key = op.region, op.key
        if not trusted or own_pending or op.serializer != self.serializer.id:
            if op.serializer != self.serializer.id:
                self.stats.updates_rejected += 1
            store.remove(key, region)
            return
        try:
            value = self.serializer.loads(op.data)
        except Exception:  # bad bytes, whatever the serializer raises: a miss, never a crash
            self.stats.updates_rejected += 1
            store.remove(key, region)
            return
        self.stats.updates_received += 1
        # Current as of the last confirmation: served while confirmations go on, like every
        # entry, never beyond the bound (see docs/guarantees.md, "Updates").
        store.set(key, value, region, ttl=op.ttl, sliding=op.sliding, stored=-math.inf)

    # -- the read path --------------------------------------------------------------------

    def load_flow(
        self,
        key: Key,
        region: Region,
        token: str,
        ttl: float | None = None,
        *,
        plain: bool = False,
        looking: bool = False,
    ) -> Generator[Step, Any, Loaded]:
        """The read path after an L1 miss (and the local flight), as I/O steps.

        With ``plain`` (the driver can read the value's key with plain commands) and the
        region's generations known here, a plain ``GET`` first: a record tagged with them is a
        hit. Otherwise, and after a plain read that found nothing or another generation, the
        read script (one round trip, taking the lease on a miss); with the lease, the factory
        and the fill; without it, polls of L2 until the holder's fill appears, the lease is
        free (the holder failed or died: take it) or ``l2_lease_wait`` ran out (load without
        it). L2 unusable or failing: the factory alone. ``looking`` (the factory is
        :func:`lookup`): the read script takes no lease, and no value means the factory (which
        raises :class:`Absent`) at once.
        """
        stats = self.stats
        if looking:
            token = ""  # the read script's "do not take the lease"
        tags = self._plain_tags(region) if plain else None
        if tags is not None:
            as_of, gen, rgen = tags
            found = yield Get(as_of)
            if found is not None and found[0] is not None:
                value = self._plain_value(found[0], region, key, gen, rgen)
                if value is not _NO_VALUE:
                    stats.l2_hits += 1
                    return Loaded(value, l2.ttl_left(found[1]))
        version = self._version
        got: ReadResult | None = yield Read(token)
        if got is not None:
            self._learn(version, region, got)
        wait: LeaseWait | None = None
        while True:
            if got is None:  # L2 down or skipped
                stats.loads += 0 if looking else 1
                return Loaded((yield Load()))
            if got.status == l2.VALUE:
                try:
                    data = l2.decode_record(
                        got.record, region, key, self.serializer.id, self._secrets
                    )
                    value = self.serializer.loads(data)
                except Exception:  # MessageError, or whatever the serializer raises
                    stats.l2_corrupt += 1  # never returned: loaded from the source instead
                    stats.loads += 1
                    return Loaded((yield Load()))
                stats.l2_hits += 1
                return Loaded(value, got.pttl, got.confirmed_only)
            if looking:
                stats.l2_misses += 1
                return Loaded((yield Load()))
            if got.status == l2.LEASED:
                stats.l2_misses += 1
                return Loaded((yield from self._load_and_fill(key, region, token, got, ttl)))
            if wait is None:
                stats.l2_lease_waits += 1
                wait = LeaseWait(self._clock(), self.options.l2_lease_wait)
            delay = wait.next_delay(self._clock())
            if delay is None or not (yield Wait(delay)):
                stats.loads += 1  # the holder is slow or gone: load without the lease
                return Loaded((yield Load()))
            got = yield Read(token)

    def _plain_value(
        self, record: bytes, region: Region, key: Key, gen: bytes, rgen: bytes
    ) -> object:
        """The value of a record read with ``GET`` if it carries these generation tags and
        decodes, else _NO_VALUE (the read script then decides: it drops records of an older
        generation, and counts a corrupt one)."""
        if not l2.tagged(record, gen, rgen):
            return _NO_VALUE
        try:
            data = l2.decode_record(record, region, key, self.serializer.id, self._secrets)
            return self.serializer.loads(data)
        except Exception:  # MessageError, or whatever the serializer raises
            return _NO_VALUE

    def _load_and_fill(
        self, key: Key, region: Region, token: str, got: ReadResult, ttl: float | None
    ) -> Generator[Step, Any, object]:
        stats = self.stats
        stats.loads += 1
        try:
            value = yield Load()
        except BaseException:
            yield Release(token)  # let the next process load at once
            raise
        try:
            data = self.serialize(value, key, region)
        except SerializationError:
            stats.l2_unserializable += 1
            yield Release(token)
            return value
        if len(data) > self.options.l2_max_bytes:
            stats.l2_oversized += 1
            yield Release(token)
            return value
        payload = l2.encode_payload(self.serializer.id, region, key, data, self._signing)
        if ttl is None:
            ttl = self._default_ttl
        ttl = self._ttl_cap if ttl is None else min(ttl, self._ttl_cap)
        self.fill_answered((yield Fill(token, payload, ttl, got.gen, got.rgen)))
        return value

    def fill_answered(self, stored: bool | None) -> None:
        """Count a fill's answer: stored, refused (the lease was gone), or None (L2 failed,
        counted as such; or the driver sent it without waiting and counts it here later)."""
        if stored:
            self.stats.l2_fills += 1
        elif stored is not None:
            self.stats.l2_fills_refused += 1


def sharing_options(
    options: L2Options,
    *,
    secrets: Mapping[str, bytes],
    replay_log: int,
    connection: bool,
    custom: bool,
) -> L2Options:
    """Check the sharing options of a cache being created (``connection``: it has a
    connection string; ``custom``: a ``backplane=`` object instead) and return them."""
    options.check(signed=bool(secrets), networked=connection or custom, replay_log=replay_log)
    if options.active and not connection:
        what = "l2=True" if options.l2 else 'propagate="update"'
        raise ConfigurationError(
            f"{what} needs a Redis connection string (a custom backplane cannot run the "
            "L2 scripts)",
            option="l2" if options.l2 else "propagate",
        )
    return options


def new_sharing(
    options: L2Options,
    *,
    max_age: float,
    default_ttl: float | None,
    secrets: Mapping[str, bytes],
    clock: Callable[[], float],
) -> Sharing | None:
    """The :class:`Sharing` of a cache, or None when it shares no values."""
    if not options.active:
        return None
    return Sharing(options, max_age=max_age, default_ttl=default_ttl, secrets=secrets, clock=clock)
