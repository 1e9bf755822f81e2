"""Scenario 1 worker: one inbound request to a Starlette app that makes 10 httpx calls.

Each mode runs in its own process (``python -m benchmarks.http_fanout '{"mode": ...}'``) so
patches of one tool never leak into another. The inbound request is driven in-process through
the ASGI interface (no client socket noise); the 10 dependency calls are real HTTP/1.1 calls
to the uvicorn upstream on 127.0.0.1 (in record and live modes).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from benchmarks.common import otel_noop_provider, quiet_stderr, worker_main

CALLS = 10
ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def make_app(upstream: str) -> tuple[Starlette, list[httpx.AsyncClient]]:
    holder: list[httpx.AsyncClient] = []

    async def fanout(request: Request) -> JSONResponse:
        if not holder:
            holder.append(httpx.AsyncClient(base_url=upstream))
        client = holder[0]
        out = []
        for i in range(CALLS):
            r = await client.get("/items", params={"i": i})
            out.append(r.json()["name"])
        return JSONResponse({"names": out})

    return Starlette(routes=[Route("/fanout", fanout)]), holder


async def call(app: ASGIApp) -> bytes:
    """One GET /fanout through the ASGI interface; returns the response body."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": "GET", "scheme": "http", "path": "/fanout", "raw_path": b"/fanout",
        "query_string": b"", "root_path": "", "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"bench.local"), (b"user-agent", b"bench"), (b"accept", b"*/*")],
    }
    sent = False
    body: list[bytes] = []
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.append(message.get("body", b""))

    await app(scope, receive, send)
    if status != 200:
        raise RuntimeError(f"/fanout answered {status}: {b''.join(body)[:300]!r}")
    return b"".join(body)


def setup_otel(app: Starlette) -> None:
    """SDK + the Starlette and httpx instrumentations, spans to a no-op exporter."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.starlette import StarletteInstrumentor

    otel_noop_provider()
    HTTPXClientInstrumentor().instrument()
    StarletteInstrumentor.instrument_app(app)


async def upstream_hits(upstream: str) -> int:
    async with httpx.AsyncClient(base_url=upstream) as c:
        return int((await c.get("/hits")).json()["hits"])


async def overhead(args: dict[str, Any]) -> dict[str, Any]:
    """Issue 2's per-call record overhead, end to end and paired: one process, one
    ``record()``, switched on and off per block exactly as 1b switches it (the mode, and the
    writer taking the provider's spans). Each round runs four blocks in a shuffled order: OTel
    only, record, record into a second writer whose process reads what it is sent and
    does nothing with it (the same request path and hand-off without the conversion and the
    writes; see ``benchmarks.contention``), and record into a third whose process runs at
    the app's priority (``TIMETRACER_WRITER_PRIORITY=normal``) whatever the default (``auto``:
    idle where its priority can be given back, which the record block shows). Differences
    against the round's OTel-only block are per dependency call (a tenth of a request, its
    inbound span included). A separate process per mode (the other rows) puts the machine's
    drift between processes, which on this VM moves a request by more than recording costs,
    into the difference. The OTel-only blocks run with the shims installed and switched off,
    as in 1b.

    Steady state: a block times ``requests`` requests after ``lead`` untimed ones, both
    longer than the writer process's write rounds (``sink.BATCH_DELAY``), so the window holds
    the conversion and the writes of about as many cassettes as it records (those of the lead
    stand in for its own, left to the flush after it), as a server recording all the time
    would; ``written_in_window`` counts the cassettes that reached the disk inside each
    record window. Each writer is flushed after its block, so no block inherits another's
    backlog.

    CPU per call in each window: the request thread (and its user/kernel split), the app's
    other threads (the writer's), the writer process and the upstream; and the time the
    request thread and the upstream were runnable but waiting for a core
    (``/proc/<pid>/task/*/schedstat``)."""
    import random
    import threading

    import timetracer_otel
    from benchmarks.contention import check_boots, discarding_boot
    from benchmarks.micro import _cpu_ns, _wait_ns
    from timetracer_otel.config import Mode
    from timetracer_otel.exporters.writer import CassetteWriter
    from timetracer_otel.replay_shims.base import STATE
    from timetracer_otel.runtime import _dispatch_for, _here, sdk_provider

    app, clients = make_app(args["upstream"])
    setup_otel(app)
    n, lead, upstream_pid = args["requests"], args.get("lead", 5), args.get("upstream_pid")
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    recording = timetracer_otel.record(dir=tmp / "rec")
    recording.__enter__()
    # switch() hands spans to each writer through the dispatch: the recording's run must not
    # claim the spans of this task for its own writer (runtime routes them by context).
    _here.set(None)
    dispatch = _dispatch_for(sdk_provider())
    normal = CassetteWriter(str(tmp / "normal"), isolate=True)
    normal.priority = "normal"  # what TIMETRACER_WRITER_PRIORITY=normal sets; read as it starts
    writers: dict[str, CassetteWriter | None] = {
        "otel": None, "record": recording.writer,
        "discard": CassetteWriter(str(tmp / "discard"), isolate=True), "normal": normal,
    }

    def switch(which: str) -> None:
        writer = writers[which]
        STATE.mode = Mode.OFF if writer is None else Mode.RECORD
        dispatch.writer = writer

    def on_disk() -> int:  # cassettes under the recording's day directories (one listing each)
        return sum(len(os.listdir(day)) for day in (tmp / "rec").iterdir())

    written_in_window: list[int] = []

    async def block(writer: CassetteWriter | None) -> dict[str, float]:
        for _ in range(lead):
            await call(app)
        child = writer._sink.proc.pid if writer is not None and writer._sink is not None else None
        files = on_disk() if writer is writers["record"] else 0
        pid, tid = os.getpid(), threading.get_native_id()
        q0, uq0 = _wait_ns(pid, tid), _wait_ns(upstream_pid)
        r0 = resource.getrusage(resource.RUSAGE_THREAD)
        m0, a0, c0, u0 = time.thread_time_ns(), _cpu_ns(pid), _cpu_ns(child), _cpu_ns(upstream_pid)
        t0 = time.perf_counter()
        for _ in range(n):
            await call(app)
        wall = time.perf_counter() - t0
        m1, a1, c1, u1 = time.thread_time_ns(), _cpu_ns(pid), _cpu_ns(child), _cpu_ns(upstream_pid)
        r1 = resource.getrusage(resource.RUSAGE_THREAD)
        q1, uq1 = _wait_ns(pid, tid), _wait_ns(upstream_pid)
        if writer is writers["record"]:
            written_in_window.append(on_disk() - files)
        if writer is not None:
            writer.flush()  # its backlog written now, not in the next block's window
        calls = n * CALLS
        return {"wall": wall * 1e6 / calls, "request_thread": (m1 - m0) / 1e3 / calls,
                # The kernel's split of that CPU (sampled at its ticks, so per block a share
                # rather than a count): callgrind counts user-mode instructions only.
                "request_thread_user": (r1.ru_utime - r0.ru_utime) * 1e6 / calls,
                "request_thread_sys": (r1.ru_stime - r0.ru_stime) * 1e6 / calls,
                "other_threads": ((a1 - a0) - (m1 - m0)) / 1e3 / calls,
                "writer_process": (c1 - c0) / 1e3 / calls,
                "upstream": (u1 - u0) / 1e3 / calls if upstream_pid else 0.0,
                "request_thread_wait": (q1 - q0) / 1e3 / calls,
                "upstream_wait": (uq1 - uq0) / 1e3 / calls if upstream_pid else 0.0}

    switch("otel")
    await block(None)  # warm-up: connections, imports
    # Both writer processes start (and import) before any window, each with its own boot.
    with discarding_boot():
        switch("discard")
        await block(writers["discard"])
    switch("record")
    await block(writers["record"])
    switch("normal")
    await block(writers["normal"])
    check_boots(writers["record"], writers["discard"])
    priorities = {w: _policy(writers[w]) for w in ("record", "discard", "normal")}
    keys = ("wall", "request_thread", "request_thread_user", "request_thread_sys",
            "other_threads", "writer_process", "upstream", "request_thread_wait", "upstream_wait")
    res: dict[str, list[float]] = {f"{w}_{k}": [] for w in ("otel", "record", "discard", "normal",
                                                             "over", "discard_over", "normal_over")
                                   for k in keys}
    for r in range(args["rounds"]):
        got: dict[str, dict[str, float]] = {}
        order = list(writers)
        random.Random(r).shuffle(order)
        for which in order:
            switch(which)
            got[which] = await block(writers[which])
        for k in keys:
            for which in writers:
                res[f"{which}_{k}"].append(got[which][k])
            res[f"over_{k}"].append(got["record"][k] - got["otel"][k])
            res[f"discard_over_{k}"].append(got["discard"][k] - got["otel"][k])
            res[f"normal_over_{k}"].append(got["normal"][k] - got["otel"][k])
    switch("record")
    for extra in (writers["discard"], writers["normal"]):
        assert extra is not None
        extra.close()
    recording.__exit__(None, None, None)
    for c in clients:
        await c.aclose()
    return {**res, "cassettes_written": len(recording.paths), "requests_per_block": n,
            "lead_requests": lead, "written_in_window": written_in_window[-args["rounds"]:],
            "writer_policies": priorities}


def _policy(writer: Any) -> str:
    """The scheduling policy a writer's process runs at, read from the system."""
    child = writer._sink if writer is not None else None
    if child is None or not hasattr(os, "sched_getscheduler"):
        return "unknown"
    policy = os.sched_getscheduler(child.proc.pid)
    return "idle" if policy == getattr(os, "SCHED_IDLE", -1) else f"normal (policy {policy})"


