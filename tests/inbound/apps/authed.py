"""A service that answers only a caller with the right bearer token (what a replay of a
recorded request must be given again: the recording stores the token redacted)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

TOKEN = "s3cr3t-token-0123456789"


async def me(request: Request) -> JSONResponse:
    if request.headers.get("authorization") != f"Bearer {TOKEN}":
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    # Echoes what it was sent (a debug field some services have): a replay given the real
    # value must compare it with the token the recording stored, and never print it.
    return JSONResponse({"user": "alice", "auth_seen": request.headers["authorization"]})


app = Starlette(routes=[Route("/me", me)])
