"""The Search gRPC servicer: ranked full-text search and lookup by id."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from services.search.storage import DEFAULT_CATALOG_CSV, Catalog, Product
from shopmesh.identity import describe_caller
from shopmesh.pagination import InvalidPageToken, PageTokens, resolve_page_size
from shopmesh.search.v1 import search_pb2, search_pb2_grpc
from shopmesh.server import InvalidArgument, NotFound, rpc_errors
from shopmesh.telemetry import tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)

SERVICE_NAME = search_pb2.DESCRIPTOR.services_by_name["Search"].full_name
MAX_QUERY_CHARS = 256
MAX_IDS = 100
MAX_ID_CHARS = 64
PAGE_TOKEN_KEY = Path("keys") / "page-token.key"

# A search term is a run of letters and digits, the same characters FTS5's
# unicode61 tokenizer keeps; everything else (quotes, '*', '(', ':', '^', '-')
# only separates terms. Users therefore cannot write FTS5 syntax at all.
_TERM = re.compile(r"[^\W_]+")

Context = grpc.aio.ServicerContext[Any, Any]


def fts_query_for(text: str) -> str:
    """Turn user text into a safe FTS5 query: every term quoted, prefix-matched, ANDed.

    `"term"*` is a quoted phrase, so words like AND, OR, NEAR or a column
    name are searched for literally; the trailing `*` makes the last word
    typed so far match ("mu" finds "mug").
    """
    return " ".join(f'"{term}"*' for term in _TERM.findall(text))


def _to_proto(product: Product) -> search_pb2.Product:
    return search_pb2.Product(
        id=product.id,
        name=product.name,
        description=product.description,
        category=product.category,
        price_minor=product.price_minor,
        currency=product.currency,
    )


class SearchServicer(search_pb2_grpc.SearchServicer):
    def __init__(self, catalog: Catalog, page_tokens: PageTokens) -> None:
        self._catalog = catalog
        self._page_tokens = page_tokens

    def register(self, server: grpc.aio.Server) -> list[str]:
        search_pb2_grpc.add_SearchServicer_to_server(self, server)
        return [SERVICE_NAME]

    @rpc_errors()
    async def SearchProducts(
        self, request: search_pb2.SearchProductsRequest, context: Context
    ) -> search_pb2.SearchProductsResponse:
        if not request.query.strip():
            raise InvalidArgument("query is required")
        if len(request.query) > MAX_QUERY_CHARS:
            raise InvalidArgument(f"query is {len(request.query)} characters long; the limit is {MAX_QUERY_CHARS}")
        page_size = resolve_page_size(request.page_size)
        fts_query = fts_query_for(request.query)
        if not fts_query:
            raise InvalidArgument("query has no words to search for (letters or digits)")
        # The token is bound to the query it was issued for: a token from
        # another query would silently page through the wrong results.
        fingerprint = hashlib.sha256(fts_query.encode()).hexdigest()[:16]
        offset = 0
        if request.page_token:
            payload = self._page_tokens.parse(request.page_token)
            token_offset = payload.get("o")
            if payload.get("q") != fingerprint or not isinstance(token_offset, int) or token_offset < 0:
                raise InvalidPageToken()
            offset = token_offset
        # The query text stays out of the span: people type anything into a
        # search box. Its shape (how many terms) is what explains the timing.
        with _tracer.start_as_current_span(
            "search.query",
            attributes={"search.term_count": len(_TERM.findall(request.query)), "search.page_size": page_size, "search.offset": offset},
        ) as span:
            try:
                page = self._catalog.search(fts_query, limit=page_size, offset=offset)
            except sqlite3.OperationalError as exc:
                # fts_query_for only emits quoted terms, so this is a bug, not the user's fault;
                # still, answer with a status the caller can read rather than UNKNOWN.
                log.error("FTS5 rejected %r built from a %d-character query: %s", fts_query, len(request.query), exc)
                raise InvalidArgument("query could not be searched; try plain words") from exc
            span.set_attributes({"search.total_matches": page.total_matches, "search.returned": len(page.products)})
        next_offset = offset + len(page.products)
        next_token = ""
        if page.products and next_offset < page.total_matches:
            next_token = self._page_tokens.issue({"q": fingerprint, "o": next_offset})
        log.info(
            "SearchProducts from %s: %d matches, returned %d from offset %d",
            describe_caller(context.invocation_metadata()),
            page.total_matches,
            len(page.products),
            offset,
        )
        return search_pb2.SearchProductsResponse(
            products=[_to_proto(p) for p in page.products],
            next_page_token=next_token,
            total_matches=page.total_matches,
        )

    @rpc_errors()
    async def GetProducts(
        self, request: search_pb2.GetProductsRequest, context: Context
    ) -> search_pb2.GetProductsResponse:
        ids = list(request.ids)
        if not ids:
            raise InvalidArgument("ids is empty; ask for 1 to 100 product ids")
        if len(ids) > MAX_IDS:
            raise InvalidArgument(f"{len(ids)} ids asked for; the limit is {MAX_IDS}")
        for index, product_id in enumerate(ids):
            if not product_id.strip():
                raise InvalidArgument(f"ids[{index}] is empty")
            if len(product_id) > MAX_ID_CHARS:
                raise InvalidArgument(f"ids[{index}] is {len(product_id)} characters long; the limit is {MAX_ID_CHARS}")
        with _tracer.start_as_current_span("search.lookup", attributes={"search.id_count": len(ids)}) as span:
            found = self._catalog.get(ids)
            span.set_attribute("search.found", len(found))
        unknown = [i for i in dict.fromkeys(ids) if i not in found]
        if unknown:
            listed = ", ".join(f"'{i}'" for i in unknown)
            raise NotFound(f"unknown product id{'s' if len(unknown) > 1 else ''} {listed}")
        log.info("GetProducts from %s: %d ids", describe_caller(context.invocation_metadata()), len(ids))
        return search_pb2.GetProductsResponse(products=[_to_proto(found[i]) for i in ids])


@contextlib.contextmanager
def search_servicer(data_dir: Path, catalog_csv: Path = DEFAULT_CATALOG_CSV) -> Iterator[SearchServicer]:
    """A SearchServicer over the catalog in data_dir, closed on exit."""
    catalog = Catalog.open(data_dir, catalog_csv)
    try:
        tokens = PageTokens.from_key_file(data_dir / PAGE_TOKEN_KEY, "search.v1.SearchProducts")
        yield SearchServicer(catalog, tokens)
    finally:
        catalog.close()
