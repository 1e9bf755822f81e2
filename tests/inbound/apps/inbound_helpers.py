"""Shared by the inbound tests: an untraced HTTP client, recording helpers, the upstream."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port, unreachable_port
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

import timetracer_otel
from timetracer_otel.cassette import Cassette, find_cassettes, load_cassette
from timetracer_otel.inbound import inbound_span
from timetracer_otel.replay_shims.base import ATTR_LIFESPAN

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


@pytest.fixture(name="seeded")
def seeded_fixture(pg_database: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test's database with the priced ``stock`` table, the pooled apps pointed at it."""
    asyncio.run(seed_stock(pg_dsn(pg_database), price=True))
    monkeypatch.setenv("POOLED_PG_DSN", pg_dsn(pg_database))
    return pg_database


def _dead_db(db: str) -> str:
    """The DSN of ``db`` at a port nothing listens on (the database gone, for a replay)."""
    return pg_dsn(db, unreachable_port())


def _env(**extra: str) -> dict[str, str]:
    """This process's environment with the apps on PYTHONPATH, plus ``extra``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([APPS, os.environ.get("PYTHONPATH", "")]))
    env.update(extra)
    return env


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m timetracer_otel.cli ARGS`` with the apps importable, its output captured."""
    return subprocess.run([sys.executable, "-m", "timetracer_otel.cli", *args], env=_env(**env),
                          capture_output=True, text=True, timeout=120)


def _startups(directory: Path) -> list[Cassette]:
    """The lifespan startup cassettes under ``directory``."""
    return [c for c in (load_cassette(p) for p in find_cassettes(directory))
            if c.root_span is not None and ATTR_LIFESPAN in c.root_span.attributes]


def _record_app(tmp_path: Path, serve: Any, app: Any, paths: list[str],
                pause: float = 0.0) -> list[Any]:
    """Record ``app`` served by uvicorn with its lifespan on, GETting ``paths`` in turn."""
    replies = []
    with timetracer_otel.record(dir=tmp_path):
        server = serve(OpenTelemetryMiddleware(app), lifespan="on")
        client = Client(server.url)
        for p in paths:
            replies.append(client.get(p))
            time.sleep(pause)
        server.stop()
    return replies


def record_get(directory: Path, serve: Any, app: Any, path: str) -> Reply:
    """Record ``app``, served by uvicorn as it is (its own instrumentation) with its lifespan
    on, answering one GET of ``path``."""
    with timetracer_otel.record(dir=directory):
        server = serve(app, lifespan="on")
        reply = Client(server.url).get(path)
        server.stop()
    return reply


def record_uvicorn(directory: Path, app_ref: str, env: dict[str, str],
                   send: Callable[[Client], object]) -> subprocess.CompletedProcess[bytes]:
    """Zero-code recording: `timetracer-otel record --dir DIRECTORY -- uvicorn APP_REF` under
    ``env``, ``send`` run with a client of it; then uvicorn, the child of
    opentelemetry-instrument's exec, is stopped as a deployment stops it (SIGTERM). Returns the
    record command's exit code and output once it has exited."""
    port = free_port()
    cmd = [sys.executable, "-m", "timetracer_otel.cli", "record", "--dir", str(directory), "--",
           sys.executable, "-m", "uvicorn", app_ref, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_port(port, proc)
        send(Client(f"http://127.0.0.1:{port}"))
        child = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0])
        os.kill(child, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
