"""The app's lifespan across frameworks and app shapes (replay --asgi, the pytest plugin),
against the real PostgreSQL, Redis and uvicorn: startups that fail, shutdowns that call,
tasks a startup leaves running, several startups in one directory, SQLAlchemy's statement
cache across requests, FastAPI and Litestar."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

from tests.conftest import SHARED_SERVICES

sys.path.insert(0, str(Path(__file__).parent / "apps"))
import lifespan_apps as apps
import pooled
from inbound_helpers import (
    APPS,
    Client,
    _cli,
    _dead_db,
    _env,
    _record_app,
    _startups,
    pg_dsn,
    record_get,
    record_uvicorn,
    seeded_fixture,
    upstream_fixture,
)
from test_asgi_lifespan import recorded  # noqa: F401  (the fixture)

import timetracer_otel
from timetracer_otel.cassette import find_cassettes, load_cassette
from timetracer_otel.exporters.assembler import TraceBatch
from timetracer_otel.exporters.writer import cassette_name
from timetracer_otel.inbound import inbound_span, replay_asgi_async

pytestmark = SHARED_SERVICES  # (see tests/conftest.py)

# The name of this process's cassette of calls outside any trace: its script's (``main``
# under ``python -m pytest``, ``pytest`` under the console script, ``process`` on an xdist
# worker).
PROCESS_CASSETTE = cassette_name(TraceBatch(trace_id="process"))

seeded = seeded_fixture
upstream = upstream_fixture


# --- the CLI's failure paths ---------------------------------------------------------------


def test_startup_failing_for_its_own_reason_says_one_line_without_traceback(
        recorded: tuple[Path, list[Any], str]) -> None:  # noqa: F811
    out = _cli("replay", str(recorded[0]), "--asgi", "lifespan_apps:broken_app")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "KeyError: 'REVIEW_NEVER_SET'" in out.stdout, out.stdout
    assert "Traceback" not in out.stderr and "never retrieved" not in out.stderr, out.stderr


def test_startup_miss_says_one_line_without_traceback(
        recorded: tuple[Path, list[Any], str]) -> None:  # noqa: F811
    for p in find_cassettes(recorded[0]):
        if "lifespan_startup" in p.name:
            p.unlink()
    out = _cli("replay", str(recorded[0]), "--asgi", "pooled:app",
               POOLED_PG_DSN=os.environ["POOLED_PG_DSN"])
    assert out.returncode == 1, out.stdout + out.stderr
    assert "no recorded answer for connect" in out.stdout
    assert "Traceback" not in out.stderr and "never retrieved" not in out.stderr, out.stderr


# --- the pytest plugin's traffic-as-tests --------------------------------------------------


def test_pytest_replay_dir_runs_the_lifespan_like_the_cli(
        recorded: tuple[Path, list[Any], str],  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """`pytest --timetracer-replay-dir DIR --timetracer-asgi-app pooled:app` is the README's
    other way to replay recorded traffic; the CLI passes on the same directory."""
    here = tmp_path_factory.mktemp("plugin")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(here),
         "--timetracer-replay-dir", str(recorded[0]), "--timetracer-asgi-app", "pooled:app"],
        cwd=here, env=_env(POOLED_PG_DSN=os.environ["POOLED_PG_DSN"]), capture_output=True,
        text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


# --- what the startup leaves running -------------------------------------------------------


def test_background_task_started_at_startup(tmp_path: Path, serve: Any, seeded: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A refresher started in the lifespan: where its calls land, and whether the replay of
    the requests still matches."""
    replies = _record_app(tmp_path, serve, apps.bg_app, ["/stock/A1", "/stock/B2"], pause=0.3)
    assert [r.status_code for r in replies] == [200, 200]
    cassettes = [load_cassette(p) for p in find_cassettes(tmp_path)]
    startup = _startups(tmp_path)
    counts = [sum("count(*)" in s.label for s in c.interactions) for c in startup]
    rootless = [c for c in cassettes if inbound_span(c) is None and c not in startup]
    # The refresher's calls, begun after the startup answered, are lone calls of the process.
    assert [c.name for c in rootless] == [PROCESS_CASSETTE], rootless
    assert sum("count(*)" in s.label for s in rootless[0].interactions) >= 2
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_apps:bg_app",
               POOLED_PG_DSN=_dead_db(seeded))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 matched, 0 differ" in out.stdout
    assert "Traceback" not in out.stderr, out.stderr
    # What runs after the startup answered is not the startup: the refresher's calls (every
    # one for the life of the process, rewritten into the file each time) should not pile
    # into the startup cassette. Observed: 16 here after ~1 s; 494 spans / 326 KB after 5 s
    # at a 20 ms period.
    assert max(counts) <= 2, counts
    # (the refresher's calls while the requests ran: answered from the process cassette)
    assert "had no recorded answer" not in out.stdout, out.stdout