async def measure(args: dict[str, Any]) -> dict[str, Any]:
    mode: str = args["mode"]
    if mode == "tt_overhead":
        return await overhead(args)
    upstream: str = args["upstream"]
    runs: int = args["runs"]
    n: int = args["requests"]
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-"))
    app, clients = make_app(upstream)
    per_request: list[float] = []
    extra: dict[str, Any] = {}

    async def loop(fn: Callable[[], Awaitable[bytes]], count: int) -> tuple[float, bytes]:
        t0 = time.perf_counter()
        last = b""
        for _ in range(count):
            last = await fn()
        return (time.perf_counter() - t0) * 1000 / count, last

    body = b""
    if mode in ("bare", "otel"):
        if mode == "otel":
            setup_otel(app)
        await loop(lambda: call(app), 5)
        for _ in range(runs):
            ms, body = await loop(lambda: call(app), n)
            per_request.append(ms)

    elif mode == "tt_record":
        import timetracer_otel

        setup_otel(app)
        # One recording for the whole run, as a server under opentelemetry-instrument has:
        # its writer (and writer process) start during the warm-up, not beside every timed
        # loop. "incl. background write" adds, per run, the wait until everything the loop
        # recorded is on disk.
        incl: list[float] = []
        with timetracer_otel.record(dir=tmp / "rec") as rec:
            await loop(lambda: call(app), 5)
            rec.writer.flush()
            warm = len(rec.writer.written)
            for _ in range(runs):
                t0 = time.perf_counter()
                ms, body = await loop(lambda: call(app), n)
                rec.writer.flush()
                incl.append((time.perf_counter() - t0) * 1000 / n)
                per_request.append(ms)
        extra = {"incl_write_ms": incl, "cassettes_written": len(rec.paths) - warm,
                 "expected": runs * n}

    elif mode in ("tt_replay", "tt_replay_preloaded"):
        import timetracer_otel

        setup_otel(app)
        with timetracer_otel.record(dir=tmp / "rec") as rec:
            for _ in range(n if mode == "tt_replay_preloaded" else 1):
                await call(app)
        paths = rec.paths
        hits0 = await upstream_hits(upstream)
        if mode == "tt_replay":
            async def one() -> bytes:
                with timetracer_otel.replay(paths[0]) as rep:
                    out = await call(app)
                assert rep.report.exact == CALLS, rep.report.render()
                return out

            await loop(one, 5)
            for _ in range(runs):
                ms, body = await loop(one, n)
                per_request.append(ms)
        else:
            for _ in range(runs + 1):
                # The index of all n recorded requests is built inside the timed block.
                t0 = time.perf_counter()
                with timetracer_otel.replay(paths) as rep:
                    _, body = await loop(lambda: call(app), n)
                per_request.append((time.perf_counter() - t0) * 1000 / n)
                assert rep.report.exact == CALLS * n, rep.report.summary()
            per_request = per_request[1:]  # the first run is the warm-up
        extra = {"network_calls_during_replay": await upstream_hits(upstream) - hits0}

    elif mode in ("upstream_record", "upstream_replay"):
        from timetracer.config import TraceConfig
        from timetracer.integrations.starlette import TimeTracerMiddleware
        from timetracer.plugins import enable_httpx

        enable_httpx()
        rec_dir = tmp / "upstream"
        rec_app, _ = make_app(upstream)
        rec_app.add_middleware(TimeTracerMiddleware,
                               config=TraceConfig(mode="record", cassette_dir=str(rec_dir)))
        with quiet_stderr():
            if mode == "upstream_record":
                await loop(lambda: call(rec_app), 5)
                for _ in range(runs):
                    ms, body = await loop(lambda: call(rec_app), n)
                    per_request.append(ms)
                extra = {"cassettes_written": len(list(rec_dir.rglob("*.json")))}
            else:
                await call(rec_app)
                path = str(next(rec_dir.rglob("*.json")))
                rep_app, _ = make_app(upstream)
                rep_app.add_middleware(TimeTracerMiddleware,
                                       config=TraceConfig(mode="replay", cassette_path=path))
                hits0 = await upstream_hits(upstream)
                await loop(lambda: call(rep_app), 5)
                for _ in range(runs):
                    ms, body = await loop(lambda: call(rep_app), n)
                    per_request.append(ms)
                extra = {"network_calls_during_replay": await upstream_hits(upstream) - hits0}

    elif mode in ("vcr_record", "vcr_replay"):
        import vcr

        my_vcr = vcr.VCR()
        counter = iter(range(10**9))

        async def record_one() -> bytes:
            with my_vcr.use_cassette(str(tmp / f"r{next(counter)}.yaml"), record_mode="all"):
                return await call(app)

        if mode == "vcr_record":
            await loop(record_one, 5)
            for _ in range(runs):
                ms, body = await loop(record_one, n)
                per_request.append(ms)
        else:
            await record_one()
            path = str(tmp / "r0.yaml")

            async def replay_one() -> bytes:
                with my_vcr.use_cassette(path, record_mode="none"):
                    return await call(app)

            hits0 = await upstream_hits(upstream)
            await loop(replay_one, 5)
            for _ in range(runs):
                ms, body = await loop(replay_one, n)
                per_request.append(ms)
            extra = {"network_calls_during_replay": await upstream_hits(upstream) - hits0}
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    for c in clients:
        await c.aclose()
    return {"per_request_ms": per_request, "body_sha": hashlib.sha256(body).hexdigest()[:16],
            **extra}


def run(args: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(measure(args))


if __name__ == "__main__":
    worker_main(run)
