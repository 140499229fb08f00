"""Unit tests of the outbox: order, coalescing, the bound, and the ``delivered`` watermark."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nearcache._core.codec import Invalidation, Kind
from nearcache._core.outbox import Outbox

CLEAR = Invalidation(Kind.CLEAR)


def key(k: object, region: str | None = None) -> Invalidation:
    return Invalidation(Kind.KEY, region, k)  # type: ignore[arg-type]


def region(name: str | None) -> Invalidation:
    return Invalidation(Kind.REGION, name)


def test_empty_outbox() -> None:
    """A new outbox has accepted and delivered nothing and nothing waits."""
    outbox = Outbox()
    assert (outbox.accepted, outbox.delivered, outbox.waiting, outbox.in_flight) == (0, 0, 0, 0)
    assert len(outbox) == 0
    assert outbox.take(10) == []
    assert outbox.superseded is False


def test_add_returns_increasing_sequences() -> None:
    """Every add, coalesced or not, returns the next accepted sequence number."""
    outbox = Outbox()
    assert [outbox.add(op) for op in (key("a"), key("b"), key("a"), CLEAR)] == [1, 2, 3, 4]
    assert outbox.accepted == 4


def test_order_is_kept() -> None:
    """Invalidations are taken in the order they were accepted."""
    outbox = Outbox()
    ops = [key("a"), region("r"), key("b", "r"), region(None), key(1), key(b"x")]
    for op in ops:
        outbox.add(op)
    assert outbox.take(100) == ops


def test_take_respects_max_ops_and_keeps_the_rest_waiting() -> None:
    """take returns at most max_ops invalidations and the rest stay waiting in order."""
    outbox = Outbox()
    for i in range(5):
        outbox.add(key(i))
    assert outbox.take(2) == [key(0), key(1)]
    assert (outbox.in_flight, outbox.waiting, len(outbox)) == (2, 3, 5)
    outbox.commit()
    assert outbox.take(10) == [key(2), key(3), key(4)]


def test_duplicate_waiting_keys_are_coalesced_at_first_position() -> None:
    """A key already waiting is kept once, at its first position."""
    outbox = Outbox()
    outbox.add(key("a"))
    outbox.add(key("b"))
    outbox.add(key("a"))
    assert outbox.waiting == 2
    assert outbox.coalesced == 1
    assert outbox.take(10) == [key("a"), key("b")]


def test_same_key_in_other_region_is_not_coalesced() -> None:
    """Keys are coalesced per region: the same key in two regions stays twice."""
    outbox = Outbox()
    outbox.add(key("a"))
    outbox.add(key("a", "r"))
    outbox.add(key("a", ""))
    assert outbox.waiting == 3
    assert outbox.coalesced == 0


def test_never_coalesced_with_the_batch_in_flight() -> None:
    """A key taken by the sender is queued again when invalidated again."""
    outbox = Outbox()
    outbox.add(key("a"))
    assert outbox.take(10) == [key("a")]
    outbox.add(key("a"))
    assert outbox.waiting == 1
    assert outbox.coalesced == 0
    outbox.commit()
    assert outbox.take(10) == [key("a")]


def test_untaken_keys_still_coalesce_after_a_partial_take() -> None:
    """Keys left waiting by a partial take keep coalescing with new ones."""
    outbox = Outbox()
    outbox.add(key("a"))
    outbox.add(key("b"))
    outbox.take(1)
    outbox.add(key("b"))
    outbox.add(key("a"))
    assert outbox.waiting == 2
    assert outbox.coalesced == 1
    outbox.commit()
    assert outbox.take(10) == [key("b"), key("a")]


def test_clear_supersedes_everything_waiting() -> None:
    """A clear replaces every waiting invalidation with itself."""
    outbox = Outbox()
    outbox.add(key("a"))
    outbox.add(region("r"))
    outbox.add(key("b"))
    outbox.add(CLEAR)
    assert outbox.waiting == 1
    assert outbox.coalesced == 3
    assert outbox.take(10) == [CLEAR]


def test_clear_leaves_the_batch_in_flight_alone() -> None:
    """A clear supersedes waiting invalidations but not those the sender already took."""
    outbox = Outbox()
    outbox.add(key("a"))
    outbox.take(10)
    outbox.add(key("b"))
    outbox.add(CLEAR)
    assert (outbox.in_flight, outbox.waiting) == (1, 1)
    outbox.commit()
    assert outbox.take(10) == [CLEAR]


def test_keys_after_a_clear_are_queued_behind_it() -> None:
    """Invalidations accepted after a clear wait behind it and coalesce among themselves."""
    outbox = Outbox()
    outbox.add(key("a"))
    outbox.add(CLEAR)
    outbox.add(key("a"))
    outbox.add(key("a"))
    assert outbox.take(10) == [CLEAR, key("a")]


def test_repeated_clears_collapse_into_one() -> None:
    """Several clears in a row wait as one."""
    outbox = Outbox()
    for _ in range(5):
        outbox.add(CLEAR)
    assert outbox.take(10) == [CLEAR]


def test_bound_degrades_to_one_clear() -> None:
    """Past max_pending waiting keys the outbox collapses into one clear and counts it."""
    outbox = Outbox(max_pending=3)
    for i in range(3):
        outbox.add(key(i))
    assert outbox.degraded == 0
    outbox.add(key(3))
    assert outbox.degraded == 1
    assert outbox.waiting == 1
    assert outbox.take(10) == [CLEAR]


def test_bound_does_not_count_the_batch_in_flight() -> None:
    """Only waiting invalidations count against max_pending, not the batch in flight."""
    outbox = Outbox(max_pending=2)
    outbox.add(key(0))
    outbox.add(key(1))
    outbox.take(10)
    outbox.add(key(2))
    outbox.add(key(3))
    assert outbox.degraded == 0
    outbox.add(key(4))
    assert outbox.degraded == 1
    assert (outbox.in_flight, outbox.waiting) == (2, 1)
    outbox.commit()
    assert outbox.take(10) == [CLEAR]


def test_coalesced_key_does_not_hit_the_bound() -> None:
    """Re-invalidating a waiting key at the bound coalesces instead of degrading."""
    outbox = Outbox(max_pending=2)
    outbox.add(key(0))
    outbox.add(key(1))
    outbox.add(key(0))
    assert outbox.degraded == 0
    assert outbox.take(10) == [key(0), key(1)]


def test_outbox_keeps_working_after_degrading() -> None:
    """After collapsing into a clear, new keys queue normally behind it."""
    outbox = Outbox(max_pending=2)
    for i in range(4):
        outbox.add(key(i))
    assert outbox.take(10) == [CLEAR, key(3)]


# -- the delivered watermark --------------------------------------------------------------------


def test_delivered_advances_only_on_commit() -> None:
    """delivered covers an invalidation only once the batch holding it is committed."""
    outbox = Outbox()
    outbox.add(key("a"))
    assert outbox.delivered == 0
    outbox.take(10)
    assert outbox.delivered == 0
    outbox.commit()
    assert outbox.delivered == 1


def test_delivered_stops_before_the_first_uncommitted() -> None:
    """With a batch committed and more waiting, delivered stops just before what waits."""
    outbox = Outbox()
    outbox.add(key("a"))
    outbox.take(10)
    outbox.add(key("b"))
    outbox.add(key("c"))
    outbox.commit()
    assert outbox.delivered == 1
    outbox.take(10)
    outbox.commit()
    assert outbox.delivered == 3


def test_delivered_after_coalescing_waits_for_everything_before() -> None:
    """A coalesced invalidation counts as delivered only with everything accepted before it."""
    outbox = Outbox()
    outbox.add(key("a"))  # 1
    outbox.add(key("b"))  # 2
    target = outbox.add(key("a"))  # 3, coalesced into 1
    assert target == outbox.accepted == 3
    outbox.take(1)
    outbox.commit()
    assert outbox.delivered < target  # b (2) is not acknowledged yet
    outbox.take(10)
    outbox.commit()
    assert outbox.delivered == target


def test_delivered_after_clear_supersession() -> None:
    """A clear that replaced waiting keys holds delivered back to before the first one."""
    outbox = Outbox()
    outbox.add(key("a"))  # 1: in flight
    outbox.take(10)
    outbox.add(key("b"))  # 2
    outbox.add(key("c"))  # 3
    target = outbox.add(CLEAR)  # 4: replaces 2 and 3
    assert target == 4
    outbox.commit()
    assert outbox.delivered == 1
    outbox.take(10)
    assert outbox.delivered == 1
    outbox.commit()
    assert outbox.delivered == 4


def test_delivered_after_degrading() -> None:
    """The clear that the bound degrades to holds delivered back until it is committed."""
    outbox = Outbox(max_pending=2)
    for i in range(5):
        outbox.add(key(i))
    assert outbox.delivered == 0
    outbox.take(10)
    outbox.commit()
    assert outbox.delivered == 5


def test_superseded_when_a_clear_waits_behind_the_batch() -> None:
    """superseded is true only while a clear waits right behind the batch in flight."""
    outbox = Outbox()
    outbox.add(key("a"))
    assert outbox.superseded is False  # nothing in flight
    outbox.take(10)
    assert outbox.superseded is False  # nothing behind
    outbox.add(key("b"))
    assert outbox.superseded is False  # a key behind
    outbox.add(CLEAR)
    assert outbox.superseded is True
    outbox.commit()
    assert outbox.superseded is False


def test_superseded_by_degrading() -> None:
    """A batch in flight is superseded when the bound collapses what waits into a clear."""
    outbox = Outbox(max_pending=1)
    outbox.add(key(0))
    outbox.take(10)
    outbox.add(key(1))
    outbox.add(key(2))
    assert outbox.superseded is True


def test_clear_in_flight_is_not_superseded_by_a_key() -> None:
    """A key queued behind a clear in flight does not make that clear superseded."""
    outbox = Outbox()
    outbox.add(CLEAR)
    outbox.take(10)
    outbox.add(key("a"))
    assert outbox.superseded is False


# -- a model check ------------------------------------------------------------------------------


@dataclass
class _Model:
    """What the outbox should hold: each queued op with the sequences it delivers."""

    max_pending: int
    accepted: int = 0
    in_flight: list[tuple[Invalidation, set[int]]] = field(default_factory=list)
    waiting: list[tuple[Invalidation, set[int]]] = field(default_factory=list)
    delivered: set[int] = field(default_factory=set)

    def add(self, op: Invalidation) -> None:
        self.accepted += 1
        seq = self.accepted
        if op.kind is Kind.KEY:
            for queued, seqs in self.waiting:
                if queued == op:
                    seqs.add(seq)
                    return
            if len(self.waiting) >= self.max_pending:
                op = CLEAR
        if op.kind is Kind.CLEAR and self.waiting:
            merged = {seq}.union(*(seqs for _, seqs in self.waiting))
            self.waiting = [(CLEAR, merged)]
            return
        self.waiting.append((op, {seq}))

    def take(self, max_ops: int) -> list[Invalidation]:
        taken, self.waiting = self.waiting[:max_ops], self.waiting[max_ops:]
        self.in_flight += taken  # behind what is in flight already, if anything
        return [op for op, _ in taken]

    def superseded(self) -> bool:
        return bool(self.in_flight) and bool(self.waiting) and self.waiting[0][0] == CLEAR

    def drop_in_flight(self) -> None:
        """The clear right behind the batch in flight stands for it too."""
        dropped = set().union(*(seqs for _, seqs in self.in_flight))
        self.in_flight = []
        self.waiting[0][1].update(dropped)

    def commit(self) -> None:
        for _, seqs in self.in_flight:
            self.delivered |= seqs
        self.in_flight = []

    def delivered_prefix(self) -> int:
        n = 0
        while n + 1 in self.delivered:
            n += 1
        return n


_ops = st.one_of(
    st.builds(key, st.sampled_from(["a", "b", "c", 1]), st.sampled_from([None, "r"])),
    st.just(CLEAR),
)
_steps = st.lists(
    st.one_of(
        st.tuples(st.just("add"), _ops),
        st.tuples(st.just("take"), st.integers(1, 4)),
        st.tuples(st.just("commit"), st.none()),
        st.tuples(st.just("drop"), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(steps=_steps, max_pending=st.integers(1, 4))
def test_outbox_matches_model(steps: list[tuple[str, Any]], max_pending: int) -> None:
    """Any sequence of adds, takes (a take with a batch in flight grows it), commits and drops
    of a superseded batch keeps order, coalescing and a safe watermark."""
    outbox = Outbox(max_pending=max_pending)
    model = _Model(max_pending)
    for action, arg in steps:
        if action == "add":
            outbox.add(arg)
            model.add(arg)
        elif action == "take":
            assert outbox.take(arg) == model.take(arg)
        elif action == "commit":
            outbox.commit()
            model.commit()
        elif action == "drop":
            assert outbox.superseded == model.superseded()
            if model.superseded():
                outbox.drop_in_flight()
                model.drop_in_flight()
        assert outbox.accepted == model.accepted
        assert (outbox.in_flight, outbox.waiting) == (len(model.in_flight), len(model.waiting))
        # Safety: flush may return only once everything up to its target was delivered.
        assert outbox.delivered <= model.delivered_prefix()
        if not model.in_flight and not model.waiting:
            assert outbox.delivered == outbox.accepted


# -- regressions: each fails until its bug is fixed ---------------------------------------------


def test_region_invalidations_respect_the_bound() -> None:
    """Region invalidations also count against max_pending, so the outbox stays bounded."""
    outbox = Outbox(max_pending=3)
    for i in range(100):
        outbox.add(region(f"r{i}"))
    assert outbox.waiting <= 3
    assert outbox.degraded >= 1


def test_add_keys_matches_add_one_by_one() -> None:
    """add_keys queues, coalesces, numbers and bounds exactly like add called per key."""
    ops = [
        Invalidation(Kind.KEY, r, k) for r, k in [(None, "a"), ("r", "a"), (None, "a"), (None, "b")]
    ]
    for bound in (100, 3):
        one, bulk = Outbox(max_pending=bound), Outbox(max_pending=bound)
        for op in ops:
            one.add(op)
        bulk.add_keys(ops)
        assert list(one._queue) == list(bulk._queue)
        assert (one.accepted, one.coalesced, one.degraded) == (
            bulk.accepted,
            bulk.coalesced,
            bulk.degraded,
        )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("key"), st.sampled_from([None, "r"]), st.integers(0, 5)),
            st.tuples(st.just("region"), st.sampled_from([None, "r"]), st.just(0)),
            st.tuples(st.just("clear"), st.none(), st.just(0)),
            st.tuples(st.just("take"), st.none(), st.integers(1, 4)),
            st.tuples(st.just("commit"), st.none(), st.just(0)),
        ),
        max_size=40,
    ),
    st.integers(min_value=1, max_value=6),
)
def test_add_key_is_add_for_a_key(steps: list[tuple[str, str | None, int]], bound: int) -> None:
    """The fast path every set and remove takes (``add_key``, which only stages the key) sends
    exactly what ``add`` of the same key invalidation would, bound and coalescing included,
    and says whether nothing waited before it. In between, ``accepted`` is exact, anything
    waits exactly when it would, and ``delivered`` may lag (a flush waits longer), never lead.
    Once folded, the counters match."""
    fast, slow = Outbox(max_pending=bound), Outbox(max_pending=bound)
    for what, name, n in steps:
        if what == "key":
            idle = slow.waiting == 0
            slow.add(key(n, name))
            assert fast.add_key(name, n) is idle
        elif what == "take":
            assert fast.take(n) == slow.take(n)
        elif what == "commit":
            fast.commit()
            slow.commit()
        else:
            op = region(name) if what == "region" else CLEAR
            assert fast.add(op) == slow.add(op)
        assert (fast.accepted, fast.in_flight) == (slow.accepted, slow.in_flight)
        assert (fast.waiting == 0) == (slow.waiting == 0)
        assert fast.delivered <= slow.delivered
        if slow.delivered == slow.accepted:
            assert fast.delivered == fast.accepted
        fast.fold()
        assert len(fast) == len(slow)
        assert (fast.waiting, fast.coalesced, fast.degraded) == (
            slow.waiting,
            slow.coalesced,
            slow.degraded,
        )
    assert fast.take(10**6) == slow.take(10**6)


def test_staged_keys_fold_in_order_with_repeats_coalesced() -> None:
    """Keys staged by add_key reach the queue in their first order, once each, behind what
    waited before them, and a key already waiting is not queued again."""
    outbox = Outbox()
    outbox.add(key("w"))
    for name in ["a", "b", "a", "w", "c", "b"]:
        outbox.add_key(None, name)
    assert outbox.accepted == 7
    assert outbox.waiting == 7  # repeats are counted until folded
    assert outbox.take(100) == [key("w"), key("a"), key("b"), key("c")]
    assert outbox.coalesced == 3
    outbox.commit()
    assert outbox.delivered == outbox.accepted == 7


def test_staged_keys_past_the_stage_limit_are_folded_by_the_caller() -> None:
    """A stuck sender never takes: the caller folds the staged keys itself, so the bound on
    waiting invalidations holds (here it degrades to one clear) and memory stays bounded."""
    outbox = Outbox(max_pending=5_000)
    for i in range(20_000):
        outbox.add_key(None, f"k{i}")
    assert len(outbox.staged) < 5_000
    assert outbox.degraded >= 1
    assert outbox.take(10**6)[0] == CLEAR


def test_len_counts_staged_keys_without_folding_them() -> None:
    """len() only reads (a metrics thread may call it through stats()): the staged keys stay
    staged, counted with their repeats, and nothing is lost."""
    outbox = Outbox()
    for name in ["a", "b", "a"]:
        outbox.add_key(None, name)
    assert len(outbox) == 3
    assert outbox.staged == [(None, "a"), (None, "b"), (None, "a")]
    assert outbox.take(10) == [key("a"), key("b")]


def test_superseded_sees_a_staged_key_that_degrades_to_a_clear() -> None:
    """A staged key past the bound becomes the clear that supersedes the batch in flight,
    before anyone asks (publish_failed decides on it)."""
    outbox = Outbox(max_pending=1)
    outbox.add_key(None, 1)
    outbox.take(10)
    outbox.add_key(None, 2)
    outbox.add_key(None, 3)
    assert outbox.superseded


def test_a_failed_fold_loses_no_staged_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fold that fails building its entries (memory) changes nothing: the keys stay
    staged and go out with the next fold."""
    from nearcache._core import outbox as outbox_module

    outbox = Outbox()
    outbox.add(key("w"))
    outbox.add_key(None, "a")

    def no_memory(seq: int, idents: list[object]) -> list[object]:
        raise MemoryError

    monkeypatch.setattr(outbox_module, "key_entries", no_memory)
    with pytest.raises(MemoryError):
        outbox.fold()
    monkeypatch.undo()
    assert (outbox.accepted, outbox.staged) == (2, [(None, "a")])
    assert outbox.take(10) == [key("w"), key("a")]


def test_no_more_keys_stay_staged_than_the_bound() -> None:
    """With a bound below STAGE_MAX the caller folds at the bound: never more keys wait
    (staged or queued) than max_pending, a stuck sender or not."""
    outbox = Outbox(max_pending=10)
    for i in range(25):
        outbox.add_key(None, f"k{i}")
        assert len(outbox.staged) < 10
    assert outbox.degraded >= 1
