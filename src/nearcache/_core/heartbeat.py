"""Heartbeat and message handling of a subscriber connection, shared by both Redis backplanes.

The backplane PINGs on its subscriber connection. Redis answers in order with the messages it
pushed before, so a matching pong proves that every message published before the ping was
sent has been received. No answer within ``timeout`` means the connection is stalled, even if
the socket looks open. No I/O here: the backplanes send the pings and read the messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nearcache._core.log import Cursor, unwrap
from nearcache._exceptions import MessageError
from nearcache._typing import BackplaneListener

__all__ = ["Heartbeat", "Receiver", "StalledError"]


class StalledError(Exception):
    """The subscriber connection stopped answering (or the server dropped the subscription)."""


class Heartbeat:
    """When to ping, how long to wait, and what a pong proves."""

    def __init__(self, interval: float, timeout: float, now: float) -> None:
        self._interval = interval
        self._timeout = timeout
        self._token = 0
        self._sent: float | None = None
        self._next = now  # ping at once: the first pong confirms the new subscription

    def due(self, now: float) -> str | None:
        """The token of a ping to send now, or None."""
        if self._sent is not None or now < self._next:
            return None
        self._token += 1
        self._sent = now
        self._next = now + self._interval
        return str(self._token)

    def wait(self, now: float) -> float:
        """Seconds to wait for the next message; raises StalledError if a pong is overdue."""
        if self._sent is None:
            return max(self._next - now, 0.0)
        left = self._sent + self._timeout - now
        if left <= 0:
            raise StalledError(f"no heartbeat answer within {self._timeout:.2f}s (stalled)")
        return left

    def pong(self, data: object) -> float | None:
        """When the answered ping was sent, if ``data`` answers the outstanding one."""
        token = str(self._token)
        if self._sent is None or data not in (token, token.encode()):
            return None
        sent, self._sent = self._sent, None
        return sent


class Receiver:
    """Turns redis-py pub/sub messages into listener calls.

    Unwraps log envelopes, skips live copies of entries already replayed from the log,
    reports an epoch change (Redis lost its log) as a loss, and matches heartbeat pongs.
    """

    def __init__(self, listener: BackplaneListener, cursor: Cursor, heartbeat: Heartbeat) -> None:
        self._listener = listener
        self._cursor = cursor
        self._heartbeat = heartbeat

    def handle(self, message: Mapping[str, Any]) -> bool:
        """Handle one message; return True when it answered the outstanding heartbeat."""
        kind = message["type"]
        if kind in ("message", "smessage"):
            data = message["data"]
            try:
                envelope = unwrap(data)
            except MessageError:
                envelope = None  # the cache decodes it and counts it as malformed
            if envelope is None:
                if self._listener.on_message(data):
                    self._cursor.saw_bare_message()
                return False
            cursor = self._cursor
            if not cursor.accept(envelope):
                return False  # already applied from the log
            # Only an authentic message may move the cursor or reveal a new epoch: a forged
            # envelope must not make this instance skip real entries.
            changed = cursor.epoch_changed(envelope)
            if self._listener.on_message(envelope.message):
                cursor.advance(envelope)
                if changed:
                    self._listener.on_loss("the log's epoch changed: Redis lost its data")
            else:
                cursor.rejected(envelope)
            return False
        if kind == "pong":
            sent = self._heartbeat.pong(message["data"])
            if sent is not None:
                self._listener.on_confirmed(sent)
                return True
            return False
        if kind in ("unsubscribe", "sunsubscribe"):
            raise StalledError(f"the server ended the subscription ({kind})")
        return False
