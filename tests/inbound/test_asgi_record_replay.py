"""Inbound requests recorded through a real uvicorn server, replayed in-process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

sys.path.insert(0, str(Path(__file__).parent / "apps"))
from inbound_helpers import Client, _only, _record, shop, upstream_fixture

from timetracer_otel.codec import as_bytes
from timetracer_otel.inbound import InboundResult, inbound_span, replay_asgi

upstream = upstream_fixture


def test_order_records_request_response_and_upstream(tmp_path: Path, serve: Any, upstream: Any) -> None:
    def send(client: Client) -> None:
        r = client.post("/orders/7?src=web", json={"sku": "A1", "qty": 3},
                        headers={"authorization": "Bearer s3cret", "x-trace-me": "1"})
        assert r.status_code == 200
        assert r.json()["total"] == 33.0

    cassette = _only(_record(tmp_path, serve, send))
    assert cassette.name == "POST__orders_id"
    root = inbound_span(cassette)
    assert root is not None and root.kind == "SERVER" and root.span_id == cassette.root
    req = root.request
    assert req["method"] == "POST" and req["path"] == "/orders/7" and req["route"] == "/orders/{id}"
    assert as_bytes(req["query_string"]) == b"src=web"
    headers = dict(req["headers"])
    assert "redacted:" in headers["authorization"] and "s3cret" not in headers["authorization"]
    assert headers["x-trace-me"] == "1"
    body = b"".join(as_bytes(m["body"]) for m in req["messages"] if m["type"] == "http.request")
    assert body == b'{"sku":"A1","qty":3}'
    assert root.response["status"] == 200 and type(root.response["status"]) is int
    start = root.response["messages"][0]
    assert start["type"] == "http.response.start" and ["x-order", "7"] in start["headers"]
    assert [s.library for s in cassette.interactions if s is not root] == ["httpx"]
    upstream.stop()

    result = replay_asgi(cassette, OpenTelemetryMiddleware(shop.make_app()))
    assert isinstance(result, InboundResult)
    assert result.ok, result.diff
    assert result.status == 200 and type(result.status) is int
    assert result.label.startswith("POST /orders/{id} [trace ")
    assert result.report.exact == 1 and result.report.misses == []
    # The bare app (no OTel middleware) compares at the outer level, also a match.
    assert replay_asgi(cassette, shop.make_app()).ok


def test_a_miss_let_go_live_is_not_a_difference(tmp_path: Path, serve: Any, upstream: Any) -> None:
    cassette = _only(_record(tmp_path, serve, lambda c: c.post("/orders/7", json={"sku": "A1", "qty": 3})))
    root = inbound_span(cassette)
    # Without its upstream call: the replay misses it, and passthrough sends it live (the
    # upstream is still up, so the answer is the same).
    bare = msgspec.structs.replace(cassette, spans=[s for s in cassette.spans if not s.library or s is root])
    passed = replay_asgi(bare, OpenTelemetryMiddleware(shop.make_app()), on_miss="passthrough")
    assert passed.ok, passed.diff
    assert passed.status == 200 and len(passed.report.misses) == 1
    failed = replay_asgi(bare, OpenTelemetryMiddleware(shop.make_app()))  # on_miss="error"
    assert not failed.ok and failed.diff[0].startswith("dependency No recorded httpx call matches")


def test_changed_handler_names_the_field(tmp_path: Path, serve: Any, upstream: Any,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cassette = _only(_record(tmp_path, serve, lambda c: c.post("/orders/7", json={"sku": "B2"})))
    upstream.stop()
    monkeypatch.setenv("SHOP_TAX", "0.2")
    result = replay_asgi(cassette, shop.make_app())
    assert not result.ok
    assert result.diff == ["body.total: recorded 28.05, now 30.6"]


def test_app_exception_recorded_and_reproduced(tmp_path: Path, serve: Any, upstream: Any) -> None:
    def send(client: Client) -> None:
        assert client.get("/boom").status_code == 500

    cassette = _only(_record(tmp_path, serve, send))
    root = inbound_span(cassette)
    assert root is not None and root.status == "ERROR"
    assert root.error["type"] == "builtins:ValueError"
    assert root.error["message"] == "boom: order 7 has no sku"
    assert 'raise ValueError("boom: order 7 has no sku")' in root.error["attrs"]["traceback"]
    result = replay_asgi(cassette, OpenTelemetryMiddleware(shop.make_app()))
    assert result.ok, result.diff
    assert replay_asgi(cassette, shop.make_app()).ok  # outer level: 500 sent, same error raised
