"""`timetracer-otel replay PATH --asgi MODULE:APP` and `timetracer-otel diff A B`, with the
Starlette service calling PostgreSQL (asyncpg) and an HTTP upstream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import unreachable_port

sys.path.insert(0, str(Path(__file__).parent / "apps"))
from inbound_helpers import (
    Client,
    _env,
    _only,
    _record,
    pg_dsn,
    record_uvicorn,
    seed_stock,
    shop,
    upstream_fixture,
)

from timetracer_otel.cassette import find_cassettes, load_cassette
from timetracer_otel.cli import main
from timetracer_otel.inbound import inbound_span

upstream = upstream_fixture


def test_replay_asgi_cli_with_postgres_and_upstream_unreachable(
    tmp_path: Path, serve: Any, upstream: Any, pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asyncio.run(seed_stock(pg_dsn(pg_database)))
    monkeypatch.setenv("SHOP_PG_DSN", pg_dsn(pg_database))
    replies = []

    def send(c: Client) -> None:
        replies.append(c.post("/orders/7", json={"sku": "A1", "qty": 2}))
        replies.append(c.post("/orders/8", json={"sku": "B2"}))

    cassettes = _record(tmp_path, serve, send)
    assert [r.json()["stock"] for r in replies] == [12, 0]
    for c in cassettes:
        libs = [s.library for s in c.interactions if s.kind != "SERVER"]
        assert libs[0] == "httpx" and "asyncpg" in libs
    upstream.stop()  # the upstream is gone, and the database is only reachable at a dead port
    monkeypatch.setenv("SHOP_PG_DSN", pg_dsn(pg_database, unreachable_port()))
    runner = CliRunner()
    out = runner.invoke(main, ["replay", str(tmp_path), "--asgi", "shop:app"])
    assert out.exit_code == 0, out.output
    assert "2 matched, 0 differ" in out.output
    assert "ok   POST /orders/{id} [trace " in out.output
    # --live (or TIMETRACER_LIVE_PLUGINS) keeps a library live: asyncpg now reaches for the
    # dead port and the requests fail; a name it does not know is bad input.
    out = runner.invoke(main, ["replay", str(tmp_path), "--asgi", "shop:app", "--live", "asyncpg"])
    assert out.exit_code == 1 and "0 matched, 2 differ" in out.output, out.output
    out = runner.invoke(main, ["replay", str(tmp_path), "--asgi", "shop:app"],
                        env={"TIMETRACER_LIVE_PLUGINS": "asyncpg"})
    assert out.exit_code == 1 and "0 matched, 2 differ" in out.output, out.output
    out = runner.invoke(main, ["replay", str(tmp_path), "--asgi", "shop:app", "--live", "bogus"])
    assert out.exit_code == 2 and "--live names 'bogus'" in out.output, out.output

    monkeypatch.setenv("SHOP_TAX", "0.25")  # the deliberately changed handler
    out = runner.invoke(main, ["replay", str(tmp_path), "--asgi", "shop:app"])
    assert out.exit_code == 1, out.output
    assert "body.total: recorded 22.0, now 25.0" in out.output
    assert "0 matched, 2 differ" in out.output


def test_replay_asgi_takes_the_real_value_of_a_header_stored_redacted(
    tmp_path: Path, serve: Any
) -> None:
    import authed
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    def send(c: Client) -> None:
        assert c.send("GET", "/me", headers={"Authorization": f"Bearer {authed.TOKEN}"}).status_code == 200

    _record(tmp_path, serve, send, app=OpenTelemetryMiddleware(authed.app))
    [path] = find_cassettes(str(tmp_path))
    assert authed.TOKEN.encode() not in Path(path).read_bytes()
    runner = CliRunner()
    # As recorded, the app sees a redaction token and answers 401; the output says why.
    out = runner.invoke(main, ["replay", str(tmp_path), "--asgi", "authed:app"])
    assert out.exit_code == 1 and "status: recorded 200, now 401" in out.output, out.output
    assert "redaction tokens in place of the values: authorization" in out.output
    # The usual spelling of the name (ASGI wants it lowercase); the app echoes the value it
    # got, which compares equal to the token the recording stored and is never printed.
    out = runner.invoke(main, ["replay", str(tmp_path), "--asgi", "authed:app",
                               "--header", f"Authorization: Bearer {authed.TOKEN}"])
    assert out.exit_code == 0 and "1 matched, 0 differ" in out.output, out.output
    assert authed.TOKEN not in out.output
    out = runner.invoke(main, ["replay", str(tmp_path), "--asgi", "authed:app",
                               "--header", f"Authorization: Bearer {authed.TOKEN}x"])
    assert out.exit_code == 1 and "now 401" in out.output and authed.TOKEN not in out.output
    out = runner.invoke(main, ["replay", str(tmp_path), "--asgi", "authed:app",
                               "--header", "authorization: Bearer t\u00f6k\u20acn"])
    assert out.exit_code == 2 and "latin-1" in out.output, out.output
    # Bad input: one line, exit 2, and never the value it was given.
    out = runner.invoke(main, ["replay", str(tmp_path), "--asgi", "authed:app",
                               "--header", f"Bearer {authed.TOKEN}"])
    assert out.exit_code == 2 and "'NAME: value'" in out.output and authed.TOKEN not in out.output
    out = runner.invoke(main, ["replay", "--cassette", str(tmp_path), "--header", "a: b",
                               "--", "true"])
    assert out.exit_code == 2 and "--header goes with --asgi" in out.output


def test_replay_reports_dependency_miss_with_closest_call(tmp_path: Path, serve: Any, upstream: Any) -> None:
    cassette = _only(_record(tmp_path, serve, lambda c: c.post("/orders/7", json={"sku": "A1"})))
    upstream.stop()
    root = inbound_span(cassette)
    assert root is not None
    # The same request, but the new code asks the upstream for another sku.
    from timetracer_otel.inbound import replay_asgi

    async def changed(scope: Any, receive: Any, send: Any) -> None:
        import httpx

        async with httpx.AsyncClient(base_url=os.environ["SHOP_UPSTREAM"]) as client:
            await client.get("/price/A1?currency=EUR")
        await shop.make_app()(scope, receive, send)

    result = replay_asgi(cassette, changed, strict=True)
    assert not result.ok
    text = "\n".join(result.diff)
    assert "dependency No recorded httpx call matches GET" in text
    assert "Closest recorded calls:" in text and "/price/A1" in text
    assert result.report.misses and type(result.report.misses[0]) is str


def test_cli_bad_input_exits_2(tmp_path: Path) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["replay", str(tmp_path / "nope.msgpack"), "--asgi", "shop:app"])
    assert out.exit_code == 2 and "no such cassette" in out.output
    empty = tmp_path / "empty"
    empty.mkdir()
    out = runner.invoke(main, ["replay", str(empty), "--asgi", "no_such_module_xyz:app"])
    assert out.exit_code == 2 and "cannot import 'no_such_module_xyz'" in out.output
    out = runner.invoke(main, ["replay", str(empty), "--asgi", "shop"])
    assert out.exit_code == 2 and "is not MODULE:APP" in out.output


def test_diff_aligns_calls_by_key(tmp_path: Path, serve: Any, upstream: Any) -> None:
    def send(c: Client) -> None:
        c.post("/orders/7", json={"sku": "A1", "qty": 1})
        time.sleep(0.05)
        c.post("/orders/7", json={"sku": "A1", "qty": 2})
        time.sleep(0.05)
        c.post("/orders/7", json={"sku": "B2", "qty": 1})

    cassettes = sorted(_record(tmp_path, serve, send), key=lambda c: c.spans[0].start_ns)
    paths = {inbound_span(c).span_id: p for p in find_cassettes(tmp_path)  # type: ignore[union-attr]
             for c in [load_cassette(p)]}
    a, b, c = (str(paths[inbound_span(x).span_id]) for x in cassettes)  # type: ignore[union-attr]
    runner = CliRunner()
    out = runner.invoke(main, ["diff", a, a])
    assert out.exit_code == 0 and "no differences" in out.output
    out = runner.invoke(main, ["diff", a, b])
    assert out.exit_code == 1, out.output
    assert "request.body.qty: recorded 1, now 2" in out.output
    assert "response body.total: recorded 11.0, now 22.0" in out.output
    assert "call " not in out.output  # the upstream call has the same key: aligned, same outcome
    out = runner.invoke(main, ["diff", a, c])
    assert out.exit_code == 1
    assert "/price/A1" in out.output and "/price/B2" in out.output
    out = runner.invoke(main, ["diff", a, str(tmp_path / "missing.msgpack")])
    assert out.exit_code == 2


def test_zero_code_record_then_replay_cli(tmp_path: Path, serve: Any, upstream: Any) -> None:
    env = _env(OTEL_PYTHON_EXCLUDED_URLS="health", OTEL_BSP_SCHEDULE_DELAY="50",
               OTEL_SERVICE_NAME="shop")

    def send(client: Client) -> None:
        assert client.get("/health").content == b"ok"
        assert client.post("/orders/42", json={"sku": "B2", "qty": 2}).json()["total"] == 56.1
        assert client.get("/boom").status_code == 500

    run = record_uvicorn(tmp_path, "shop:app", env, send)
    err = run.stderr
    # uvicorn shuts down cleanly, then re-raises SIGTERM: the wrapper exits 128 + SIGTERM.
    assert run.returncode in (0, 128 + signal.SIGTERM), err.decode()
    assert b"recorded 2 cassette(s)" in err
    names = sorted(load_cassette(p).name for p in find_cassettes(tmp_path))
    assert "GET__health" not in names  # OTEL_PYTHON_EXCLUDED_URLS
    assert "POST__orders_id" in names and "GET__boom" in names
    boom = next(load_cassette(p) for p in find_cassettes(tmp_path) if "GET__boom" in p.name)
    root = inbound_span(boom)
    assert root is not None and root.error["type"] == "builtins:ValueError"
    assert root.response is None  # raised inside ServerErrorMiddleware: nothing sent yet
    upstream.stop()
    out = subprocess.run(
        [sys.executable, "-m", "timetracer_otel.cli", "replay", str(tmp_path), "--asgi", "shop:app"],
        env=env, capture_output=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    assert b"2 matched, 0 differ" in out.stdout
