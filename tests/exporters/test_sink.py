"""The isolated writer: spans converted and written by a child process, as a thread would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode

from timetracer_otel.cassette import Cassette, load_cassette
from timetracer_otel.errors import ConfigError
from timetracer_otel.exporters import CassetteSpanProcessor, CassetteWriter, sink
from timetracer_otel.redaction import Redactor
from timetracer_otel.replay_shims.base import ATTR_PAYLOAD, STATE, payload_attribute


def _tracer(writer: CassetteWriter) -> Any:
    provider = TracerProvider(resource=Resource.create({"service.name": "shop", "k": ("a", "b")}))
    provider.add_span_processor(CassetteSpanProcessor(writer=writer))
    return provider.get_tracer("t")


def _trace(tracer: Any, n: int) -> None:
    """A server span with a recorded client call, an event and an error status; then a lone
    client call (the per-process cassette)."""
    with tracer.start_as_current_span(f"GET /orders/{n}", kind=SpanKind.SERVER,
                                      attributes={"http.route": "/orders/{id}", "n": n}) as root:
        with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as client:
            client.set_attribute("url.full", f"http://127.0.0.1:9/items?i={n}")
            client.set_attribute("tags", ("x", "y"))
            client.set_attribute(ATTR_PAYLOAD, payload_attribute(
                "httpx", f"httpx:{n}", "httpx:shape", "GET /items",
                b"\x81\xa3url\xa0", response=b"\x81\xa6status\xcc\xc8"))
            client.add_event("retry", {"attempt": 2, "codes": (500, 503)})
        root.set_status(Status(StatusCode.ERROR, "upstream failed"))
    tracer.start_span("lone", kind=SpanKind.CLIENT).end()


def _strip(c: Cassette) -> Any:
    # Ids, times and trace ids differ between any two writers and providers; the rest is the
    # recording, types included.
    resource = {k: v for k, v in c.resource.items() if k != "service.instance.id"}
    return (c.name, c.complete, resource, c.recorder, [
        (s.name, s.kind, s.status, s.status_message, s.attributes,
         [(e.name, e.attributes) for e in s.events], s.library, s.key,
         s.shape, s.label, s.request, s.response, s.error, s.truncated,
         s.parent_id is None, s.end_ns - s.start_ns >= 0)
        for s in c.spans])


def _by_name(paths: list[str]) -> dict[str, Any]:
    return {load_cassette(p).name: _strip(load_cassette(p)) for p in paths}


def test_a_child_process_writes_what_a_thread_writes(tmp_path: Path) -> None:
    isolated = CassetteWriter(str(tmp_path / "child"), isolate=True)
    threaded = CassetteWriter(str(tmp_path / "thread"), isolate=False)
    assert isolated.isolate and not threaded.isolate
    for writer in (isolated, threaded):
        tracer = _tracer(writer)
        for n in range(3):
            _trace(tracer, n)
        writer.flush(process=True)
    sink = isolated._sink
    assert sink is not None and sink.proc.poll() is None  # the child wrote them
    for writer in (isolated, threaded):
        writer.close()
    assert sink.proc.returncode == 0
    assert isolated.stats() == threaded.stats() == {
        "written": 4, "dropped_spans": 0, "late_spans": 0, "duplicate_spans": 0, "errors": 0,
        "skipped": 0, "unwritten": 0, "recovered": 0}
    child = sorted(_strip(load_cassette(p)) for p in isolated.written)
    thread = sorted(_strip(load_cassette(p)) for p in threaded.written)
    assert child == thread
    assert sorted(c[0] for c in child)[:3] == ["GET__orders_0", "GET__orders_1", "GET__orders_2"]
    [server, *_] = [load_cassette(p) for p in isolated.written if "orders" in p]
    root, client = server.spans
    assert root.status == "ERROR" and root.status_message == "upstream failed"
    assert client.attributes["tags"] == ["x", "y"]
    assert client.events[0].name == "retry" and client.events[0].attributes == {
        "attempt": 2, "codes": [500, 503]}
    assert client.response == {"status": 200} and server.resource["k"] == ["a", "b"]


def test_a_secret_the_app_learns_later_is_scrubbed_by_the_child(tmp_path: Path) -> None:
    saved = STATE.redactor
    STATE.redactor = Redactor(key=b"k" * 32)
    try:
        writer = CassetteWriter(str(tmp_path), isolate=True)
        tracer = _tracer(writer)
        tracer.start_span("first", kind=SpanKind.CLIENT).end()
        writer.flush()
        assert writer._sink is not None  # the child has this redactor, without the secret
        secret = "s3cr3t-Token-0123456789abcdef"
        token = STATE.redactor.token(secret)  # learned by an app thread (an auth header)
        tracer.start_span("second", kind=SpanKind.CLIENT,
                          attributes={"note": f"retrying with {secret}"}).end()
        writer.close()
    finally:
        STATE.redactor = saved
    [path] = writer.written
    second = next(s for s in load_cassette(path).spans if s.name == "second")
    assert second.attributes["note"] == f"retrying with {token}"
    assert secret.encode() not in Path(path).read_bytes()


def test_a_dead_child_is_replaced_by_the_writer_thread(tmp_path: Path, caplog: Any) -> None:
    writer = CassetteWriter(str(tmp_path), isolate=True)
    tracer = _tracer(writer)
    _trace(tracer, 1)
    writer.flush()
    sink = writer._sink
    assert sink is not None
    os.kill(sink.proc.pid, signal.SIGKILL)
    sink.proc.wait()
    _trace(tracer, 2)  # never raises into the app
    writer.flush(process=True)
    writer.close()
    assert writer._sink is None and not writer.isolate
    assert writer.stats()["errors"] >= 1
    assert "cassette writer process is gone" in caplog.text
    names = sorted(s.name for p in writer.written for s in load_cassette(p).spans)
    assert "GET /orders/2" in names and "GET /orders/1" in names


def test_a_span_msgpack_cannot_carry_is_dropped_and_its_trace_marked(tmp_path: Path) -> None:
    writer = CassetteWriter(str(tmp_path), isolate=True)
    tracer = _tracer(writer)
    with tracer.start_as_current_span("GET /big", kind=SpanKind.SERVER):
        tracer.start_span("huge", kind=SpanKind.CLIENT, attributes={"n": 2**70}).end()
        tracer.start_span("fine", kind=SpanKind.CLIENT).end()
    writer.close()
    [path] = writer.written
    cassette = load_cassette(path)
    assert [s.name for s in cassette.spans] == ["GET /big", "fine"]
    assert cassette.complete is False and writer.stats()["dropped_spans"] == 1


def test_writer_kind_comes_from_the_environment(tmp_path: Path, monkeypatch: Any) -> None:
    from timetracer_otel.exporters import sink

    monkeypatch.setenv("TIMETRACER_WRITER", "thread")
    assert not CassetteWriter(str(tmp_path)).isolate
    monkeypatch.setenv("TIMETRACER_WRITER", "process")
    assert CassetteWriter(str(tmp_path)).isolate
    monkeypatch.delenv("TIMETRACER_WRITER")  # auto: a process where there are two CPUs
    for n, isolated in ((1, False), (2, True)):
        monkeypatch.setattr(sink, "cpus", lambda n=n: n)
        assert CassetteWriter(str(tmp_path)).isolate is isolated
    monkeypatch.setenv("TIMETRACER_WRITER", "process")
    assert not CassetteWriter(str(tmp_path), via="collector").isolate  # no app to spare
    assert not CassetteWriter(str(tmp_path), on_written=lambda p, c: None).isolate
    monkeypatch.setenv("TIMETRACER_WRITER", "fork")
    with pytest.raises(ConfigError, match="TIMETRACER_WRITER='fork' is not valid"):
        CassetteWriter(str(tmp_path))


_LINUX_POLICIES = pytest.mark.skipif(
    not sink.idle_policies(), reason="Linux scheduling policies; Popen(process_group=) is 3.11+")


_RESTORABLE = pytest.mark.skipif(
    not sink.idle_policies() or not sink.can_restore_priority(),
    reason="this process may not give a task its priority back")


def _policies(pid: int) -> set[int]:
    """The scheduling policies of every thread of process ``pid``, read from the system."""
    return {os.sched_getscheduler(int(tid)) for tid in os.listdir(f"/proc/{pid}/task")}


@_LINUX_POLICIES
@pytest.mark.parametrize("setting", ["", "auto", "normal", "idle"])
def test_the_writer_process_priority_and_session(
        tmp_path: Path, monkeypatch: Any, setting: str) -> None:
    # At normal priority the child has a session of its own: no controlling terminal, so
    # the terminal's signals cannot reach it. At idle priority it has its own process group
    # in the app's session (one autogroup: the priority then counts against the app's tasks;
    # Ctrl-C still goes to the app's group only) and ignores SIGTTOU (`stty tostop`). The
    # default is auto: idle where this process may give it its priority back, else normal.
    monkeypatch.setenv("TIMETRACER_WRITER_PRIORITY", setting)
    writer = CassetteWriter(str(tmp_path), isolate=True)
    _trace(_tracer(writer), 1)
    assert writer.flush(timeout=60, process=True)
    assert writer._sink is not None
    child = writer._sink.proc.pid
    idle = setting == "idle" or (setting in ("", "auto") and sink.can_restore_priority())
    try:
        if idle:
            assert os.getsid(child) == os.getsid(0)
            assert os.getpgid(child) == child != os.getpgid(0)
            ignored = int(Path(f"/proc/{child}/status").read_text().split("SigIgn:")[1].split()[0], 16)
            assert ignored & (1 << (signal.SIGTTOU - 1))
            # SCHED_IDLE (every thread, the fsync pool's too, once the flush has ended), or
            # nice 19 where a sandbox refuses the policy.
            assert _policies(child) == {os.SCHED_IDLE} \
                or os.getpriority(os.PRIO_PROCESS, child) == 19
        else:
            assert os.getsid(child) == child != os.getsid(0)
            assert os.sched_getscheduler(child) == os.SCHED_OTHER
            assert os.getpriority(os.PRIO_PROCESS, child) == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        writer.close()
    assert len(writer.written) == 2  # the trace and the lone call, as at any priority


def _eventually(pid: int, policy: int, timeout: float = 30) -> bool:
    """Whether every thread of ``pid`` comes to run at ``policy`` within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while _policies(pid) != {policy} and time.monotonic() < deadline:
        time.sleep(0.01)
    return _policies(pid) == {policy}


