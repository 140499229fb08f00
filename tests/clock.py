"""A clock for tests: it only moves when a test moves it."""

from __future__ import annotations


class FakeClock:
    """A clock that only moves when a test advances it or sets ``now``."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
