"""The ``cached`` decorator of :class:`~nearcache.NearCache` and :class:`~nearcache.AsyncNearCache`.

A decorated function's result is cached under a key built from its arguments, in a region
(by default one per function), through ``get_or_set``: concurrent callers of one key wait
for one call (stampede protection), and a result whose computation overlapped an
invalidation of its key is returned but not cached.

Keys must name the same call in every process and every Python run, so they are built from
the arguments' *values*, never from ``hash()`` (randomized per process for ``str``) or
``id()``. The arguments are first bound to the signature (``f(1)``, ``f(x=1)`` and a default
give one key), then written out canonically:

- ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``decimal.Decimal``,
  ``fractions.Fraction``, ``uuid.UUID``, ``datetime.date`` / ``datetime`` / ``time`` /
  ``timedelta`` (ISO form, with the UTC offset when aware), and ``enum.Enum`` members (by
  class and member name);
- ``tuple``, ``list``, ``set``, ``frozenset`` and ``dict`` of the above, nested (sets and
  dicts in a sorted order, so their iteration order does not matter).

Anything else (a model instance, a request, ``self``) raises ``TypeError`` at call time,
naming the argument: pass ``key=`` to build the key yourself. Values of different types
never share a key (``1``, ``1.0``, ``True`` and ``"1"`` are four keys). Keys longer than
``MAX_READABLE_KEY`` characters are replaced by the function's name and a SHA-256 of the
canonical form.
"""

from __future__ import annotations

import datetime
import decimal
import enum
import fractions
import functools
import hashlib
import inspect
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, cast

from nearcache._core.cache import check_ttl

if TYPE_CHECKING:
    from nearcache._drivers.aio import AsyncNearCache
    from nearcache._drivers.sync import NearCache

__all__ = [
    "MAX_READABLE_KEY",
    "AsyncCached",
    "AsyncCachedFunction",
    "Cached",
    "CachedFunction",
    "RegionLoads",
    "call_key",
    "region_loads",
]

P = ParamSpec("P")
R = TypeVar("R")

MAX_READABLE_KEY = 500
_MAX_DEPTH = 32


class _Unkeyable(TypeError):
    def __init__(self, where: str, value: object) -> None:
        super().__init__(where)
        self.where = where
        self.type_name = type(value).__qualname__


def _write(value: object, out: list[str], where: str, depth: int) -> None:
    """Append the canonical form of ``value`` to ``out`` (raise _Unkeyable otherwise)."""
    if depth > _MAX_DEPTH:
        raise _Unkeyable(where, value)
    if value is None or isinstance(value, bool):
        out.append(repr(value))
    elif isinstance(value, enum.Enum):
        cls = type(value)
        out.append(f"{cls.__module__}.{cls.__qualname__}.{value.name}")
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, float):
        out.append(float.__repr__(value))
    elif isinstance(value, str):
        # ASCII only, by code point: repr() prints what the running Python's Unicode database
        # calls printable, which changes between versions (a key must not).
        escaped = value.encode("unicode_escape").decode("ascii").replace("'", "\\'")
        out.append(f"'{escaped}'")
    elif isinstance(value, bytes):
        out.append(bytes.__repr__(value))
    elif isinstance(value, decimal.Decimal | fractions.Fraction | datetime.timedelta):
        out.append(f"{type(value).__name__}({value})")
    elif isinstance(value, datetime.date | datetime.time):
        # datetime before date: a datetime is a date. isoformat keeps the UTC offset.
        out.append(f"{type(value).__name__}({value.isoformat()})")
    elif isinstance(value, uuid.UUID):
        out.append(f"UUID({value.hex})")
    elif isinstance(value, tuple | list):
        out.append("(" if isinstance(value, tuple) else "[")
        for i, item in enumerate(value):
            if i:
                out.append(", ")
            _write(item, out, f"{where}[{i}]", depth + 1)
        out.append(")" if isinstance(value, tuple) else "]")
    elif isinstance(value, set | frozenset):
        items = sorted(_form(item, f"{where} (an element)", depth + 1) for item in value)
        out.append("{" + ", ".join(items) + "}" if items else "set()")
    elif isinstance(value, dict):
        pairs = sorted(
            (_form(k, f"{where} (a key)", depth + 1), _form(v, f"{where}[{k!r}]", depth + 1))
            for k, v in value.items()
        )
        out.append("{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}")
    else:
        raise _Unkeyable(where, value)


def _form(value: object, where: str, depth: int) -> str:
    out: list[str] = []
    _write(value, out, where, depth)
    return "".join(out)


