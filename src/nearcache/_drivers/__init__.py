"""The two drivers over one ``nearcache._core.cache.CacheCore``, with the same method names.

- ``sync``: :class:`~nearcache.NearCache`, with a lock and a sender thread.
- ``aio``: :class:`~nearcache.AsyncNearCache`, with tasks on one event loop.
"""
