"""Flows across shims that the lifespan and requests changes could have broken: a job the
app's startup starts is recorded as its own trace, a startup's refresher calls stay out of its
cassette however many traces follow, prepares learned by one replay answer nothing outside it,
Celery's refused sends over Redis, requests' elapsed whatever the instrumentation order."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import timetracer_otel
from tests.conftest import SHARED_SERVICES
from timetracer_otel.cassette import load_cassette

pytestmark = [pytest.mark.timeout(120), SHARED_SERVICES]  # (see tests/conftest.py)


def _dsn(db: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/{db}"


async def _with_prepare(db: str, n: int) -> Any:
    """``SELECT $1::int + 1`` through a prepared statement, on a connection of its own."""
    import asyncpg

    conn = await asyncpg.connect(_dsn(db))
    try:
        return await (await conn.prepare("SELECT $1::int + 1 AS n")).fetchval(n)
    finally:
        await conn.close()


async def _without_prepare(db: str) -> Any:
    """``SELECT 2`` with no prepare of its own, on a connection of its own."""
    import asyncpg

    conn = await asyncpg.connect(_dsn(db))
    try:
        return await conn.fetchval("SELECT 2")
    finally:
        await conn.close()


def test_statements_learned_elsewhere_answer_a_miss_in_an_ordinary_replay(
        pg_database: str, tmp_path: Path) -> None:
    """A prepare the replayed cassette does not hold was a ReplayMissError (on_miss=error)
    before this session; once any cassette holding it was learned in this process
    (--timetracer-replay-dir collection, replay --asgi), an ordinary replay answers it."""
    import asyncpg

    from timetracer_otel.replay_shims.base import learn_statements, statements

    async def prepare_only() -> Any:
        conn = await asyncpg.connect(_dsn(pg_database))
        try:
            st = await conn.prepare("SELECT $1::int + 1 AS n")
            return [a.name for a in st.get_attributes()]
        finally:
            await conn.close()

    with timetracer_otel.record(dir=tmp_path / "a") as rec_a:
        asyncio.run(_with_prepare(pg_database, 41))
    with timetracer_otel.record(dir=tmp_path / "b") as rec_b:
        asyncio.run(_without_prepare(pg_database))

    def replay_b() -> Any:
        try:
            with timetracer_otel.replay(rec_b.paths, on_miss="error"):
                return asyncio.run(prepare_only())
        except Exception as exc:
            return type(exc).__name__

    before = replay_b()  # nothing learned: the miss is reported
    learned: dict[str, Any] = {}
    for p in rec_a.paths:  # as a replay of another directory learns them
        learn_statements(load_cassette(p).interactions, learned)
    after = replay_b()  # outside that replay: the miss is reported still
    with statements(learned):  # inside it (replay --asgi, a replay-dir item): answered
        inside = replay_b()
    assert before == after == "ReplayMissError", (before, after)
    assert inside == ["n"], inside


# --- background work started by a lifespan startup -------------------------------------------


def _job_app() -> Any:
    import contextlib

    import redis
    from opentelemetry import trace
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    tracer = trace.get_tracer("review.jobs")

    async def worker() -> None:
        # A job loop the app starts at startup: each run its own unit of work (its own span),
        # as a queue consumer or a scheduler does.
        await asyncio.sleep(0.1)
        with tracer.start_as_current_span("nightly job"):
            r = redis.Redis(host="127.0.0.1", port=6379, db=13)
            r.set("review27:job", "done")
            r.get("review27:job")
            r.close()

    @contextlib.asynccontextmanager
    async def life(app: Any) -> Any:
        task = asyncio.create_task(worker())
        yield
        task.cancel()

    async def home(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/", home)], lifespan=life)


def test_a_job_the_startup_starts_is_still_recorded(serve: Any, tmp_path: Path) -> None:
    """Before this session the job's trace (its own root span, its Redis calls) was written
    as a cassette; the startup now holds the job's context, its spans start after the
    startup answered, and they are dropped: the job's calls are recorded nowhere."""
    import time
    import urllib.request

    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    from timetracer_otel.cassette import find_cassettes

    with timetracer_otel.record(dir=tmp_path):
        server = serve(OpenTelemetryMiddleware(_job_app()), lifespan="on")
        time.sleep(0.5)
        assert urllib.request.urlopen(server.url + "/").read() == b"ok"
        server.stop()
    calls = [(c.name, s.library, s.label) for p in find_cassettes(tmp_path)
             for c in [load_cassette(p)] for s in c.interactions]
    assert [lib for _, lib, _ in calls].count("redis") == 2, calls


