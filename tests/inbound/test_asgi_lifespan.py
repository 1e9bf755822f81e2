"""The app's lifespan: its startup is recorded as a cassette of its own, and `replay --asgi`
runs the startup (answered from it) before the requests and the shutdown after, so a pool
opened at startup serves the replayed requests with PostgreSQL unreachable."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner
from conftest import unreachable_port
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

sys.path.insert(0, str(Path(__file__).parent / "apps"))
import pooled
from inbound_helpers import Client, _env, pg_dsn, record_uvicorn, seed_stock

import timetracer_otel
from timetracer_otel.cassette import Cassette, find_cassettes, load_cassette
from timetracer_otel.cli import main
from timetracer_otel.inbound import Lifespan, inbound_span, replay_asgi
from timetracer_otel.replay_shims.base import ATTR_LIFESPAN


def _record(tmp_path: Path, serve: Any, send: Any) -> list[Cassette]:
    """Record the pooled app served by uvicorn, its lifespan run as a server runs it."""
    with timetracer_otel.record(dir=tmp_path) as rec:
        server = serve(OpenTelemetryMiddleware(pooled.app), lifespan="on")
        send(Client(server.url))
        server.stop()
    return [load_cassette(p) for p in rec.paths]


def _startup(cassettes: list[Cassette]) -> Cassette:
    found = [c for c in cassettes if c.root_span is not None
             and c.root_span.attributes.get(ATTR_LIFESPAN) == "startup"]
    assert len(found) == 1, [c.name for c in cassettes]
    return found[0]


@pytest.fixture
def recorded(tmp_path: Path, serve: Any, pg_database: str,
             monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[Any], str]:
    asyncio.run(seed_stock(pg_dsn(pg_database), price=True))
    monkeypatch.setenv("POOLED_PG_DSN", pg_dsn(pg_database))
    replies: list[Any] = []

    def send(c: Client) -> None:
        replies.extend([c.get("/stock/A1"), c.get("/stock/B2")])

    _record(tmp_path, serve, send)
    assert [r.json() for r in replies] == [{"qty": 12, "price": "9.50", "of": 2},
                                           {"qty": 0, "price": "1.25", "of": 2}]
    # The database is gone from here on: only the dead port is reachable.
    monkeypatch.setenv("POOLED_PG_DSN", pg_dsn(pg_database, unreachable_port()))
    return tmp_path, replies, pg_database


def test_startup_is_recorded_as_its_own_cassette(recorded: tuple[Path, list[Any], str]) -> None:
    cassettes = [load_cassette(p) for p in find_cassettes(recorded[0])]
    startup = _startup(cassettes)
    assert startup.name == "lifespan_startup" and inbound_span(startup) is None
    calls = [(s.library, s.label) for s in startup.interactions]
    assert sum(1 for lib, label in calls if lib == "asyncpg" and label.startswith("connect")) == 2
    assert any("count(*)" in label for _, label in calls), calls
    # The requests' cassettes hold their queries, not the pool's connections.
    inbound = [c for c in cassettes if inbound_span(c) is not None]
    assert len(inbound) == 2
    for c in inbound:
        labels = [s.label for s in c.interactions if s.library == "asyncpg"]
        assert labels and not any(label.startswith("connect") for label in labels), labels


def test_replay_asgi_runs_the_recorded_startup_with_postgres_unreachable(
        recorded: tuple[Path, list[Any], str]) -> None:
    runner = CliRunner()
    out = runner.invoke(main, ["replay", str(recorded[0]), "--asgi", "pooled:app"])
    assert out.exit_code == 0, out.output
    assert "2 matched, 0 differ" in out.output and "skipped" not in out.output
    # Without the lifespan the requests find no pool in their state: both fail.
    out = runner.invoke(main, ["replay", str(recorded[0]), "--asgi", "pooled:app",
                               "--lifespan", "off"])
    assert out.exit_code == 1 and "0 matched, 2 differ" in out.output, out.output


def test_replay_asgi_says_when_no_startup_was_recorded(
        recorded: tuple[Path, list[Any], str]) -> None:
    startup = next(p for p in find_cassettes(recorded[0]) if "lifespan_startup" in p.name)
    startup.unlink()
    # auto: the startup is tried, fails on the pool's first connection (which nothing
    # answers), and the requests run without it, as before startups were recorded.
    out = CliRunner().invoke(main, ["replay", str(recorded[0]), "--asgi", "pooled:app"])
    assert out.exit_code == 1, out.output
    assert ("note: the app's lifespan startup failed (no recorded startup in the cassettes): "
            f"no recorded answer for connect {recorded[2]}; the requests ran without the "
            "lifespan") in out.output
    assert "0 matched, 2 differ" in out.output
    # on: a startup is required, and no request runs without it.
    out = CliRunner().invoke(main, ["replay", str(recorded[0]), "--asgi", "pooled:app",
                                    "--lifespan", "on"])
    assert out.exit_code == 1, out.output
    assert "FAIL the app's lifespan startup failed (no recorded startup" in out.output
    assert "no request replayed (2 recorded)" in out.output
    assert "Traceback" not in out.output


def test_replay_asgi_in_code_with_the_startup_cassette(recorded: tuple[Path, list[Any], str]) -> None:
    paths = find_cassettes(recorded[0])
    startup = next(p for p in paths if "lifespan_startup" in p.name)
    request = next(p for p in paths if inbound_span(load_cassette(p)) is not None)
    app = OpenTelemetryMiddleware(pooled.app)
    result = replay_asgi(request, app, lifespan=startup)
    assert result.ok, result.render()
    assert result.report.exact >= 1 and not result.report.misses
    result = replay_asgi(request, app)  # no lifespan: no pool
    assert not result.ok and result.status == 500


def test_replayed_startup_values_keep_their_types(recorded: tuple[Path, list[Any], str]) -> None:
    """What the startup read comes back as live gave it (an int, not a str), and the pool it
    opened answers a request's Decimal as a Decimal."""
    paths = find_cassettes(recorded[0])
    startup = next(p for p in paths if "lifespan_startup" in p.name)
    seen: dict[str, Any] = {}

    async def probe(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            return await pooled.app(scope, receive, send)
        seen["skus"] = scope["state"]["skus"]
        seen["row"] = await scope["state"]["pool"].fetchrow(
            "SELECT qty, price FROM stock WHERE sku = $1", "A1")
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def run() -> None:
        from timetracer_otel import replay

        request = next(p for p in paths if inbound_span(load_cassette(p)) is not None
                       and "A1" in str(inbound_span(load_cassette(p)).request))
        life = Lifespan(probe, (str(startup), load_cassette(startup)))
        assert await life.startup() is None
        with replay(request):
            await probe({"type": "http", "state": dict(life.state)}, None, _ignore)
        assert await life.shutdown() is None

    asyncio.run(run())
    assert type(seen["skus"]) is int and seen["skus"] == 2
    assert type(seen["row"]) is asyncpg.Record
    assert type(seen["row"]["price"]) is Decimal and seen["row"]["price"] == Decimal("9.50")


async def _ignore(message: Any) -> None:
    pass


def test_an_app_outside_the_lifespan_protocol() -> None:
    async def run(required: bool) -> tuple[str | None, bool]:
        life = Lifespan(pooled.raw_app, None, required=required)
        failed = await life.startup()
        assert await life.shutdown() is None
        return failed, life.supported

    assert asyncio.run(run(False)) == (None, False)  # auto: runs without one, as uvicorn does
    failed, supported = asyncio.run(run(True))
    assert not supported and failed is not None
    assert "does not take part in the ASGI lifespan protocol" in failed
    assert "lifespan is not supported" in failed


def test_startup_is_kept_when_only_errors_are_recorded(
        tmp_path: Path, serve: Any, pg_database: str, monkeypatch: pytest.MonkeyPatch) -> None:
    asyncio.run(seed_stock(pg_dsn(pg_database), price=True))
    monkeypatch.setenv("POOLED_PG_DSN", pg_dsn(pg_database))
    monkeypatch.setenv("TIMETRACER_ERRORS_ONLY", "1")
    cassettes = _record(tmp_path, serve, lambda c: c.get("/stock/A1"))
    assert [c.name for c in cassettes] == ["lifespan_startup"]


def test_zero_code_records_the_startup_and_replay_runs_it(
        tmp_path: Path, pg_database: str) -> None:
    """`timetracer-otel record -- uvicorn pooled:app`, stopped as a deployment stops it, then
    `replay --asgi` in another process with PostgreSQL at a dead port."""
    asyncio.run(seed_stock(pg_dsn(pg_database), price=True))
    env = _env(OTEL_BSP_SCHEDULE_DELAY="50", POOLED_PG_DSN=pg_dsn(pg_database))

    def send(client: Client) -> None:
        assert client.get("/stock/B2").json()["price"] == "1.25"

    err = record_uvicorn(tmp_path, "pooled:app", env, send).stderr
    assert b"recorded 2 cassette(s)" in err, err.decode()
    names = sorted(load_cassette(p).name for p in find_cassettes(tmp_path))
    assert names == ["GET__stock_sku", "lifespan_startup"], names
    env["POOLED_PG_DSN"] = pg_dsn(pg_database, unreachable_port())
    out = subprocess.run(
        [sys.executable, "-m", "timetracer_otel.cli", "replay", str(tmp_path), "--asgi", "pooled:app"],
        env=env, capture_output=True, timeout=120,
    )
    assert out.returncode == 0, out.stdout.decode() + out.stderr.decode()
    assert b"1 matched, 0 differ" in out.stdout