def call_key(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    signature: inspect.Signature | None = None,
) -> str:
    """The cache key of ``fn(*args, **kwargs)``: the same in every process and Python run.

    Raises ``TypeError`` naming the argument whose type cannot be part of a key, or the
    binding error of a call that does not match the signature.
    """
    name = f"{fn.__module__}.{fn.__qualname__}"
    bound = (signature or inspect.signature(fn)).bind(*args, **kwargs)
    bound.apply_defaults()
    out = [name, "("]
    for i, (param, value) in enumerate(bound.arguments.items()):
        if i:
            out.append(", ")
        out.append(f"{param}=")
        try:
            _write(value, out, repr(param), 0)
        except _Unkeyable as exc:
            raise TypeError(
                f"{name}(): cannot build a cache key from argument {exc.where} "
                f"(a {exc.type_name}): keys are built from None, bool, int, float, str, "
                "bytes, Decimal, Fraction, UUID, date/time, Enum members and tuples, lists, "
                "sets and dicts of them; pass key=... to the decorator to build it yourself"
            ) from None
    out.append(")")
    key = "".join(out)
    if len(key) > MAX_READABLE_KEY:
        return f"{name}#sha256:{hashlib.sha256(key.encode()).hexdigest()}"
    return key


@dataclass
class RegionLoads:
    """What the decorated functions of one region did, in one cache: ``calls``, and of those
    the ``loads`` that ran the function (``load_errors`` raised), taking ``load_seconds``."""

    calls: int = 0
    loads: int = 0
    load_errors: int = 0
    load_seconds: float = 0.0


_loads: weakref.WeakKeyDictionary[object, dict[str, RegionLoads]] = weakref.WeakKeyDictionary()
_loads_lock = threading.Lock()


def _region_counters(cache: object, region: str) -> RegionLoads:
    with _loads_lock:
        regions = _loads.get(cache)
        if regions is None:
            regions = _loads[cache] = {}
        counters = regions.get(region)
        if counters is None:
            counters = regions[region] = RegionLoads()
        return counters


def region_loads(cache: object) -> dict[str, RegionLoads]:
    """A copy of the load counters of every region that decorated functions of ``cache``
    used (the metrics exporters label them by region: a set bounded by the code)."""
    with _loads_lock:
        regions = _loads.get(cache, {})
        return {
            region: RegionLoads(c.calls, c.loads, c.load_errors, c.load_seconds)
            for region, c in regions.items()
        }


def _count(cache: object, region: str, *, load: bool, error: bool, seconds: float) -> None:
    counters = _region_counters(cache, region)
    with _loads_lock:
        counters.calls += 1
        if load:
            counters.loads += 1
            counters.load_errors += error
            counters.load_seconds += seconds


def _check_options(ttl: float | None, sliding: float | None, key: object) -> None:
    check_ttl(ttl, "cached(): ttl")
    check_ttl(sliding, "cached(): sliding")
    if key is not None and not callable(key):
        raise TypeError(f"cached(): key must be a function of the call's arguments, not {key!r}")


class _Base(Generic[P, R]):
    def __init__(
        self,
        fn: Callable[P, Any],
        cache: Any,
        region: str | None,
        ttl: float | None,
        sliding: float | None,
        key: Callable[..., Hashable] | None,
    ) -> None:
        self.__wrapped__ = fn
        functools.update_wrapper(cast(Any, self), fn)
        # A NearCache, or a function returning the cache to use now (Flask's current app's).
        self._cache = cache if callable(cache) else lambda: cache
        #: The region the results are cached in (by default the function's qualified name).
        self.region: str = region if region is not None else f"{fn.__module__}.{fn.__qualname__}"
        self._ttl = ttl
        self._sliding = sliding
        self._key_fn = key
        self._signature = inspect.signature(fn) if key is None else None

    def cache_key(self, *args: P.args, **kwargs: P.kwargs) -> Hashable:
        """The key that ``fn(*args, **kwargs)`` is cached under (in :attr:`region`)."""
        if self._key_fn is not None:
            return self._key_fn(*args, **kwargs)
        return call_key(self.__wrapped__, args, kwargs, self._signature)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        """On a class, bind as a function does: ``obj.method(...)`` passes ``obj`` first
        (pass ``key=`` to leave it out of the key)."""
        return self if instance is None else _BoundMethod(self, instance)


class _BoundMethod:
    """A decorated method of one instance: calls, ``invalidate`` and ``cache_key`` get the
    instance as their first argument; everything else is the decorated function's."""

    __slots__ = ("_function", "_instance")

    def __init__(self, function: _Base[Any, Any], instance: object) -> None:
        self._function = function
        self._instance = instance

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._function(self._instance, *args, **kwargs)  # type: ignore[operator]

    def invalidate(self, *args: Any, **kwargs: Any) -> Any:
        """The decorated function's ``invalidate``, for a call on this instance."""
        return self._function.invalidate(self._instance, *args, **kwargs)  # type: ignore[attr-defined]

    def cache_key(self, *args: Any, **kwargs: Any) -> Hashable:
        """The key of a call on this instance."""
        return self._function.cache_key(self._instance, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._function, name)


