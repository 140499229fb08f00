"""The I/O-free decisions of a cache, shared by both drivers and every backplane.

Nothing here imports ``redis``, ``asyncio`` or ``threading``; the clock is injected.

- ``store``: the L1 store (entries, expiry, size bound, reservations, the staleness rule),
  with ``_speedups.c``, its optional C hit path.
- ``codec``: the backplane message format.
- ``outbox``: invalidations accepted here and not yet acknowledged by Redis.
- ``cache``: ``CacheCore``, which ties them together (sending and receiving bookkeeping).
- ``heartbeat``: what a pong on the subscriber connection proves.
- ``log``: the replay log's cursor and its scripts.
"""
