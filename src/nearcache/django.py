"""Django integration: a ``CACHES`` backend and model invalidation (``pip install
'nearcache[django]'``; see docs/django.md).

::

    CACHES = {
        "default": {
            "BACKEND": "nearcache.django.NearCacheBackend",
            "LOCATION": "redis://127.0.0.1:6379/0",    # or a StackExchange.Redis string
            "TIMEOUT": 300,
            "OPTIONS": {"channel": "shop", "max_staleness": 2.0, "max_entries": 100_000},
        }
    }

``OPTIONS`` are the keyword arguments of :class:`~nearcache.NearCache` (all but
``connection``, ``backplane``, ``clock``, and ``ttl`` / ``sliding``: the alias's ``TIMEOUT``
is the time to live), checked by name and type. Every alias with the same ``LOCATION`` and
``OPTIONS`` shares one :class:`~nearcache.NearCache` per process, whatever thread Django
creates its backend instances on; ``close()``, which Django calls after every request, leaves
it open (it is closed at interpreter exit, or by :func:`close_caches`).

Values are pickled on ``set`` and unpickled on every ``get``, as Django's local-memory
backend does, so that no caller ever shares a mutable object with the cache (the cache
middleware stores response objects). ``None``, ``bool``, ``int``, ``float``, ``str`` and
``bytes`` values are immutable and stored as they are.

With ``OPTIONS["l2"] = True`` (a shared Redis L2) or ``OPTIONS["propagate"] = "update"``,
those pickled bytes are what L2 and update messages carry, so ``OPTIONS["secret"]`` is then
required: every L2 record and message is HMAC-verified before anything in it is unpickled,
and whoever can write to Redis cannot make the application run code. ``get`` (and every
operation that looks a key up) then reads L2 on an L1 miss, without taking a lease.
"""

from __future__ import annotations

import atexit
import inspect
import math
import os
import pickle
import struct
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

try:
    from django.core.cache import caches
    from django.core.cache.backends.base import DEFAULT_TIMEOUT, BaseCache
    from django.core.exceptions import ImproperlyConfigured
    from django.db import transaction
    from django.db.models.signals import post_delete, post_save
except ImportError as exc:  # pragma: no cover - exercised by test_extras_missing
    raise ImportError("nearcache.django needs Django: pip install 'nearcache[django]'") from exc

from nearcache._config import parse_connection_string
from nearcache._core.sharing import Absent, lookup
from nearcache._core.store import MISSING
from nearcache._drivers.sync import CacheState, NearCache
from nearcache._exceptions import BackplaneUnavailableError, ConfigurationError, SerializationError

__all__ = ["NearCacheBackend", "close_caches", "evict_on_change", "model_key"]

# NearCache arguments that OPTIONS cannot set, and why.
_NOT_OPTIONS = {
    "connection": "it is the alias's LOCATION",
    "ttl": "the alias's TIMEOUT is the time to live",
    "sliding": "Django caches have no sliding expiration",
    "backplane": "it is not a setting",
    "clock": "it is not a setting",
    "serializer": "with l2 or propagate='update' the backend shares its own pickled values, "
    "signed with OPTIONS['secret']",
}
# The remaining keyword arguments of NearCache, read from its signature, so that options
# added to NearCache later (the L2's among them) pass through with no change here.
_OPTIONS = frozenset(
    name
    for name, param in inspect.signature(NearCache).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in _NOT_OPTIONS
)
_HINTS = {
    "MAX_ENTRIES": "max_entries",
    "CULL_FREQUENCY": None,
    "CHANNEL": "channel",
    "MAX_STALENESS": "max_staleness",
    "SECRET": "secret",
}
_IMMUTABLE = frozenset({type(None), bool, int, float, str, bytes})


class _Stored:
    """What the backend keeps in L1: the value (pickled unless immutable) and when it expires
    (monotonic seconds, for ``incr`` to keep the remaining time)."""

    __slots__ = ("data", "expires", "pickled")

    def __init__(self, value: object, expires: float | None) -> None:
        if type(value) in _IMMUTABLE:
            self.data, self.pickled = value, False
        else:
            self.data, self.pickled = pickle.dumps(value, pickle.HIGHEST_PROTOCOL), True
        self.expires = expires

    @classmethod
    def shared(cls, data: bytes, expires: float | None) -> _Stored:
        """A value another process shared (through L2 or an update message): its pickle,
        already verified with the secret, is loaded only when read."""
        stored = cls.__new__(cls)
        stored.data, stored.pickled, stored.expires = data, True, expires
        return stored

    def value(self) -> Any:
        if self.pickled:
            # Pickled by _Stored here, or by another process and HMAC-verified on arrival.
            return pickle.loads(cast(bytes, self.data))  # noqa: S301
        return self.data


