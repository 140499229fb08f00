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

__all__ = ["STOP_GRACE", "stop_task", "wait_event"]

log = logging.getLogger("nearcache")

#: Seconds a task gets to finish after being cancelled, before its connections are aborted.
#: A task that received its cancel stops within a loop iteration; this only bounds the rare
#: one whose cancel was lost and that now waits on the network.
STOP_GRACE = 0.5
#: Seconds between two cancels of a task that has not finished yet.
_RECANCEL = 0.02


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
