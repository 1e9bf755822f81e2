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
from timetracer_otel.replay_shims.base import STATE

upstream = upstream_fixture
SECRET = "s3cr3t-inbound-0123456789"
QTOKEN = "qt0ken-inbound-98765"


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_inbound_requests_left_to_the_writer_record_as_on_the_request_path(
        serve: Any, upstream: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    port = free_port()  # both recordings' requests carry the same Host

    def job(base: str, down: str) -> None:
        server = serve(OpenTelemetryMiddleware(shop.make_app()), port)
        client = Client(server.url)
        auth = {"authorization": f"Bearer {SECRET}", "cookie": "session=s3cr3t-cookie; theme=dark"}
        assert client.post(f"/orders/7?src=web&token={QTOKEN}", json={"sku": "A1", "qty": 3},
                           headers=auth).status_code == 200
        assert client.post("/echo", chunks=[b"first,", b"second"],
                           headers={"content-type": "text/plain"}).content == b"first,second"
        assert client.get("/stream").content.count(b"data: event") == 5
        assert client.get("/boom").status_code == 500
        assert client.get("/fail").status_code == 503
        # The app's redactor learned the request's secrets on the request path, whichever way.
        scrubbed = STATE.redactor.scrub(f"log: {SECRET} {QTOKEN} s3cr3t-cookie")
        assert SECRET not in scrubbed and QTOKEN not in scrubbed and "s3cr3t-cookie" not in scrubbed
        server.stop()

    interactions = recorded_both_ways(job, "", 6, tmp_path, monkeypatch, fmt)
    inbound = [i for i in interactions if i[0] == "asgi"]
    assert sorted(i[3] for i in inbound) == [
        "GET /boom", "GET /fail", "GET /stream", "POST /echo", "POST /orders/{id}"]
    order = next(i for i in inbound if i[3] == "POST /orders/{id}")
    headers = dict(order[4]["headers"])
    assert headers["authorization"].startswith("Bearer redacted:")
    assert headers["cookie"].startswith("session=redacted:") and "; theme=redacted:" in headers["cookie"]
    boom = next(i for i in inbound if i[3] == "GET /boom")
    assert boom[6]["type"] == "builtins:ValueError" and "Traceback" in boom[6]["attrs"]["traceback"]