# --- Celery over Redis, the one Redis server down while recording ----------------------------


def _celery_app(url: str) -> Any:
    from celery import Celery

    app = Celery("review27", broker=url, backend=url)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_publish_retry=False, broker_connection_retry_on_startup=False,
        broker_transport_options={"max_retries": 0},
        result_backend_transport_options={"retry_policy": {"max_retries": 0}},
        redis_backend_health_check_interval=None)

    @app.task(name="review27.add", shared=False)
    def add(x: int, y: int) -> int:
        return x + y

    return app, add


def test_celery_redis_down_send_replays_its_error(tmp_path: Path) -> None:
    import time

    from tests.conftest import connects_refused, unreachable_port

    url = f"redis://127.0.0.1:{unreachable_port()}/13"

    def job() -> Any:
        app, add = _celery_app(url)
        t0 = time.monotonic()
        try:
            add.delay(2, 3)
            out: Any = "sent"
        except Exception as exc:
            out = (type(exc).__module__, type(exc).__name__, str(exc)[:120])
        app.close()
        return out, round(time.monotonic() - t0) < 20

    plain = job()
    with timetracer_otel.record(dir=tmp_path) as rec:
        recorded = job()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job()
    report = rep.report
    assert recorded == plain and replayed == plain, (plain, recorded, replayed)
    assert attempts == [] and not report.unused and not report.misses, (attempts, report)


# --- requests' elapsed with the OTel requests instrumentation applied first ------------------


def _hello_app() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request: Any) -> PlainTextResponse:
        await asyncio.sleep(0.01)
        return PlainTextResponse("x" * 300_000)

    return Starlette(routes=[Route("/", hello)])


@pytest.mark.parametrize("first", ["timetracer", "otel"])
def test_elapsed_replays_as_the_app_saw_it(serve: Any, tmp_path: Path, first: str) -> None:
    import requests
    from opentelemetry.instrumentation.requests import RequestsInstrumentor

    server = serve(_hello_app())
    inst = RequestsInstrumentor()
    was = inst.is_instrumented_by_opentelemetry
    if first == "otel" and was:
        inst.uninstrument()
    try:
        if first == "otel":
            inst.instrument()
        seen = []
        with timetracer_otel.record(dir=tmp_path) as rec:
            for _ in range(5):
                seen.append(requests.get(server.url + "/").elapsed)
        with timetracer_otel.replay(rec.paths):
            again = [requests.get(server.url + "/").elapsed for _ in range(5)]
    finally:
        if first == "otel":
            inst.uninstrument()
            if was:
                inst.instrument()
    assert again == seen, (seen, again)


def test_replay_dir_in_the_same_session_hides_a_miss_of_an_ordinary_test(
        pg_database: str, tmp_path: Path) -> None:
    """`pytest tests/ --timetracer-replay-dir DIR --timetracer-asgi-app app:app`: the directory's
    prepares, learned at collection, answer an ordinary test's replay that has no recorded
    prepare (a stale cassette), which failed with ReplayMissError without the option."""
    import os
    import subprocess
    import sys
    import textwrap

    with timetracer_otel.record(dir=tmp_path / "dir"):
        asyncio.run(_with_prepare(pg_database, 1))
    with timetracer_otel.record(dir=tmp_path / "own") as own:
        asyncio.run(_without_prepare(pg_database))
    work = tmp_path / "work"
    work.mkdir()
    (work / "app_mod.py").write_text(textwrap.dedent("""
        from starlette.applications import Starlette
        app = Starlette()
    """))
    (work / "test_ordinary.py").write_text(textwrap.dedent(f"""
        import asyncio, asyncpg, pytest, timetracer_otel
        from timetracer_otel.errors import ReplayMissError

        async def run():
            conn = await asyncpg.connect({_dsn(pg_database)!r})
            try:
                st = await conn.prepare("SELECT $1::int + 1 AS n")
                return [a.name for a in st.get_attributes()]
            finally:
                await conn.close()

        def test_stale_cassette_is_a_miss():
            with pytest.raises(ReplayMissError):
                with timetracer_otel.replay({[str(p) for p in own.paths]!r}, on_miss="error"):
                    asyncio.run(run())
    """))
    env = {**os.environ, "PYTHONPATH": str(work)}

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
             "--rootdir", str(work), "test_ordinary.py", *extra],
            cwd=work, env=env, capture_output=True, text=True, timeout=120)

    alone = run()
    assert alone.returncode == 0, alone.stdout[-2000:]
    together = run("--timetracer-replay-dir", str(tmp_path / "dir"),
                   "--timetracer-asgi-app", "app_mod:app")
    assert together.returncode == 0, together.stdout[-2000:]