def _stopped_idle_writer(tmp_path: Path, monkeypatch: Any) -> tuple[CassetteWriter, int]:
    """An idle writer whose process has started and is stopped (SIGSTOP): what it is sent
    waits in its pipe, as behind busy cores, and its priority can be read meanwhile (once
    at idle: a child starved as it started, on a busy machine, is raised for a while)."""
    monkeypatch.setenv("TIMETRACER_WRITER_PRIORITY", "idle")
    writer = CassetteWriter(str(tmp_path), isolate=True)
    _trace(_tracer(writer), 0)
    assert writer.flush(timeout=60)
    assert writer._sink is not None
    child = writer._sink.proc.pid
    os.kill(child, signal.SIGSTOP)
    assert _eventually(child, os.SCHED_IDLE)
    return writer, child


@_RESTORABLE
def test_an_idle_writer_gets_the_apps_priority_while_a_flush_waits_for_it(
        tmp_path: Path, monkeypatch: Any) -> None:
    writer, child = _stopped_idle_writer(tmp_path, monkeypatch)
    tracer = _tracer(writer)
    try:
        _trace(tracer, 1)
        done: list[bool] = []
        flushing = threading.Thread(target=lambda: done.append(writer.flush(timeout=60)))
        flushing.start()
        # The flush cannot end while the child is stopped: its threads are raised meanwhile.
        assert _eventually(child, os.SCHED_OTHER)
        assert not done
    finally:
        os.kill(child, signal.SIGCONT)
    flushing.join(60)
    assert done == [True]
    assert _eventually(child, os.SCHED_IDLE)  # idle again once answered
    writer.close()
    names = sorted(load_cassette(p).name for p in writer.written)
    assert {"GET__orders_0", "GET__orders_1"} <= set(names)  # with the lone calls' cassette


