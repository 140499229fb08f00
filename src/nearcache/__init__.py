"""nearcache: in-process caches kept consistent across instances over Redis Pub/Sub.

Start with :class:`NearCache` (threads: Django, Flask) or :class:`AsyncNearCache` (asyncio:
FastAPI, Starlette). Nothing runs at import: no connection, no thread.
"""

from nearcache._backplane.memory import AsyncMemoryBackplane, MemoryBackplane, MemoryBroker
from nearcache._cached import AsyncCachedFunction, CachedFunction
from nearcache._config import Endpoint, RedisSettings, parse_connection_string
from nearcache._core.cache import CacheOptions, CacheStats
from nearcache._core.codec import Invalidation, Kind, Update
from nearcache._core.serializer import PickleSerializer, SafeSerializer
from nearcache._core.store import MISSING
from nearcache._drivers.aio import AsyncNearCache
from nearcache._drivers.sync import CacheState, NearCache
from nearcache._exceptions import (
    BackplaneError,
    BackplaneUnavailableError,
    CacheClosedError,
    ConfigurationError,
    ConfigurationWarning,
    FlushTimeoutError,
    MessageError,
    NearCacheError,
    PublishRefusedError,
    SerializationError,
)
from nearcache._typing import (
    AsyncBackplane,
    Backplane,
    BackplaneListener,
    BackplaneState,
    Serializer,
)

__version__ = "0.1.0"

__all__ = [
    "MISSING",
    "AsyncBackplane",
    "AsyncCachedFunction",
    "AsyncMemoryBackplane",
    "AsyncNearCache",
    "Backplane",
    "BackplaneError",
    "BackplaneListener",
    "BackplaneState",
    "BackplaneUnavailableError",
    "CacheClosedError",
    "CacheOptions",
    "CacheState",
    "CacheStats",
    "CachedFunction",
    "ConfigurationError",
    "ConfigurationWarning",
    "Endpoint",
    "FlushTimeoutError",
    "Invalidation",
    "Kind",
    "MemoryBackplane",
    "MemoryBroker",
    "MessageError",
    "NearCache",
    "NearCacheError",
    "PickleSerializer",
    "PublishRefusedError",
    "RedisSettings",
    "SafeSerializer",
    "SerializationError",
    "Serializer",
    "Update",
    "__version__",
    "parse_connection_string",
]
