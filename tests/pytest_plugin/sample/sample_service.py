"""The ASGI service whose recorded requests --timetracer-replay-dir turns into tests."""

from __future__ import annotations

import os

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def order(request: Request) -> JSONResponse:
    oid = int(request.path_params["id"])
    async with httpx.AsyncClient(base_url=os.environ["SAMPLE_UPSTREAM"]) as client:
        echoed = (await client.get(f"/price/{oid}", params={"currency": "EUR"})).json()
    total = oid * 10 + len(echoed["query"])  # CHANGE-ME
    return JSONResponse({"id": oid, "upstream": echoed["path"], "total": total})


app = Starlette(routes=[Route("/orders/{id}", order, methods=["GET"])])
