"""Every error nearcache raises, under one root.

```
NearCacheError
├── ConfigurationError        bad connection string, option or argument
├── CacheClosedError          the cache was closed; it refuses further use
├── BackplaneError            the backplane could not do what was asked
│   ├── BackplaneUnavailableError   Redis unreachable (abortConnect=True at start)
│   ├── FlushTimeoutError           flush() ran out of time before Redis acknowledged
│   └── PublishRefusedError         Redis answers every publish with an error (an ACL
│                                   without the commands, out of memory, a script refused)
├── MessageError              a backplane message could not be decoded (counted, never raised
│                             out of a listener)
└── SerializationError        a value could not be serialized for L2 or an update message

ConfigurationWarning (UserWarning): an option was accepted but has no effect here.
```

Errors carry context (the key, the region, the channel, the offending option) and never a
password.
"""

from __future__ import annotations

__all__ = [
    "BackplaneError",
    "BackplaneUnavailableError",
    "CacheClosedError",
    "ConfigurationError",
    "ConfigurationWarning",
    "FlushTimeoutError",
    "MessageError",
    "NearCacheError",
    "PublishRefusedError",
    "SerializationError",
]


class NearCacheError(Exception):
    """Root of every error raised by nearcache."""


class ConfigurationError(NearCacheError, ValueError):
    """A connection string, option or argument is invalid.

    ``option`` names the offending setting when there is one. The message never contains a
    password.
    """

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


class CacheClosedError(NearCacheError, RuntimeError):
    """The cache was closed and refuses further use."""


class BackplaneError(NearCacheError):
    """The backplane could not do what was asked."""


class BackplaneUnavailableError(BackplaneError, ConnectionError):
    """Redis could not be reached (raised at start when ``abortConnect=True``)."""


class FlushTimeoutError(BackplaneError, TimeoutError):
    """``flush()`` ran out of time before Redis acknowledged every queued invalidation.

    ``pending`` is the number of invalidations still queued (they are kept and will be
    delivered when Redis is reachable).
    """

    def __init__(self, message: str, *, pending: int) -> None:
        super().__init__(message)
        self.pending = pending


class PublishRefusedError(BackplaneError):
    """Redis answered a publish with an error reply (``NOPERM``, ``OOM``, a script error):
    retrying will not help until an operator acts.

    ``flush()`` raises it as soon as the latest publish attempt was refused, instead of
    waiting for its timeout; ``reply`` is Redis's error text and ``pending`` the number of
    invalidations still queued (they are kept, retried, and delivered once Redis accepts
    them). Raised at start with ``abortConnect=True`` when the Redis user lacks a command the
    publish script needs (checked with ACL rules where Redis can, 7.0 and later).
    """

    def __init__(self, message: str, *, reply: str, pending: int = 0) -> None:
        super().__init__(message)
        self.reply = reply
        self.pending = pending


class MessageError(NearCacheError, ValueError):
    """A backplane message could not be decoded."""


class SerializationError(NearCacheError, ValueError):
    """A value could not be serialized (for the L2 or an update message) or deserialized.

    Raised by the serializers; ``set`` raises it after dropping the key everywhere (the value
    is not cached). Bytes that fail to load are never raised to a reader: they are counted
    and treated as a miss.
    """


class ConfigurationWarning(UserWarning):
    """A connection-string option was accepted but has no effect in nearcache."""
