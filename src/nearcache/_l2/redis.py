"""The L2 for the threaded driver: runs the core's read path (``Sharing.load_flow``) and the
L2-aware publish script on its own Redis connections.

Every read-path command has the short ``l2_timeout``; after a failure L2 is skipped for a
while (``Breaker``), so a Redis that is down costs one timeout, not one per miss. Publishing
keeps the connection string's timeouts: it is the outbox's delivery, retried until it works.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis

from nearcache._backplane.redis import make_client_kwargs, publish_error
from nearcache._config import RedisSettings
from nearcache._core import l2
from nearcache._core.codec import Key, Region
from nearcache._core.log import new_epoch
from nearcache._core.sharing import Breaker, Fill, Load, Loaded, Read, Release, Sharing, Wait
from nearcache._exceptions import MessageError
from nearcache._typing import Clock

__all__ = ["RedisL2", "l2_client_kwargs"]

_ERRORS = (redis.RedisError, OSError, MessageError)


def l2_client_kwargs(settings: RedisSettings, timeout: float) -> dict[str, Any]:
    """Client arguments for the read path: the connection string's, with ``timeout`` as the
    command and connect timeout (never longer than the string's own)."""
    kwargs = make_client_kwargs(settings)
    kwargs["socket_timeout"] = min(timeout, kwargs.get("socket_timeout") or timeout)
    kwargs["socket_connect_timeout"] = min(timeout, kwargs.get("socket_connect_timeout") or timeout)
    return kwargs


class RedisL2:
    """L2 reads, fills and the publish script for one :class:`~nearcache.NearCache`."""

    def __init__(
        self,
        settings: RedisSettings,
        channel: str,
        sharing: Sharing,
        *,
        clock: Clock,
        log_length: int,
        usable: Callable[[], bool],
    ) -> None:
        self._settings = settings
        self._channel = channel
        self._sharing = sharing
        self._clock = clock
        self._log_length = log_length
        self._usable = usable
        options = sharing.options
        # Reads go through L2 only with l2=True (propagate="update" alone only publishes here).
        self.reads = sharing.l2
        self._lease_ttl = options.l2_lease_ttl
        self._client = redis.Redis(**l2_client_kwargs(settings, options.l2_timeout))
        self._publisher = redis.Redis(**make_client_kwargs(settings))
        self._read_script = self._client.register_script(l2.READ_SCRIPT)
        self._fill_script = self._client.register_script(l2.FILL_SCRIPT)
        self._release_script = self._client.register_script(l2.RELEASE_SCRIPT)
        self._publish_script = self._publisher.register_script(l2.PUBLISH_SCRIPT)
        self._breaker = Breaker()
        self._breaker_lock = threading.Lock()
        self._closed = False

    # -- the read path ----------------------------------------------------------------------

    def load(
        self,
        key: Key,
        region: Region,
        factory: Callable[[], Any],
        ttl: float | None,
        is_open: Callable[[], bool],
    ) -> Loaded:
        """Run the read path for one missed key: L2, lease, wait, factory, fill."""
        flow = self._sharing.load_flow(key, region, l2.new_token(), ttl)
        send: Any = None
        error: BaseException | None = None
        while True:
            try:
                step = flow.send(send) if error is None else flow.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            error = None
            send = None
            if type(step) is Read:
                send = self._read(key, region, step.token)
            elif type(step) is Load:
                try:
                    send = factory()
                except BaseException as exc:  # handed to the flow: it gives the lease up
                    error = exc
            elif type(step) is Wait:
                if is_open():
                    time.sleep(step.seconds)
                    send = True
            elif type(step) is Fill:
                send = self._fill(key, region, step)
            elif type(step) is Release:
                self._run(self._release_script, [l2.value_keys(self._channel, region, key)[1]], [
                    step.token
                ])  # fmt: skip

    def _read(self, key: Key, region: Region, token: str) -> l2.ReadResult | None:
        if not self._usable() or not self._breaker.available(self._clock()):
            return None
        keys, args = l2.read_call(self._channel, region, key, token, self._lease_ttl)
        reply = self._run(self._read_script, keys, args)
        if reply is None:
            return None
        try:
            return l2.parse_read(reply)
        except MessageError:
            self._failed()
            return None

    def _fill(self, key: Key, region: Region, step: Fill) -> bool | None:
        keys, args = l2.fill_call(
            self._channel, region, key, step.token, step.payload, step.ttl, step.gen, step.rgen
        )
        reply = self._run(self._fill_script, keys, args)
        return None if reply is None else bool(reply)

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        """Run a read-path script; None (counted, breaker opened) if Redis failed. Once
        closed, None without a command: a load that outlived close() (its fill, its lease
        release) must not open a connection that nothing would close."""
        if self._closed:
            return None
        try:
            reply = script(keys=keys, args=args)
        except _ERRORS:
            self._failed()
            return None
        finally:
            if self._closed:  # closed while it ran: close what it may have reopened
                self._client.close()
        self._breaker.succeeded()
        return reply

    def _failed(self) -> None:
        self._sharing.stats.l2_errors += 1
        with self._breaker_lock:
            self._breaker.failed(self._clock())

    # -- the write path ---------------------------------------------------------------------

    def publish(
        self, plans: Sequence[l2.MessagePlan], since: tuple[bytes, str] | None, sender: bytes
    ) -> int:
        """Publish a batch through the L2-aware script (log, channel, L2 and generations in
        one atomic step); return the receivers of the last message. Raises BackplaneError."""
        keys, args = l2.publish_call(
            self._channel, self._log_length, sender, since, plans, new_epoch()
        )
        try:
            reply = self._publish_script(keys=keys, args=args)
        except (redis.RedisError, OSError) as exc:
            raise publish_error(exc, self._channel, self._settings.describe()) from exc
        self._sharing.stats.updates_fell_back += int(reply[3])
        return int(reply[2])

    def close(self) -> None:
        """Release the connections."""
        self._closed = True
        self._client.close()
        self._publisher.close()