def test_fine_head_204_304_and_no_length_bodies(serve: Any, tmp_path: Path) -> None:
    import requests
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    from tests.conftest import connects_refused

    async def page(request: Any) -> Response:
        return PlainTextResponse("hello" * 1000)

    async def empty(request: Any) -> Response:
        return Response(status_code=204)

    async def same(request: Any) -> Response:
        return Response(status_code=304, headers={"etag": "x"})

    async def stream(request: Any) -> StreamingResponse:
        async def gen() -> Any:
            for i in range(5):
                yield b"part%d " % i
                await asyncio.sleep(0.01)
        return StreamingResponse(gen())

    server = serve(Starlette(routes=[Route("/", page, methods=["GET", "HEAD"]),
                                     Route("/e", empty), Route("/s", same), Route("/t", stream)]))

    def job() -> Any:
        with requests.Session() as s:
            h = s.head(server.url + "/")
            out = [(h.status_code, h.headers.get("content-length"), h.content)]
            for p in ("/e", "/s", "/t"):
                r = s.get(server.url + p)
                out.append((r.status_code, r.content))
            r = s.get(server.url + "/t", stream=True)
            out.append(b"".join(r.iter_content(3)))
        return out

    plain = job()
    with timetracer_otel.record(dir=tmp_path) as rec:
        recorded = job()
    server.stop()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = job()
    assert attempts == []
    assert recorded == plain and replayed == plain, (plain, recorded, replayed)


def test_refresher_calls_after_the_startup_trace_is_forgotten() -> None:
    """In-process: once 1000 more traces closed (max_open_traces), the startup's span ids are
    forgotten; a refresher's calls under the startup span then wait in an open trace with no
    root, piling up for the life of the app, and at shutdown are written as a cassette of
    their own that says complete: false (instead of being left out like the earlier ones)."""
    from timetracer_otel.cassette import SpanRecord
    from timetracer_otel.exporters.assembler import TraceAssembler, TraceBatch
    from timetracer_otel.replay_shims.base import ATTR_LIFESPAN

    out: list[TraceBatch] = []
    a = TraceAssembler(out.append, max_open_traces=2)
    life_t = "1" * 32
    a.add(SpanRecord(trace_id=life_t, span_id="a" * 16, name="lifespan startup",
                     start_ns=1, end_ns=10, attributes={ATTR_LIFESPAN: "startup"}))
    n = 0

    def refresh(at: int) -> None:
        nonlocal n
        n += 1
        a.add(SpanRecord(trace_id=life_t, span_id=f"{n:016x}", parent_id="a" * 16,
                         name="GET", kind="CLIENT", start_ns=at, end_ns=at + 1,
                         library="redis", key="k", label="GET k"))

    refresh(20)
    for i in range(5):  # requests' traces
        a.add(SpanRecord(trace_id=f"{i + 2:032x}", span_id=f"{i + 100:016x}", name="GET /",
                         kind="SERVER", start_ns=30 + i, end_ns=31 + i, library="asgi"))
    for k in range(50):
        refresh(100 + k)
    a.close_all()
    after = [b for b in out if b.trace_id == life_t and b.root is None and not b.late]
    assert not after, [(len(b.spans), b.complete) for b in after]
