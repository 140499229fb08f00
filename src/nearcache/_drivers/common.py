"""What ``NearCache`` and ``AsyncNearCache`` do alike without waiting on anything.

Both drivers take the same arguments and answer the same questions; only how they wait
differs (a lock, a condition and threads, or one event loop and tasks). Their common part
lives here once: the arguments turned into options and settings, the introspection
(``channel``, ``state``, ``instance_id``, ...), ``on_invalidation``, and the errors both raise
(an unreachable Redis at start, a refused publish, a flush that ran out of time). Every
decision about the cache itself is in ``_core``.
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Any, Literal

from nearcache._config import RedisSettings, parse_connection_string
from nearcache._core.cache import Batch, CacheCore, CacheOptions, check_key
from nearcache._core.codec import Invalidation, Kind, channel_name
from nearcache._core.l2 import L2Options
from nearcache._core.serializer import SafeSerializer
from nearcache._core.sharing import sharing_options
from nearcache._exceptions import (
    BackplaneUnavailableError,
    CacheClosedError,
    ConfigurationError,
    FlushTimeoutError,
    PublishRefusedError,
)
from nearcache._typing import BackplaneState, Clock, Serializer

__all__ = ["CacheCommon", "CacheState", "ClosedStore", "normalize_secrets"]

log = logging.getLogger("nearcache")


class CacheState(enum.Enum):
    """Lifecycle of a cache."""

    #: Serving reads and writes (the backplane may still be connecting).
    OPEN = "open"
    #: Closed: every call raises CacheClosedError.
    CLOSED = "closed"


# A member read through its Enum class costs ~80 ns on Python 3.11, more than the rest of a
# local set: the per-call state checks compare with this module constant instead.
CLOSED = CacheState.CLOSED


def normalize_secrets(
    secret: str | bytes | Mapping[str, str | bytes] | None,
) -> dict[str, bytes]:
    """Turn the ``secret=`` argument into key id → secret bytes (the first one signs); a
    ``str`` secret becomes bytes by UTF-8."""
    if secret is None:
        return {}
    if isinstance(secret, str | bytes):
        secret = {"k1": secret}
    if not isinstance(secret, Mapping):
        raise ConfigurationError(
            "secret must be a str, bytes, or a mapping of key ids to secrets, not "
            f"{type(secret).__name__}",
            option="secret",
        )
    return {kid: s.encode() if isinstance(s, str) else s for kid, s in secret.items()}


def check_arguments(channel: object, abort_connect: object) -> None:
    """Refuse a wrongly typed ``channel`` or ``abort_connect``."""
    if not isinstance(channel, str) or not channel:
        raise ConfigurationError(
            f"channel must be a non-empty str, not {channel!r}", option="channel"
        )
    if abort_connect is not None and not isinstance(abort_connect, bool):
        raise ConfigurationError(
            f"abort_connect must be True, False or None, not {abort_connect!r}",
            option="abort_connect",
        )


class ClosedStore:
    """Stands in for the store once the cache is closed: every read refuses."""

    def get(self, key: Hashable, default: Any = None, region: str | None = None) -> Any:
        raise CacheClosedError("the cache is closed")

    async def aget(self, key: Hashable, default: Any = None, region: str | None = None) -> Any:
        raise CacheClosedError("the cache is closed")


class CacheCommon:
    """The part of a cache that neither blocks nor awaits (see the module docstring)."""

    _options: CacheOptions
    _clock: Clock
    _settings: RedisSettings | None
    _channel: str
    _sharing_options: L2Options
    _abort_connect: bool
    _backplane: Any
    _core: CacheCore
    _state: CacheState
    _written: tuple[Batch, list[bytes]] | None
    _publishing: bool

    def _write_batch(self) -> tuple[Batch, list[bytes]]:
        """The direct path (``_backplane/wire.py``): take what waits, write it to the
        publishing connection without blocking or awaiting, and leave the reply to the
        sender; return what was written. The caller checked that no batch is in flight and
        that the connection is writable."""
        core = self._core
        taken = core.take_ops()
        payloads = core.encode_batch(taken)
        self._backplane.write_nowait(payloads)
        self._written = written = (taken, payloads)
        self._publishing = True
        return written

    def _configure(
        self,
        connection: str | None,
        channel: str,
        backplane: Any,
        *,
        max_entries: int,
        ttl: float | None,
        sliding: float | None,
        max_age: float,
        max_staleness: float,
        heartbeat_interval: float | None,
        max_pending: int,
        secret: str | bytes | Mapping[str, str | bytes] | None,
        abort_connect: bool | None,
        replay_log: int,
        reconcile_interval: float,
        clock: Clock,
        l2: bool,
        propagate: Literal["invalidate", "update"],
        serializer: Serializer | None,
        l2_ttl: float | None,
        l2_max_bytes: int,
        l2_lease_ttl: float,
        l2_lease_wait: float,
        l2_timeout: float,
        update_max_bytes: int,
    ) -> None:
        """Check and record the constructor's arguments (both drivers take the same)."""
        check_arguments(channel, abort_connect)
        self._options = CacheOptions(
            max_entries=max_entries,
            ttl=ttl,
            sliding=sliding,
            max_age=max_age,
            max_staleness=max_staleness,
            heartbeat_interval=heartbeat_interval,
            max_pending=max_pending,
            secrets=normalize_secrets(secret),
            replay_log=replay_log,
            reconcile_interval=reconcile_interval,
        )
        self._clock = clock
        self._settings = None
        if connection is not None and backplane is not None:
            raise ValueError("pass either a connection string or a backplane, not both")
        if connection is not None:
            self._settings = parse_connection_string(connection)
            channel = channel_name(channel, self._settings.channel_prefix, self._settings.database)
        elif backplane is not None:
            channel = backplane.channel
        self._channel = channel
        self._sharing_options = sharing_options(
            L2Options(
                l2,
                propagate,
                serializer or SafeSerializer(),
                l2_ttl,
                l2_max_bytes,
                l2_lease_ttl,
                l2_lease_wait,
                l2_timeout,
                update_max_bytes,
            ),
            secrets=self._options.secrets,
            replay_log=replay_log,
            connection=connection is not None,
            custom=backplane is not None,
        )
        self._abort_connect = (
            abort_connect
            if abort_connect is not None
            else (self._settings.abort_connect if self._settings else False)
        )
        self._backplane = backplane
        self._state = CacheState.OPEN

    def _check_open(self) -> None:
        if self._state is CLOSED:
            raise CacheClosedError(f"the cache on channel {self._channel!r} is closed")

    # -- errors both drivers raise ----------------------------------------------------------

    def _connect_timeout(self) -> float:
        """How long ``abortConnect=True`` waits for the subscription at start."""
        return self._settings.connect_timeout if self._settings else 5.0

    def _start_error(self, connected: bool) -> Exception | None:
        """With ``abortConnect=True``, after waiting for the subscription: what the start
        raises (Redis unreachable, or it would refuse to publish), or None."""
        where = self._settings.describe() if self._settings else repr(self._backplane)
        failure = getattr(self._backplane, "start_failure", None)
        if not connected and isinstance(failure, ConfigurationError):
            return failure  # the server shows the configuration cannot work (topology)
        if not connected:
            reason = str(failure or "") or getattr(self._backplane, "last_error", None)
            return BackplaneUnavailableError(
                f"could not subscribe to channel {self._channel!r} on {where} within "
                f"{self._connect_timeout()}s ({reason or 'no answer'}); pass "
                "abortConnect=False to start without Redis"
            )
        refused = self._core.publishing.flush_error(0)
        if refused is None:
            return None
        return PublishRefusedError(
            f"Redis on {where} would refuse to publish on channel {self._channel!r} "
            f"({refused.reply}); pass abortConnect=False to start anyway",
            reply=refused.reply,
        )

    def _flush_refused(self) -> PublishRefusedError | None:
        """What ``flush()`` raises at once when Redis refuses the publish, else None."""
        return self._core.publishing.flush_error(len(self._core.outbox))

    def _flush_timeout(self, timeout: float) -> FlushTimeoutError:
        pending = len(self._core.outbox)
        return FlushTimeoutError(
            f"{pending} invalidations on channel {self._channel!r} not acknowledged by Redis "
            f"within {timeout}s",
            pending=pending,
        )

    def _closing_undelivered(self, error: FlushTimeoutError | PublishRefusedError) -> None:
        log.warning(
            "nearcache: closing channel %r with %d invalidations undelivered",
            self._channel,
            error.pending,
        )

    # -- invalidations ------------------------------------------------------------------------

    @staticmethod
    def _key_invalidations(keys: Iterable[Hashable], region: str | None) -> list[Invalidation]:
        """``remove_many``'s invalidations, every key checked first."""
        ops = []
        for key in keys:
            check_key(key, region)
            ops.append(Invalidation(Kind.KEY, region, key))  # type: ignore[arg-type]
        return ops

    def on_invalidation(self, callback: Callable[[Invalidation], None]) -> Callable[[], None]:
        """Call ``callback(invalidation)`` for every invalidation received from another
        instance, right after it was applied to L1; return a function that unregisters it.

        It runs on the backplane's listener thread (``NearCache``, without the cache's lock:
        it may call any method of the cache, ``close()`` included) or on the event loop
        (``AsyncNearCache``). Keep it short: the next invalidation waits for it. Its
        exceptions are logged and counted (``stats().listener_errors``), never propagated.
        Own writes and local expiries are not reported.
        """
        listeners = self._core.listeners
        listeners.append(callback)

        def unregister() -> None:
            if callback in listeners:
                listeners.remove(callback)

        return unregister

    # -- introspection ------------------------------------------------------------------------

    @property
    def channel(self) -> str:
        """The channel name on the wire (for a local cache: the logical name given)."""
        return self._channel

    @property
    def state(self) -> CacheState:
        """The cache's lifecycle state."""
        return self._state

    @property
    def backplane_state(self) -> BackplaneState | None:
        """The backplane's state, or ``None`` for a local cache."""
        return None if self._backplane is None else self._backplane.state

    @property
    def instance_id(self) -> str:
        """The sender id this instance publishes under (hex); a new one after a minute
        without publishing (see docs/protocol.md, "Sender id and sequence numbers")."""
        return self._core.instance_id.hex()

    def __len__(self) -> int:
        return len(self._core.store)

    def __repr__(self) -> str:
        where = self._settings.describe() if self._settings else "local"
        name = type(self).__name__
        return f"<{name} channel={self._channel!r} on {where} {self._state.value}>"

    def _l2_usable(self) -> bool:
        """L2 is tried only while the backplane is up: a down Redis costs no timeout."""
        backplane = self._backplane
        return backplane is not None and backplane.state is BackplaneState.CONNECTED

    def _l2_current(self) -> bool:
        """Whether L1's confirmations are fresh now (a value current only as of them may be
        served: see ``Loaded.confirmed_only``)."""
        return bool(self._core.store.is_fresh(-math.inf, self._clock()))

    def _log_position(self) -> tuple[bytes, str] | None:
        position = getattr(self._backplane, "log_position", None)
        return position() if position is not None else None


class ListenerCommon:
    """The listener reports both drivers handle alike."""

    __slots__ = ("_cache",)

    def __init__(self, cache: Any) -> None:
        self._cache = cache

    def on_state(self, state: BackplaneState, reason: str | None) -> None:
        if reason:
            self._cache._core.last_error = reason
            log.warning(
                "nearcache: backplane on %r is %s: %s", self._cache._channel, state.value, reason
            )