class CachedFunction(_Base[P, R]):
    """A function whose results are cached in a :class:`~nearcache.NearCache`.

    Call it as the function; ``invalidate(*args, **kwargs)`` drops one call's entry on
    every instance; ``invalidate_all()`` drops the whole :attr:`region` everywhere.
    """

    __wrapped__: Callable[P, R]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        cache: NearCache = self._cache()
        key = self.cache_key(*args, **kwargs)
        region, fn = self.region, self.__wrapped__
        loaded = False

        def load() -> R:
            nonlocal loaded
            loaded = True
            started = time.perf_counter()
            try:
                value = fn(*args, **kwargs)
            except BaseException:
                _count(cache, region, load=True, error=True, seconds=time.perf_counter() - started)
                raise
            _count(cache, region, load=True, error=False, seconds=time.perf_counter() - started)
            return value

        value = cache.get_or_set(key, load, region=region, ttl=self._ttl, sliding=self._sliding)
        if not loaded:
            _count(cache, region, load=False, error=False, seconds=0.0)
        return value

    def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the cached result of ``fn(*args, **kwargs)`` here and on every instance."""
        self._cache().remove(self.cache_key(*args, **kwargs), region=self.region)

    def invalidate_all(self) -> None:
        """Drop :attr:`region` (every cached call, and anything else cached in the region)
        here and on every instance."""
        self._cache().clear_region(self.region)


class AsyncCachedFunction(_Base[P, R]):
    """A coroutine function whose results are cached in an :class:`~nearcache.AsyncNearCache`.

    ``await`` it as the function; ``await invalidate(*args, **kwargs)`` drops one call's entry
    on every instance; ``await invalidate_all()`` drops the whole :attr:`region` everywhere.
    """

    __wrapped__: Callable[P, Awaitable[R]]

    async def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        cache: AsyncNearCache = self._cache()
        key = self.cache_key(*args, **kwargs)
        region, fn = self.region, self.__wrapped__
        loaded = False

        async def load() -> R:
            nonlocal loaded
            loaded = True
            started = time.perf_counter()
            try:
                value = await fn(*args, **kwargs)
            except BaseException:
                _count(cache, region, load=True, error=True, seconds=time.perf_counter() - started)
                raise
            _count(cache, region, load=True, error=False, seconds=time.perf_counter() - started)
            return value

        value: R = await cache.get_or_set(
            key, load, region=region, ttl=self._ttl, sliding=self._sliding
        )
        if not loaded:
            _count(cache, region, load=False, error=False, seconds=0.0)
        return value

    async def invalidate(self, *args: P.args, **kwargs: P.kwargs) -> None:
        """Drop the cached result of ``fn(*args, **kwargs)`` here and on every instance."""
        await self._cache().remove(self.cache_key(*args, **kwargs), region=self.region)

    async def invalidate_all(self) -> None:
        """Drop :attr:`region` here and on every instance."""
        await self._cache().clear_region(self.region)


class Cached:
    """The decorator returned by :meth:`NearCache.cached <nearcache.NearCache.cached>`."""

    def __init__(
        self,
        cache: NearCache | Callable[[], NearCache],
        *,
        region: str | None = None,
        ttl: float | None = None,
        sliding: float | None = None,
        key: Callable[..., Hashable] | None = None,
    ) -> None:
        _check_options(ttl, sliding, key)
        self._cache = cache
        self._options = (region, ttl, sliding, key)

    def __call__(self, fn: Callable[P, R]) -> CachedFunction[P, R]:
        if inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"{fn.__qualname__} is a coroutine function: cache it with AsyncNearCache.cached "
                "(a NearCache would block the event loop while another caller loads)"
            )
        if not callable(fn):
            raise TypeError(f"cached() decorates a function, not {fn!r}")
        return CachedFunction(fn, self._cache, *self._options)


class AsyncCached:
    """The decorator returned by :meth:`AsyncNearCache.cached <nearcache.AsyncNearCache.cached>`."""

    def __init__(
        self,
        cache: AsyncNearCache | Callable[[], AsyncNearCache],
        *,
        region: str | None = None,
        ttl: float | None = None,
        sliding: float | None = None,
        key: Callable[..., Hashable] | None = None,
    ) -> None:
        _check_options(ttl, sliding, key)
        self._cache = cache
        self._options = (region, ttl, sliding, key)

    def __call__(self, fn: Callable[P, Awaitable[R]]) -> AsyncCachedFunction[P, R]:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"{getattr(fn, '__qualname__', fn)!r} is not a coroutine function: cache it "
                "with NearCache.cached, or make it `async def`"
            )
        return AsyncCachedFunction(fn, self._cache, *self._options)