def test_background_task_calls_during_a_replayed_request(
        tmp_path: Path, serve: Any, seeded: str) -> None:
    """The same refresher, recorded at its usual pace; replayed while it runs a little faster
    (or the requests a little slower): its calls are charged to whichever request runs."""
    _record_app(tmp_path, serve, apps.bg_app, ["/stock/A1", "/stock/B2"], pause=0.3)
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_apps:bg_app",
               POOLED_PG_DSN=_dead_db(seeded), REVIEW_REFRESH="0")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_shutdown_that_makes_a_call(tmp_path: Path, serve: Any, seeded: str) -> None:
    replies = _record_app(tmp_path, serve, apps.audited_app, ["/stock/A1"])
    assert replies[0].status_code == 200
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_apps:audited_app",
               POOLED_PG_DSN=_dead_db(seeded))
    # The shutdown's NOTIFY ran outside any trace: the process cassette holds it, and answers
    # it (a shutdown call nothing answers would be a note, never a difference).
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 matched, 0 differ" in out.stdout and "note:" not in out.stdout, out.stdout


def test_python_api_startup_failure_leaves_the_app_running(
        tmp_path: Path, serve: Any, seeded: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """replay_asgi_async(lifespan=...) whose startup 'fails' after the app answered complete
    (a swallowed warm-up miss): is the app shut down, or its lifespan task left running?"""
    _record_app(tmp_path, serve, apps.warm_app, ["/stock/A1"])
    startup = next(p for p in find_cassettes(tmp_path) if "lifespan_startup" in p.name)
    request = next(p for p in find_cassettes(tmp_path) if inbound_span(load_cassette(p)))
    monkeypatch.setenv("POOLED_PG_DSN", _dead_db(seeded))
    monkeypatch.setenv("REVIEW_WARM_SQL", "SELECT count(*) FROM stock WHERE qty > 0")  # new code
    apps.EVENTS.clear()

    async def run() -> tuple[Any, list[asyncio.Task[Any]]]:
        result = await replay_asgi_async(request, OpenTelemetryMiddleware(apps.warm_app),
                                         lifespan=startup)
        await asyncio.sleep(0.1)
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        return result, left

    result, left = asyncio.run(run())
    assert not result.ok and "startup failed" in "\n".join(result.diff)
    assert not left, f"the app's lifespan task is left running: {left}"
    assert "warm: shut down" in apps.EVENTS, apps.EVENTS


# --- several startups in one directory -----------------------------------------------------


def test_latest_startup_failed_while_an_earlier_one_succeeded(
        tmp_path: Path, serve: Any, seeded: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A service recorded over time restarts once while its database is down (the worker
    fails to start, the next restart succeeds — or the failed one is simply the last): the
    directory holds a good startup and a later failed one."""
    _record_app(tmp_path, serve, pooled.app, ["/stock/A1"])
    monkeypatch.setenv("POOLED_PG_DSN", _dead_db(seeded))
    with timetracer_otel.record(dir=tmp_path), pytest.raises(BaseException):  # noqa: B017
        serve(OpenTelemetryMiddleware(pooled.app), lifespan="on")  # uvicorn exits: startup failed
    startups = _startups(tmp_path)
    assert sorted(c.root_span.status for c in startups) == ["ERROR", "UNSET"], startups
    out = _cli("replay", str(tmp_path), "--asgi", "pooled:app",
               POOLED_PG_DSN=_dead_db(seeded))
    assert out.returncode == 0, out.stdout + out.stderr


# --- frameworks and clients ----------------------------------------------------------------


def test_fastapi_on_startup_pool_on_app_state(tmp_path: Path, serve: Any, seeded: str) -> None:
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    api = apps.make_fastapi()
    FastAPIInstrumentor.instrument_app(api)
    reply = record_get(tmp_path, serve, api, "/stock/A1")
    assert reply.status_code == 200 and reply.json()["qty"] == 12
    assert len(_startups(tmp_path)) == 1
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_apps:fastapi_app",
               POOLED_PG_DSN=_dead_db(seeded))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 matched, 0 differ" in out.stdout


def test_httpx_and_redis_at_startup(tmp_path: Path, serve: Any, upstream: Any) -> None:
    import redis

    r = redis.Redis()
    r.set("review:flag", "on")
    r.set("review:hits:B2", "7")
    try:
        replies = _record_app(tmp_path, serve, apps.clients_app, ["/quote/B2"])
    finally:
        r.delete("review:flag", "review:hits:B2")
    assert replies[0].json() == {"start": 10.0, "now": 25.5, "flag": "on", "hits": "7"}
    startup = _startups(tmp_path)
    assert len(startup) == 1
    upstream.stop()  # (the same URL, nothing listening there any more)
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_apps:clients_app")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 matched, 0 differ" in out.stdout


# --- the pytest plugin recording a test that runs the app's lifespan -----------------------

_PLUGIN_TEST = '''
import sys
import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from starlette.testclient import TestClient
sys.path.insert(0, {apps!r})
import pooled

@pytest.mark.timetracer
def test_stock():
    with TestClient(OpenTelemetryMiddleware(pooled.app)) as client:
        assert client.get("/stock/A1").json()["qty"] == 12
        assert client.get("/stock/B2").json()["qty"] == 0
'''


def _plugin_run(here: Path, dsn: str) -> subprocess.CompletedProcess[str]:
    env = _env(POOLED_PG_DSN=dsn)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-W",
         "error::pytest.PytestUnraisableExceptionWarning", "--rootdir", str(here), str(here)],
        cwd=here, env=env, capture_output=True, text=True, timeout=120)


def test_plugin_records_and_replays_a_test_running_the_lifespan(
        seeded: str, tmp_path: Path) -> None:
    """A test that runs the app's lifespan (TestClient as a context manager) records its
    startup's calls into the test's own cassette, and replays with the database gone."""
    here = tmp_path / "suite"
    here.mkdir()
    (here / "test_app.py").write_text(_PLUGIN_TEST.format(apps=APPS))
    first = _plugin_run(here, pg_dsn(seeded))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    [cassette] = [load_cassette(p) for p in find_cassettes(here / "cassettes")]
    labels = [s.label for s in cassette.interactions if s.library == "asyncpg"]
    assert sum(label.startswith("connect") for label in labels) == 2, labels
    again = _plugin_run(here, _dead_db(seeded))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert "Failed to detach" not in first.stdout + first.stderr + again.stdout + again.stderr


def test_sqlalchemy_engine_create_all_at_startup(tmp_path: Path, serve: Any, seeded: str) -> None:
    replies = _record_app(tmp_path, serve, apps.make_sqlalchemy_app(), ["/note", "/note"])
    assert [r.json() for r in replies] == [{"id": 1, "text": "hello"}] * 2
    startup = _startups(tmp_path)
    assert len(startup) == 1
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_apps:sqlalchemy_app",
               POOLED_PG_DSN=_dead_db(seeded))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "2 matched, 0 differ" in out.stdout


def _sqlalchemy_recorded(tmp_path: Path, serve: Any) -> tuple[Path, list[Path]]:
    rec = tmp_path / "rec"
    _record_app(rec, serve, apps.make_sqlalchemy_app(), ["/note", "/note"])
    requests = sorted((p for p in find_cassettes(rec) if inbound_span(load_cassette(p))),
                      key=lambda p: inbound_span(load_cassette(p)).start_ns)
    startup = next(p for p in find_cassettes(rec) if "lifespan_startup" in p.name)
    return startup, requests  # requests in the order they were recorded


@pytest.mark.parametrize("order", ["as_recorded", "reversed"])
def test_sqlalchemy_cli_result_depends_on_file_name_order(
        order: str, tmp_path: Path, serve: Any, seeded: str) -> None:
    """Same cassettes, only their file names differ (the CLI replays in sorted path order,
    i.e. by random trace id): the replay's verdict should not depend on it."""
    startup, (first, second) = _sqlalchemy_recorded(tmp_path, serve)
    d = tmp_path / "replay"
    d.mkdir()
    (d / startup.name).write_bytes(startup.read_bytes())
    names = ("a", "b") if order == "as_recorded" else ("b", "a")
    (d / f"{names[0]}.msgpack").write_bytes(first.read_bytes())
    (d / f"{names[1]}.msgpack").write_bytes(second.read_bytes())
    out = _cli("replay", str(d), "--asgi", "lifespan_apps:sqlalchemy_app",
               POOLED_PG_DSN=_dead_db(seeded))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_zero_code_fastapi_on_startup(tmp_path: Path, seeded: str) -> None:
    """`timetracer-otel record -- uvicorn` (opentelemetry-instrument) of a FastAPI app whose
    on_startup handler keeps the pool on app.state; then `replay --asgi`."""
    def send(client: Client) -> None:
        assert client.get("/stock/B2").json()["price"] == "1.25"

    err = record_uvicorn(tmp_path, "lifespan_apps:fastapi_app",
                         _env(OTEL_BSP_SCHEDULE_DELAY="50", POOLED_PG_DSN=pg_dsn(seeded)),
                         send).stderr
    names = sorted(load_cassette(p).name for p in find_cassettes(tmp_path))
    assert names == ["GET__stock_sku", "lifespan_startup"], (names, err.decode()[-2000:])
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_apps:fastapi_app",
               POOLED_PG_DSN=_dead_db(seeded))
    assert out.returncode == 0, out.stdout + out.stderr


def test_litestar_startup_is_answered_from_the_process_cassette(
        tmp_path: Path, serve: Any, seeded: str) -> None:
    """Litestar, instrumented as the README says (its own OpenTelemetry plugin, whose
    middleware never sees the lifespan scope): no startup cassette is recorded, its startup's
    calls land in the process cassette of calls made outside any trace, and the replay answers
    the startup from there."""
    app = apps.make_litestar()
    reply = record_get(tmp_path, serve, app, "/stock/A1")
    assert reply.status_code == 200, reply.content
    names = sorted(load_cassette(p).name for p in find_cassettes(tmp_path))
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_apps:litestar_app",
               POOLED_PG_DSN=_dead_db(seeded))
    assert names == sorted(["GET__stock_sku", PROCESS_CASSETTE]) and not _startups(tmp_path), names
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "1 matched, 0 differ" in out.stdout


