"""The lifespan replay's other paths: cancelled startups and requests, --lifespan on, the
Collector path and the zero-code path with a refresher, concurrent and nested replays, Ctrl-C,
a startup's blocking work in an executor, Litestar under the pytest plugin."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

from tests.conftest import SHARED_SERVICES

sys.path.insert(0, str(Path(__file__).parent / "apps"))
import lifespan_paths_apps as apps
from inbound_helpers import (
    Client,
    _cli,
    _dead_db,
    _env,
    _wait_port,
    pg_dsn,
    record_get,
    record_uvicorn,
    seeded_fixture,
)
from test_asgi_lifespan import recorded  # noqa: F401  (the fixture)

import timetracer_otel
from timetracer_otel import runtime
from timetracer_otel.cassette import find_cassettes, load_cassette
from timetracer_otel.config import Mode
from timetracer_otel.inbound import inbound_span, replay_asgi_async
from timetracer_otel.replay_shims.base import STATE

pytestmark = SHARED_SERVICES  # (see tests/conftest.py)

seeded = seeded_fixture


# 1. A lifespan replay cancelled during the startup (a test's asyncio.wait_for, pytest-timeout's
#    signal method, Ctrl-C in a notebook) leaves its replay run active for good.
def test_cancelled_startup_leaves_replay_mode_on(recorded: tuple[Path, list[Any], str]) -> None:  # noqa: F811
    request = next(p for p in find_cassettes(recorded[0]) if inbound_span(load_cassette(p)))

    async def run() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(replay_asgi_async(
                request, OpenTelemetryMiddleware(apps.slow_app), lifespan=True), 0.3)

    asyncio.run(run())
    leaked = list(runtime._active)
    mode = STATE.mode
    for frame in leaked:  # (clean up for the next tests)
        runtime._deactivate(frame)
    assert mode is Mode.OFF and not leaked, (mode, leaked)


@pytest.fixture
def redis13() -> Any:
    import redis

    r = redis.Redis(db=13)
    r.set("review2:k", "v1")
    yield r
    r.delete("review2:k", "review2:beat")


# 3. The CLI answers a Litestar startup from the process cassette (17c07bd); the plugin's
#    traffic-as-tests, which the README offers as the other way to replay a directory, do not.
def test_plugin_replay_dir_litestar_like_the_cli(
        tmp_path: Path, serve: Any, seeded: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    import lifespan_apps

    app = lifespan_apps.make_litestar()
    reply = record_get(tmp_path, serve, app, "/stock/A1")
    assert reply.status_code == 200, reply.content
    cli = _cli("replay", str(tmp_path), "--asgi", "lifespan_apps:litestar_app",
               POOLED_PG_DSN=_dead_db(seeded))
    assert cli.returncode == 0, cli.stdout + cli.stderr[-2000:]
    here = tmp_path_factory.mktemp("items")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--rootdir", str(here),
         "--timetracer-replay-dir", str(tmp_path), "--timetracer-asgi-app",
         "lifespan_apps:litestar_app"],
        cwd=here, env=_env(POOLED_PG_DSN=_dead_db(seeded)), capture_output=True, text=True,
        timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def _record_simple(tmp_path: Path, serve: Any, app: Any, path: str, lifespan: str = "on") -> Any:
    with timetracer_otel.record(dir=tmp_path):
        server = serve(OpenTelemetryMiddleware(app), lifespan=lifespan)
        reply = Client(server.url).get(path)
        server.stop()
    return reply


# 4. A startup that makes no call writes no cassette; --lifespan on must still run it.
def test_lifespan_on_with_a_startup_that_makes_no_call(tmp_path: Path, serve: Any) -> None:
    reply = _record_simple(tmp_path, serve, apps.nocall_app, "/greet")
    assert reply.json() == {"greeting": "hi"}
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_paths_apps:nocall_app", "--lifespan", "on")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 matched, 0 differ" in out.stdout


# 5. --lifespan on, an app outside the lifespan protocol: one line, which exit code?
def test_lifespan_on_with_an_app_outside_the_protocol(tmp_path: Path, serve: Any) -> None:
    import pooled

    reply = _record_simple(tmp_path, serve, pooled.raw_app, "/x", lifespan="off")
    assert reply.status_code == 204
    out = _cli("replay", str(tmp_path), "--asgi", "pooled:raw_app", "--lifespan", "on")
    assert "Traceback" not in out.stdout + out.stderr
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)


# 6. The collector path: the startup's trace keeps receiving the refresher's spans, so it is
#    never quiet; the filter in _add_late never applies and every refresher call for the life
#    of the process lands in the startup cassette (the first review's defect, on this path).
def test_collector_path_refresher_piles_into_the_startup_cassette(
        tmp_path: Path, seeded: str) -> None:
    import signal

    from conftest import free_port

    cport, aport = free_port(), free_port()
    out_dir = tmp_path / "cassettes"
    collector = subprocess.Popen(
        [sys.executable, "-m", "timetracer_otel.cli", "collect", "--listen",
         f"127.0.0.1:{cport}", "--dir", str(out_dir), "--quiet-period", "1"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    env = _env(POOLED_PG_DSN=pg_dsn(seeded), REVIEW_REFRESH="0.05", TIMETRACER_MODE="record",
               OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
               OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{cport}",
               OTEL_BSP_SCHEDULE_DELAY="200", OTEL_SERVICE_NAME="bg")
    app = subprocess.Popen(
        [str(Path(sys.executable).parent / "opentelemetry-instrument"),
         sys.executable, "-m", "uvicorn", "lifespan_apps:bg_app", "--host", "127.0.0.1",
         "--port", str(aport)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_port(cport, collector)
        _wait_port(aport, app)
        assert Client(f"http://127.0.0.1:{aport}").get("/stock/A1").status_code == 200
        time.sleep(5)
        while_running = sorted(load_cassette(p).name for p in find_cassettes(out_dir)) \
            if out_dir.exists() else []
        import shutil

        shutil.copytree(out_dir, tmp_path / "snapshot")
        app.send_signal(signal.SIGTERM)
        app.communicate(timeout=60)
        time.sleep(3)
        collector.send_signal(signal.SIGTERM)
        _, err = collector.communicate(timeout=60)
    finally:
        for p in (app, collector):
            if p.poll() is None:
                p.kill()
    cassettes = [load_cassette(p) for p in find_cassettes(out_dir)]
    names = sorted(c.name for c in cassettes)
    startup = [c for c in cassettes if c.name == "lifespan_startup"]
    assert startup, (names, err.decode()[-2000:])
    counts = [sum("count(*)" in s.label for s in c.interactions) for c in startup]
    assert "lifespan_startup" in while_running, while_running
    assert max(counts) <= 2, counts
    # What was on disk while the app ran replays (with the database gone).
    snap = _cli("replay", str(tmp_path / "snapshot"), "--asgi", "lifespan_apps:bg_app",
                POOLED_PG_DSN=_dead_db(seeded))
    assert snap.returncode == 0 and "1 matched, 0 differ" in snap.stdout, snap.stdout[-2000:]


# 7. Zero-code (`timetracer-otel record -- uvicorn`), the same refresher: is the startup
#    cassette bounded on this path?
def test_zero_code_refresher_and_the_startup_cassette(tmp_path: Path, seeded: str) -> None:
    def send(client: Client) -> None:
        assert client.get("/stock/B2").status_code == 200
        time.sleep(4)

    env = _env(OTEL_BSP_SCHEDULE_DELAY="50", POOLED_PG_DSN=pg_dsn(seeded), REVIEW_REFRESH="0.05")
    err = record_uvicorn(tmp_path, "lifespan_apps:bg_app", env, send).stderr
    cassettes = [load_cassette(p) for p in find_cassettes(tmp_path)]
    startup = [c for c in cassettes if c.name == "lifespan_startup"]
    counts = [sum("count(*)" in s.label for s in c.interactions) for c in startup]
    assert startup and max(counts) <= 2, (counts, err.decode()[-2000:])
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_apps:bg_app",
               POOLED_PG_DSN=_dead_db(seeded))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


# 8. Two lifespan replays at once in one loop (a test gathering them), and one inside an
#    outer replay() block.
def test_concurrent_and_nested_lifespan_replays(recorded: tuple[Path, list[Any], str]) -> None:  # noqa: F811
    import pooled

    paths = find_cassettes(recorded[0])
    startup = next(p for p in paths if "lifespan_startup" in p.name)
    requests = [p for p in paths if inbound_span(load_cassette(p))]
    assert len(requests) == 2

    async def both() -> list[Any]:
        return await asyncio.gather(*(replay_asgi_async(
            r, OpenTelemetryMiddleware(pooled.app), lifespan=startup) for r in requests))

    results = asyncio.run(both())
    assert all(r.ok for r in results), [r.render() for r in results]
    assert STATE.mode is Mode.OFF and not runtime._active
    with timetracer_otel.replay(startup):
        from timetracer_otel.inbound import replay_asgi

        result = replay_asgi(requests[0], OpenTelemetryMiddleware(pooled.app), lifespan=startup)
        assert result.ok, result.render()
        assert STATE.mode is Mode.REPLAY
    assert STATE.mode is Mode.OFF and not runtime._active


# 9. Ctrl-C during `replay --asgi`: one line, no traceback, and the app shut down?
@pytest.mark.parametrize("lifespan", ["auto", "off"])
def test_ctrl_c_during_replay(tmp_path: Path, serve: Any, lifespan: str) -> None:
    import signal

    rec = tmp_path / "rec"
    reply = _record_simple(rec, serve, apps.nocall_app, "/greet")
    assert reply.json() == {"greeting": "hi"}
    log, started = tmp_path / "shutdown.log", tmp_path / "started"
    proc = subprocess.Popen(
        [sys.executable, "-m", "timetracer_otel.cli", "replay", str(rec), "--asgi",
         "lifespan_paths_apps:nocall_app", "--lifespan", lifespan],
        env=_env(REVIEW2_GREET_SLOW="5", REVIEW2_SHUTDOWN_LOG=str(log),
                 REVIEW2_GREET_STARTED=str(started)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # (as a terminal's Ctrl-C finds it: a test worker may run with SIGINT ignored, which
        # a child inherits)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60  # the request under way, however slow the start
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started.exists(), proc.communicate(timeout=60)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == 1, (out, err)  # aborted
    assert log.exists() is (lifespan != "off")  # the app shut down, where it was started


# 10. A startup doing blocking work with run_in_executor: recorded outside the startup's trace
#     (the executor thread has no OTel context), replayed inside the startup's replay.
def test_startup_run_in_executor(tmp_path: Path, serve: Any, redis13: Any) -> None:
    redis13.set("review2:config", "blue")
    try:
        reply = _record_simple(tmp_path, serve, apps.executor_app, "/config")
    finally:
        redis13.delete("review2:config")
    assert reply.json() == {"config": "blue"}
    out = _cli("replay", str(tmp_path), "--asgi", "lifespan_paths_apps:executor_app")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


# 1b. The same cancellation, during the request instead of the startup.
def test_cancelled_request_in_lifespan(tmp_path: Path, serve: Any,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    reply = _record_simple(tmp_path, serve, apps.nocall_app, "/greet")
    assert reply.json() == {"greeting": "hi"}
    request = next(p for p in find_cassettes(tmp_path) if inbound_span(load_cassette(p)))
    monkeypatch.setenv("REVIEW2_GREET_SLOW", "5")
    apps.EVENTS.clear()

    async def run() -> float:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(replay_asgi_async(
                request, OpenTelemetryMiddleware(apps.nocall_app), lifespan=True), 0.5)
        return time.monotonic() - started

    assert asyncio.run(run()) < 5  # (the request's 5 s were cut short)
    leaked, mode = list(runtime._active), STATE.mode
    for frame in leaked:
        runtime._deactivate(frame)
    assert mode is Mode.OFF and not leaked, (mode, leaked)
    assert "nocall: shut down" in apps.EVENTS