@_RESTORABLE
def test_an_idle_writer_falling_behind_gets_the_apps_priority_until_it_catches_up(
        tmp_path: Path, monkeypatch: Any) -> None:
    writer, child = _stopped_idle_writer(tmp_path, monkeypatch)
    assert writer._sink is not None
    pipe = writer._sink._pipe_size
    tracer = _tracer(writer)
    big = "x" * 4096
    try:
        # Spans until what the stopped child has not read fills half its pipe.
        deadline = time.monotonic() + 60
        n = 0
        while _policies(child) != {os.SCHED_OTHER} and time.monotonic() < deadline:
            for _ in range(pipe // 4096 // 16):
                tracer.start_span("filler", attributes={"big": big}).end()
                n += 1
            time.sleep(0.06)  # the writer thread ships what gathered
        assert _policies(child) == {os.SCHED_OTHER}
        assert n * 4096 >= pipe // 2
    finally:
        os.kill(child, signal.SIGCONT)
    # Caught up (the flush reads it all), then back at idle priority once a frame goes out.
    assert writer.flush(timeout=60, process=True)
    tracer.start_span("after").end()
    assert _eventually(child, os.SCHED_IDLE)
    writer.close()
    assert writer.stats()["dropped_spans"] == 0


@_RESTORABLE
def test_an_idle_writer_starved_by_busy_cores_gets_the_apps_priority_and_writes(
        tmp_path: Path, monkeypatch: Any) -> None:
    # One busy process more than this process has CPUs: an idle task would get almost no
    # time. The quiet app's cassettes must still reach the disk without a flush.
    monkeypatch.setenv("TIMETRACER_WRITER_PRIORITY", "idle")
    writer = CassetteWriter(str(tmp_path), isolate=True)
    tracer = _tracer(writer)
    _trace(tracer, 0)
    assert writer.flush(timeout=60)
    assert writer._sink is not None
    child = writer._sink.proc.pid
    assert _eventually(child, os.SCHED_IDLE)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(len(os.sched_getaffinity(0)) + 1)]
    try:
        time.sleep(0.2)
        for n in (1, 2):
            with tracer.start_as_current_span(f"GET /orders/{n}", kind=SpanKind.SERVER,
                                              attributes={"http.route": "/orders/{id}"}):
                tracer.start_span("GET", kind=SpanKind.CLIENT).end()
        assert _eventually(child, os.SCHED_OTHER, timeout=20)
        deadline = time.monotonic() + 20
        found: list[Path] = []
        while time.monotonic() < deadline and len(found) < 3:
            time.sleep(0.05)
            found = list(tmp_path.rglob("GET__orders*"))
        assert len(found) == 3, f"{len(found)} of 3 cassettes on disk without a flush"
    finally:
        for p in busy:
            p.kill()
            p.wait()
    writer.close()


