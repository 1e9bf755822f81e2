"""Apps for tests/inbound/test_asgi_lifespan_apps.py: lifespan shapes real services have
(a startup that fails for its own reasons, a background refresher, a shutdown that writes,
a best-effort warm-up, FastAPI on_startup with app.state, httpx and redis at startup)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import redis.asyncio as aioredis
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

SQL = "SELECT qty, price FROM stock WHERE sku = $1"
EVENTS: list[str] = []  # what the lifespans did, for the tests to look at


async def stock(request: Request) -> JSONResponse:
    row = await request.state.pool.fetchrow(SQL, request.path_params["sku"])
    return JSONResponse({"qty": row["qty"], "price": str(row["price"])})


# -- a startup that fails for a reason of its own (a setting missing in this environment) ----

@asynccontextmanager
async def _broken(app: Starlette) -> AsyncIterator[None]:
    os.environ["REVIEW_NEVER_SET"]  # KeyError
    yield


broken_app = Starlette(routes=[Route("/stock/{sku}", stock)], lifespan=_broken)


# -- a startup that starts a background refresher on the pool --------------------------------

@asynccontextmanager
async def _bg(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    pool = await asyncpg.create_pool(os.environ["POOLED_PG_DSN"], min_size=1, max_size=2)
    seen = {"n": 0, "errors": 0}

    async def refresh() -> None:
        while True:
            try:
                seen["n"] = await pool.fetchval("SELECT count(*) FROM stock")
            except Exception as exc:  # a refresher logs and goes on
                seen["errors"] += 1
                EVENTS.append(f"refresh failed: {type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(float(os.environ.get("REVIEW_REFRESH", "0.05")))

    task = asyncio.create_task(refresh())
    try:
        yield {"pool": pool, "seen": seen}
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await pool.close()


bg_app = Starlette(routes=[Route("/stock/{sku}", stock)], lifespan=_bg)


# -- a shutdown that makes a call (an instance registry, a last flush) -----------------------

@asynccontextmanager
async def _audited(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    pool = await asyncpg.create_pool(os.environ["POOLED_PG_DSN"], min_size=1, max_size=1)
    try:
        yield {"pool": pool}
        await pool.execute("NOTIFY review_instances, 'stopped'")
    finally:
        await pool.close()


audited_app = Starlette(routes=[Route("/stock/{sku}", stock)], lifespan=_audited)


# -- a best-effort warm-up whose query this version of the code changed ----------------------

@asynccontextmanager
async def _warm(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    pool = await asyncpg.create_pool(os.environ["POOLED_PG_DSN"], min_size=1, max_size=1)
    EVENTS.append("warm: started")
    try:
        try:  # a warm-up that fails is not fatal
            await pool.fetchval(os.environ.get("REVIEW_WARM_SQL", "SELECT count(*) FROM stock"))
        except Exception as exc:
            EVENTS.append(f"warm-up skipped: {type(exc).__name__}")
        yield {"pool": pool}
    finally:
        EVENTS.append("warm: shut down")
        await pool.close()


warm_app = Starlette(routes=[Route("/stock/{sku}", stock)], lifespan=_warm)


# -- FastAPI, on_startup handlers, the pool on app.state -------------------------------------

def make_fastapi() -> FastAPI:
    api = FastAPI()

    @api.on_event("startup")
    async def open_pool() -> None:
        api.state.pool = await asyncpg.create_pool(os.environ["POOLED_PG_DSN"], min_size=1,
                                                   max_size=1)

    @api.on_event("shutdown")
    async def close_pool() -> None:
        await api.state.pool.close()

    @api.get("/stock/{sku}")
    async def get_stock(sku: str, request: Request) -> dict[str, Any]:
        row = await request.app.state.pool.fetchrow(SQL, sku)
        return {"qty": row["qty"], "price": str(row["price"])}

    return api


fastapi_app = make_fastapi()


# -- httpx and redis at startup --------------------------------------------------------------

@asynccontextmanager
async def _clients(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    client = httpx.AsyncClient(base_url=os.environ["SHOP_UPSTREAM"])
    cache = aioredis.from_url(os.environ.get("REVIEW_REDIS", "redis://127.0.0.1:6379/0"))
    try:
        price = (await client.get("/prices/A1")).json()["price"]  # configuration at startup
        flag = await cache.get("review:flag")
        yield {"client": client, "cache": cache, "price": price,
               "flag": flag.decode() if flag else None}
    finally:
        await client.aclose()
        await cache.aclose()


async def quote(request: Request) -> JSONResponse:
    sku = request.path_params["sku"]
    live = (await request.state.client.get(f"/prices/{sku}")).json()["price"]
    hits = await request.state.cache.get(f"review:hits:{sku}")
    return JSONResponse({"start": request.state.price, "now": live, "flag": request.state.flag,
                         "hits": hits.decode() if hits else None})


clients_app = Starlette(routes=[Route("/quote/{sku}", quote)], lifespan=_clients)


# -- SQLAlchemy (asyncpg) engine: create_all at startup, the engine on app.state -------------

def make_sqlalchemy_app() -> Starlette:
    from sqlalchemy import Column, Integer, MetaData, String, Table, select
    from sqlalchemy.ext.asyncio import create_async_engine

    meta = MetaData()
    notes = Table("notes", meta, Column("id", Integer, primary_key=True), Column("text", String))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        dsn = os.environ["POOLED_PG_DSN"].replace("postgresql://", "postgresql+asyncpg://")
        app.state.engine = create_async_engine(dsn, pool_size=2)
        async with app.state.engine.begin() as conn:
            await conn.run_sync(meta.create_all)
            if not (await conn.execute(select(notes))).first():
                await conn.execute(notes.insert().values(id=1, text="hello"))
        yield
        await app.state.engine.dispose()

    async def note(request: Request) -> JSONResponse:
        async with request.app.state.engine.connect() as conn:
            row = (await conn.execute(select(notes).where(notes.c.id == 1))).one()
        return JSONResponse({"id": row.id, "text": row.text})

    return Starlette(routes=[Route("/note", note)], lifespan=lifespan)


sqlalchemy_app = make_sqlalchemy_app()


# -- Litestar (its own OpenTelemetry plugin), the pool opened in its lifespan ----------------

from litestar import Litestar, get  # noqa: E402
from litestar import Request as LRequest  # noqa: E402
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin  # noqa: E402


def make_litestar() -> Any:
    @asynccontextmanager
    async def pool_lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.pool = await asyncpg.create_pool(os.environ["POOLED_PG_DSN"], min_size=1,
                                                   max_size=1)
        try:
            yield
        finally:
            await app.state.pool.close()

    @get("/stock/{sku:str}")
    async def get_stock(sku: str, request: LRequest) -> dict[str, Any]:
        row = await request.app.state.pool.fetchrow(SQL, sku)
        return {"qty": row["qty"], "price": str(row["price"])}

    return Litestar([get_stock], lifespan=[pool_lifespan],
                    plugins=[OpenTelemetryPlugin(OpenTelemetryConfig())])


litestar_app = make_litestar()


# -- a startup query with a parameter (for --strict) -----------------------------------------

@asynccontextmanager
async def _threshold(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    pool = await asyncpg.create_pool(os.environ["POOLED_PG_DSN"], min_size=1, max_size=1)
    try:
        low = await pool.fetchval("SELECT count(*) FROM stock WHERE qty <= $1",
                                  int(os.environ.get("REVIEW_LOW", "0")))
        yield {"pool": pool, "low": low}
    finally:
        await pool.close()


async def low_stock(request: Request) -> JSONResponse:
    row = await request.state.pool.fetchrow(SQL, request.path_params["sku"])
    return JSONResponse({"qty": row["qty"], "low": request.state.low})


threshold_app = Starlette(routes=[Route("/stock/{sku}", low_stock)], lifespan=_threshold)


# -- a best-effort warm-up, and a write in the lifespan's finally (a "stopped" marker) -------

@asynccontextmanager
async def _warm_marker(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    pool = await asyncpg.create_pool(os.environ["POOLED_PG_DSN"], min_size=1, max_size=1)
    try:
        with contextlib.suppress(Exception):
            await pool.fetchval(os.environ.get("REVIEW_WARM_SQL", "SELECT count(*) FROM stock"))
        yield {"pool": pool}
    finally:
        with contextlib.suppress(Exception):
            await pool.execute("INSERT INTO stock VALUES ('stopped-' || now()::text, 0, 0)")
        await pool.close()


warm_marker_app = Starlette(routes=[Route("/stock/{sku}", stock)], lifespan=_warm_marker)
