"""The product catalog in SQLite with an FTS5 index.

The CSV shipped with the service (data/catalog.csv) is the source of truth.
At start the service loads it into `search.db` under its data directory and
keeps the CSV's SHA-256 next to it; a later start reuses the database while
the hash matches and rebuilds it when the CSV changed. A rebuild writes a new
file and renames it over the old one, so a crash mid-build never leaves a
half-filled catalog behind.

The FTS5 table is external-content (content='products'): the text lives
once, in `products`, and the index points at its rowids.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import secrets
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from shopmesh.server import StartupError

log = logging.getLogger(__name__)

DEFAULT_CATALOG_CSV = Path(__file__).resolve().parent / "data" / "catalog.csv"
DB_NAME = "search.db"
# Bump when the schema below changes, so existing databases get rebuilt.
SCHEMA_VERSION = "1"
CSV_COLUMNS = ("id", "name", "description", "category", "price_minor", "currency")
# bm25 column weights (name, description, category): a hit in the name says
# far more about what a product is than a word somewhere in its description.
BM25_WEIGHTS = (10.0, 2.0, 1.0)
_CURRENCY = re.compile(r"^[A-Z]{3}$")

_SCHEMA = """
CREATE TABLE catalog_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE products (
    rowid INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    category TEXT NOT NULL,
    price_minor INTEGER NOT NULL CHECK (price_minor >= 0),
    currency TEXT NOT NULL
);
-- porter: "mugs" finds "mug"; remove_diacritics: "cafe" finds "café".
CREATE VIRTUAL TABLE products_fts USING fts5(
    name, description, category,
    content='products', content_rowid='rowid',
    tokenize='porter unicode61 remove_diacritics 2'
);
"""


class CatalogError(StartupError):
    """The catalog CSV is unreadable or has a bad row; the message names it."""


@dataclass(frozen=True)
class Product:
    id: str
    name: str
    description: str
    category: str
    price_minor: int
    currency: str


@dataclass(frozen=True)
class SearchPage:
    products: list[Product]
    total_matches: int


def read_catalog_csv(data: bytes, source: str) -> list[Product]:
    """Parse and validate the catalog CSV; CatalogError names the line and field."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{source}: not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != CSV_COLUMNS:
        raise CatalogError(f"{source}: header is {reader.fieldnames}, expected {list(CSV_COLUMNS)}")
    products: list[Product] = []
    seen: set[str] = set()
    for row in reader:
        where = f"{source} line {reader.line_num}"
        if None in row or any(row[c] is None for c in CSV_COLUMNS):
            raise CatalogError(f"{where}: expected {len(CSV_COLUMNS)} fields")
        product_id = row["id"].strip()
        if not product_id:
            raise CatalogError(f"{where}: empty id")
        if product_id in seen:
            raise CatalogError(f"{where}: duplicate id {product_id!r}")
        seen.add(product_id)
        if not row["name"].strip():
            raise CatalogError(f"{where}: product {product_id!r} has no name")
        try:
            price_minor = int(row["price_minor"])
        except ValueError:
            raise CatalogError(f"{where}: price_minor {row['price_minor']!r} is not an integer") from None
        if price_minor < 0:
            raise CatalogError(f"{where}: price_minor {price_minor} is negative")
        if not _CURRENCY.fullmatch(row["currency"]):
            raise CatalogError(f"{where}: currency {row['currency']!r} is not an ISO 4217 code")
        products.append(
            Product(
                id=product_id,
                name=row["name"].strip(),
                description=row["description"].strip(),
                category=row["category"].strip(),
                price_minor=price_minor,
                currency=row["currency"],
            )
        )
    if not products:
        raise CatalogError(f"{source}: no products")
    return products


