"""A small local upstream service for the examples: JSON, bytes, a redirect and an error."""

from __future__ import annotations

import sys

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


async def items(request: Request) -> JSONResponse:
    page = int(request.query_params.get("page", "1"))
    return JSONResponse({"page": page, "items": [f"item-{page}-{i}" for i in range(3)]})


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"method": request.method, "length": len(body), "body": body.decode()})


async def blob(request: Request) -> Response:
    return Response(bytes(range(256)), media_type="application/octet-stream")


async def stream(request: Request) -> StreamingResponse:
    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(3):
            yield f"chunk {i}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


async def broken(request: Request) -> JSONResponse:
    return JSONResponse({"error": "upstream exploded"}, status_code=503)


app = Starlette(
    routes=[
        Route("/items", items),
        Route("/echo", echo, methods=["POST"]),
        Route("/blob", blob),
        Route("/stream", stream),
        Route("/broken", broken),
    ]
)

if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