def test_strict_applies_to_the_startup(tmp_path: Path, serve: Any, seeded: str) -> None:
    """--strict turns off shape matching: a request call with another parameter is a miss.
    The startup's calls are matched by shape anyway."""
    _record_app(tmp_path, serve, apps.threshold_app, ["/stock/A1"])
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_apps:threshold_app",
               "--strict", POOLED_PG_DSN=_dead_db(seeded), REVIEW_LOW="100")
    assert out.returncode == 1, out.stdout  # the startup's query changed its parameter


def test_two_good_startups_in_one_directory(tmp_path: Path, serve: Any, seeded: str) -> None:
    _record_app(tmp_path, serve, pooled.app, ["/stock/A1"])
    _record_app(tmp_path, serve, pooled.app, ["/stock/B2"])
    assert len(_startups(tmp_path)) == 2
    out = _cli("replay", str(tmp_path), "--asgi", "pooled:app", POOLED_PG_DSN=_dead_db(seeded))
    assert out.returncode == 0 and "2 matched, 0 differ" in out.stdout, out.stdout + out.stderr


def test_failed_startup_replay_writes_to_the_real_database(
        tmp_path: Path, serve: Any, seeded: str) -> None:
    """The startup 'fails' in replay after the app started (its warm-up query changed and
    was swallowed); the CLI gives up, asyncio.run cancels the app's lifespan, and the app's
    finally runs outside any replay: its write goes to the real database."""
    import psycopg

    _record_app(tmp_path, serve, apps.warm_marker_app, ["/stock/A1"])
    with psycopg.connect(pg_dsn(seeded), autocommit=True) as conn:
        conn.execute("DELETE FROM stock WHERE sku LIKE 'stopped-%'")
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_apps:warm_marker_app",
               REVIEW_WARM_SQL="SELECT count(*) FROM stock WHERE qty > 0")  # DB reachable
    assert out.returncode == 1 and "startup failed" in out.stdout
    with psycopg.connect(pg_dsn(seeded), autocommit=True) as conn:
        written = conn.execute("SELECT count(*) FROM stock WHERE sku LIKE 'stopped-%'").fetchone()
    assert written == (0,), "the replay wrote to the real database"


def test_sqlalchemy_requests_replay_each_on_a_freshly_started_app(
        tmp_path: Path, serve: Any, seeded: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """`pytest --timetracer-replay-dir` starts the app afresh for each item: the request
    recorded second, whose connection had SQLAlchemy's statement prepared already, prepares
    it again, answered with what the first request's recorded prepare described."""
    startup, requests = _sqlalchemy_recorded(tmp_path, serve)
    first = load_cassette(requests[0])
    second = load_cassette(requests[1])
    prepares = [[s for s in c.interactions if s.label.startswith("prepare")]
                for c in (first, second)]
    assert prepares[0] and not prepares[1], prepares  # the second ran on a warm connection
    here = tmp_path_factory.mktemp("items")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(here),
         "--timetracer-replay-dir", str(startup.parent),
         "--timetracer-asgi-app", "lifespan_apps:sqlalchemy_app"],
        cwd=here, env=_env(POOLED_PG_DSN=_dead_db(seeded)), capture_output=True, text=True,
        timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 passed" in out.stdout, out.stdout[-2000:]
