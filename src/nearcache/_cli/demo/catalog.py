"""The demo's source of truth: a small product catalog in one SQLite file.

Every demo instance reads it through its :class:`~nearcache.NearCache` (region ``products``:
name and version; region ``prices``: price and version); a write bumps the product's version,
so a reader can tell a current value from a stale one by the version alone.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path
from typing import Any, NamedTuple

__all__ = [
    "HOT_PRODUCT",
    "PRODUCT_COUNT",
    "REGIONS",
    "Price",
    "Product",
    "connect",
    "create",
    "current_versions",
    "load",
    "update_price",
]

PRODUCT_COUNT = 200
HOT_PRODUCT = 42
REGIONS = ("products", "prices")

_ADJECTIVES = ("Sturdy", "Quiet", "Bright", "Compact", "Classic", "Nimble", "Rustic", "Polar")
_NOUNS = (
    "Kettle",
    "Lamp",
    "Backpack",
    "Teapot",
    "Notebook",
    "Umbrella",
    "Skillet",
    "Headset",
    "Blender",
    "Scarf",
    "Mug",
    "Drone",
    "Chair",
    "Clock",
    "Bottle",
)


class Product(NamedTuple):
    """What region ``products`` caches: a product's name at a version."""

    id: int
    name: str
    version: int
    loaded_at: float  # monotonic seconds when the load from SQLite started


class Price(NamedTuple):
    """What region ``prices`` caches: a product's price at a version."""

    id: int
    cents: int
    version: int
    loaded_at: float


def _name(product_id: int) -> str:
    if product_id == HOT_PRODUCT:
        return "Answer Teapot"
    adjective = _ADJECTIVES[product_id % len(_ADJECTIVES)]
    noun = _NOUNS[(product_id // len(_ADJECTIVES)) % len(_NOUNS)]
    return f"{adjective} {noun} {product_id}"


def connect(path: Path | str) -> sqlite3.Connection:
    """Open the catalog (one connection per thread: sqlite3 connections are not shared)."""
    return sqlite3.connect(str(path), timeout=5.0)


def create(path: Path, *, products: int = PRODUCT_COUNT, seed: int = 42) -> None:
    """Create the catalog file with ``products`` products, all at version 1."""
    rng = random.Random(seed)
    conn = connect(path)
    try:
        # WAL: readers in the instance processes never wait for a writer.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " price_cents INTEGER NOT NULL, version INTEGER NOT NULL)"
        )
        conn.executemany(
            "INSERT INTO products VALUES (?, ?, ?, 1)",
            [(pid, _name(pid), rng.randrange(199, 19999)) for pid in range(1, products + 1)],
        )
        conn.commit()
    finally:
        conn.close()


def load(conn: sqlite3.Connection, region: str, product_id: int, now: float) -> Product | Price:
    """Read one product as region ``region`` caches it (``KeyError`` if there is none)."""
    row = conn.execute(
        "SELECT name, price_cents, version FROM products WHERE id = ?", (product_id,)
    ).fetchone()
    if row is None:
        raise KeyError(product_id)
    name, cents, version = row
    if region == "products":
        return Product(product_id, name, version, now)
    return Price(product_id, cents, version, now)


def update_price(conn: sqlite3.Connection, product_id: int, rng: random.Random) -> Price:
    """Change a product's price and bump its version; return the new price row."""
    with conn:  # one transaction: commit on success
        conn.execute(
            "UPDATE products SET price_cents = max(99, price_cents + ?), version = version + 1"
            " WHERE id = ?",
            (rng.randrange(-300, 301), product_id),
        )
        row = conn.execute(
            "SELECT price_cents, version FROM products WHERE id = ?", (product_id,)
        ).fetchone()
    if row is None:
        raise KeyError(product_id)
    return Price(product_id, row[0], row[1], 0.0)


def current_versions(conn: sqlite3.Connection) -> dict[int, int]:
    """Every product's current version."""
    return dict(conn.execute("SELECT id, version FROM products").fetchall())


class CatalogSerializer:
    """How the demo keeps products and prices in the shared L2: a custom ``Serializer``
    (id 128) on top of the safe default, since named tuples are not plain data."""

    id = 128
    needs_signing = False

    def __init__(self) -> None:
        from nearcache._core.serializer import SafeSerializer

        self._safe = SafeSerializer()

    def dumps(self, value: object) -> bytes:
        """A product or a price as a tagged tuple of plain values."""
        if isinstance(value, Product | Price):
            return self._safe.dumps((type(value).__name__, *value))
        raise TypeError(f"the catalog stores products and prices, not {type(value).__name__}")

    def loads(self, data: bytes) -> object:
        """Back to a Product or a Price (anything else fails: a miss)."""
        value: Any = self._safe.loads(data)
        cls: Any = {"Product": Product, "Price": Price}[value[0]]
        return cls(*value[1:])
