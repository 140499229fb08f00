from collections.abc import Awaitable, Callable, Hashable
from typing import Any

class Entry:
    key: Hashable
    region: str | None
    value: Any
    stored: float
    expires: float
    deadline: float
    sliding: float
    hits: int
    mark: int
    def __init__(
        self,
        key: Hashable,
        region: str | None,
        value: object,
        stored: float,
        expires: float,
        deadline: float,
        sliding: float,
    ) -> None: ...

class Reader:
    default_bucket: dict[Hashable, Any]
    regions: dict[str | None, dict[Hashable, Any]]
    fresh_until: float
    max_staleness: float
    misses: int
    def __init__(
        self,
        default_bucket: dict[Hashable, Any],
        regions: dict[str | None, dict[Hashable, Any]],
        clock: Callable[[], float] | None,
        fresh_until: float,
        max_staleness: float,
    ) -> None: ...
    def get(self, key: Hashable, default: Any = None, region: str | None = None) -> Any: ...
    def aget(
        self, key: Hashable, default: Any = None, region: str | None = None
    ) -> Awaitable[Any]: ...

class Ready:
    def __await__(self) -> Any: ...