_NEVER = math.nan  # the wire's "no expiry"
_EXPIRY = struct.Struct(">d")


class _SharedValues:
    """The serializer of a backend with the L2 or update messages: a :class:`_Stored` travels
    as its pickle (made once, on ``set``) and its expiry as wall-clock time (each process
    turns it back into its own monotonic clock); anything else put into the NearCache
    directly is pickled. Every record and message is HMAC-verified before :meth:`loads`
    sees it (``needs_signing``: the cache refuses to start without ``secret``)."""

    id = 3
    needs_signing = True

    def dumps(self, value: object) -> bytes:
        if type(value) is _Stored:
            expires = _NEVER
            if value.expires is not None:
                expires = time.time() + (value.expires - time.monotonic())
            data = (
                value.data if value.pickled else pickle.dumps(value.data, pickle.HIGHEST_PROTOCOL)
            )
            return b"S" + _EXPIRY.pack(expires) + cast(bytes, data)
        try:
            return b"P" + pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # pickling user objects can raise anything
            raise SerializationError(f"cannot pickle a {type(value).__qualname__}: {exc}") from None

    def loads(self, data: bytes) -> object:
        tag = data[:1]
        if tag == b"S":
            (expires,) = _EXPIRY.unpack_from(data, 1)
            if math.isnan(expires):
                return _Stored.shared(data[9:], None)
            return _Stored.shared(data[9:], time.monotonic() + (expires - time.time()))
        if tag == b"P":
            return pickle.loads(data[1:])  # noqa: S301 - only ever HMAC-verified bytes
        raise ValueError(f"not a value of the Django backend (tag {tag!r})")

    def __repr__(self) -> str:
        return "nearcache.django values (pickled, signed)"


_SHARED_VALUES = _SharedValues()


def _shares(options: dict[str, Any]) -> bool:
    """Whether these OPTIONS share values between processes (L2, update messages)."""
    return bool(options.get("l2")) or options.get("propagate") == "update"


class _Shared:
    """One NearCache shared by every backend instance of a LOCATION + OPTIONS in a process,
    with the lock that makes ``add``, ``incr`` and ``touch`` atomic among them."""

    __slots__ = ("cache", "lock")

    def __init__(self, cache: NearCache) -> None:
        self.cache = cache
        self.lock = threading.RLock()


