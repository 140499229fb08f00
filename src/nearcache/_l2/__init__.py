"""The shared Redis L2's I/O: the threaded (``redis``) and the asyncio (``aioredis``) clients
that carry out the core's read-path steps and publish through the L2-aware script."""
