"""An in-process backplane: caches of one process sharing a :class:`MemoryBroker`.

It delivers synchronously and never loses a message, so it is always confirmed. It exists for
tests of applications built on nearcache and to check, with the same conformance suite as the
Redis backplane, that the cache's behaviour does not depend on the transport.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

from nearcache._typing import BackplaneListener, BackplaneState

__all__ = ["AsyncMemoryBackplane", "MemoryBackplane", "MemoryBroker"]


class MemoryBroker:
    """Channels in one process; what Redis is to the Redis backplane."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[str, list[BackplaneListener]] = {}

    def subscribe(self, channel: str, listener: BackplaneListener) -> None:
        """Add a subscriber to a channel."""
        with self._lock:
            self._subscribers.setdefault(channel, []).append(listener)

    def unsubscribe(self, channel: str, listener: BackplaneListener) -> None:
        """Remove a subscriber from a channel."""
        with self._lock:
            listeners = self._subscribers.get(channel, [])
            if listener in listeners:
                listeners.remove(listener)

    def publish(self, channel: str, payload: bytes) -> int:
        """Deliver to every subscriber of ``channel`` (the publisher's too); return how many."""
        with self._lock:
            listeners = list(self._subscribers.get(channel, ()))
        for listener in listeners:
            listener.on_message(payload)
        return len(listeners)


class _MemoryBase:
    def __init__(self, broker: MemoryBroker, channel: str) -> None:
        self._broker = broker
        self._channel = channel
        self._state = BackplaneState.IDLE
        self._listener: BackplaneListener | None = None

    @property
    def channel(self) -> str:
        """The full channel name."""
        return self._channel

    @property
    def state(self) -> BackplaneState:
        """The current state."""
        return self._state

    def _start(self, listener: BackplaneListener) -> None:
        self._listener = listener
        self._broker.subscribe(self._channel, listener)
        listener.on_subscribed(-math.inf, False)
        # Delivery is synchronous and lossless: everything is always confirmed.
        listener.on_confirmed(math.inf)
        self._state = BackplaneState.CONNECTED
        listener.on_state(self._state, None)

    def _publish(self, payloads: Sequence[bytes]) -> int:
        count = 0
        for payload in payloads:
            count = self._broker.publish(self._channel, payload)
        return count

    def _close(self) -> None:
        if self._listener is not None:
            self._broker.unsubscribe(self._channel, self._listener)
        self._state = BackplaneState.CLOSED


class MemoryBackplane(_MemoryBase):
    """In-process backplane for :class:`nearcache.NearCache`."""

    def start(self, listener: BackplaneListener) -> None:
        """Subscribe to the broker."""
        self._start(listener)

    def wait_connected(self, timeout: float) -> bool:
        """Always connected once started."""
        return self._state is BackplaneState.CONNECTED

    def publish(self, payloads: Sequence[bytes]) -> int:
        """Deliver to every subscriber now."""
        return self._publish(payloads)

    def close(self) -> None:
        """Unsubscribe."""
        self._close()


class AsyncMemoryBackplane(_MemoryBase):
    """In-process backplane for :class:`nearcache.AsyncNearCache`."""

    async def start(self, listener: BackplaneListener) -> None:
        """Subscribe to the broker."""
        self._start(listener)

    async def wait_connected(self, timeout: float) -> bool:
        """Always connected once started."""
        return self._state is BackplaneState.CONNECTED

    async def publish(self, payloads: Sequence[bytes]) -> int:
        """Deliver to every subscriber now."""
        return self._publish(payloads)

    async def aclose(self) -> None:
        """Unsubscribe."""
        self._close()
