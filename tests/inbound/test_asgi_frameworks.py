"""FastAPI (under the ASGI middleware) and Litestar (its own OpenTelemetry plugin) record and
replay the same way Starlette does."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent / "apps"))
import frameworks
from inbound_helpers import Client, _only, _record, upstream_fixture

from timetracer_otel.inbound import inbound_span, instrument_app, replay_asgi

upstream = upstream_fixture


def _order(c: Client) -> None:
    r = c.post("/orders/5", json={"sku": "B2", "qty": 2})
    assert r.status_code == 200, r.content
    assert r.json() == {"id": 5, "price": 25.5, "total": 56.1}


@pytest.mark.parametrize("framework", ["fastapi", "litestar"])
def test_framework_records_and_replays(framework: str, tmp_path: Path, serve: Any, upstream: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    def make() -> Any:
        if framework == "fastapi":
            # FastAPI's native telemetry steps aside when the ASGI middleware is in its stack.
            return instrument_app(frameworks.make_fastapi())
        return frameworks.make_litestar()

    cassette = _only(_record(tmp_path, serve, _order, app=make()))
    root = inbound_span(cassette)
    assert root is not None and root.kind == "SERVER"
    assert cassette.name.startswith("POST__orders_order_id")
    assert root.request["route"].startswith("/orders/{order_id")
    assert [s.library for s in cassette.interactions if s is not root] == ["httpx"]
    upstream.stop()
    result = replay_asgi(cassette, make())
    assert result.ok, result.diff
    assert result.status == 200 and result.report.exact == 1
    monkeypatch.setenv("SHOP_TAX", "0")
    changed = replay_asgi(cassette, make())
    assert changed.diff == ["body.total: recorded 56.1, now 51.0"]


def test_a_fastapi_500_recorded_under_its_own_instrumentation_replays(
    tmp_path: Path, serve: Any
) -> None:
    """opentelemetry-instrument gives a FastAPI app FastAPI's instrumentation, whose
    middleware sits outside Starlette's ServerErrorMiddleware: the 500 sent for an exception
    is recorded. The replay's instrument_app must give the app the same stack, or it sees no
    response at all."""
    from fastapi import FastAPI
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    def make() -> FastAPI:
        api = FastAPI()

        @api.get("/boom")
        async def boom() -> None:
            raise RuntimeError("kaboom")

        return api

    recorded = make()
    FastAPIInstrumentor.instrument_app(recorded)  # what opentelemetry-instrument does

    def send(c: Client) -> None:
        r = c.get("/boom")
        assert (r.status_code, r.content) == (500, b"Internal Server Error")

    cassette = _only(_record(tmp_path, serve, send, app=recorded))
    assert cassette.spans[0].response is not None and cassette.spans[0].response["status"] == 500
    result = replay_asgi(cassette, instrument_app(make()))
    assert result.ok, result.diff
    assert result.status == 500
