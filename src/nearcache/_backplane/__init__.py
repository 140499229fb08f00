"""Backplanes: how encoded messages travel between the instances of one channel.

- ``redis``: Redis Pub/Sub with the replay log, for the threaded driver.
- ``aioredis``: the same for the asyncio driver.
- ``memory``: an in-process broker that passes the same conformance suite.

They implement the Protocols of ``nearcache._typing``; every decision they report on is
taken in ``nearcache._core``.
"""