class _Registry:
    """The process's shared caches, by LOCATION and OPTIONS."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], _Shared] = {}
        self.lock = threading.Lock()
        self.atexit_registered = False


_registry = _Registry()


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork() stays held forever in the child.
    _registry.lock = threading.Lock()
    for shared in _registry.entries.values():
        shared.lock = threading.RLock()


if hasattr(os, "register_at_fork"):  # pragma: no branch - every POSIX Python has it
    os.register_at_fork(after_in_child=_after_fork_in_child)


def close_caches(timeout: float = 1.0) -> None:
    """Close every NearCache that Django backends opened in this process, delivering what
    is queued (at most ``timeout`` seconds each). Runs by itself at interpreter exit."""
    with _registry.lock:
        shared = list(_registry.entries.values())
        _registry.entries.clear()
    for entry in shared:
        entry.cache.close(timeout=timeout)


def _describe(location: str) -> str:
    """LOCATION without its password."""
    try:
        return parse_connection_string(location).describe()
    except (ConfigurationError, ValueError, TypeError):
        return "LOCATION"


def _check_options(options: object) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise ImproperlyConfigured(
            f"nearcache: OPTIONS must be a dict, not {type(options).__name__}"
        )
    for name, value in options.items():
        if name not in _OPTIONS:
            if name in _NOT_OPTIONS:
                why = _NOT_OPTIONS[name]
                raise ImproperlyConfigured(f"nearcache: OPTIONS[{name!r}] is not allowed: {why}")
            hint = _HINTS.get(name, "")
            if name in _HINTS:
                hint = (
                    f" (did you mean {hint!r}?)"
                    if hint
                    else " (nearcache evicts by CLOCK, one entry at a time: no culling)"
                )
            raise ImproperlyConfigured(
                f"nearcache: unknown option OPTIONS[{name!r}]{hint}; "
                f"the options are {', '.join(sorted(_OPTIONS))}"
            )
        if name == "channel" and (not isinstance(value, str) or not value):
            raise ImproperlyConfigured(
                f"nearcache: OPTIONS['channel'] must be a non-empty str, not {value!r}"
            )
        if ((name == "l2" and value) or (name == "propagate" and value == "update")) and not (
            options.get("secret")
        ):
            raise ImproperlyConfigured(
                f"nearcache: OPTIONS[{name!r}] = {value!r} needs OPTIONS['secret']: Django "
                "values are shared as pickles, which are loaded only when signed with it"
            )
        if name == "abort_connect" and value is not None and not isinstance(value, bool):
            raise ImproperlyConfigured(
                f"nearcache: OPTIONS['abort_connect'] must be True, False or None, not {value!r}"
            )
    return options


def _open(location: str, options: dict[str, Any]) -> NearCache:
    if _shares(options):
        options = {**options, "serializer": _SHARED_VALUES}
    try:
        return NearCache(location or None, **options)
    except BackplaneUnavailableError as exc:
        raise ImproperlyConfigured(
            f"nearcache: Redis at LOCATION {_describe(location)} is unreachable and "
            f"abortConnect is true (set OPTIONS['abort_connect'] = False, or abortConnect=false "
            f"in LOCATION, to start without it): {exc}"
        ) from exc
    except ConfigurationError as exc:
        option = {"secrets": "secret"}.get(exc.option or "", exc.option)
        if option in options:
            raise ImproperlyConfigured(f"nearcache: OPTIONS[{option!r}]: {exc}") from exc
        raise ImproperlyConfigured(f"nearcache: LOCATION: {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise ImproperlyConfigured(
            f"nearcache: OPTIONS {sorted(options)} or LOCATION rejected: {exc}"
        ) from exc


def _shared_cache(location: object, options: object) -> _Shared:
    if isinstance(location, list | tuple):
        if len(location) != 1:
            raise ImproperlyConfigured(
                "nearcache: LOCATION is one connection string (Sentinel and replicas are "
                "written inside it), not a list of servers"
            )
        location = location[0]
    if location is None:
        location = ""
    if not isinstance(location, str):
        raise ImproperlyConfigured(
            f"nearcache: LOCATION must be a connection string, not {type(location).__name__}"
        )
    checked = _check_options(options)
    ident = (location, repr(sorted(checked.items())))
    with _registry.lock:
        shared = _registry.entries.get(ident)
        if shared is None or shared.cache.state is not CacheState.OPEN:
            shared = _registry.entries[ident] = _Shared(_open(location, checked))
            if not _registry.atexit_registered:
                atexit.register(close_caches)
                _registry.atexit_registered = True
        return shared


class NearCacheBackend(BaseCache):  # type: ignore[misc]  # Django is untyped
    """A Django cache backend over one :class:`~nearcache.NearCache` per process.

    Every operation applies ``KEY_PREFIX``, ``VERSION`` and ``KEY_FUNCTION`` at call time and
    warns with ``CacheKeyWarning`` about keys memcached would refuse, as Django's own
    backends do. ``set``, ``delete``, ``delete_many``, ``set_many``, ``clear``, ``incr``,
    ``decr`` and a timeout of 0 or less make every other process drop its copy within the
    staleness bound; ``touch`` and expiry are local to this process.
    """

    def __init__(self, server: object, params: dict[str, Any]) -> None:
        super().__init__(params)
        self._shared = _shared_cache(server, params.get("OPTIONS", {}))
        self._cache = self._shared.cache
        # With the L2, a key missing here is looked up there too (no lease, no factory).
        self._looks_further = bool(params.get("OPTIONS", {}).get("l2"))

    @property
    def nearcache(self) -> NearCache:
        """The process's NearCache behind this alias (for ``cached``, regions, ``stats()``)."""
        return self._cache

    # -- helpers ---------------------------------------------------------------------------

    def _seconds(self, timeout: Any) -> float | None:
        """The time to live in seconds (``None``: no limit but ``max_age``; <= 0: delete)."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        return None if timeout is None else float(timeout)

    @staticmethod
    def _expires(seconds: float | None) -> float | None:
        return None if seconds is None else time.monotonic() + seconds

    def _held(self, key: str) -> _Stored | None:
        stored = self._cache.get(key, MISSING)
        if stored is MISSING and self._looks_further:
            try:  # L2: a value found there is cached here as a load is
                stored = self._cache.get_or_set(key, lookup)
            except Absent:
                return None
        # Anything else under the key was put there through the NearCache directly.
        return stored if type(stored) is _Stored else None

    # -- the BaseCache API ---------------------------------------------------------------

    def add(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        key = self.make_and_validate_key(key, version=version)
        seconds = self._seconds(timeout)
        stored = _Stored(value, self._expires(seconds))  # a pickling error raises here
        with self._shared.lock:
            if self._held(key) is not None:
                return False
            if seconds is not None and seconds <= 0:
                return True  # added and expired at once, as in Django's other backends
            self._cache.set(key, stored, ttl=seconds)
            return True

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        stored = self._cache.get(key, MISSING)
        if type(stored) is not _Stored:
            stored = self._held(key) if stored is MISSING else None
            if stored is None:
                return default
        return stored.value()

    def set(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> None:
        key = self.make_and_validate_key(key, version=version)
        seconds = self._seconds(timeout)
        stored = _Stored(value, self._expires(seconds))
        if seconds is not None and seconds <= 0:
            self._cache.remove(key)
        else:
            self._cache.set(key, stored, ttl=seconds)

    def touch(self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        seconds = self._seconds(timeout)
        with self._shared.lock:
            stored = self._held(key)
            if stored is None:
                return False
            if seconds is not None and seconds <= 0:
                self._cache.remove(key)
                return True
            # In place: re-setting the value could bring back one that another process
            # invalidated meanwhile, and would make it look fresher than it is.
            if not self._cache.touch(key, ttl=seconds):
                return False
            stored.expires = self._expires(seconds)
            return True

    def delete(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        held = self._held(key) is not None
        self._cache.remove(key)
        return held

    def clear(self) -> None:
        self._cache.clear()

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        key = self.make_and_validate_key(key, version=version)
        with self._shared.lock:
            stored = self._held(key)
            remaining = None
            if stored is not None and stored.expires is not None:
                remaining = stored.expires - time.monotonic()
            if stored is None or (remaining is not None and remaining <= 0):
                raise ValueError(f"Key '{key}' not found")
            value = stored.value() + delta
            self._cache.set(key, _Stored(value, stored.expires), ttl=remaining)
            return value

    def has_key(self, key: Any, version: int | None = None) -> bool:
        key = self.make_and_validate_key(key, version=version)
        return self._held(key) is not None

    def get_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        found = {}
        for key in keys:
            stored = self._held(self.make_and_validate_key(key, version=version))
            if stored is not None:
                found[key] = stored.value()
        return found

    def set_many(
        self,
        data: dict[Any, Any],
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> list[Any]:
        seconds = self._seconds(timeout)
        expires = self._expires(seconds)
        # Every value is pickled before anything is written: one failure writes nothing.
        entries = [
            (self.make_and_validate_key(key, version=version), _Stored(value, expires))
            for key, value in data.items()
        ]
        if seconds is not None and seconds <= 0:
            self._cache.remove_many(key for key, _ in entries)
        else:
            for key, stored in entries:
                self._cache.set(key, stored, ttl=seconds)
        return []

    def delete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        self._cache.remove_many([self.make_and_validate_key(key, version=version) for key in keys])

    def get_or_set(
        self,
        key: Any,
        default: Any,
        timeout: Any = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> Any:
        """Return the cached value, or ``default`` (called if callable) after caching it.

        Through :meth:`NearCache.get_or_set <nearcache.NearCache.get_or_set>`: concurrent
        callers in this process wait for one call of ``default``, and its result is not
        cached if the key was invalidated while it ran (it may predate that write).
        """
        made = self.make_and_validate_key(key, version=version)
        stored = self._held(made)
        if stored is not None:
            return stored.value()
        seconds = self._seconds(timeout)
        if seconds is not None and seconds <= 0:
            return default() if callable(default) else default

        def load() -> _Stored:
            value = default() if callable(default) else default
            return _Stored(value, self._expires(seconds))

        stored = self._cache.get_or_set(made, load, ttl=seconds)
        # Something else under the key was put there through the NearCache directly.
        return stored.value() if type(stored) is _Stored else stored

    def close(self, **kwargs: Any) -> None:
        """Nothing to do: Django calls this after every request, and the NearCache is shared
        by the whole process (see :func:`close_caches`)."""

    # -- async: every operation is in memory and never waits on the network ----------------

    async def aadd(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        return self.add(key, value, timeout, version)

    async def aget(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        return self.get(key, default, version)

    async def aset(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> None:
        self.set(key, value, timeout, version)

    async def atouch(
        self, key: Any, timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> bool:
        return self.touch(key, timeout, version)

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        return self.delete(key, version)

    async def aget_many(self, keys: Iterable[Any], version: int | None = None) -> dict[Any, Any]:
        return self.get_many(keys, version)

    async def ahas_key(self, key: Any, version: int | None = None) -> bool:
        return self.has_key(key, version)

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return self.incr(key, delta, version)

    async def aset_many(
        self, data: dict[Any, Any], timeout: Any = DEFAULT_TIMEOUT, version: int | None = None
    ) -> list[Any]:
        return self.set_many(data, timeout, version)

    async def adelete_many(self, keys: Iterable[Any], version: int | None = None) -> None:
        self.delete_many(keys, version)

    async def aclear(self) -> None:
        self.clear()

    async def aclose(self, **kwargs: Any) -> None:
        """Nothing to do (see :meth:`close`)."""


# -- model invalidation ---------------------------------------------------------------------


def model_key(model: Any, pk: Any = None) -> str:
    """The conventional cache key of one model instance: ``"<app_label>.<model_name>:<pk>"``.

    ``model_key(product)`` or ``model_key(Product, 42)``; :func:`evict_on_change` evicts
    it by default.
    """
    meta = model._meta
    if pk is None:
        pk = model.pk
    return f"{meta.app_label}.{meta.model_name}:{pk}"


def evict_on_change(
    model: Any,
    *,
    keys: Callable[[Any], Iterable[Any]] | None = None,
    regions: Iterable[str] = (),
    alias: str = "default",
) -> Callable[[], None]:
    """Evict a model's cached entries on every process whenever an instance is saved or
    deleted; return a function that disconnects the handlers.

    Args:
        model: the model class (signals of subclasses and proxies are not included).
        keys: ``keys(instance)`` gives the cache keys to delete, as passed to
            ``cache.set`` (``KEY_PREFIX`` and ``VERSION`` are applied); default:
            ``[model_key(instance)]``.
        regions: NearCache regions to clear on any change of the model, e.g. the regions of
            ``@cache.nearcache.cached(region=...)`` functions that read it.
        alias: the ``CACHES`` alias (a :class:`NearCacheBackend`).

    The entries are evicted at once (``post_save`` / ``post_delete``) and, when the change
    is inside a transaction, once more when it commits: another process that reads the row
    between the two loads the old row and may cache it, and the second eviction drops it.

    Example::

        evict_on_change(Product)                       # in AppConfig.ready()
        cache.get_or_set(model_key(Product, 42), lambda: Product.objects.get(pk=42))
    """
    key_fn = keys if keys is not None else (lambda instance: [model_key(instance)])
    region_list = list(regions)

    def evict(instance: Any) -> None:
        backend = caches[alias]
        if not isinstance(backend, NearCacheBackend):
            raise ImproperlyConfigured(
                f"evict_on_change: CACHES[{alias!r}] is not a nearcache.django.NearCacheBackend"
            )
        backend.delete_many(list(key_fn(instance)))
        for region in region_list:
            backend.nearcache.clear_region(region)

    def changed(sender: Any, instance: Any, using: str, **kwargs: Any) -> None:
        evict(instance)
        if transaction.get_connection(using).in_atomic_block:
            transaction.on_commit(lambda: evict(instance), using=using)

    post_save.connect(changed, sender=model, weak=False)
    post_delete.connect(changed, sender=model, weak=False)

    def disconnect() -> None:
        post_save.disconnect(changed, sender=model)
        post_delete.disconnect(changed, sender=model)

    return disconnect
