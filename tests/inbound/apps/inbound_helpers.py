"""Shared by the inbound tests: an untraced HTTP client, recording helpers, the upstream."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

import timetracer_otel
from timetracer_otel.cassette import Cassette, load_cassette
from timetracer_otel.inbound import inbound_span

APPS = str(Path(__file__).parent)
if APPS not in sys.path:
    sys.path.insert(0, APPS)

import shop  # noqa: E402
import upstream_raw  # noqa: E402


@pytest.fixture(name="upstream")
def upstream_fixture(serve: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
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


def _wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError("uvicorn under timetracer-otel record did not start")


def pg_dsn(db: str, port: int = 5432) -> str:
    return f"postgresql://postgres@127.0.0.1:{port}/{db}"


async def seed_stock(dsn: str, price: bool = False) -> None:
    """The ``stock`` table the shop and pooled apps read: A1 (12 left) and B2 (none)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        if price:
            await conn.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int, price numeric)")
            await conn.execute("INSERT INTO stock VALUES ('A1', 12, 9.50), ('B2', 0, 1.25)")
        else:
            await conn.execute("CREATE TABLE stock (sku text PRIMARY KEY, qty int)")
            await conn.execute("INSERT INTO stock VALUES ('A1', 12), ('B2', 0)")
    finally:
        await conn.close()
