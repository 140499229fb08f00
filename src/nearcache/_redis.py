"""The Redis Pub/Sub backplane for the threaded driver.

One listener thread owns the subscriber connection. It subscribes, then pings the server on
that same connection every ``heartbeat`` seconds: Redis answers a PING in order with the
messages it pushed before, so a pong proves that every message published before the PING was
sent has been received (``on_confirmed``). A pong that does not come within ``heartbeat_timeout``
means a silent stall: the connection is dropped and a new one subscribed. Every new
subscription is reported with ``on_subscribed`` so the cache can repair what it may have
missed. redis-py's own retries and silent resubscription are switched off: a lost connection
must never go unnoticed.
"""

from __future__ import annotations

import contextlib
import random
import socket
import threading
from collections.abc import Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from nearcache._config import RedisSettings
from nearcache._exceptions import BackplaneError
from nearcache._heartbeat import Heartbeat, StalledError, dispatch
from nearcache._typing import BackplaneListener, BackplaneState, Clock

__all__ = ["RedisBackplane", "make_client_kwargs"]

_RECONNECT_MIN = 0.05
_RECONNECT_MAX = 2.0


def make_client_kwargs(settings: RedisSettings) -> dict[str, Any]:
    """redis-py client arguments with redis-py's own retries off (nearcache retries itself,
    and must see every disconnect)."""
    kwargs = settings.redis_kwargs()
    kwargs["retry"] = Retry(NoBackoff(), 0)
    kwargs["health_check_interval"] = 0
    return kwargs


class RedisBackplane:
    """Redis Pub/Sub backplane (blocking; a listener thread per instance).

    Args:
        settings: parsed connection settings.
        channel: the full wire channel name.
        clock: monotonic seconds.
        heartbeat: seconds between pings on the subscriber connection.
        heartbeat_timeout: seconds without a pong before the connection counts as stalled.
    """

    def __init__(
        self,
        settings: RedisSettings,
        channel: str,
        *,
        clock: Clock,
        heartbeat: float,
        heartbeat_timeout: float,
    ) -> None:
        self._settings = settings
        self._channel = channel
        self._clock = clock
        self._heartbeat = heartbeat
        self._heartbeat_timeout = heartbeat_timeout
        kwargs = make_client_kwargs(settings)
        self._publisher = redis.Redis(**kwargs)
        self._subscriber_client = redis.Redis(**kwargs)
        self._state = BackplaneState.IDLE
        self._state_lock = threading.Lock()
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._pubsub: Any = None
        self._thread: threading.Thread | None = None
        self._listener: BackplaneListener | None = None
        self.last_error: str | None = None

    @property
    def channel(self) -> str:
        """The full channel name on the wire."""
        return self._channel

    @property
    def state(self) -> BackplaneState:
        """The current state."""
        return self._state

    def _set_state(self, state: BackplaneState, reason: str | None = None) -> None:
        with self._state_lock:
            if self._state is BackplaneState.CLOSED or self._state is state:
                return
            self._state = state
        if state is BackplaneState.CONNECTED:
            self._connected.set()
        else:
            self._connected.clear()
        if self._listener is not None:
            self._listener.on_state(state, reason)

    def start(self, listener: BackplaneListener) -> None:
        """Start the listener thread."""
        self._listener = listener
        self._set_state(BackplaneState.CONNECTING)
        self._thread = threading.Thread(
            target=self._run, name=f"nearcache-listener:{self._channel}", daemon=True
        )
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """Block until subscribed or ``timeout`` seconds passed."""
        return self._connected.wait(timeout)

    def publish(self, payloads: Sequence[bytes]) -> int:
        """PUBLISH every payload in one pipelined round trip; return the last receiver count."""
        try:
            if len(payloads) == 1:
                return int(self._publisher.publish(self._channel, payloads[0]))
            with self._publisher.pipeline(transaction=False) as pipe:
                for payload in payloads:
                    pipe.publish(self._channel, payload)
                counts = pipe.execute()
            return int(counts[-1]) if counts else 0
        except (redis.RedisError, OSError) as exc:
            raise BackplaneError(
                f"publish to channel {self._channel!r} on {self._settings.describe()} failed: {exc}"
            ) from exc

    def close(self) -> None:
        """Stop the listener thread and close the connections."""
        self._closing.set()
        self._interrupt()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)
        self._set_state(BackplaneState.CLOSED)
        with self._state_lock:
            self._state = BackplaneState.CLOSED
        self._publisher.close()
        self._subscriber_client.close()

    def _interrupt(self) -> None:
        """Wake the listener out of a blocking read by shutting its socket down."""
        pubsub = self._pubsub
        connection = getattr(pubsub, "connection", None)
        sock = getattr(connection, "_sock", None)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    # -- the listener thread ------------------------------------------------------------------

    def _run(self) -> None:
        delay = _RECONNECT_MIN
        listener = self._listener
        assert listener is not None
        while not self._closing.is_set():
            pubsub = self._subscriber_client.pubsub(ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
            self._pubsub = pubsub
            try:
                as_of = self._subscribe(pubsub)
                listener.on_subscribed(as_of)
                self._set_state(BackplaneState.CONNECTED)
                delay = _RECONNECT_MIN
                self._listen(pubsub, listener)
            except (redis.RedisError, OSError, StalledError, ValueError) as exc:
                if self._closing.is_set():
                    break
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._set_state(BackplaneState.DISCONNECTED, self.last_error)
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    pubsub.close()
            # Full jitter keeps a fleet that lost Redis together from reconnecting in lockstep.
            self._closing.wait(random.uniform(_RECONNECT_MIN, delay))
            delay = min(delay * 2, _RECONNECT_MAX)

    def _subscribe(self, pubsub: Any) -> float:
        """Subscribe and wait for Redis to confirm; return when the SUBSCRIBE was sent."""
        sent = self._clock()
        pubsub.subscribe(self._channel)
        deadline = sent + self._settings.connect_timeout
        while True:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise StalledError(
                    f"no subscribe confirmation within {self._settings.connect_timeout}s"
                )
            message = pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "subscribe":
                return sent

    def _listen(self, pubsub: Any, listener: BackplaneListener) -> None:
        heartbeat = Heartbeat(self._heartbeat, self._heartbeat_timeout, self._clock())
        while not self._closing.is_set():
            now = self._clock()
            token = heartbeat.due(now)
            if token is not None:
                pubsub.ping(token)
            message = pubsub.get_message(timeout=heartbeat.wait(now))
            if message is not None:
                dispatch(message, heartbeat, listener)
