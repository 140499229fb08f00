"""``nearcache._cancellation.Signal``: a wake-up that lands between a waiter's check and the
moment its wait registers is never lost (the Sentinel resolver and ``flush()`` rely on it)."""

from __future__ import annotations

import asyncio

from nearcache._cancellation import Signal, wait_event


def test_a_notify_before_the_wait_begins_is_seen() -> None:
    """Ticket taken, condition checked, then two notifies run before the waiter's task first
    runs: the wait returns at once (``set(); clear()`` on one event would sleep here)."""

    async def main() -> bool:
        signal = Signal()
        loop = asyncio.get_running_loop()
        ticket = signal.ticket()
        # Queued ahead of the waiter task that wait_event starts: they run first.
        loop.call_soon(signal.notify)
        loop.call_soon(signal.notify)
        return await wait_event(ticket, 30.0)

    assert asyncio.run(asyncio.wait_for(main(), 10)) is True


def test_every_holder_of_a_ticket_wakes_and_later_tickets_wait_for_the_next_notify() -> None:
    async def main() -> None:
        signal = Signal()
        first, second = signal.ticket(), signal.ticket()
        assert first is second
        waiters = [asyncio.ensure_future(wait_event(t, 30.0)) for t in (first, second)]
        await asyncio.sleep(0)
        signal.notify()
        assert await asyncio.gather(*waiters) == [True, True]
        later = signal.ticket()
        assert later is not first and not later.is_set()
        assert await wait_event(later, 0.01) is False  # no notify since it was taken
        signal.notify()
        assert later.is_set()

    asyncio.run(asyncio.wait_for(main(), 10))
