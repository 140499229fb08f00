"""Sentinel discovery: which node is the primary, asked of every Sentinel at once.

redis-py's ``Sentinel`` is not used: it retries each dead Sentinel with back-off (a dead
Sentinel listed first cost 3.7 s of discovery here, 1 ms without retries), trusts the first
answer it gets, and never moves a pooled connection after a switch. Instead each Sentinel
gets one persistent connection without retries and one worker; a *round* asks all of them
``SENTINEL MASTER <service>`` in parallel, and the answers go into a
:class:`~nearcache._core.topology.SentinelQuorum`, which decides. A Sentinel that is down
or slow costs nothing as long as a majority answers; a question still unanswered is not asked
again, so a black-holed Sentinel never piles up work.

``+switch-master`` on every Sentinel is watched too (:meth:`SentinelResolver.watch`): it is
the earliest sign of a failover, and lets a subscriber leave the old primary at once instead
of at its next heartbeat. It is only a hint; what counts is a majority's answers.

:class:`SentinelResolver` is the threaded flavour, :class:`AsyncSentinelResolver` the asyncio
one; the decisions are shared in ``nearcache._core.topology``.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from nearcache._cancellation import Signal, wait_event
from nearcache._config import Endpoint, RedisSettings
from nearcache._core.topology import (
    PrimaryClaim,
    SentinelQuorum,
    parse_sentinel_master,
    parse_switch_master,
)
from nearcache._exceptions import BackplaneUnavailableError, ConfigurationError
from nearcache._typing import Clock

__all__ = ["AsyncSentinelResolver", "SentinelResolver"]

SWITCH_CHANNEL = "+switch-master"
_WATCH_RETRY = 1.0  # seconds between attempts to re-watch a Sentinel that went away


def _sentinel_kwargs(settings: RedisSettings, endpoint: Endpoint) -> dict[str, Any]:
    kwargs = settings.sentinel_kwargs(endpoint)
    kwargs["retry"] = Retry(NoBackoff(), 0)  # a dead Sentinel must cost one attempt, not ten
    kwargs["health_check_interval"] = 0
    return kwargs


def _is_unknown_service(exc: redis.ResponseError) -> bool:
    return "no such master" in str(exc).lower()


def _unavailable(
    settings: RedisSettings, quorum: SentinelQuorum, errors: list[str | None]
) -> Exception:
    service = settings.service_name
    if quorum.unknown_service():
        return ConfigurationError(
            f"serviceName: the Sentinels do not know the service {service!r} "
            f"({settings.describe()})",
            option="serviceName",
        )
    answers = [
        f"{endpoint}: {error or answer}"
        for endpoint, error, answer in zip(
            settings.endpoints, errors, quorum.answers(), strict=True
        )
    ]
    return BackplaneUnavailableError(
        f"no majority of the {quorum.size} Sentinels names a primary for {service!r} "
        f"({'; '.join(answers)})"
    )


class SentinelResolver:
    """Asks the Sentinels of ``settings`` who the primary of its service is (threaded).

    Args:
        settings: parsed settings with ``serviceName``; the endpoints are the Sentinels.
        clock: monotonic seconds (question times are read from it).
    """

    def __init__(self, settings: RedisSettings, *, clock: Clock = time.monotonic) -> None:
        if not settings.sentinel:
            raise ValueError("settings without serviceName")
        self._settings = settings
        self._service = settings.service_name or ""
        self._clock = clock
        self._clients = [redis.Redis(**_sentinel_kwargs(settings, e)) for e in settings.endpoints]
        self.quorum = SentinelQuorum(len(self._clients))
        self.errors: list[str | None] = [None] * len(self._clients)
        self._asking = [False] * len(self._clients)
        self._again = [False] * len(self._clients)  # asked while busy: ask again after
        self._changed = threading.Condition()
        self._pool = ThreadPoolExecutor(
            max_workers=len(self._clients), thread_name_prefix="nearcache-sentinel"
        )
        self._closed = False
        self._watchers: list[threading.Thread] = []
        self._watch_sockets: list[Any] = []

    # -- questions ------------------------------------------------------------------------

    def ask(self) -> float:
        """Start a round: ask every Sentinel not still busy with an earlier question. Returns
        the round's time (answers to it are recorded as asked at or after it)."""
        asked_at = self._clock()
        with self._changed:
            if self._closed:
                return asked_at
            for index, busy in enumerate(self._asking):
                if busy:
                    # Its answer would predate this round: ask once more when it comes.
                    self._again[index] = True
                else:
                    self._asking[index] = True
                    self._pool.submit(self._question, index)
        return asked_at

    def _question(self, index: int) -> None:
        again = True
        while again:
            asked_at = self._clock()
            claim: PrimaryClaim | None = None
            error: str | None = None
            try:
                client = self._clients[index]
                reply = client.execute_command("SENTINEL", "MASTER", self._service)  # type: ignore[no-untyped-call]
                claim = parse_sentinel_master(reply)
            except redis.ResponseError as exc:
                if not _is_unknown_service(exc):
                    error = f"{type(exc).__name__}: {exc}"
            except (redis.RedisError, OSError, KeyError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
            with self._changed:
                self.errors[index] = error
                if error is None:
                    self.quorum.record(index, asked_at, claim)
                again = self._again[index] and not self._closed
                self._again[index] = False
                self._asking[index] = again
                self._changed.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate()`` (checked under the lock after every answer) or until
        no question is outstanding or ``timeout`` passed; return ``predicate()``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed or not any(self._asking):
                    return predicate()
                self._changed.wait(remaining)
            return True

    def primary(self, timeout: float | None = None) -> PrimaryClaim:
        """Ask every Sentinel and return the primary a majority names now.

        Raises :class:`~nearcache.ConfigurationError` if a majority does not know the
        service, :class:`~nearcache.BackplaneUnavailableError` if no majority agrees
        within ``timeout`` (default ``connectTimeout``).
        """
        since = self.ask()
        limit = self._settings.connect_timeout if timeout is None else timeout
        self.wait(lambda: self.quorum.primary(since) is not None, limit)
        with self._changed:
            claim = self.quorum.primary(since)
            if claim is None:
                raise _unavailable(self._settings, self.quorum, list(self.errors))
            return claim

    def confirm(self, claim: PrimaryClaim, after: float, timeout: float) -> bool:
        """Ask every Sentinel and wait until a majority asked at or after ``after`` still
        names ``claim``; False if not within ``timeout`` (or a majority names another)."""
        self.ask()

        def settled() -> bool:
            confirmed = self.quorum.confirmed(claim)
            return (confirmed is not None and confirmed >= after) or self.quorum.primary(
                after
            ) not in (None, claim)

        self.wait(settled, timeout)
        with self._changed:
            confirmed = self.quorum.confirmed(claim)
            return confirmed is not None and confirmed >= after

    def confirmed(self, claim: PrimaryClaim) -> float | None:
        """The latest time as of which a majority still named ``claim``."""
        with self._changed:
            return self.quorum.confirmed(claim)

    # -- the early signal -------------------------------------------------------------------

    def watch(self, on_switch: Callable[[Endpoint], None]) -> None:
        """Call ``on_switch(new primary)`` from a watcher thread whenever any Sentinel
        announces ``+switch-master`` for the service (one thread per Sentinel)."""
        for index, endpoint in enumerate(self._settings.endpoints):
            thread = threading.Thread(
                target=self._watch,
                args=(index, endpoint, on_switch),
                name=f"nearcache-sentinel-watch:{endpoint}",
                daemon=True,
            )
            self._watchers.append(thread)
            thread.start()

    def _watch(self, index: int, endpoint: Endpoint, on_switch: Callable[[Endpoint], None]) -> None:
        while not self._closed:
            client = redis.Redis(**_sentinel_kwargs(self._settings, endpoint))
            pubsub: Any = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(SWITCH_CHANNEL)
                with self._changed:
                    self._watch_sockets.append(pubsub)
                    if self._closed:
                        break
                while not self._closed:
                    message = pubsub.get_message(timeout=1.0)  # closing is checked between
                    if message is None or message.get("type") != "message":
                        continue
                    switch = parse_switch_master(message["data"])
                    if switch is not None and switch[0] == self._service:
                        # Record nothing: only a majority's answers count. Ask again now.
                        self.ask()
                        on_switch(switch[2])
            except (redis.RedisError, OSError, ValueError):
                pass
            finally:
                with self._changed:
                    if pubsub in self._watch_sockets:
                        self._watch_sockets.remove(pubsub)
                with contextlib.suppress(Exception):
                    pubsub.close()
                client.close()
            with self._changed:
                if not self._closed:
                    self._changed.wait(_WATCH_RETRY)

    @property
    def watching(self) -> int:
        """How many Sentinels' ``+switch-master`` this resolver is subscribed to now."""
        with self._changed:
            return len(self._watch_sockets)

    def close(self) -> None:
        """Stop asking and watching; close every connection."""
        with self._changed:
            self._closed = True
            watching = list(self._watch_sockets)
            self._changed.notify_all()
        for pubsub in watching:
            sock = getattr(getattr(pubsub, "connection", None), "_sock", None)
            if isinstance(sock, socket.socket):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self._watchers:
            if thread is not threading.current_thread():
                thread.join(timeout=5.0)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for client in self._clients:
            client.close()


class AsyncSentinelResolver:
    """The asyncio flavour of :class:`SentinelResolver` (same methods, awaited)."""

    def __init__(self, settings: RedisSettings, *, clock: Clock = time.monotonic) -> None:
        if not settings.sentinel:
            raise ValueError("settings without serviceName")
        self._settings = settings
        self._service = settings.service_name or ""
        self._clock = clock
        self._clients = [
            redis.asyncio.Redis(**_sentinel_kwargs(settings, e)) for e in settings.endpoints
        ]
        self.quorum = SentinelQuorum(len(self._clients))
        self.errors: list[str | None] = [None] * len(self._clients)
        self._asking: list[asyncio.Task[None] | None] = [None] * len(self._clients)
        self._again = [False] * len(self._clients)
        self._answered = Signal()  # an answer (or error) was recorded
        self._closed = False
        self._watchers: list[asyncio.Task[None]] = []
        self._watching = 0  # watch tasks subscribed now

    def ask(self) -> float:
        """Start a round (see :meth:`SentinelResolver.ask`); needs a running loop."""
        asked_at = self._clock()
        if self._closed:
            return asked_at
        for index, task in enumerate(self._asking):
            if task is None or task.done():
                self._asking[index] = asyncio.get_running_loop().create_task(
                    self._question(index), name=f"nearcache-sentinel:{index}"
                )
            else:
                self._again[index] = True  # its answer would predate this round
        return asked_at

    async def _question(self, index: int) -> None:
        while True:
            await self._ask_one(index)
            if not self._again[index] or self._closed:
                return
            self._again[index] = False

    async def _ask_one(self, index: int) -> None:
        asked_at = self._clock()
        claim: PrimaryClaim | None = None
        error: str | None = None
        try:
            client = self._clients[index]
            reply = await client.execute_command("SENTINEL", "MASTER", self._service)  # type: ignore[no-untyped-call]
            claim = parse_sentinel_master(reply)
        except redis.ResponseError as exc:
            if not _is_unknown_service(exc):
                error = f"{type(exc).__name__}: {exc}"
        except (redis.RedisError, OSError, KeyError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self._answered_by(index, asked_at, claim, error)

    def _answered_by(
        self, index: int, asked_at: float, claim: PrimaryClaim | None, error: str | None
    ) -> None:
        """Record Sentinel ``index``'s answer (or error) and wake every :meth:`wait`."""
        self.errors[index] = error
        if error is None:
            self.quorum.record(index, asked_at, claim)
        self._answered.notify()

    async def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """See :meth:`SentinelResolver.wait`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            answered = self._answered.ticket()  # before the check: no answer goes unseen
            if predicate():
                return True
            remaining = deadline - loop.time()
            outstanding = any(task is not None and not task.done() for task in self._asking)
            if remaining <= 0 or self._closed or not outstanding:
                return predicate()
            await wait_event(answered, remaining)

    async def primary(self, timeout: float | None = None) -> PrimaryClaim:
        """See :meth:`SentinelResolver.primary`."""
        since = self.ask()
        limit = self._settings.connect_timeout if timeout is None else timeout
        await self.wait(lambda: self.quorum.primary(since) is not None, limit)
        claim = self.quorum.primary(since)
        if claim is None:
            raise _unavailable(self._settings, self.quorum, list(self.errors))
        return claim

    async def confirm(self, claim: PrimaryClaim, after: float, timeout: float) -> bool:
        """See :meth:`SentinelResolver.confirm`."""
        self.ask()

        def settled() -> bool:
            confirmed = self.quorum.confirmed(claim)
            return (confirmed is not None and confirmed >= after) or self.quorum.primary(
                after
            ) not in (None, claim)

        await self.wait(settled, timeout)
        confirmed = self.quorum.confirmed(claim)
        return confirmed is not None and confirmed >= after

    def confirmed(self, claim: PrimaryClaim) -> float | None:
        """See :meth:`SentinelResolver.confirmed`."""
        return self.quorum.confirmed(claim)

    def watch(self, on_switch: Callable[[Endpoint], None]) -> None:
        """See :meth:`SentinelResolver.watch` (one task per Sentinel)."""
        loop = asyncio.get_running_loop()
        for endpoint in self._settings.endpoints:
            self._watchers.append(
                loop.create_task(
                    self._watch(endpoint, on_switch), name=f"nearcache-watch:{endpoint}"
                )
            )

    async def _watch(self, endpoint: Endpoint, on_switch: Callable[[Endpoint], None]) -> None:
        while not self._closed:
            client = redis.asyncio.Redis(**_sentinel_kwargs(self._settings, endpoint))
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            subscribed = False
            try:
                await pubsub.subscribe(SWITCH_CHANNEL)
                subscribed = True
                self._watching += 1
                while not self._closed:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None or message.get("type") != "message":
                        continue
                    switch = parse_switch_master(message["data"])
                    if switch is not None and switch[0] == self._service:
                        self.ask()
                        on_switch(switch[2])
            except (redis.RedisError, OSError, ValueError):
                pass
            finally:
                if subscribed:
                    self._watching -= 1
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await client.aclose()
            if not self._closed:
                await asyncio.sleep(_WATCH_RETRY)  # back-off before re-watching, not a sync

    @property
    def watching(self) -> int:
        """See :attr:`SentinelResolver.watching`."""
        return self._watching

    async def aclose(self) -> None:
        """Stop asking and watching; close every connection."""
        self._closed = True
        tasks = [t for t in (*self._asking, *self._watchers) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for client in self._clients:
            with contextlib.suppress(Exception):
                await client.aclose()
