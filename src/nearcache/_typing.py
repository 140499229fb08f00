"""The extension points: backplanes (sync and asyncio), what they report to a cache, and the
serializer of values kept in the shared L2 and sent in update messages.

A backplane moves encoded messages between the instances of one channel. It owns its
connections and its subscription; the cache owns every decision. Two implementations ship:
Redis Pub/Sub (``RedisBackplane`` / ``AsyncRedisBackplane``) and an in-process broker
(``MemoryBackplane`` / ``AsyncMemoryBackplane``) that passes the same conformance tests.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

__all__ = [
    "AsyncBackplane",
    "Backplane",
    "BackplaneListener",
    "BackplaneState",
    "Clock",
    "Serializer",
]

Clock = Callable[[], float]
"""Seconds from a monotonic clock; ``time.monotonic`` unless a test injects one."""


class BackplaneState(enum.Enum):
    """Where a backplane is in its life."""

    #: Created, not started.
    IDLE = "idle"
    #: Connecting or subscribing; L1 entries age out under the staleness rule meanwhile.
    CONNECTING = "connecting"
    #: Subscribed and heartbeats answered: invalidations flow.
    CONNECTED = "connected"
    #: Connection lost or stalled; retrying with backoff.
    DISCONNECTED = "disconnected"
    #: Closed for good.
    CLOSED = "closed"


class BackplaneListener(Protocol):
    """What a backplane reports to its cache. Called from the backplane's listener thread or
    task, one call at a time, in the order things happened."""

    def on_message(self, payload: bytes) -> bool:
        """A message arrived on the channel (possibly the cache's own, possibly garbage).
        Return whether it was a valid (and, with a secret, authentic) message."""

    def on_subscribed(self, as_of: float, complete: bool) -> None:
        """A subscription is up since ``as_of``. ``complete``: every message published before
        ``as_of`` that this cache had not seen was replayed through ``on_message`` (from the
        log); otherwise some may have been lost and the cache must repair."""

    def on_loss(self, reason: str) -> None:
        """Messages may have been lost although the subscription stayed up."""

    def on_confirmed(self, as_of: float) -> None:
        """Every message published before ``as_of`` has been passed to ``on_message``."""

    def on_state(self, state: BackplaneState, reason: str | None) -> None:
        """The backplane changed state (``reason`` says why it left CONNECTED)."""

    def on_publish_refused(self, reason: str) -> None:
        """A check found that Redis will refuse this cache's publishes (an ACL without a
        command the publish script needs), before any publish was attempted. Backplanes
        that cannot check never call it."""


@runtime_checkable
class Backplane(Protocol):
    """A blocking backplane for :class:`nearcache.NearCache`."""

    @property
    def channel(self) -> str:
        """The full channel name on the wire."""

    @property
    def state(self) -> BackplaneState:
        """The current state."""

    def start(self, listener: BackplaneListener) -> None:
        """Begin connecting and subscribing in the background; return at once."""

    def wait_connected(self, timeout: float) -> bool:
        """Block until subscribed (True) or ``timeout`` seconds passed (False)."""

    def publish(self, payloads: Sequence[bytes]) -> int:
        """Publish messages in order and return how many subscribers received the last one.

        Blocks until Redis acknowledged them; raises ``BackplaneError`` when it could not.
        """

    def close(self) -> None:
        """Stop listening and release every connection."""


@runtime_checkable
class AsyncBackplane(Protocol):
    """An asyncio backplane for :class:`nearcache.AsyncNearCache`."""

    @property
    def channel(self) -> str:
        """The full channel name on the wire."""

    @property
    def state(self) -> BackplaneState:
        """The current state."""

    async def start(self, listener: BackplaneListener) -> None:
        """Begin connecting and subscribing in a background task; return at once."""

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until subscribed (True) or ``timeout`` seconds passed (False)."""

    async def publish(self, payloads: Sequence[bytes]) -> int:
        """Publish messages in order; see :meth:`Backplane.publish`."""

    async def aclose(self) -> None:
        """Stop listening and release every connection, in bounded time; if cancelled, close
        every connection before the cancel propagates (nothing may live on)."""


@runtime_checkable
class Serializer(Protocol):
    """Turns values into bytes for the shared Redis L2 and for update messages, and back.

    Two ship: :class:`nearcache.SafeSerializer` (the default: a tagged binary format of
    plain data types whose loading runs no code) and :class:`nearcache.PickleSerializer`
    (any picklable value; only with ``secret=``, so that every pickle is HMAC-verified
    before it is loaded). Every stored value records the serializer's ``id``: a value
    written with another serializer is counted and treated as a miss, never loaded.
    """

    @property
    def id(self) -> int:
        """1-255, stored with every value (1 and 2 are the built-ins; use 128-255)."""

    @property
    def needs_signing(self) -> bool:
        """Whether ``loads`` may run code (pickle): the cache then refuses to start without
        ``secret=``, and loads only bytes whose signature it verified."""

    def dumps(self, value: object) -> bytes:
        """Serialize; raise ``TypeError`` or ``ValueError`` for a value it cannot carry."""

    def loads(self, data: bytes) -> object:
        """Deserialize what :meth:`dumps` produced; raise any exception for bad input (the
        cache counts it and treats the value as a miss)."""
