"""Concurrent requests record into their own cassettes; replay does not depend on completion order."""

from __future__ import annotations

import asyncio
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from opentelemetry import trace

import timetracer_otel
from tests.upstream_app import app
from timetracer_otel.cassette import load_cassette

tracer = trace.get_tracer("tests")


def test_fifty_concurrent_asyncio_requests_each_get_their_own_cassette(serve: Any, tmp_path: Path) -> None:
    server = serve(app)

    async def handle(client: httpx.AsyncClient, i: int) -> str:
        # Each task is its own inbound request: a SERVER root span, like an ASGI server makes.
        with tracer.start_as_current_span(f"request-{i}", kind=trace.SpanKind.SERVER):
            await asyncio.sleep(random.random() / 100)
            r = await client.get("/items", params={"page": i})
            return str(r.json()["page"])

    async def run_all(order: list[int]) -> dict[int, str]:
        async with httpx.AsyncClient(base_url=server.url) as client:
            results = await asyncio.gather(*(handle(client, i) for i in order))
        return dict(zip(order, results, strict=True))

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(run_all(list(range(50))))
    assert len(rec.paths) == 50
    for path in rec.paths:
        cassette = load_cassette(path)
        page = cassette.name.removeprefix("request-")
        calls = cassette.interactions
        assert len(calls) == 1 and calls[0].label is not None and calls[0].label.endswith(f"page={page}")
        assert cassette.root_span is not None and cassette.root_span.kind == "SERVER"
    server.stop()

    shuffled = list(range(50))
    random.shuffle(shuffled)
    with timetracer_otel.replay(rec.paths) as rep:
        replayed = asyncio.run(run_all(shuffled))
    assert replayed == live
    assert rep.report.exact == 50 and not rep.report.unused


def test_thread_pool_requests_record_and_replay(serve: Any, tmp_path: Path) -> None:
    server = serve(app)

    def handle(i: int) -> str:
        with (
            tracer.start_as_current_span(f"job-{i}", kind=trace.SpanKind.CONSUMER),
            httpx.Client(base_url=server.url) as c,
        ):
            return str(c.get("/items", params={"page": i}).json()["page"])

    with timetracer_otel.record(dir=tmp_path) as rec, ThreadPoolExecutor(8) as pool:
        live = list(pool.map(handle, range(40)))
    assert len(rec.paths) == 40
    server.stop()
    with timetracer_otel.replay(rec.paths), ThreadPoolExecutor(8) as pool:
        replayed = list(pool.map(handle, reversed(range(40))))
    assert replayed[::-1] == live
