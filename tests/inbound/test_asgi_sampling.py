"""TIMETRACER_SAMPLE_RATE and TIMETRACER_ERRORS_ONLY decide per trace and keep every child
span; excluded URLs (health checks) are not recorded at all."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

sys.path.insert(0, str(Path(__file__).parent / "apps"))
from inbound_helpers import Client, shop, upstream_fixture

import timetracer_otel
from timetracer_otel.cassette import Cassette, load_cassette
from timetracer_otel.exporters.writer import sampled
from timetracer_otel.inbound import inbound_span

upstream = upstream_fixture


def _run(tmp_path: Path, serve: Any, send: Any, app: Any = None) -> tuple[list[Cassette], int]:
    with timetracer_otel.record(dir=tmp_path) as rec:
        server = serve(app or OpenTelemetryMiddleware(shop.make_app()))
        send(Client(server.url))
        server.stop()
    assert rec.writer is not None
    cassettes = [load_cassette(p) for p in rec.paths]
    return [c for c in cassettes if inbound_span(c) is not None], rec.writer.skipped


def test_errors_only_keeps_failed_traces_whole(tmp_path: Path, serve: Any, upstream: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMETRACER_ERRORS_ONLY", "1")

    def send(c: Client) -> None:
        assert c.post("/orders/1", json={"sku": "A1"}).status_code == 200
        assert c.post("/orders/2", json={"sku": "A1", "fail": True}).status_code == 502
        assert c.get("/boom").status_code == 500
        assert c.get("/fail").status_code == 503

    cassettes, skipped = _run(tmp_path, serve, send)
    names = sorted(c.name for c in cassettes)
    assert names == ["GET__boom", "GET__fail", "POST__orders_id"]
    assert skipped >= 1
    order = next(c for c in cassettes if c.name == "POST__orders_id")
    root = inbound_span(order)
    assert root is not None and root.response["status"] == 502
    # The whole trace is kept: the upstream call and the ASGI receive/send spans.
    assert [s.library for s in order.interactions if s is not root] == ["httpx"]
    assert {s.name for s in order.spans} >= {"POST /orders/2 http receive", "POST /orders/2 http send"}
    assert all(s.trace_id == root.trace_id for s in order.spans)


def test_sample_rate_is_per_trace(tmp_path: Path, serve: Any, upstream: Any,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIMETRACER_SAMPLE_RATE", "0.5")
    n = 20

    def send(c: Client) -> None:
        for i in range(n):
            assert c.post(f"/orders/{i}", json={"sku": "B2"}).status_code == 200

    cassettes, skipped = _run(tmp_path, serve, send)
    assert 0 < len(cassettes) < n
    assert len(cassettes) + skipped == n
    for c in cassettes:
        root = inbound_span(c)
        assert root is not None and sampled(root.trace_id, 0.5)
        assert [s.library for s in c.interactions if s is not root] == ["httpx"]
        assert c.complete is True


def test_excluded_urls_are_not_recorded(tmp_path: Path, serve: Any, upstream: Any) -> None:
    app = OpenTelemetryMiddleware(shop.make_app(), excluded_urls="health,ready")

    def send(c: Client) -> None:
        assert c.get("/health").content == b"ok"  # still answered, just not recorded
        assert c.post("/orders/3", json={"sku": "A1"}).status_code == 200

    cassettes, _ = _run(tmp_path, serve, send, app)
    assert [c.name for c in cassettes] == ["POST__orders_id"]