@_RESTORABLE
def test_an_idle_writer_process_takes_its_priority_back_for_every_thread() -> None:
    # What the child does at end of input (the app gone, nobody left to raise it): every
    # thread of its process, the one calling and the others, back to SCHED_OTHER. Run in a
    # process of its own, whose threads are all lowered first.
    code = textwrap.dedent("""
        import json, os, threading
        from timetracer_otel.exporters import sink
        idle = os.sched_param(0)
        lowered, done = threading.Event(), threading.Event()
        def other():
            os.sched_setscheduler(0, os.SCHED_IDLE, idle)
            lowered.set()
            done.wait()
        t = threading.Thread(target=other)
        t.start()
        lowered.wait()
        os.sched_setscheduler(0, os.SCHED_IDLE, idle)
        def policies():
            return sorted({os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")})
        before = policies()
        sink.restore_priority()
        print(json.dumps([before, policies()]))
        done.set()
        t.join()
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         check=True).stdout
    assert json.loads(out) == [[os.SCHED_IDLE], [os.SCHED_OTHER]]


def test_a_wrong_writer_priority_is_a_clear_error(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("TIMETRACER_WRITER_PRIORITY", "low")
    with pytest.raises(ConfigError,
                       match="TIMETRACER_WRITER_PRIORITY='low' is not valid; use one of: auto, idle, normal"):
        CassetteWriter(str(tmp_path), isolate=True)


def test_cassettes_survive_the_app_being_killed(tmp_path: Path) -> None:
    # The app records a trace and dies without flushing (SIGKILL, an OOM kill): the child
    # reads to the end of the pipe and writes every trace it was sent.
    app = textwrap.dedent(f"""
        import os, signal, time
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace import SpanKind
        from timetracer_otel.exporters import CassetteSpanProcessor, CassetteWriter, sink
        writer = CassetteWriter({str(tmp_path)!r}, isolate=True)
        provider = TracerProvider()
        provider.add_span_processor(CassetteSpanProcessor(writer=writer))
        tracer = provider.get_tracer("t")
        with tracer.start_as_current_span("GET /killed", kind=SpanKind.SERVER):
            tracer.start_span("call", kind=SpanKind.CLIENT).end()
        while writer._sink is None or writer._queue.qsize() or writer._outbox:
            time.sleep(0.01)
        time.sleep(0.2)  # the frame is in the pipe
        print(writer._sink.proc.pid, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", app], capture_output=True, text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    child = int(proc.stdout.split()[0])
    for _ in range(500):  # the orphaned child finishes on its own
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        import time

        time.sleep(0.02)
    [path] = list(tmp_path.glob("*/*.msgpack"))
    assert [s.name for s in load_cassette(path).spans] == ["GET /killed", "call"]


def test_one_cpu_keeps_the_writer_in_the_app_process(tmp_path: Path) -> None:
    # A container limited to one CPU: a writer process would spend the app's own CPU quota.
    from timetracer_otel.exporters.sink import cpus

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("100000 100000\n")
    assert cpus(str(v2)) == 1.0
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpus(str(v2)) == len(os.sched_getaffinity(0))
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpus(str(v1)) == min(1.5, len(os.sched_getaffinity(0)))
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpus(str(v1)) == len(os.sched_getaffinity(0))


def test_what_the_child_cannot_take_is_written_by_the_thread(tmp_path: Path, caplog: Any) -> None:
    # A resource value msgpack cannot carry, and a redactor subclass the child may not be able
    # to import: the writer thread falls back to writing in this process, and never stops.
    class MyRedactor(Redactor):
        pass

    provider = TracerProvider(resource=Resource.create({"build.id": 2**70}))
    writer = CassetteWriter(str(tmp_path / "resource"), isolate=True)
    provider.add_span_processor(CassetteSpanProcessor(writer=writer))
    provider.get_tracer("t").start_span("GET /r", kind=SpanKind.SERVER).end()
    assert writer.flush()  # that cassette cannot be encoded in any writer: counted
    _tracer(writer).start_span("GET /after", kind=SpanKind.SERVER).end()
    assert writer.flush()
    writer.close()
    assert [load_cassette(p).name for p in writer.written] == ["GET__after"]
    assert not writer.isolate and writer.errors == 2

    saved = STATE.redactor
    STATE.redactor = MyRedactor(key=b"k" * 32)
    try:
        writer = CassetteWriter(str(tmp_path / "redactor"), isolate=True)
        _tracer(writer).start_span("GET /s", kind=SpanKind.SERVER).end()
        assert writer.flush()
        writer.close()
    finally:
        STATE.redactor = saved
    assert [load_cassette(p).name for p in writer.written] == ["GET__s"]
    assert "not a Redactor" in caplog.text


def test_a_trace_the_dead_child_held_part_of_is_written_incomplete(tmp_path: Path) -> None:
    writer = CassetteWriter(str(tmp_path), isolate=True)
    tracer = _tracer(writer)
    with tracer.start_as_current_span("GET /half", kind=SpanKind.SERVER):
        tracer.start_span("call", kind=SpanKind.CLIENT).end()
        writer.flush()  # the client span is in the child, its trace still open there
        sink = writer._sink
        assert sink is not None
        os.kill(sink.proc.pid, signal.SIGKILL)
        sink.proc.wait()
    writer.flush()  # the writer thread finds the child gone
    _trace(tracer, 3)  # a trace that begins after that: complete
    writer.close()
    cassettes = {load_cassette(p).name: load_cassette(p) for p in writer.written}
    assert [s.name for s in cassettes["GET__half"].spans] == ["GET /half"]
    assert cassettes["GET__half"].complete is False
    assert cassettes["GET__orders_3"].complete is True


def test_a_span_read_straight_from_the_sdk_wires_as_its_snapshot_does() -> None:
    """The request path's wired() reads the SDK's fields directly; each span must come out as
    wire(snapshot(span)) makes it, kinds and statuses of value 0 included."""
    from opentelemetry import trace as api
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanContext, TraceFlags

    from timetracer_otel.exporters.sink import wire, wired
    from timetracer_otel.exporters.spans import snapshot
    from timetracer_otel.replay_shims.base import defer

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    remote = SpanContext(2**100 + 7, 99, is_remote=True, trace_flags=TraceFlags(1))
    # The outer span: kind INTERNAL and status UNSET, both of value 0.
    with tracer.start_as_current_span("internal"), tracer.start_as_current_span(
            "GET", kind=SpanKind.CLIENT, attributes={"url.full": "http://h/x", "n": 3}) as span:
        span.add_event("retry", {"attempt": 2})
        span.add_event("bare")
        defer(span, "httpx", ("GET", "http://h/x", [(b"a", b"a", b"1")], b""))
        span.set_status(Status(StatusCode.ERROR, "boom"))
    with tracer.start_as_current_span("consume", context=api.set_span_in_context(
            api.NonRecordingSpan(remote)), kind=SpanKind.CONSUMER) as consumer:
        consumer.set_status(Status(StatusCode.OK))
    spans = list(exporter.get_finished_spans())
    # A span another library made through the public constructor (a plain attribute dict).
    spans.append(ReadableSpan("made", context=SpanContext(5, 6, False), attributes={"a": 1},
                              kind=SpanKind.PRODUCER, start_time=1, end_time=2))
    class Minimal(ReadableSpan):  # another implementation: its own fields, no _events
        def __init__(self, inner: ReadableSpan) -> None:
            for f in ("_name", "_context", "_parent", "_kind", "_status", "_attributes",
                      "_resource", "_start_time", "_end_time"):
                setattr(self, f, getattr(inner, f))
            self._inner = inner

        @property
        def events(self) -> Any:
            return self._inner.events

    assert len(spans) == 4
    assert wired(Minimal(spans[0]), 17) == wire(snapshot(spans[0]), 17)
    for finished in spans:
        assert wired(finished, 17) == wire(snapshot(finished), 17)
    assert [wired(s, 0)[6] for s in spans] == [SpanKind.CLIENT.value, SpanKind.INTERNAL.value,
                                               SpanKind.CONSUMER.value, SpanKind.PRODUCER.value]
    assert wired(spans[0], 0)[14] == ("httpx", ("GET", "http://h/x", [(b"a", b"a", b"1")], b""))


def test_a_quiet_apps_cassettes_reach_disk_without_a_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The child holds encoded cassettes for a round only while frames keep coming: once the
    app is quiet they are written, so a child that cannot outlive the app (the app as PID 1
    of a container) does not take them with it. Here a round could wait a minute; the files
    must appear long before, with no flush."""
    import time

    from timetracer_otel.exporters import sink

    boot = sink._BOOT.replace(
        "from timetracer_otel.exporters.sink import main; main()",
        "from timetracer_otel.exporters import sink; sink.BATCH_DELAY = 60.0; sink.main()")
    assert boot != sink._BOOT
    monkeypatch.setattr(sink, "_BOOT", boot)
    writer = CassetteWriter(str(tmp_path), isolate=True)
    tracer = _tracer(writer)
    for n in range(3):
        with tracer.start_as_current_span(f"GET /orders/{n}", kind=SpanKind.SERVER,
                                          attributes={"http.route": "/orders/{id}"}):
            tracer.start_span("GET", kind=SpanKind.CLIENT).end()
    deadline = time.monotonic() + 20
    found: list[Path] = []
    while time.monotonic() < deadline and len(found) < 3:
        time.sleep(0.05)
        found = list(tmp_path.rglob("GET__orders*"))
    try:
        assert len(found) == 3, f"{len(found)} of 3 cassettes on disk without a flush"
        assert sorted(load_cassette(p).name for p in found) == [
            "GET__orders_0", "GET__orders_1", "GET__orders_2"]
    finally:
        writer.close()


@pytest.mark.parametrize("isolate", [False, True])
def test_a_span_that_cannot_be_taken_is_counted_never_raised(tmp_path: Path, isolate: bool) -> None:
    """A span without a context (another implementation's), at a full queue or not: counted
    as dropped, nothing raised into the app; a span of a trace that lost one marks it."""
    from opentelemetry.sdk.trace import ReadableSpan

    full = CassetteWriter(str(tmp_path / "full"), isolate=isolate, max_queue=0)
    full.submit(ReadableSpan("no context"))
    assert full.stats()["dropped_spans"] == 1
    full.close()
    writer = CassetteWriter(str(tmp_path / "w"), isolate=isolate)
    tracer = _tracer(writer)
    with tracer.start_as_current_span("GET /orders/1", kind=SpanKind.SERVER,
                                      attributes={"http.route": "/orders/{id}"}):
        broken = tracer.start_span("GET", kind=SpanKind.CLIENT)
        broken._events = None  # neither path can read it
        broken.end()
    writer.submit(ReadableSpan("no context"))
    writer.flush()
    writer.close()
    assert writer.stats()["dropped_spans"] == 2
    [path] = writer.written
    assert load_cassette(path).complete is False
