"""The Starlette service the inbound tests record and replay: it calls an HTTP upstream.

``SHOP_UPSTREAM`` is the upstream's base URL, ``SHOP_PG_DSN`` (optional) the PostgreSQL
database holding stock; ``SHOP_TAX`` (default 0.1) is what a "deliberately changed handler"
changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

# One TLS context for every client: building one per request costs ~100 ms (certifi load).
TLS = ssl.create_default_context()


def tax() -> float:
    return float(os.environ.get("SHOP_TAX", "0.1"))


async def order(request: Request) -> JSONResponse:
    body = await request.json()
    async with httpx.AsyncClient(base_url=os.environ["SHOP_UPSTREAM"], verify=TLS) as client:
        price = (await client.get(f"/price/{body['sku']}")).json()["price"]
    stock = None
    if os.environ.get("SHOP_PG_DSN"):
        import asyncpg

        conn = await asyncpg.connect(os.environ["SHOP_PG_DSN"])
        try:
            stock = await conn.fetchval("SELECT qty FROM stock WHERE sku = $1", body["sku"])
        finally:
            await conn.close()
    qty = int(body.get("qty", 1))
    if body.get("fail"):
        return JSONResponse({"error": "payment declined", "price": price}, status_code=502)
    return JSONResponse(
        {"id": int(request.path_params["id"]), "sku": body["sku"], "qty": qty, "price": price,
         "total": round(price * qty * (1 + tax()), 2), "stock": stock},
        headers={"x-order": request.path_params["id"]},
    )


async def echo(request: Request) -> Response:
    body = await request.body()
    return Response(body, media_type=request.headers.get("content-type", "application/octet-stream"),
                    headers={"x-sha256": hashlib.sha256(body).hexdigest()})


async def form(request: Request) -> JSONResponse:
    data = await request.form()
    out: dict[str, object] = {}
    for key, value in data.multi_items():
        if isinstance(value, str):
            out[key] = value
        else:
            content = await value.read()
            out[key] = {"filename": value.filename, "size": len(content),
                        "sha256": hashlib.sha256(content).hexdigest()}
    return JSONResponse(out)


async def stream(request: Request) -> StreamingResponse:
    async def events():  # type: ignore[no-untyped-def]
        for i in range(5):
            yield f"data: event {i}\n\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(events(), media_type="text/event-stream")


async def boom(request: Request) -> Response:
    raise ValueError("boom: order 7 has no sku")


async def fail(request: Request) -> Response:
    return PlainTextResponse("upstream said no", status_code=503)


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


routes = [
    Route("/orders/{id}", order, methods=["POST"]),
    Route("/echo", echo, methods=["POST", "PUT"]),
    Route("/form", form, methods=["POST"]),
    Route("/stream", stream),
    Route("/boom", boom),
    Route("/fail", fail),
    Route("/health", health),
]


def make_app() -> Starlette:
    return Starlette(routes=routes)


app = make_app()
