"""A real HTTP upstream for the HTTP client tests (served by uvicorn on 127.0.0.1)."""

from __future__ import annotations

import asyncio

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

calls = {"n": 0}


async def items(request: Request) -> JSONResponse:
    calls["n"] += 1
    return JSONResponse({"page": request.query_params.get("page"), "n": calls["n"]})


async def echo(request: Request) -> Response:
    body = await request.body()
    return Response(body[::-1], media_type="application/octet-stream",
                    headers={"x-length": str(len(body))})


async def blob(request: Request) -> Response:
    return Response(bytes(range(256)) * 64, media_type="application/octet-stream")


async def stream(request: Request) -> StreamingResponse:
    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(4):
            yield f"data: {i}\n\n".encode()
            await asyncio.sleep(0)

    return StreamingResponse(chunks(), media_type="text/event-stream")


async def multi(request: Request) -> Response:
    response = Response("ok", status_code=201)
    response.headers.append("x-multi", "a")
    response.headers.append("x-multi", "b")
    response.set_cookie("session", "s3cr3t-cookie")
    return response


async def slow(request: Request) -> Response:
    await asyncio.sleep(2)
    return Response("late")


async def gzipped(request: Request) -> Response:
    import gzip

    return Response(gzip.compress(b'{"zipped": true}'), media_type="application/json",
                    headers={"content-encoding": "gzip"})


app = Starlette(
    routes=[
        Route("/items", items),
        Route("/echo", echo, methods=["POST", "PUT"]),
        Route("/blob", blob),
        Route("/stream", stream),
        Route("/multi", multi),
        Route("/slow", slow),
        Route("/gzip", gzipped),
    ]
)
