"""Scenario 6 (issue 4): inbound ASGI recording and ``replay --asgi`` throughput.

``overhead``: a Starlette endpoint receiving a 1 KB JSON body and answering 1 KB, driven
in-process through ASGI, with the Starlette instrumentation (OTel only) and then under
``timetracer_otel.record()`` (which captures the request, every body chunk and the response on
the server span). Blocks of the two modes alternate, so drift hits both alike.

``replay``: 1,000 requests recorded to 1,000 cassettes, then each replayed into the app with
``timetracer_otel.inbound.replay_asgi`` (the engine of ``timetracer-otel replay DIR --asgi``),
its response compared with the recorded one.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import otel_noop_provider, worker_main

PAYLOAD = {"sku": "A1", "note": "x" * 960}  # ~1 KB each way


def make_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def orders(request: Request) -> JSONResponse:
        body = await request.json()
        return JSONResponse({"id": 42, "sku": body["sku"], "note": body["note"]})

    return Starlette(routes=[Route("/orders", orders, methods=["POST"])])


async def call(app: Any, body: bytes) -> int:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/orders", "raw_path": b"/orders", "query_string": b"",
        "root_path": "", "headers": [(b"content-type", b"application/json"),
                                     (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


def instrument(app: Any) -> None:
    from opentelemetry.instrumentation.starlette import StarletteInstrumentor

    otel_noop_provider()
    StarletteInstrumentor.instrument_app(app)


async def overhead(args: dict[str, Any]) -> dict[str, Any]:
    import timetracer_otel

    app = make_app()
    instrument(app)
    body = json.dumps(PAYLOAD).encode()
    n = args["requests"]

    async def block() -> float:
        start = time.perf_counter()
        for _ in range(n):
            assert await call(app, body) == 200
        return (time.perf_counter() - start) / n * 1e6

    await block()
    otel: list[float] = []
    recorded: list[float] = []
    for r in range(args["runs"]):
        otel.append(await block())
        with timetracer_otel.record(dir=tempfile.mkdtemp(prefix=f"bench-inbound-{r}-")) as rec:
            recorded.append(await block())
        assert len(rec.paths) == n, (len(rec.paths), n)
    return {"otel_us": otel, "record_us": recorded,
            "overhead_us": [b - a for a, b in zip(otel, recorded, strict=True)]}


def replay(args: dict[str, Any]) -> dict[str, Any]:
    import timetracer_otel
    from timetracer_otel.cassette import load_cassette
    from timetracer_otel.inbound import replay_asgi

    app = make_app()
    instrument(app)
    body = json.dumps(PAYLOAD).encode()
    directory = Path(tempfile.mkdtemp(prefix="bench-inbound-replay-"))

    async def record_all() -> None:
        for _ in range(args["cassettes"]):
            await call(app, body)

    with timetracer_otel.record(dir=directory) as rec:
        asyncio.run(record_all())
    cassettes = [load_cassette(p) for p in rec.paths]
    rates: list[float] = []
    for _ in range(args["runs"]):
        start = time.perf_counter()
        results = [replay_asgi(c, app) for c in cassettes]
        rates.append(len(cassettes) / (time.perf_counter() - start))
        failed = [r.render() for r in results if not r.ok]
        assert not failed, failed[:1]
    return {"cassettes_per_s": rates, "cassettes": len(cassettes)}


def run(args: dict[str, Any]) -> dict[str, Any]:
    # replay_asgi drives the app with an event loop of its own, so replay runs outside one.
    return replay(args) if args["mode"] == "replay" else asyncio.run(overhead(args))


if __name__ == "__main__":
    worker_main(run)
