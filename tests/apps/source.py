"""The "database" of the Flask and FastAPI test apps: a JSON file of product prices that
every app process reads, so that a stale cached price is visible as such."""

from __future__ import annotations

import json
import os
from pathlib import Path


def read_price(path: str, pid: int) -> int:
    """The price of product ``pid`` now."""
    prices: dict[str, int] = json.loads(Path(path).read_text())
    return prices[str(pid)]


def write_price(path: str, pid: int, price: int) -> None:
    """Change a price (atomically: readers see the old file or the new one)."""
    prices = json.loads(Path(path).read_text())
    prices[str(pid)] = price
    tmp = f"{path}.{os.getpid()}.tmp"
    Path(tmp).write_text(json.dumps(prices))
    os.replace(tmp, path)
