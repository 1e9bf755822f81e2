"""A Starlette service whose lifespan opens what its requests use, as most services do: an
asyncpg pool (``POOLED_PG_DSN``), a warm-up query, and both left in the lifespan state.
``raw_app`` is a bare ASGI app that takes no part in the lifespan protocol."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    pool = await asyncpg.create_pool(os.environ["POOLED_PG_DSN"], min_size=2, max_size=2)
    try:
        skus = await pool.fetchval("SELECT count(*) FROM stock")
        yield {"pool": pool, "skus": skus}
    finally:
        await pool.close()


async def stock(request: Request) -> JSONResponse:
    row = await request.state.pool.fetchrow(
        "SELECT qty, price FROM stock WHERE sku = $1", request.path_params["sku"])
    return JSONResponse({"qty": row["qty"], "price": str(row["price"]), "of": request.state.skus})


app = Starlette(routes=[Route("/stock/{sku}", stock)], lifespan=lifespan)


async def raw_app(scope: Any, receive: Any, send: Any) -> None:
    assert scope["type"] == "http", "lifespan is not supported"
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})
