"""Apps for tests/inbound/test_asgi_lifespan_paths.py."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import redis
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

EVENTS: list[str] = []


# -- a startup that starts a plain thread heartbeat (APScheduler BackgroundScheduler, a
#    metrics flusher, a sync client poller): threads do not inherit the startup's context ----

@asynccontextmanager
async def _threaded(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    client = aioredis.Redis(db=13)
    await client.ping()
    stop = threading.Event()

    def beat() -> None:
        sync = redis.Redis(db=13)
        while not stop.is_set():
            try:
                sync.incr("review2:beat")
            except Exception as exc:  # a heartbeat logs and goes on
                EVENTS.append(f"beat failed: {type(exc).__name__}: {exc}"[:200])
            stop.wait(float(os.environ.get("REVIEW2_BEAT", "0.01")))

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield {"redis": client}
    finally:
        stop.set()
        thread.join(2)
        await client.aclose()


async def _hit(request: Request) -> JSONResponse:
    await asyncio.sleep(float(os.environ.get("REVIEW2_SLOW", "0.1")))
    value = await request.state.redis.get("review2:k")
    return JSONResponse({"k": value.decode() if value else None})


threaded_app = Starlette(routes=[Route("/hit", _hit)], lifespan=_threaded)


# -- a startup that takes a while (a migration, a cache warm-up) ----------------------------

@asynccontextmanager
async def _slow(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    await asyncio.sleep(float(os.environ.get("REVIEW2_STARTUP_S", "2")))
    yield {}


async def _plain(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


slow_app = Starlette(routes=[Route("/stock/{sku}", _plain)], lifespan=_slow)


# -- a prepared statement, for the STATEMENTS registry --------------------------------------

async def prepare_and_fetch(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        stmt = await conn.prepare(sql)
        rows = await stmt.fetch(*args)
        return [dict(r) for r in rows]
    finally:
        await conn.close()


# -- a startup that makes no call at all (config into the state) ----------------------------

@asynccontextmanager
async def _nocall(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    try:
        yield {"greeting": os.environ.get("REVIEW2_GREETING", "hi")}
    finally:
        EVENTS.append("nocall: shut down")
        if os.environ.get("REVIEW2_SHUTDOWN_LOG"):
            with open(os.environ["REVIEW2_SHUTDOWN_LOG"], "a") as f:
                f.write("shut down\n")


async def _greet(request: Request) -> JSONResponse:
    if os.environ.get("REVIEW2_GREET_STARTED"):  # (a test waits for this before its Ctrl-C)
        with open(os.environ["REVIEW2_GREET_STARTED"], "w") as f:
            f.write("started\n")
    await asyncio.sleep(float(os.environ.get("REVIEW2_GREET_SLOW", "0")))
    return JSONResponse({"greeting": request.state.greeting})


nocall_app = Starlette(routes=[Route("/greet", _greet)], lifespan=_nocall)


# -- a startup that does blocking work in the default executor (loading a model or a config
#    with a sync client): run_in_executor does not carry the context into the thread ---------

def _load_config() -> str:
    value = redis.Redis(db=13).get("review2:config")
    return value.decode() if value else "none"


@asynccontextmanager
async def _executor(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    client = aioredis.Redis(db=13)
    await client.ping()
    config = await asyncio.get_running_loop().run_in_executor(None, _load_config)
    try:
        yield {"redis": client, "config": config}
    finally:
        await client.aclose()


async def _config(request: Request) -> JSONResponse:
    return JSONResponse({"config": request.state.config})


executor_app = Starlette(routes=[Route("/config", _config)], lifespan=_executor)
