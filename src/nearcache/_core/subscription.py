"""The subscriber side of the Redis backplane, written once, without I/O.

:meth:`Subscription.run` is a generator of :mod:`~nearcache._core.commands`: the threaded
backplane (``_backplane/redis.py``) and the asyncio one (``_backplane/aioredis.py``) each
execute what it yields, send the reply back in and throw failures in, and decide nothing
themselves. One subscription's life:

1. ``SUBSCRIBE`` on a new connection and wait (at most the connect timeout) for Redis's
   confirmation; what is published from the moment it was sent will arrive.
2. Resync with the replay log (``_core/log.py``): read the epoch, the entries after the
   cursor and Redis's run id, then either replay what was missed (L1 stays) or report that
   L1 must be dropped (``on_subscribed(as_of, complete)``). The epoch script also checks the
   user's ACL for every command the publish script needs, and a refusal is reported at once
   (``on_publish_refused``) rather than at the first write.
3. Listen: ``PING`` every heartbeat on the subscriber connection. Redis answers in order with
   the messages it pushed before, so a pong proves that everything published before the ping
   was sent has arrived (``on_confirmed``); no pong within the timeout means a silent stall.
   Every ``reconcile`` seconds the log's tail is read just before a ping; when its pong
   arrives, a cursor behind that tail means messages were lost on a live subscription: they
   are replayed from the log, or L1 is dropped (``on_loss``).

Any failure ends the subscription, never the flow: it disconnects, waits a jittered backoff
(full jitter, 50 ms doubling to 1 s, so that a fleet that lost Redis together does not come
back in lockstep) and starts again at 1.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Generator
from typing import Any, cast

from nearcache._core.commands import (
    AskSentinels,
    Call,
    Command,
    ConfirmPrimary,
    ConnectionLost,
    Disconnect,
    ErrorReply,
    Locate,
    Pause,
    Ping,
    Pipeline,
    Receive,
    RunScript,
    Subscribe,
)
from nearcache._core.heartbeat import Heartbeat, Receiver, StalledError
from nearcache._core.log import (
    EPOCH_SCRIPT,
    SHARDED_EPOCH_SCRIPT,
    Cursor,
    EntryId,
    epoch_script_call,
    log_keys,
    parse_entries,
    parse_epoch_reply,
    reconcile,
)
from nearcache._core.topology import Placement
from nearcache._typing import BackplaneListener, BackplaneState

__all__ = ["RECONNECT_MAX", "RECONNECT_MIN", "REPLAY_PAGE", "Subscription"]

log = logging.getLogger("nearcache")
RECONNECT_MIN = 0.05
RECONNECT_MAX = 1.0  # below typical staleness bounds: L1 recovers soon after Redis
REPLAY_PAGE = 1000  # log entries read per round trip

Flow = Generator[Command, Any, Any]


class Subscription:
    """One backplane's subscriber: its cursor in the log and the decisions of its loop.

    Args:
        listener: the cache's listener (every report goes there).
        channel: the wire channel.
        clock: monotonic seconds.
        heartbeat: seconds between pings; ``heartbeat_timeout``: seconds without a pong
            before the connection counts as stalled.
        connect_timeout: seconds to wait for the subscription's confirmation.
        log_length: the replay log's length (0: no log, every new subscription repairs).
        reconcile: seconds between comparisons of the log's tail with the cursor.
        set_state: the backplane's state setter (it owns the events waiters wait on).
        cursor: where this subscriber is in the log (kept by the backplane, which reports
            it to the L2; a new one by default).
    """

    def __init__(
        self,
        listener: BackplaneListener,
        *,
        channel: str,
        clock: Callable[[], float],
        heartbeat: float,
        heartbeat_timeout: float,
        connect_timeout: float,
        log_length: int,
        reconcile: float,
        set_state: Callable[[BackplaneState, str | None], None],
        cursor: Cursor | None = None,
    ) -> None:
        self.listener = listener
        self.channel = channel
        self.clock = clock
        self.heartbeat = heartbeat
        self.heartbeat_timeout = heartbeat_timeout
        self.connect_timeout = connect_timeout
        self.log_length = log_length
        self.reconcile = reconcile
        self.set_state = set_state
        self.cursor = Cursor() if cursor is None else cursor
        self.last_error: str | None = None
        self.log_key, self.epoch_key = log_keys(channel)
        self.placement: Placement | None = None

    def run(self) -> Flow:
        """Subscribe, resync, listen; after any failure, back off and start again. Ends
        only when its shell stops driving it."""
        delay = RECONNECT_MIN
        while True:
            try:
                yield from self._locate()
                as_of = yield from self._subscribe()
                yield from self._confirm_primary(as_of)
                complete = yield from self._resync()
                self.listener.on_subscribed(as_of, complete)
                self.set_state(BackplaneState.CONNECTED, None)
                delay = RECONNECT_MIN
                yield from self._listen()
            except Exception as exc:  # any failure ends this subscription, never the flow
                if isinstance(exc, (ConnectionLost, ErrorReply)):
                    self.last_error = str(exc)
                else:
                    if not isinstance(exc, (StalledError, ValueError)):
                        log.exception("nearcache: unexpected error in the listener; resubscribing")
                    self.last_error = f"{type(exc).__name__}: {exc}"
                self.set_state(BackplaneState.DISCONNECTED, self.last_error)
            yield Disconnect()
            yield Pause(random.uniform(RECONNECT_MIN, delay))
            delay = min(delay * 2, RECONNECT_MAX)

    def _locate(self) -> Flow:
        """Find the node in charge of the channel (topology, slot owner, Sentinel primary);
        on a cluster the channel and its log keys take their hash-tagged names."""
        placement: Placement = yield Locate()
        self.placement = placement
        self.channel = placement.channel
        self.log_key, self.epoch_key = log_keys(placement.channel)

    def _confirm_primary(self, sent: float) -> Flow:
        """With Sentinel: the subscription counts (as of ``sent``) only if a majority of the
        Sentinels, asked after the SUBSCRIBE was sent, still names the node it was made on."""
        placement = self.placement
        if placement is None or placement.claim is None:
            return
        confirmed = yield ConfirmPrimary(sent, self.connect_timeout)
        if not confirmed:
            raise StalledError(
                f"a majority of the Sentinels no longer names {placement.endpoint} the primary"
            )

    def _subscribe(self) -> Flow:
        """Subscribe and wait for Redis to confirm; return when the SUBSCRIBE was sent."""
        sent = self.clock()
        yield Subscribe(self.channel)
        deadline = sent + self.connect_timeout
        while True:
            remaining = deadline - self.clock()
            if remaining <= 0:
                raise StalledError(f"no subscribe confirmation within {self.connect_timeout}s")
            message = yield Receive(remaining)
            if message is not None and message["type"] in ("subscribe", "ssubscribe"):
                return sent

    # -- the replay log -------------------------------------------------------------------

    def _resync(self) -> Flow:
        """After subscribing: replay from the log what was missed. Return whether that made
        L1 whole (False: the cache must drop it, and the cursor restarts at the log's end)."""
        if not self.log_length:
            return False
        keys, args = epoch_script_call(self.channel)
        sharded = self.placement is not None and self.placement.sharded
        script = SHARDED_EPOCH_SCRIPT if sharded else EPOCH_SCRIPT
        epoch, refused = parse_epoch_reply((yield RunScript(script, keys, args)))
        if refused:
            self.listener.on_publish_refused(
                f"NOPERM the Redis user may not run {', '.join(refused)}, which publishing "
                "through the replay log needs (found by an ACL check at subscription)"
            )
        cursor = self.cursor
        entries = None
        if cursor.last is not None and cursor.epoch == epoch:
            entries = yield from self._read_log(cursor.last)
        server = yield from self._server_id()
        replay = cursor.plan(epoch, entries, server)
        if replay is None:
            tail = parse_entries((yield Call("xrevrange", (self.log_key, "+", "-", 1))))
            cursor.reset(epoch, tail[0][0] if tail else None, server)
            return False
        for message in replay:
            self.listener.on_message(message)
        return True

    def _server_id(self) -> Flow:
        """Redis's run id (it changes on every restart), with the Sentinel epoch when there
        is one (``Placement.server_id``), or None if INFO is not allowed."""
        try:
            info = yield Call("info", ("server",))
        except ErrorReply:
            return None
        run_id = info.get("run_id")
        server = str(run_id) if run_id else None
        return server if self.placement is None else self.placement.server_id(server)

    def _read_log(self, start: EntryId) -> Flow:
        """The log's entries from ``start`` (inclusive) to its end, or None if too many."""
        entries: list[tuple[EntryId, bytes]] = []
        low = str(start)
        while True:
            page = parse_entries((yield Call("xrange", (self.log_key, low, "+", REPLAY_PAGE))))
            entries.extend(page)
            if len(page) < REPLAY_PAGE:
                return entries
            if len(entries) > self.log_length * 2:
                return None
            low = "(" + str(entries[-1][0])

    def _log_tail(self) -> Flow:
        """The log's epoch and last entry id, read on the command connection."""
        epoch, tail = yield Pipeline(
            (Call("get", (self.epoch_key,)), Call("xrevrange", (self.log_key, "+", "-", 1)))
        )
        entries = parse_entries(tail)
        return epoch or b"", entries[0][0] if entries else None

    def _reconcile_now(self, tail: tuple[bytes, EntryId | None]) -> Flow:
        """A pong proved that everything published before the tail was read has arrived: if
        the cursor is still behind the tail, messages were lost on a live subscription."""
        cursor = self.cursor
        entries: list[tuple[EntryId, bytes]] | None = None
        if tail[1] is not None and cursor.last is not None and tail[1] > cursor.last:
            entries = yield from self._read_log(cursor.last)
        replay = reconcile(cursor, tail, lambda _start: entries)
        if replay is None:
            self.listener.on_loss("reconciliation: the log holds messages this instance never got")
            return
        for message in replay:
            self.listener.on_message(message)

    # -- listening ------------------------------------------------------------------------

    def _listen(self) -> Flow:
        heartbeat = Heartbeat(self.heartbeat, self.heartbeat_timeout, self.clock())
        placement = self.placement
        following = placement is not None and placement.claim is not None
        listener = (
            cast(BackplaneListener, _FollowingPrimary(self.listener, placement))
            if following and placement is not None
            else self.listener
        )
        handle = Receiver(listener, self.cursor, heartbeat).handle
        next_reconcile = self.clock() + self.reconcile
        checking: tuple[bytes, EntryId | None] | None = None
        receive = Receive(0.0)  # one for the whole loop: nothing is built per message
        while True:
            now = self.clock()
            token = heartbeat.due(now)
            if token is not None:
                if self.log_length and checking is None and now >= next_reconcile:
                    checking = yield from self._log_tail()
                    next_reconcile = now + self.reconcile
                yield Ping(token)
                if following:
                    yield AskSentinels()  # answered by the time the pong is, or soon after
            receive.timeout = heartbeat.wait(now)
            message = yield receive
            if message is not None and handle(message) and checking is not None:
                yield from self._reconcile_now(checking)
                checking = None


class _FollowingPrimary:
    """The cache's listener, with every heartbeat confirmation limited to what a majority of
    the Sentinels still vouches for: a pong confirms ``min(ping time, the latest time as of
    which a majority named this primary under the same epoch)``, and none once a majority
    names another (the subscription then ends and is made again on the new primary)."""

    def __init__(self, listener: BackplaneListener, placement: Placement) -> None:
        self._listener = listener
        self._placement = placement

    def on_confirmed(self, sent: float) -> None:
        placement = self._placement
        assert placement.claim is not None
        confirmed = (
            sent if placement.quorum is None else placement.quorum.confirmed(placement.claim)
        )
        if confirmed is None:
            raise StalledError(
                f"a majority of the Sentinels no longer names {placement.endpoint} the primary"
            )
        self._listener.on_confirmed(min(sent, confirmed))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._listener, name)
