"""Inbound requests recorded through a real uvicorn server, replayed in-process."""

from __future__ import annotations

import http.client
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

import timetracer_otel
from timetracer_otel.cassette import Cassette, load_cassette
from timetracer_otel.codec import as_bytes
from timetracer_otel.inbound import InboundResult, inbound_span, replay_asgi

APPS = str(Path(__file__).parent / "apps")
if APPS not in sys.path:
    sys.path.insert(0, APPS)

import shop  # noqa: E402
import upstream_raw  # noqa: E402


@pytest.fixture
def upstream(serve: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    server = serve(upstream_raw.app)
    monkeypatch.setenv("SHOP_UPSTREAM", server.url)
    return server


class Client:
    """An untraced HTTP client (stdlib http.client): like a real caller in another process,
    it adds no traceparent and no spans of its own to the recording."""

    def __init__(self, url: str) -> None:
        self.host, _, port = url.removeprefix("http://").partition(":")
        self.port = int(port)

    def send(self, method: str, path: str, chunks: list[bytes] | None = None, **kw: Any) -> Reply:
        req = httpx.Request(method, f"http://{self.host}:{self.port}{path}", **kw)
        headers = {k: v for k, v in req.headers.items() if k not in ("host", "content-length")}
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            if chunks is not None:
                conn.request(method, path, body=iter(chunks), headers=headers, encode_chunked=True)
            else:
                body = req.read()
                conn.request(method, path, body=body or None, headers=headers)
            resp = conn.getresponse()
            return Reply(resp.status, dict(resp.getheaders()), resp.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Reply:
        return self.send("GET", path, **kw)

    def post(self, path: str, **kw: Any) -> Reply:
        return self.send("POST", path, **kw)


@dataclass
class Reply:
    status_code: int
    headers: dict[str, str]
    content: bytes

    def json(self) -> Any:
        return json.loads(self.content)


def _record(tmp_path: Path, serve: Any, send: Any, app: Any = None) -> list[Cassette]:
    with timetracer_otel.record(dir=tmp_path) as rec:
        server = serve(app or OpenTelemetryMiddleware(shop.make_app()))
        send(Client(server.url))
        server.stop()
    return [load_cassette(p) for p in rec.paths]


def _only(cassettes: list[Cassette]) -> Cassette:
    inbound = [c for c in cassettes if inbound_span(c) is not None]
    assert len(inbound) == 1, [c.name for c in cassettes]
    return inbound[0]


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
