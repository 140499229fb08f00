"""nearcache's benchmark harness (issue #5): ``python -m benchmarks [--quick] [--only ...]``.

Every comparison runs in one process tree on one machine, against peers measured in the same
run, so that the ratios mean something on a noisy shared host. Sections:

- ``hit``: L1 hit / miss / set cost in ns per operation against ``dict`` and the single-process
  caches (cachetools, cachebox, theine), sync and asyncio drivers.
- ``propagation``: one-way invalidation latency between processes against raw redis-py
  Pub/Sub.
- ``throughput``: invalidations per second delivered to four subscriber processes.
- ``workload``: four app processes, Zipf reads over SQLite, against Redis-only caching,
  redis-py client-side caching and an unsynchronized local cache.
- ``memory``: bytes per cached entry beyond the value (tracemalloc).

Nothing here is a test: speed targets are reported, never asserted.
"""