def _build(path: Path, products: Iterable[Product], csv_sha256: str) -> None:
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.executescript(_SCHEMA)
            conn.executemany(
                "INSERT INTO products (id, name, description, category, price_minor, currency) VALUES (?, ?, ?, ?, ?, ?)",
                [(p.id, p.name, p.description, p.category, p.price_minor, p.currency) for p in products],
            )
            conn.execute("INSERT INTO products_fts (products_fts) VALUES ('rebuild')")
            conn.executemany(
                "INSERT INTO catalog_meta (key, value) VALUES (?, ?)",
                [("csv_sha256", csv_sha256), ("schema_version", SCHEMA_VERSION)],
            )
    finally:
        conn.close()


def _meta(path: Path) -> dict[str, str]:
    """The stored meta of an existing database, or {} if it is not a usable one."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error:
        return {}
    try:
        return dict(conn.execute("SELECT key, value FROM catalog_meta").fetchall())
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


class Catalog:
    """Read-only queries over the catalog database.

    Queries run on the event loop thread: the catalog is a few hundred rows
    and every query is a sub-millisecond index lookup, so a thread hop would
    cost more than it saves.
    """

    def __init__(self, conn: sqlite3.Connection, csv_sha256: str) -> None:
        self._conn = conn
        self.csv_sha256 = csv_sha256

    @classmethod
    def open(cls, data_dir: Path, csv_path: Path = DEFAULT_CATALOG_CSV) -> Catalog:
        """Open the catalog in data_dir, (re)building it from csv_path if needed."""
        try:
            data = csv_path.read_bytes()
        except OSError as exc:
            raise CatalogError(f"cannot read catalog {str(csv_path)!r}: {exc.strerror}") from exc
        digest = hashlib.sha256(data).hexdigest()
        db_path = data_dir / DB_NAME
        meta = _meta(db_path) if db_path.exists() else {}
        if meta.get("csv_sha256") != digest or meta.get("schema_version") != SCHEMA_VERSION:
            products = read_catalog_csv(data, str(csv_path))
            # A private temporary name: two starts building at once each
            # write their own file, and the last rename wins (same content).
            tmp = data_dir / f".{DB_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            try:
                _build(tmp, products, digest)
                os.replace(tmp, db_path)
            finally:
                tmp.unlink(missing_ok=True)
            log.info("built catalog %s from %s: %d products (sha256 %s)", db_path, csv_path, len(products), digest[:12])
        else:
            log.info("catalog %s is current (sha256 %s)", db_path, digest[:12])
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
        conn.row_factory = sqlite3.Row
        return cls(conn, digest)

    def close(self) -> None:
        self._conn.close()

    def count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM products").fetchone()[0])

    def search(self, fts_query: str, *, limit: int, offset: int) -> SearchPage:
        """Products matching an FTS5 query (built by the caller), best first.

        Ties in rank are broken by id so that offset pagination is stable.
        """
        total = int(self._conn.execute("SELECT count(*) FROM products_fts WHERE products_fts MATCH ?", (fts_query,)).fetchone()[0])
        weights = ", ".join(str(w) for w in BM25_WEIGHTS)
        rows = self._conn.execute(
            f"""
            SELECT p.id, p.name, p.description, p.category, p.price_minor, p.currency
            FROM products_fts JOIN products AS p ON p.rowid = products_fts.rowid
            WHERE products_fts MATCH ?
            ORDER BY bm25(products_fts, {weights}), p.id
            LIMIT ? OFFSET ?
            """,
            (fts_query, limit, offset),
        ).fetchall()
        return SearchPage([_product(r) for r in rows], total)

    def get(self, ids: Sequence[str]) -> dict[str, Product]:
        """The known products among ids, by id (unknown ids are simply absent)."""
        unique = list(dict.fromkeys(ids))
        placeholders = ", ".join("?" for _ in unique)
        rows = self._conn.execute(
            f"SELECT id, name, description, category, price_minor, currency FROM products WHERE id IN ({placeholders})",
            unique,
        ).fetchall()
        return {r["id"]: _product(r) for r in rows}


def _product(row: sqlite3.Row) -> Product:
    return Product(
        id=row["id"],
        name=row["name"],
        description=row["description"],
        category=row["category"],
        price_minor=int(row["price_minor"]),
        currency=row["currency"],
    )
