"""Scenario 7: issue 2's per-call targets counted in CPU instructions (valgrind's callgrind).

The wall-clock rows of scenario 1b move 2-3x between runs on this shared VM. Callgrind counts
the instructions executed, which the machine's other load does not change, so the difference
between two configurations is repeatable. Each configuration runs twice under callgrind, with
``warm`` calls only and with ``warm + calls`` calls; the difference divided by ``calls`` is one
call, start-up and warm-up excluded. The parent turns an instruction difference into
microseconds with the same run's wall-clock baseline (``delta / baseline_instructions *
baseline_us``), which assumes both paths retire instructions at the same rate.

Modes (one process each):

- ``prepare``: record one real call against the upstream, to a cassette both replay modes read.
- ``mock``: ``httpx.Client`` over ``httpx.MockTransport`` returning the recorded bytes.
- ``replay``: ``httpx.Client`` under ``replay()``, answered by the shim from that cassette.
- ``otel`` / ``record``: an httpx call with OTel's httpx instrumentation and the connection pool
  stubbed (as in 1b), inside server spans of 10; ``record`` runs it under ``record()``.
- ``inbound-otel`` / ``inbound-record``: scenario 6's 1 KB Starlette request, in-process.
- ``fanout-otel`` / ``fanout-record``: scenario 1's request (a Starlette endpoint making 10
  async httpx calls to the live upstream at ``upstream``), in-process, per request.
- ``db-otel`` / ``db-record``: scenario 4's 10-row query on the live loopback PostgreSQL
  (``driver``: asyncpg or psycopg), or a Redis GET of 100 bytes (``driver``: redis, the
  machine's server), with OTel's instrumentation, and under ``record()``. Only this process
  is counted, not the server's work.
- ``convert``: the writer's span -> SpanRecord conversion (``record_from_readable``) of
  scenario 5's traces, per span.
- ``convert-calls``: the writer process's whole work on 1b's recorded httpx calls, from the
  spans as the request path encodes them to cassettes on tmpfs, per call, on one thread
  (the writer process's own count in ``record`` depends on how its work is batched, which
  valgrind's timing moves).

Callgrind runs threads one at a time and counts each apart: the main thread is the request
path; the total adds the app's writer thread. ``--trace-children=yes`` counts the writer
process apart (``child``): it runs on the other core, so it is reported beside the app's
counts, not in them. A recording waits for that process however long valgrind makes it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import worker_main

WARM = 100


def _settle() -> None:
    """After the warm-up: collect, then move every object alive into the GC's permanent
    generation. A full collection otherwise walks the whole heap (modules, OTel, httpx), and
    whether one more of them falls inside the counted calls moved a per-call difference by
    ~15,000 instructions between runs; the collections our own allocations cause still count."""
    import gc

    gc.collect()
    gc.freeze()


def _written(rec: Any) -> None:
    """Wait for the writer process, however long it takes under valgrind (its start-up
    alone outlasts the recording's 30 s flush there): every span it was sent is counted."""
    assert rec.writer.flush(timeout=3600, process=True), "the writer did not finish"


def _recorded(cassette: str) -> Any:
    from timetracer_otel.cassette import load_cassette

    return load_cassette(cassette).interactions[0]


def prepare(args: dict[str, Any]) -> dict[str, Any]:
    import httpx

    import timetracer_otel

    tmp = Path(tempfile.mkdtemp(prefix="bench-instr-"))
    with timetracer_otel.record(dir=tmp, libraries=["httpx"]) as rec, httpx.Client() as client:
        client.get(args["upstream"] + "/items?i=3")
    return {"cassette": rec.paths[0]}


def http_replay(args: dict[str, Any]) -> dict[str, Any]:
    import httpx

    import timetracer_otel
    from benchmarks.micro import _otel
    from timetracer_otel import replay_shims
    from timetracer_otel.cassette import Cassette
    from timetracer_otel.codec import as_bytes

    _otel()
    replay_shims.install(["httpx"])
    recorded = _recorded(args["cassette"])
    resp = recorded.response
    body = b"".join(as_bytes(c) for c in resp["chunks"])
    url = recorded.request["url"]
    n = WARM + args["calls"]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(resp["status"], headers=[(k, v) for k, v in resp["headers"]],
                              content=body)

    cassette = Cassette(id="bench", name="bench", created="2026-01-01T00:00:00+00:00",
                        spans=[recorded] * n)
    client = httpx.Client(transport=httpx.MockTransport(handler)) if args["mode"] == "mock" \
        else httpx.Client()
    with timetracer_otel.replay(cassette, libraries=[]) as rep:
        for _ in range(WARM):
            r = client.get(url)
        _settle()
        for _ in range(args["calls"]):
            r = client.get(url)
    assert r.content == body
    assert args["mode"] == "mock" or rep.report.exact == n, rep.report.summary()
    return {}


def _stub_calls() -> Any:
    """1b's loop: ``calls(n)`` makes n httpx calls with OTel's httpx instrumentation and the
    shim installed, the connection pool stubbed beneath the transport, in server spans of 10."""
    import httpx
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.trace import SpanKind

    from benchmarks.micro import _otel, _StubPool
    from timetracer_otel import replay_shims

    tracer = _otel()
    replay_shims.install(["httpx"])
    HTTPXClientInstrumentor().instrument()
    transport = httpx.HTTPTransport()
    transport._pool = _StubPool(b'{"i": 3, "name": "item-3"}')  # type: ignore[assignment]
    client = httpx.Client(base_url="http://127.0.0.1:9", transport=transport)

    def calls(count: int) -> None:
        for j in range(count // 10):
            with tracer.start_as_current_span("GET /fanout", kind=SpanKind.SERVER):
                for i in range(10):
                    client.get("/items", params={"i": i + j % 7})

    return calls


def http_record(args: dict[str, Any]) -> dict[str, Any]:
    import timetracer_otel

    calls = _stub_calls()
    calls(WARM)  # imports, pools: the same in both counts
    _settle()
    if args["mode"] == "record":
        with timetracer_otel.record(dir=tempfile.mkdtemp(prefix="bench-instr-rec-"),
                                    libraries=["httpx"]) as rec:
            calls(10)  # the writer's thread and process start in both counts
            calls(args["calls"])
            _written(rec)
    else:
        calls(10)
        calls(args["calls"])
    return {}


def inbound_record(args: dict[str, Any]) -> dict[str, Any]:
    import asyncio
    import json

    import timetracer_otel
    from benchmarks.inbound import PAYLOAD, call, instrument, make_app

    app = make_app()
    instrument(app)
    body = json.dumps(PAYLOAD).encode()

    async def requests(count: int) -> None:
        for _ in range(count):
            assert await call(app, body) == 200

    asyncio.run(requests(WARM))
    _settle()
    if args["mode"] == "inbound-record":
        with timetracer_otel.record(dir=tempfile.mkdtemp(prefix="bench-instr-in-")) as rec:
            asyncio.run(requests(1))  # the writer's thread and process start in both counts
            asyncio.run(requests(args["calls"]))
            _written(rec)
    else:
        asyncio.run(requests(1))
        asyncio.run(requests(args["calls"]))
    return {}


def fanout_record(args: dict[str, Any]) -> dict[str, Any]:
    """Scenario 1's request (a Starlette endpoint making 10 async httpx calls to the live
    upstream at ``args["upstream"]``), OTel only or under ``record()``; per request."""
    import asyncio

    import timetracer_otel
    from benchmarks.http_fanout import call, make_app, setup_otel

    app, _ = make_app(args["upstream"])
    setup_otel(app)

    async def requests(count: int) -> None:
        for _ in range(count):
            await call(app)

    async def main() -> None:
        await requests(WARM // 10)
        _settle()
        recording = args["mode"] == "fanout-record"
        with timetracer_otel.record(dir=tempfile.mkdtemp(prefix="bench-instr-fan-")) \
                if recording else _nothing() as rec:
            # In both counts: the writer's thread and process start, and the memos that serve
            # every later request (header rows, URLs, attribute sets) fill.
            await requests(args.get("lead", 5))
            await requests(args["calls"])
            if recording:
                _written(rec)

    asyncio.run(main())
    return {}


def db_record(args: dict[str, Any]) -> dict[str, Any]:
    import asyncio

    import timetracer_otel
    from benchmarks.db import PG, SQL, drop_database, fresh_database
    from benchmarks.micro import _otel
    from timetracer_otel import replay_shims

    driver = args["driver"]
    _otel()
    replay_shims.instrument([driver])
    if driver == "redis":
        return _redis_record(args)
    db = fresh_database()
    dsn = f"postgresql://postgres@{PG}/{db}"
    recording = args["mode"] == "db-record"
    try:
        if driver == "asyncpg":
            import asyncpg

            async def main() -> None:
                conn = await asyncpg.connect(dsn)
                for _ in range(WARM):
                    await conn.fetch(SQL)
                _settle()
                for _ in range(args["calls"]):
                    await conn.fetch(SQL)
                await conn.close()

            with timetracer_otel.record(dir=tempfile.mkdtemp(prefix="bench-instr-db-"),
                                        libraries=[driver]) if recording else _nothing() as rec:
                asyncio.run(main())
                if recording:
                    _written(rec)
        else:
            import psycopg

            with timetracer_otel.record(dir=tempfile.mkdtemp(prefix="bench-instr-db-"),
                                        libraries=[driver]) if recording else _nothing() as rec, \
                    psycopg.connect(dsn) as conn:
                for _ in range(WARM):
                    conn.execute(SQL).fetchall()
                _settle()
                for _ in range(args["calls"]):
                    conn.execute(SQL).fetchall()
                if recording:
                    _written(rec)
    finally:
        drop_database(db)
    return {}


def _redis_record(args: dict[str, Any]) -> dict[str, Any]:
    """Scenario 4b's Redis GET (a 100-byte value) on the machine's server, database 12."""
    import redis

    import timetracer_otel

    client = redis.Redis(port=6379, db=12)
    client.set("bench:instr", b"v" * 100)
    with timetracer_otel.record(dir=tempfile.mkdtemp(prefix="bench-instr-redis-"),
                                libraries=["redis"]) if args["mode"] == "db-record" \
            else _nothing() as rec:
        for _ in range(WARM):
            client.get("bench:instr")
        _settle()
        for _ in range(args["calls"]):
            client.get("bench:instr")
        if rec is not None:
            _written(rec)
    client.close()
    return {}


def _nothing() -> Any:
    import contextlib

    return contextlib.nullcontext()


def convert_spans(args: dict[str, Any]) -> dict[str, Any]:
    """The msgpack writer's conversion of ended SDK spans to SpanRecords (scenario 5's traces,
    payloads kept encoded, as the writer keeps them): both runs build the same ``traces``;
    only the number converted differs."""
    from benchmarks.exporter import make_traces
    from timetracer_otel.exporters.spans import Memo, record_from_readable

    spans = [s for t in make_traces(args["traces"]) for s in t]
    memo: Memo = {}
    for s in spans[:WARM]:
        record_from_readable(s, memo, raw=True)
    _settle()
    for s in spans[WARM:WARM + args["calls"]]:
        record_from_readable(s, memo, raw=True)
    return {}


def convert_calls(args: dict[str, Any]) -> dict[str, Any]:
    """The writer process's work on recorded httpx calls (1b's loop, each call left to the
    writer): the spans as the app's request path encodes them for it, then decoded, built,
    converted, assembled and encoded into cassettes as its loop does (files on tmpfs where
    there is one). Both runs record the same ``recorded`` calls; only the number converted
    differs, and the conversion runs on this one thread, so the count does not move between
    runs."""
    import timetracer_otel
    from timetracer_otel.exporters import sink
    from timetracer_otel.exporters.writer import CassetteWriter, _encode_frame

    calls = _stub_calls()
    frames: list[bytes] = []
    resources: dict[int, Any] = {}

    def keep(span: Any, resource: Any = None) -> None:  # the request path's encoding
        resources.setdefault(id(span.resource), sink._Resource(dict(span.resource.attributes)))
        frames.append(_encode_frame(sink.wired(span, id(span.resource))))

    total = WARM + args["recorded"]  # the same in both runs (calls <= recorded)
    with timetracer_otel.record(dir=tempfile.mkdtemp(prefix="bench-instr-conv-"),
                                libraries=["httpx"]) as rec:
        rec.writer.isolate = False  # no writer process: the spans go to keep()
        rec.writer.submit = keep  # type: ignore[method-assign]
        calls(total)
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    writer = CassetteWriter(tempfile.mkdtemp(prefix="bench-instr-conv-", dir=shm), isolate=False)
    statuses: dict[Any, Any] = {}
    per_call = len(frames) / total  # spans per call (the server span of every 10 included)
    warm, end = round(WARM * per_call), round((WARM + args["calls"]) * per_call)
    for f in frames[:warm]:
        writer.add_now(sink._snapshot(sink._decode(f), resources, statuses))
    _settle()
    for f in frames[warm:end]:
        writer.add_now(sink._snapshot(sink._decode(f), resources, statuses))
    return {}


def run(args: dict[str, Any]) -> dict[str, Any]:
    mode = args["mode"]
    if mode == "convert":
        return convert_spans(args)
    if mode == "convert-calls":
        return convert_calls(args)
    if mode == "prepare":
        return prepare(args)
    if mode in ("mock", "replay"):
        return http_replay(args)
    if mode.startswith("inbound"):
        return inbound_record(args)
    if mode.startswith("db"):
        return db_record(args)
    if mode.startswith("fanout"):
        return fanout_record(args)
    return http_record(args)


# --- parent side -----------------------------------------------------------------------------


def available() -> bool:
    return shutil.which("valgrind") is not None


def count(args: dict[str, Any]) -> dict[str, int]:
    """Instructions executed by one worker process running ``args`` under callgrind: in all,
    on its main thread (the request path; the writer thread runs beside it), and in the
    processes it starts (``child``: the cassette writer's process, on the other core)."""
    import json
    import os

    from benchmarks.common import ROOT

    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as tmp:
        out = Path(tmp) / "cg.%p.out"
        cmd = ["valgrind", "--tool=callgrind", "--separate-threads=yes", "--trace-children=yes",
               f"--callgrind-out-file={out}",
               sys.executable, "-m", "benchmarks.instructions", json.dumps(args)]
        # One hash seed for every run: with a random one, dict and set layouts (and so the
        # instructions of each lookup) differ between the two runs whose difference is taken.
        env = dict(os.environ, PYTHONHASHSEED="0",
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _, stderr = proc.communicate(timeout=1800)
        # One file per thread of each process: cg.<pid>.out-<thread>.
        per_pid: dict[int, dict[int, int]] = {}
        for f in Path(tmp).glob("cg.*.out-*"):
            found = re.search(r"^totals: (\d+)", f.read_text(), re.M)
            if found is not None:
                pid, thread = re.fullmatch(r"cg\.(\d+)\.out-(\d+)", f.name).groups()  # type: ignore[union-attr]
                per_pid.setdefault(int(pid), {})[int(thread)] = int(found[1])
        own = per_pid.pop(proc.pid, {})
        if proc.returncode != 0 or 1 not in own:
            tail = " | ".join(stderr.strip().splitlines()[-5:])
            raise RuntimeError(f"callgrind run {args['mode']} failed (exit {proc.returncode}): {tail}")
        return {"total": sum(own.values()), "main": own[1],
                "child": sum(sum(threads.values()) for threads in per_pid.values())}


def per_call(args: dict[str, Any], calls: int) -> dict[str, float]:
    """Instructions of one call, in all and on the main thread: the run with ``calls`` more
    calls minus the run without."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:  # two valgrind processes, one per core
        base, more = pool.map(count, [{**args, "calls": 0}, {**args, "calls": calls}])
    return {k: (more[k] - base[k]) / calls for k in base}


if __name__ == "__main__":
    worker_main(run)
