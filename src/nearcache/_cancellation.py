"""Waiting and stopping in asyncio without trusting a single cancel to arrive.

Before Python 3.12, ``asyncio.wait_for`` loses a cancellation that lands in the loop
iteration where what it waits on completes: it returns the result, and the cancelled task
runs on as if nothing had happened. redis-py wraps every socket write in ``wait_for`` (when a
``socket_timeout`` is set, as ours always is), so one ``task.cancel()`` cannot stop a task
that talks to Redis, and ``await task`` after it can wait forever. (``asyncio.timeout``
has the same defect before 3.11.3, the version Debian 12 ships.)

So the asyncio driver and backplane never depend on one cancel: every loop of their tasks
also checks a closing state, these helpers wait with :func:`asyncio.wait` (which never
swallows the caller's cancel), and :func:`stop_task` cancels again until the task is done
or its time is up, after which the caller closes the task's connections under it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

__all__ = ["STOP_GRACE", "Signal", "stop_task", "wait_event"]

log = logging.getLogger("nearcache")

#: Seconds a task gets to finish after being cancelled, before its connections are aborted.
#: A task that received its cancel stops within a loop iteration; this only bounds the rare
#: one whose cancel was lost and that now waits on the network.
STOP_GRACE = 0.5
#: Seconds between two cancels of a task that has not finished yet.
_RECANCEL = 0.02


class Signal:
    """Wakes every coroutine waiting for "something changed", and never loses a wake-up.

    The usual ``event.set(); event.clear()`` (or a waiter that clears a shared event before
    waiting) loses a wake-up: a waiter registers with the event only when its task first
    runs, which may be loop iterations after it checked its condition, and a set-then-clear
    in between is never seen; the waiter then sleeps until its timeout although its
    condition holds. (The Sentinel resolver did this: under CPU load, the second and third
    answers of a round landed while the waiter was re-registering after the first, and a
    start waited out its whole connect timeout with a majority already in hand.)

    Here a waiter takes a :meth:`ticket` *before* checking its condition and waits on it;
    :meth:`notify` sets the current ticket for good and issues a fresh one. A notify after
    the ticket was taken is therefore never missed, however late the wait begins.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        """The event the next :meth:`notify` sets; take it before checking the condition."""
        return self._event

    def notify(self) -> None:
        """Wake every holder of the current ticket (now or whenever it waits)."""
        event, self._event = self._event, asyncio.Event()
        event.set()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set (True) or ``timeout`` seconds passed (False).

    Unlike ``asyncio.wait_for(event.wait(), timeout)``, a cancel of the caller always
    propagates, and no task is left behind when this returns.
    """
    if event.is_set():
        return True
    if timeout <= 0:
        return False
    waiter = asyncio.ensure_future(event.wait())
    try:
        done, _ = await asyncio.wait((waiter,), timeout=timeout)
    finally:
        if not waiter.done():
            waiter.cancel()
            # A task blocked on an Event finishes one iteration after its cancel; wait for
            # that (asyncio.wait raises only for our own cancel, never for the waiter's).
            await asyncio.wait((waiter,))
    return bool(done)


async def stop_task(task: asyncio.Task[Any], timeout: float = STOP_GRACE) -> bool:
    """Cancel ``task`` until it is done, for at most ``timeout`` seconds; return whether it is.

    The cancel is repeated because one can be lost (see the module docstring); the task must
    also check its own closing state, since a task inside such a ``wait_for`` only sees the
    next cancel once it awaits something else.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        task.cancel()
        await asyncio.wait((task,), timeout=min(_RECANCEL, remaining))
    if not task.cancelled() and task.exception() is not None:
        log.error("nearcache: %s failed", task.get_name(), exc_info=task.exception())
    return True
