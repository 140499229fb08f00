"""The outbox: invalidations accepted locally and not yet acknowledged by the backplane.

No I/O. The caller's thread only appends here; a sender (thread or task) takes batches,
publishes them and commits them once Redis acknowledged. Order is kept. While a batch is in
flight, new invalidations are coalesced only with other invalidations that are still
waiting (never with the in-flight batch: it may already have been delivered before the newer
write happened).

- A repeated key is kept once (at its first position: the receivers evict it either way).
- A plain key invalidation (the path of every ``set`` and ``remove`` without values) is only
  staged by the caller: one list append. The staged keys are folded into the queue at once,
  by the next operation that needs the queue (the sender's :meth:`Outbox.take` under load),
  their repeats coalesced and their entries built in C where the codec's accelerator is
  built. Each folded entry carries the first sequence number of its fold: ``delivered`` may
  lag behind what was acknowledged (a flush then waits for one more batch), never run ahead.
- A clear supersedes everything waiting.
- Past ``max_pending`` waiting invalidations the outbox degrades to one clear: receivers
  will drop everything, but no invalidation is lost.
- A key invalidation may carry the key's new value (an ``Update``, with ``l2=True`` or
  ``propagate="update"``). A repeated key keeps its first position but the latest operation
  (a later ``remove`` turns a waiting value back into a plain invalidation). Waiting values
  are bounded by ``max_value_bytes``: past it a value travels as a plain invalidation.

``flush`` waits on :attr:`Outbox.delivered`: every invalidation accepted with a sequence
number up to it has been acknowledged.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from itertools import islice
from operator import itemgetter

from nearcache._core.codec import Invalidation, Kind, Update, key_entries

__all__ = ["EVERY_KEY", "REGION_KEYS", "STAGE_MAX", "Outbox", "written_ident"]

_Ident = tuple[str | None, Hashable]


class _Every:
    """A stand-in key for every key a clear writes (never equal to a real key)."""

    __slots__ = ("_what",)

    def __init__(self, what: str) -> None:
        self._what = what

    def __repr__(self) -> str:
        return f"<{self._what}>"


REGION_KEYS = _Every("every key of the region")  # (region, REGION_KEYS): a clear_region
EVERY_KEY: _Ident = (None, _Every("every key"))  # a clear


def written_ident(op: Invalidation) -> _Ident:
    """What a write makes stale: one key, ``(region, REGION_KEYS)`` for a clear_region, or
    :data:`EVERY_KEY` for a clear."""
    if op.kind is Kind.REGION:
        return (op.region, REGION_KEYS)
    if op.kind is Kind.CLEAR:
        return EVERY_KEY
    return (op.region, op.key)


# Enum members read through their class cost ~50-80 ns each on Python 3.11: the per-write
# paths compare with these module constants instead.
_KEY, _UPDATE, _CLEAR = Kind.KEY, Kind.UPDATE, Kind.CLEAR
_new_op = tuple.__new__
_second = itemgetter(1)
# Staged keys past this many are folded by the caller (the sender may be stuck: the bound
# on waiting invalidations applies to them as to the rest).
STAGE_MAX = 16384


class Outbox:
    """Ordered, coalescing, bounded queue of outgoing invalidations."""

    def __init__(self, max_pending: int = 100_000, max_value_bytes: int = 64 << 20) -> None:
        self._max_pending = max_pending
        self._max_value_bytes = max_value_bytes
        # Only with values (empty otherwise, keeping the plain paths as they were): the latest
        # operation of a waiting key coalesced into its first one, the value each waiting key
        # carries, the size of those values, and the keys of the batch in flight.
        self._latest: dict[_Ident, Invalidation] = {}
        self._values: dict[_Ident, Update] = {}
        self.value_bytes = 0
        self.values_dropped = 0  # values sent as plain invalidations: past the byte bound
        self.track_in_flight = False
        self._in_flight_keys: set[_Ident] = set()  # clears as written_ident() names them
        self._waiting_clears: dict[_Ident, int] = {}  # with track_in_flight only
        # With values (track_writes): the sequence of each waiting key's latest write.
        self.track_writes = False
        self._accepted_at: dict[_Ident, int] = {}
        # With track_writes: when each waiting clear_region, and a waiting clear, was accepted
        # (by written_ident); a value whose change ran across one is sent as an invalidation.
        self._cleared_at: dict[_Ident, int] = {}
        self._queue: deque[tuple[int, Invalidation]] = deque()  # (first sequence, op)
        self._in_flight = 0  # length of the queue's prefix taken by the sender
        # The keys that wait (a dict used as an ordered set: a fold into an empty queue makes
        # its dict of staged keys this, without a copy).
        self._waiting_keys: dict[_Ident, None] = {}
        self._accepted = 0  # sequence of the last invalidation folded into the queue
        #: Key invalidations accepted after that, in order, as ``(region, key)``: what
        #: :meth:`add_key` stages. The list is never replaced, so a caller on the hottest path
        #: may append to it itself, only while no values travel and no write is tracked (no
        #: ``l2``, no ``propagate="update"``: see CacheCore.staged), and must then call
        #: :meth:`fold` once it holds :attr:`stage_max` keys or more.
        self.staged: list[_Ident] = []
        #: Staged keys past this many are folded by the caller: :data:`STAGE_MAX`, or
        #: ``max_pending`` if lower (no more keys wait than the bound allows).
        self.stage_max = min(STAGE_MAX, max_pending)
        self.degraded = 0  # how many times the bound collapsed the queue into one clear
        self.coalesced = 0

    @property
    def accepted(self) -> int:
        """Sequence number of the last accepted invalidation."""
        return self._accepted + len(self.staged)

    @property
    def delivered(self) -> int:
        """Every invalidation with a sequence number up to this one has been acknowledged."""
        if not self._queue:
            return self._accepted
        return self._queue[0][0] - 1

    @property
    def in_flight(self) -> int:
        """Invalidations taken by the sender and not yet committed."""
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Invalidations not yet taken by the sender (repeats of a staged key counted until
        they are folded)."""
        return len(self._queue) - self._in_flight + len(self.staged)

    def __len__(self) -> int:
        """Invalidations waiting or in flight (repeats of a staged key counted until they
        are folded). Reads only: safe from a thread that does not own the outbox."""
        return len(self._queue) + len(self.staged)

    def add_keys(self, ops: list[Invalidation]) -> None:
        """Accept several key invalidations (what :meth:`add` does for each, in one loop)."""
        self.fold()
        waiting_keys, queue = self._waiting_keys, self._queue
        if (
            len(queue) - self._in_flight + len(ops) > self._max_pending
            or self._values
            or self.track_writes
        ):
            for op in ops:
                self.add(op)  # near the bound: one at a time, degrading to a clear past it
            return
        accepted, before, append = self._accepted, len(waiting_keys), queue.append
        known = before
        for op in ops:
            accepted += 1
            waiting_keys[(op.region, op.key)] = None
            if len(waiting_keys) != known:  # a new key: queue it; a repeat is coalesced
                known += 1
                append((accepted, op))
        self.coalesced += len(ops) - (known - before)
        self._accepted = accepted

    def add_key(self, region: str | None, key: Hashable) -> bool:
        """Accept one key invalidation (what :meth:`add` does, on the path every ``set`` and
        ``remove`` takes); return whether nothing was waiting before it (the sender must
        wake)."""
        staged = self.staged
        idle = not staged and len(self._queue) == self._in_flight
        if self._values or self._latest or self.track_writes:
            self.add(_new_op(Invalidation, (_KEY, region, key)))
            return idle
        staged.append((region, key))
        if len(staged) >= self.stage_max:
            self.fold()
        return idle

    def fold(self) -> None:
        """Move the staged key invalidations into the queue, as :meth:`add` would one by
        one (coalesced with the waiting keys and with each other, bounded by
        ``max_pending``), in a few C-speed passes."""
        staged = self.staged  # (the list stays the same object: see staged)
        if not staged:
            return
        first = self._accepted + 1
        unique = dict.fromkeys(staged)  # the first position of each key, in order
        waiting_keys, queue = self._waiting_keys, self._queue
        if len(queue) - self._in_flight + len(unique) > self._max_pending:
            taken = staged.copy()
            staged.clear()
            for region, key in taken:  # near the bound: one at a time, degrading to a clear
                self.add(_new_op(Invalidation, (_KEY, region, key)))
            return
        new = [i for i in unique if i not in waiting_keys] if waiting_keys else list(unique)
        entries = key_entries(first, new)  # before any change: a MemoryError loses nothing
        count = len(staged)
        staged.clear()
        if waiting_keys:
            waiting_keys.update(dict.fromkeys(new))
        else:
            self._waiting_keys = unique
        queue.extend(entries)
        self.coalesced += count - len(new)
        self._accepted += count

    def add(self, op: Invalidation) -> int:
        """Accept one invalidation; return its sequence number."""
        self.fold()
        self._accepted += 1
        seq = self._accepted
        if op.kind is Kind.KEY or op.kind is Kind.UPDATE:
            ident = (op.region, op.key)
            if op.kind is Kind.UPDATE:
                op = self._admit(ident, op)  # type: ignore[arg-type]
                started = getattr(op, "started", None)
                if started is not None and self._cleared_since(op.region, started):
                    # Another caller here cleared the key's region (or everything) while
                    # this write ran, and that clear waits: it may go out in the same batch,
                    # where the publish script cannot see it, and which of the two reached
                    # the source last is unknown. No value is sent.
                    op = op.invalidation()  # type: ignore[attr-defined]
            if ident in self._waiting_keys:
                self.coalesced += 1
                if op.kind is Kind.UPDATE or ident in self._values or ident in self._latest:
                    started = getattr(op, "started", None)
                    if started is not None and self._accepted_at.get(ident, 0) > started:
                        # Another caller here wrote the key while this write ran: which one
                        # reached the source last is unknown, so neither value is sent.
                        op = op.invalidation()  # type: ignore[attr-defined]
                    self._latest[ident] = op  # sent at the first position, as the latest
                    self._carry(ident, op)
                if self.track_writes:
                    self._accepted_at[ident] = seq
                return seq
            if self.waiting < self._max_pending:
                self._waiting_keys[ident] = None
                self._queue.append((seq, op))
                if op.kind is Kind.UPDATE:
                    self._carry(ident, op)
                if self.track_writes:
                    self._accepted_at[ident] = seq
                return seq
            self.degraded += 1
            op = Invalidation(Kind.CLEAR)
        elif op.kind is Kind.REGION and self.waiting >= self._max_pending:
            self.degraded += 1
            op = Invalidation(Kind.CLEAR)
        if op.kind is Kind.CLEAR and self.waiting:
            # Everything waiting is superseded; the clear takes over the earliest sequence it
            # replaces so that ``delivered`` never runs ahead of it.
            seq = self._queue[self._in_flight][0]
            self.coalesced += self.waiting
            while len(self._queue) > self._in_flight:
                self._queue.pop()
            self._waiting_keys.clear()
            self._latest.clear()
            self._values.clear()
            self._accepted_at.clear()
            self._waiting_clears.clear()
            self._cleared_at.clear()
            self.value_bytes = 0
        if self.track_writes:
            self._cleared_at[written_ident(op)] = self._accepted  # (seq may be an earlier one)
        if self.track_in_flight:
            cleared = written_ident(op)
            self._waiting_clears[cleared] = self._waiting_clears.get(cleared, 0) + 1
        self._queue.append((seq, op))
        return self._accepted

    def _cleared_since(self, region: str | None, started: int) -> bool:
        """Whether a clear of ``region``, or of everything, accepted after ``started`` waits."""
        cleared = self._cleared_at
        return bool(cleared) and (
            cleared.get((region, REGION_KEYS), 0) > started or cleared.get(EVERY_KEY, 0) > started
        )

    def _admit(self, ident: _Ident, op: Update) -> Invalidation:
        """The value, or its plain invalidation if the waiting values would exceed the bound."""
        replaced = self._values.get(ident)
        size = self.value_bytes + len(op.data) - (len(replaced.data) if replaced else 0)
        if size > self._max_value_bytes:
            self.values_dropped += 1
            return op.invalidation()
        return op

    def _carry(self, ident: _Ident, op: Invalidation) -> None:
        """Record which value (if any) a waiting key now carries."""
        old = self._values.pop(ident, None)
        if old is not None:
            self.value_bytes -= len(old.data)
        if isinstance(op, Update):
            self._values[ident] = op
            self.value_bytes += len(op.data)

    def holds(self, region: str | None, key: Hashable) -> bool:
        """Whether a write of this key made here waits or is in flight (the latter, and the
        clears and clear_regions that write it, known only with ``track_in_flight``)."""
        self.fold()
        ident = (region, key)
        if ident in self._waiting_keys or ident in self._in_flight_keys:
            return True
        clears, flying = self._waiting_clears, self._in_flight_keys
        if not clears and not flying:
            return False
        region_keys = (region, REGION_KEYS)
        return (
            region_keys in clears
            or EVERY_KEY in clears
            or region_keys in flying
            or EVERY_KEY in flying
        )

    def take(self, max_ops: int) -> list[Invalidation]:
        """Mark up to ``max_ops`` waiting invalidations as in flight and return them in order.

        With something in flight already, what is taken joins it: the batch in flight grows
        (its operations are published behind it, on the same connection), and it is
        committed, superseded or dropped as one. Only a plain outbox grows a batch in flight:
        no values travel and no write is tracked.
        """
        start = self._in_flight
        assert not start or not (
            self.track_in_flight or self.track_writes or self._values or self._latest
        ), "only a plain outbox grows the batch in flight"
        self.fold()
        queue = self._queue
        count = min(max_ops, len(queue) - start)
        if start + count == len(queue):
            batch = list(map(_second, islice(queue, start, None) if start else queue))
            self._waiting_keys.clear()  # everything is taken: nothing waits any more
        else:
            # (a deque's [i] walks to i: islice walks once)
            batch = list(map(_second, islice(queue, start, start + count)))
            discard = self._waiting_keys.pop
            for op in batch:
                if op.kind is _KEY or op.kind is _UPDATE:
                    discard((op.region, op.key), None)
        if self._latest or self._values or self._accepted_at:
            self._take_latest(batch)
        if self._cleared_at:
            self._take_cleared(count)
        if self.track_in_flight:
            self._in_flight_keys = {written_ident(op) for op in batch}
            clears = self._waiting_clears
            if count == len(queue):
                clears.clear()
            elif clears:
                for op in batch:
                    if op.kind is Kind.REGION or op.kind is Kind.CLEAR:
                        ident = written_ident(op)
                        left = clears[ident] - 1
                        if left:
                            clears[ident] = left
                        else:
                            del clears[ident]
        self._in_flight = start + count
        return batch

    def _take_cleared(self, count: int) -> None:
        """The first ``count`` waiting operations were taken: forget the clears among them
        (a clear in flight is published before anything still waiting, so the publish
        script sees it)."""
        cleared, queue = self._cleared_at, self._queue
        if count == len(queue):
            cleared.clear()
            return
        for i in range(count):
            seq, op = queue[i]
            if op.kind is Kind.CLEAR:
                cleared.pop(EVERY_KEY, None)  # at most one waits: a clear supersedes the rest
            elif op.kind is Kind.REGION:
                ident = written_ident(op)
                if cleared.get(ident) == seq:  # not a later clear of the region still waiting
                    del cleared[ident]

    def _take_latest(self, batch: list[Invalidation]) -> None:
        """Put each taken key's latest operation in its place; its value is no longer waiting."""
        latest, values = self._latest, self._values
        for i, op in enumerate(batch):
            if op.kind is Kind.KEY or op.kind is Kind.UPDATE:
                ident = (op.region, op.key)
                newer = latest.pop(ident, None)
                if newer is not None:
                    batch[i] = newer
                self._accepted_at.pop(ident, None)
                value = values.pop(ident, None)
                if value is not None:
                    self.value_bytes -= len(value.data)

    @property
    def superseded(self) -> bool:
        """Whether the batch in flight no longer matters: a clear waits right behind it
        (staged keys folded first: past the bound they become that clear)."""
        self.fold()
        if self._in_flight == 0 or self._in_flight >= len(self._queue):
            return False
        return self._queue[self._in_flight][1].kind is Kind.CLEAR

    def drop_in_flight(self) -> None:
        """Drop the batch in flight (all of it, if it grew) without sending it, because a
        clear waits right behind it (see :attr:`superseded`). The clear takes over the batch's
        first sequence number, so ``delivered`` does not count the dropped batch as
        acknowledged."""
        assert self.superseded
        first = self._queue[0][0]
        for _ in range(self._in_flight):
            self._queue.popleft()
        self._in_flight = 0
        self._in_flight_keys = set()
        _, clear = self._queue.popleft()
        self._queue.appendleft((first, clear))

    def commit(self) -> None:
        """The batch in flight was acknowledged by the backplane."""
        if self._in_flight == len(self._queue):
            self._queue.clear()  # the common case under load: everything was taken
        else:
            for _ in range(self._in_flight):
                self._queue.popleft()
        self._in_flight = 0
        if self._in_flight_keys:
            self._in_flight_keys = set()
