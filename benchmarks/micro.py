"""Per-call costs behind scenario 1 (issue 2's targets), each in its own process.

``record-overhead``: httpx calls to the upstream inside a server span, alternating blocks of
OTel-only (shims installed, mode off) and recorded calls (one ``record()`` switched on and off
per block); per round the difference per call.
On the request thread it also counts write syscalls (``/proc/thread-self/io`` ``syscw``) and
file opens (an audit hook), in both kinds of block, to show recording adds no file I/O there.

``replay-vs-mock``: a replayed httpx call against an ``httpx.MockTransport`` returning the
same recorded bytes; first with no OTel instrumentation, then with it, so OTel's own span
cost is reported apart from ours.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import otel_noop_provider, worker_main


def _syscw() -> int:
    try:
        for line in Path("/proc/thread-self/io").read_text().splitlines():
            if line.startswith("syscw:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1


def _schedstat_ns(pid: int | None, field: int, tid: int | None = None) -> int:
    """Field ``field`` of ``/proc/<pid>/task/<tid>/schedstat`` (0: time on a core, 1: time
    runnable but waiting for one), in ns so far, summed over every thread of ``pid`` without
    ``tid``; 0 without a process."""
    total = 0
    if pid is not None:
        stats = [Path(f"/proc/{pid}/task/{tid}/schedstat")] if tid is not None \
            else Path(f"/proc/{pid}/task").glob("*/schedstat")
        for stat in stats:
            with contextlib.suppress(OSError, ValueError, IndexError):  # a thread that ended
                total += int(stat.read_text().split()[field])
    return total


def _cpu_ns(pid: int | None) -> int:
    """CPU time of every thread of process ``pid`` so far, in ns (the scheduler's count)."""
    return _schedstat_ns(pid, 0)


def _wait_ns(pid: int | None, tid: int | None = None) -> int:
    """Time thread ``tid`` of ``pid`` (every thread without ``tid``) spent runnable but
    waiting for a core so far, in ns."""
    return _schedstat_ns(pid, 1, tid)


def _otel() -> Any:
    from opentelemetry import trace

    otel_noop_provider()
    return trace.get_tracer("bench")


class _StubPool:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def handle_request(self, request: Any) -> Any:
        import httpcore

        return httpcore.Response(200, headers=[(b"content-type", b"application/json"),
                                               (b"content-length", str(len(self.body)).encode())],
                                 content=self.body)

    def close(self) -> None:
        pass


def record_overhead(args: dict[str, Any]) -> dict[str, Any]:
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.trace import SpanKind

    import timetracer_otel
    from timetracer_otel import replay_shims

    tracer = _otel()
    replay_shims.install(["httpx"])
    HTTPXClientInstrumentor().instrument()
    if args.get("writer") == "off":
        # The request path alone: the shim captures and sets the payload attribute, and the
        # finished span goes nowhere (no snapshot, no conversion, no cassette). Only to split
        # the overhead between the app's thread and the writer's; never how users record.
        from timetracer_otel.exporters.writer import CassetteWriter

        CassetteWriter.submit = lambda self, span, resource=None: None  # type: ignore[method-assign]
    tmp = Path(tempfile.mkdtemp(prefix="bench-micro-"))
    live_client = httpx.Client(base_url=args["upstream"])
    # The same transport stack with the connection pool beneath it answering from memory:
    # OTel wrapper, shim and httpx's own mapping all run, the network does not.
    body = live_client.get("/items", params={"i": 1}).content
    stub_transport = httpx.HTTPTransport()
    stub_transport._pool = _StubPool(body)  # type: ignore[assignment]
    stub_client = httpx.Client(base_url=args["upstream"], transport=stub_transport)
    client = stub_client if args.get("network") == "stub" else live_client
    calls: int = args["calls"]
    lead = min(calls, 300)
    main = threading.get_ident()
    io_state = {"active": False, "opens": 0}

    def audit(event: str, _args: Any) -> None:
        if io_state["active"] and event == "open" and threading.get_ident() == main:
            io_state["opens"] += 1

    sys.addaudithook(audit)
    # Garbage collection inside the timed window, whichever thread triggered it: seconds and
    # full (oldest-generation) collections. Spans the writer still holds when the collector
    # runs are promoted, and the app pays for them in full collections.
    gc_state = {"active": False, "t0": 0.0, "s": 0.0, "full": 0}

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if not gc_state["active"]:
            return
        if phase == "start":
            gc_state["t0"] = time.perf_counter()
        else:
            gc_state["s"] += time.perf_counter() - gc_state["t0"]
            gc_state["full"] += info["generation"] == 2

    gc.callbacks.append(on_gc)

    def run(count: int) -> None:
        for j in range(count // 10):
            with tracer.start_as_current_span("GET /fanout", kind=SpanKind.SERVER):
                for i in range(10):
                    client.get("/items", params={"i": i + j % 7})

    def block(writer: Any = None) -> tuple[float, float, int, int]:
        """``calls`` calls in server spans of 10: wall and request-thread CPU µs per call,
        write syscalls and file opens on the request thread.

        The window is taken in steady state: ``lead`` untimed calls first, so that a recording
        writer enters the window with the backlog it leaves behind at its end. Its work on
        the calls before the window then stands in for its work on the calls still queued
        after it, which a window starting from an idle writer would leave out; and an
        OTel-only block's lead lets the writer finish the previous record block's backlog."""
        run(lead)
        sink = getattr(writer, "_sink", None)
        child = sink.proc.pid if sink is not None else None
        k0 = _cpu_ns(child)
        thread = getattr(writer, "_thread", None)
        clock = time.pthread_getcpuclockid(thread.ident) if thread and thread.ident else None
        w_cpu0 = time.clock_gettime(clock) if clock is not None else 0.0
        io_state["opens"] = 0
        w0 = _syscw()
        io_state["active"] = True
        gc_state.update(active=True, s=0.0, full=0)
        c0 = time.thread_time()
        t0 = time.perf_counter()
        run(calls)
        us = (time.perf_counter() - t0) * 1e6 / calls
        cpu = (time.thread_time() - c0) * 1e6 / calls
        io_state["active"] = gc_state["active"] = False
        if child is not None:
            child_us.append((_cpu_ns(child) - k0) / 1e3 / calls)
        if clock is not None:
            writer_us.append((time.clock_gettime(clock) - w_cpu0) * 1e6 / calls)
        gc_us.append(gc_state["s"] * 1e6 / calls)
        gc_full.append(int(gc_state["full"]))
        return us, cpu, _syscw() - w0, io_state["opens"]

    gc_us: list[float] = []
    gc_full: list[int] = []
    # CPU of the cassette writer's process in the window, per call (on the other core), and
    # of the app's writer thread (which holds the app's GIL while it runs).
    child_us: list[float] = []
    writer_us: list[float] = []

    # One recording for the whole run, switched on for record blocks and off for OTel-only
    # ones exactly as record() switches it (the mode, and the writer taking the provider's
    # spans); starting a writer (and its process) for every block put that start-up, and its
    # CPU on the other core, next to every window.
    from timetracer_otel.config import Mode
    from timetracer_otel.replay_shims.base import STATE
    from timetracer_otel.runtime import _dispatch_for, sdk_provider

    recording = timetracer_otel.record(dir=tmp / "rec", libraries=["httpx"])
    recording.__enter__()
    writer = recording.writer
    dispatch = _dispatch_for(sdk_provider())

    def switch(on: bool) -> None:
        STATE.mode = Mode.RECORD if on else Mode.OFF
        dispatch.writer = writer if on else None

    switch(False)
    block()  # warm-up: connections, imports
    switch(True)
    block(writer)
    writer.flush()  # the writer's process has started: its imports stay out of every window
    res: dict[str, list[float]] = {k: [] for k in (
        "otel_us", "record_us", "overhead_us", "otel_cpu_us", "record_cpu_us", "overhead_cpu_us",
        "otel_gc_us", "record_gc_us")}
    full_collections = {"otel": 0, "record": 0}
    io = {"otel_syscw": 0, "record_syscw": 0, "otel_opens": 0, "record_opens": 0}
    for r in range(args["runs"]):
        order = ("otel", "record") if r % 2 == 0 else ("record", "otel")
        got: dict[str, tuple[float, float]] = {}
        for which in order:
            switch(which == "record")
            us, cpu, w, o = block(writer if which == "record" else None)
            got[which] = (us, cpu)
            res[f"{which}_gc_us"].append(gc_us[-1])
            full_collections[which] += gc_full[-1]
            io[f"{which}_syscw"] += w
            io[f"{which}_opens"] += o
        res["otel_us"].append(got["otel"][0])
        res["record_us"].append(got["record"][0])
        res["overhead_us"].append(got["record"][0] - got["otel"][0])
        res["otel_cpu_us"].append(got["otel"][1])
        res["record_cpu_us"].append(got["record"][1])
        res["overhead_cpu_us"].append(got["record"][1] - got["otel"][1])
    switch(True)
    recording.__exit__(None, None, None)
    written = len(recording.paths)
    return {**res, "writer_process_cpu_us": child_us, "writer_thread_cpu_us": writer_us, "io": io,
            "full_collections": full_collections,
            "cassettes_written": written, "calls_per_block": calls,
            "network": args.get("network", "live")}


def replay_vs_mock(args: dict[str, Any]) -> dict[str, Any]:
    import timetracer_otel
    from timetracer_otel import replay_shims
    from timetracer_otel.cassette import Cassette, load_cassette
    from timetracer_otel.codec import as_bytes

    _otel()
    replay_shims.install(["httpx"])
    tmp = Path(tempfile.mkdtemp(prefix="bench-mock-"))
    url = args["upstream"] + "/items?i=3"
    with timetracer_otel.record(dir=tmp, libraries=[]) as rec, httpx.Client() as live:
        live.get(url)
    recorded = load_cassette(rec.paths[0]).interactions[0]
    resp = recorded.response
    body = b"".join(as_bytes(c) for c in resp["chunks"])
    headers = [(k, v) for k, v in resp["headers"]]
    calls: int = args["calls"]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(resp["status"], headers=headers, content=body)

    mock_client = httpx.Client(transport=httpx.MockTransport(handler))
    replay_client = httpx.Client()
    cassette = Cassette(id="bench", name="bench", created="2026-01-01T00:00:00+00:00",
                        spans=[recorded] * calls)

    def timed(client: httpx.Client, replaying: bool) -> float:
        if replaying:
            with timetracer_otel.replay(cassette, libraries=[]) as rep:
                t0 = time.perf_counter()
                for _ in range(calls):
                    r = client.get(url)
                us = (time.perf_counter() - t0) * 1e6 / calls
            assert rep.report.exact == calls, rep.report.summary()
        else:
            t0 = time.perf_counter()
            for _ in range(calls):
                r = client.get(url)
            us = (time.perf_counter() - t0) * 1e6 / calls
        assert r.content == body
        return us

    out: dict[str, list[float]] = {"mock_us": [], "replay_us": [], "replay_otel_us": []}
    timed(mock_client, False)
    timed(replay_client, True)
    for _ in range(args["runs"]):
        out["mock_us"].append(timed(mock_client, False))
        out["replay_us"].append(timed(replay_client, True))
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor().instrument()
    timed(replay_client, True)
    for _ in range(args["runs"]):
        out["replay_otel_us"].append(timed(replay_client, True))
    return {**out, "body_bytes": len(body), "calls_per_block": calls}


def run(args: dict[str, Any]) -> dict[str, Any]:
    return {"record-overhead": record_overhead, "replay-vs-mock": replay_vs_mock}[args["mode"]](args)


if __name__ == "__main__":
    worker_main(run)
