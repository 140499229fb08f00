"""How publishing fares: what a failed attempt means, when to try again, what to log and what
``flush()`` reports. No I/O: both drivers' send loops ask it.

A failed publish is retried, whatever failed: nothing queued is ever dropped. Two kinds of
failure differ in what they say about the next attempt:

- *failing*: no answer (connection lost, timeout) or an answer that says "not now"
  (``READONLY`` during a failover, ``LOADING``, ``BUSY``, ``TRYAGAIN``, ...). Redis is
  expected back soon: retry after 50 ms, doubling to 1 s.
- *refused*: any other error reply (``NOPERM`` from an ACL without the needed commands,
  ``OOM`` at ``maxmemory`` with ``noeviction``, a script refused). It will be refused again
  until an operator acts: retry every few seconds (doubling to 10 s), log an ERROR (again at
  most once a minute while it lasts), and make ``flush()`` raise
  :class:`~nearcache.PublishRefusedError` at once instead of waiting for its timeout.

Both show in ``stats()``: ``publishing`` (``"ok"``, ``"failing"``, ``"refused"``) and
``publish_error`` (the last failure in Redis's words).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable

from nearcache._exceptions import PublishRefusedError

__all__ = ["PublishState", "Publishing"]

log = logging.getLogger("nearcache")

RETRY_MIN = 0.05
RETRY_MAX = 1.0  # below typical staleness bounds: delivery resumes soon after Redis does
REFUSED_RETRY_MIN = 1.0
REFUSED_RETRY_MAX = 10.0  # a fixed ACL or freed memory is noticed within ten seconds
LOG_EVERY = 60.0  # seconds between two log records about the same lasting failure
# Error replies that mean "not now" rather than "no": retried as if the connection failed.
TRANSIENT_REPLIES = (
    "READONLY",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "MOVED",
    "ASK",
)


class PublishState(enum.Enum):
    """How the latest publish attempt went."""

    #: It succeeded, or none failed since the cache started.
    OK = "ok"
    #: It failed without a lasting reason (no connection, a failover): retried quickly.
    FAILING = "failing"
    #: Redis answered it with an error that will not go away by itself: retried slowly.
    REFUSED = "refused"


class Publishing:
    """The sending side's record of failures: consecutive count, state, delays, log."""

    def __init__(self, channel: str, clock: Callable[[], float]) -> None:
        self.channel = channel
        self.clock = clock
        self.state = PublishState.OK
        self.error: str | None = None  # the latest failure, in Redis's words where it gave any
        self.reply: str | None = None  # Redis's error reply while REFUSED
        self.failures = 0  # consecutive failed attempts
        self.finding: str | None = None  # what the start-up check found, until a success
        self._delay = 0.0
        self._logged_at = -math.inf

    def failed(self, exc: BaseException, pending: int) -> float:
        """Record a failed attempt (``pending``: invalidations queued); return the seconds to
        wait before the next one."""
        self.failures += 1
        # Redis's reply to a refused script does not say which command it refused; the
        # start-up check did, so it stays in the report until a publish succeeds.
        also = "" if self.finding is None else f" ({self.finding})"
        self.error = f"{exc}{also}"
        reply = exc.reply if isinstance(exc, PublishRefusedError) else None
        if reply is not None and not reply.startswith(TRANSIENT_REPLIES):
            first = self.state is not PublishState.REFUSED
            self.state, self.reply = PublishState.REFUSED, f"{reply}{also}"
            # (Not first after refused_at_start, which set no delay: never below the minimum.)
            self._delay = max(REFUSED_RETRY_MIN, min(self._delay * 2, REFUSED_RETRY_MAX))
            self._log(logging.ERROR, first, pending)
        else:
            first = self.state is PublishState.OK
            self.state, self.reply = PublishState.FAILING, None
            self._delay = RETRY_MIN if first else max(RETRY_MIN, min(self._delay * 2, RETRY_MAX))
            # A Redis restart fails a few attempts and heals: say so only if it lasts.
            if self.failures >= 10:
                self._log(logging.WARNING, self.failures == 10, pending)
        return self._delay

    def refused_at_start(self, reason: str) -> None:
        """The start-up check found that Redis will refuse to publish (an ACL without a
        command the publish script needs); the first attempt will fail the same way."""
        first = self.finding != reason
        self.state, self.error, self.reply, self.finding = (PublishState.REFUSED,) + (reason,) * 3
        if first:  # every new subscription checks again: say it once
            self._log(logging.ERROR, True, 0)

    def succeeded(self) -> None:
        """A publish was acknowledged."""
        if self.state is not PublishState.OK:
            log.warning(
                "nearcache: publishing on channel %r works again (after %d failed attempts)",
                self.channel,
                self.failures,
            )
        self.state, self.reply, self.failures, self.finding = PublishState.OK, None, 0, None

    def flush_error(self, pending: int) -> PublishRefusedError | None:
        """What ``flush()`` raises now: a refusal, or None (keep waiting)."""
        if self.state is not PublishState.REFUSED or self.reply is None:
            return None
        return PublishRefusedError(
            f"{pending} invalidations on channel {self.channel!r} not delivered: Redis "
            f"refuses to publish them ({self.reply}); they stay queued and are retried",
            reply=self.reply,
            pending=pending,
        )

    def _log(self, level: int, first: bool, pending: int) -> None:
        now = self.clock()
        if not first and now - self._logged_at < LOG_EVERY:
            return
        self._logged_at = now
        what = "refuses every publish" if level >= logging.ERROR else "cannot be published to"
        log.log(
            level,
            "nearcache: Redis %s on channel %r (%d attempts so far, %d invalidations waiting, "
            "other instances keep serving what they hold): %s",
            what,
            self.channel,
            self.failures,
            pending,
            self.error,
        )
