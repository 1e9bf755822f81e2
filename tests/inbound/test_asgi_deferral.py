"""Inbound requests left to the writer give the cassette the app itself would have written."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

sys.path.insert(0, str(Path(__file__).parent / "apps"))
from inbound_helpers import Client, shop, upstream_fixture

from tests.conftest import free_port
from tests.deferral import recorded_both_ways
from timetracer_otel.codec import as_bytes
from timetracer_otel.redaction import Redactor
from timetracer_otel.replay_shims.base import STATE

upstream = upstream_fixture


async def _raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A plain ASGI app whose response start carries a key no recording can keep (as a
    server extension's file object would be)."""
    if scope["type"] != "http":
        return
    await receive()
    await send({"type": "http.response.start", "status": 201, "extension": object(),
                "headers": [(b"content-type", b"text/plain"), (b"set-cookie", b"sid=s3cr3t-set")]})
    await send({"type": "http.response.body", "body": bytearray(b"made")})
SECRET = "s3cr3t-inbound-0123456789"
QTOKEN = "qt0ken-inbound-98765"


@pytest.fixture(name="response_propagator")
def _response_propagator() -> Any:
    """OTel's traceresponse propagator: the middleware appends its headers to the app's own
    response header list after the app sent it, which a recording must not keep."""
    from opentelemetry.instrumentation.propagators import (
        TraceResponsePropagator,
        get_global_response_propagator,
        set_global_response_propagator,
    )

    before = get_global_response_propagator()
    set_global_response_propagator(TraceResponsePropagator())
    yield
    set_global_response_propagator(before)  # type: ignore[arg-type]


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_inbound_requests_left_to_the_writer_record_as_on_the_request_path(
        serve: Any, upstream: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str,
        response_propagator: Any) -> None:
    port, raw_port = free_port(), free_port()  # both recordings' requests carry the same Host

    key = STATE.redactor.key

    def job(base: str, down: str) -> None:
        # A redactor that knows no secret yet (the same key, so both recordings' tokens
        # match): the check below then sees only what this recording taught it.
        monkeypatch.setattr(STATE, "redactor", Redactor(key=key))
        server = serve(OpenTelemetryMiddleware(shop.make_app()), port)
        client = Client(server.url)
        auth = {"authorization": f"Bearer {SECRET}", "cookie": "session=s3cr3t-cookie; theme=dark"}
        assert client.post(f"/orders/7?src=web&token={QTOKEN}", json={"sku": "A1", "qty": 3},
                           headers=auth).status_code == 200
        # One body: a chunked upload reaches the app as one or two messages by TCP timing,
        # which two recordings need not share.
        assert client.post("/echo", content=b"first,second",
                           headers={"content-type": "text/plain"}).content == b"first,second"
        assert client.get("/stream").content.count(b"data: event") == 5
        assert client.get("/boom").status_code == 500
        assert client.get("/fail").status_code == 503
        raw = serve(OpenTelemetryMiddleware(_raw_app), raw_port)
        assert Client(raw.url).get("/raw").content == b"made"
        raw.stop()
        # The app's redactor learned the request's secrets on the request path, whichever way.
        scrubbed = STATE.redactor.scrub(f"log: {SECRET} {QTOKEN} s3cr3t-cookie s3cr3t-set")
        for secret in (SECRET, QTOKEN, "s3cr3t-cookie", "s3cr3t-set"):
            assert secret not in scrubbed
        server.stop()

    interactions = recorded_both_ways(job, "", 7, tmp_path, monkeypatch, fmt)
    inbound = [i for i in interactions if i[0] == "asgi"]
    assert sorted(i[3] for i in inbound) == [
        "GET /boom", "GET /fail", "GET /raw", "GET /stream", "POST /echo", "POST /orders/{id}"]
    raw = next(i for i in inbound if i[3] == "GET /raw")
    start, body = raw[5]["messages"]
    assert "extension" not in start and start["status"] == 201
    assert [h[0] for h in start["headers"]] == ["content-type", "set-cookie"]  # no traceresponse
    assert ["set-cookie", "sid=s3cr3t-set"] not in start["headers"]
    assert as_bytes(body["body"]) == b"made" and type(as_bytes(body["body"])) is bytes
    order = next(i for i in inbound if i[3] == "POST /orders/{id}")
    headers = dict(order[4]["headers"])
    assert headers["authorization"].startswith("Bearer redacted:")
    assert headers["cookie"].startswith("session=redacted:") and "; theme=redacted:" in headers["cookie"]
    boom = next(i for i in inbound if i[3] == "GET /boom")
    assert boom[6]["type"] == "builtins:ValueError" and "Traceback" in boom[6]["attrs"]["traceback"]
