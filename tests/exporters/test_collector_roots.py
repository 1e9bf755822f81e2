"""The Collector path groups spans by local root, as the in-process recorder does, whatever
order and however many requests they come in: two local roots of one trace in one request make
two cassettes, a span that waits for a parent not yet received goes where that parent goes,
and one whose parent never comes is still written (into its trace's cassette, which then says
``complete: false``), never lost."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.propagation import set_span_in_context

import timetracer_otel
from tests.exporters.span_tap import tap as span_tap
from tests.upstream_app import app
from timetracer_otel.cassette import Cassette, SpanRecord, load_cassette
from timetracer_otel.exporters.assembler import TraceAssembler, TraceBatch
from timetracer_otel.exporters.otlp import OTLPReceiver
from timetracer_otel.exporters.processor import CassetteSpanProcessor
from timetracer_otel.exporters.writer import CassetteWriter

QUIET_NS = 200_000_000




@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[OTLPReceiver]:
    writer = CassetteWriter(str(tmp_path / "collected"), via="collector", quiet_ns=QUIET_NS)
    r = OTLPReceiver(writer, host="127.0.0.1", port=0).start()
    yield r
    if not r._stopping.is_set():
        r.stop()


def post(r: OTLPReceiver, body: bytes) -> None:
    with suppress_instrumentation():  # httpx may be instrumented by other tests: not our spans
        resp = httpx.post(r.url, content=body, headers={"Content-Type": "application/x-protobuf"})
    assert resp.status_code == 200, resp.text


def files_in(tmp_path: Path) -> list[Path]:
    directory = tmp_path / "collected"
    return sorted(directory.rglob("*.msgpack")) if directory.exists() else []


def wait_for_files(tmp_path: Path, n: int, timeout: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = files_in(tmp_path)
        if len(files) >= n:
            return files
        time.sleep(0.05)
    raise AssertionError(f"{n} cassette(s) expected, found {files_in(tmp_path)}")


def by_name(paths: list[Path]) -> dict[str, Cassette]:
    cassettes = [load_cassette(p) for p in paths]
    out = {c.name: c for c in cassettes}
    assert len(out) == len(cassettes), [c.name for c in cassettes]
    return out


def job(c: httpx.Client) -> list[Any]:
    return [c.get("/items", params={"page": 1}).json(), c.post("/echo", content=b"\x00ab\xff").content]


def record_job(base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[ReadableSpan]]:
    """A root "job" with two calls (GET, then POST), recorded with their payloads on the
    spans, as an app exporting to a Collector sends them."""
    tracer = trace.get_tracer("test")
    tap = span_tap()
    tap.spans = []
    monkeypatch.setenv("TIMETRACER_SPAN_PAYLOADS", "1")
    with (timetracer_otel.record(dir=tmp_path / "inproc"), tracer.start_as_current_span("job"),
          httpx.Client(base_url=base) as c):
        live = job(c)
    spans, tap.spans = tap.spans, None
    return live, sorted(spans, key=lambda s: s.start_time or 0)


# Export requests of one span each, edited as protobuf messages.


def single(span: ReadableSpan) -> ExportTraceServiceRequest:
    return encode_spans([span])


def only(request: ExportTraceServiceRequest) -> Any:
    return request.resource_spans[0].scope_spans[0].spans[0]


def copy(request: ExportTraceServiceRequest) -> ExportTraceServiceRequest:
    out = ExportTraceServiceRequest()
    out.CopyFrom(request)
    return out


def body(*picked: ExportTraceServiceRequest) -> bytes:
    out = ExportTraceServiceRequest()
    for r in picked:
        out.resource_spans.extend(r.resource_spans)
    return out.SerializeToString()


def set_service(request: ExportTraceServiceRequest, name: str) -> None:
    attrs = request.resource_spans[0].resource.attributes
    kept = [kv for kv in attrs if kv.key != "service.name"]
    del attrs[:]
    attrs.extend(kept)
    attrs.append(KeyValue(key="service.name"))
    attrs[-1].value.string_value = name


def another_root(root_r: ExportTraceServiceRequest, name: str, service: str | None = None,
                 kind: int = 5) -> ExportTraceServiceRequest:
    """A second local root of the root's trace: its parent is remote (a CONSUMER by default)."""
    other_r = copy(root_r)
    other = only(other_r)
    other.span_id, other.parent_span_id, other.name, other.kind = b"\x22" * 8, b"\x33" * 8, name, kind
    other.flags = 0x300  # (its parent is remote)
    if service is not None:
        set_service(other_r, service)
    return other_r


def under(request: ExportTraceServiceRequest, parent: ExportTraceServiceRequest,
          service: str | None = None) -> ExportTraceServiceRequest:
    out = copy(request)
    only(out).parent_span_id = only(parent).span_id
    if service is not None:
        set_service(out, service)
    return out


def replays(files: list[Path], base: str, live: Any) -> None:
    with timetracer_otel.replay([str(f) for f in files], strict=True) as rep, \
            httpx.Client(base_url=base) as c:
        assert job(c) == live
    assert rep.report.exact == 2 and rep.report.unused == []


# -- defect 1: local roots that arrive together --------------------------------------------------


def test_two_services_local_roots_in_one_request_make_a_cassette_each(
    serve: Any, tmp_path: Path, receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Service A's root with its GET, and in the same trace service B's CONSUMER root with
    the POST, all in one export request (a Collector batches them): two cassettes, each with
    its own root's spans and its own service."""
    server = serve(app)
    live, spans = record_job(server.url, tmp_path, monkeypatch)
    root_r, get_r, echo_r = (single(s) for s in spans)
    set_service(root_r, "orders")
    set_service(get_r, "orders")
    consumer_r = another_root(root_r, "billing process", service="billing")
    request = body(root_r, get_r, consumer_r, under(echo_r, consumer_r, service="billing"))
    post(receiver, request)
    files = wait_for_files(tmp_path, 2)
    time.sleep(0.3)
    post(receiver, request)  # the Collector retries the request: nothing new
    receiver.stop()
    assert files_in(tmp_path) == files
    stats = receiver.writer.stats()
    assert (stats["written"], stats["duplicate_spans"], stats["late_spans"]) == (2, 4, 0), stats
    got = by_name(files)
    assert set(got) == {"job", "billing_process"}
    assert [s.name for s in got["job"].spans] == ["job", "GET"]
    assert [s.name for s in got["billing_process"].spans] == ["billing process", "POST"]
    assert got["job"].resource["service.name"] == "orders"
    assert got["billing_process"].resource["service.name"] == "billing"
    assert got["billing_process"].root == (b"\x22" * 8).hex()
    assert all(c.complete for c in got.values())
    server.stop()
    replays(files, server.url, live)


def test_two_root_spans_of_one_service_under_a_remote_parent_match_the_in_process_cassettes(
    serve: Any, tmp_path: Path, receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service calling itself: two SERVER spans continue one remote parent, each with a
    call. In-process they make two cassettes; sent to the receiver in one request they make
    the same two."""
    server = serve(app)
    remote = SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    tap = span_tap()
    tap.spans = []
    monkeypatch.setenv("TIMETRACER_SPAN_PAYLOADS", "1")
    with timetracer_otel.record(dir=tmp_path / "inproc") as rec:
        tracer = trace.get_tracer("t")
        for page in (1, 2):
            with tracer.start_as_current_span("GET /orders", kind=SpanKind.SERVER,
                                              context=set_span_in_context(NonRecordingSpan(remote))):
                httpx.get(f"{server.url}/items", params={"page": page})
    spans, tap.spans = tap.spans, None
    assert len(spans) == 4 and len(rec.paths) == 2
    post(receiver, encode_spans(spans).SerializeToString())
    files = wait_for_files(tmp_path, 2)
    receiver.stop()
    assert files_in(tmp_path) == files
    inproc = sorted((load_cassette(p) for p in rec.paths), key=lambda c: c.spans[0].start_ns)
    collected = sorted((load_cassette(p) for p in files), key=lambda c: c.spans[0].start_ns)
    assert [c.spans for c in collected] == [c.spans for c in inproc]
    assert [c.root for c in collected] == [c.root for c in inproc]
    assert all(c.complete for c in collected)


def test_a_local_root_that_comes_after_its_children_does_not_lose_them_to_the_other_root(
    serve: Any, tmp_path: Path, receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Service B's call comes with service A's whole trace; B's own root comes after A's
    cassette was written (B's exporter sent it in its next batch). The call waits for its
    parent instead of going into A's cassette."""
    server = serve(app)
    live, spans = record_job(server.url, tmp_path, monkeypatch)
    root_r, get_r, echo_r = (single(s) for s in spans)
    consumer_r = another_root(root_r, "billing process", service="billing")
    post(receiver, body(root_r, get_r, under(echo_r, consumer_r, service="billing")))
    (first,) = wait_for_files(tmp_path, 1)
    time.sleep(0.3)
    assert [s.name for s in load_cassette(first).spans] == ["job", "GET"]
    post(receiver, body(consumer_r))
    files = wait_for_files(tmp_path, 2)
    receiver.stop()
    assert files_in(tmp_path) == files
    got = by_name(files)
    assert [s.name for s in got["job"].spans] == ["job", "GET"]
    assert [s.name for s in got["billing_process"].spans] == ["billing process", "POST"]
    assert receiver.writer.assembler.orphan_spans == 0
    server.stop()
    replays(files, server.url, live)


# -- defect 2: a late span before its late parent -----------------------------------------------


def _job_with_work(serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[
        Any, str, ExportTraceServiceRequest, ExportTraceServiceRequest, ExportTraceServiceRequest,
        ExportTraceServiceRequest]:
    """The job's spans, with the GET moved under an internal span "work" (the root's child)."""
    server = serve(app)
    live, spans = record_job(server.url, tmp_path, monkeypatch)
    root_r, get_r, echo_r = (single(s) for s in spans)
    work_r = copy(root_r)
    work = only(work_r)
    work.span_id, work.parent_span_id, work.name = b"\x11" * 8, only(root_r).span_id, "work"
    del work.attributes[:]
    only(get_r).parent_span_id = work.span_id
    server.stop()
    return live, server.url, root_r, work_r, get_r, echo_r


def test_a_late_grandchild_before_its_late_parent_joins_the_traces_cassette(
    serve: Any, tmp_path: Path, receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trace is written without "work" and the GET under it; a retry brings the GET,
    twice, then another brings "work": the GET goes into the trace's cassette, no stray
    cassette is made, nothing is counted as lost."""
    live, base, root_r, work_r, get_r, echo_r = _job_with_work(serve, tmp_path, monkeypatch)
    post(receiver, body(root_r, echo_r))
    files = wait_for_files(tmp_path, 1)
    time.sleep(0.3)
    post(receiver, body(get_r))  # late, its parent not received yet
    post(receiver, body(get_r))  # and again
    time.sleep(0.3)  # past the quiet period: it still waits for its parent
    post(receiver, body(work_r))  # the parent, late: the GET follows it into the cassette
    receiver.writer.flush()
    assert [s.name for s in load_cassette(files[0]).spans] == ["job", "GET", "POST"]
    post(receiver, body(get_r, work_r, echo_r))  # everything once more
    receiver.stop()
    assert files_in(tmp_path) == files  # no stray cassette, at shutdown either
    collected = load_cassette(files[0])
    assert [s.name for s in collected.spans] == ["job", "GET", "POST"]
    assert collected.complete is True
    stats = receiver.writer.stats()
    assert stats["duplicate_spans"] == 4 and stats["late_spans"] == 2, stats
    assert stats["dropped_spans"] == 0 and receiver.writer.assembler.orphan_spans == 0
    replays(files, base, live)


def test_a_late_span_whose_parent_never_comes_is_added_to_its_traces_cassette(
    serve: Any, tmp_path: Path, receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GET's parent never comes: once it has waited ``orphan_wait_ns`` it is added to its
    trace's cassette (the only one), counted in ``orphan_spans``, and the cassette says
    ``complete: false``: it lacks the GET's parent. The parent coming after all adds nothing
    twice, and leaves the cassette as it was (an internal span is not added late)."""
    live, base, root_r, work_r, get_r, echo_r = _job_with_work(serve, tmp_path, monkeypatch)
    receiver.writer.assembler.orphan_wait_ns = 400_000_000
    post(receiver, body(root_r, echo_r))
    files = wait_for_files(tmp_path, 1)
    assert load_cassette(files[0]).complete is True  # (the root's child: all that came)
    time.sleep(0.3)
    post(receiver, body(get_r))
    deadline = time.monotonic() + 10
    while receiver.writer.assembler.orphan_spans == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    receiver.writer.flush()
    assert receiver.writer.assembler.orphan_spans == 1
    collected = load_cassette(files[0])
    assert [s.name for s in collected.spans] == ["job", "GET", "POST"]
    assert collected.complete is False
    post(receiver, body(work_r, get_r))  # the parent after all, and the GET again
    receiver.stop()
    assert files_in(tmp_path) == files
    collected = load_cassette(files[0])
    assert [s.name for s in collected.spans] == ["job", "GET", "POST"]
    assert collected.complete is False
    stats = receiver.writer.stats()
    assert stats["duplicate_spans"] == 1 and stats["late_spans"] == 2, stats
    replays(files, base, live)


def test_at_shutdown_a_late_span_still_waiting_for_its_parent_goes_into_its_traces_cassette(
    serve: Any, tmp_path: Path, receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    live, base, root_r, _work_r, get_r, echo_r = _job_with_work(serve, tmp_path, monkeypatch)
    post(receiver, body(root_r, echo_r))
    files = wait_for_files(tmp_path, 1)
    time.sleep(0.3)
    post(receiver, body(get_r))
    receiver.stop()  # long before orphan_wait_ns
    assert files_in(tmp_path) == files
    collected = load_cassette(files[0])
    assert [s.name for s in collected.spans] == ["job", "GET", "POST"]
    assert collected.complete is False  # (the GET's parent never came)
    assert receiver.writer.assembler.orphan_spans == 1
    replays(files, base, live)


# -- the assembler's own bookkeeping --------------------------------------------------------------


def _span(span_id: str, parent: str | None = None, *, start: int = 0, end: int = 0,
          remote: bool = False, kind: str = "INTERNAL", library: str | None = "httpx") -> SpanRecord:
    return SpanRecord(trace_id="ab" * 16, span_id=span_id * 16, parent_id=parent and parent * 16,
                      remote_parent=remote, name=span_id, kind=kind, start_ns=start, end_ns=end,
                      library=library)


def _assembler(**kw: Any) -> tuple[TraceAssembler, list[TraceBatch]]:
    out: list[TraceBatch] = []
    return TraceAssembler(out.append, quiet_ns=1, **kw), out


def _settle(a: TraceAssembler) -> None:
    time.sleep(0.002)
    a.flush_idle()


def test_a_waiting_span_goes_to_the_written_root_whose_time_holds_it() -> None:
    a, out = _assembler()
    a.orphan_wait_ns = 1
    a.add(_span("a", start=0, end=100, kind="SERVER", library=None))
    a.add(_span("b", "9", remote=True, start=200, end=300, kind="SERVER", library=None))
    _settle(a)
    assert sorted(b.root.span_id[0] for b in out if b.root is not None) == ["a", "b"]
    a.add(_span("c", "7", start=250, end=260))  # parent never comes; within b's time
    a.add(_span("d", "8", start=50, end=60))  # within a's
    _settle(a)
    _settle(a)
    late = {b.spans[0].name: b.late_root for b in out if b.late}
    assert late == {"c": "b" * 16, "d": "a" * 16}
    assert a.orphan_spans == 2 and not a.open


def test_waiting_spans_are_bounded_and_evicted_into_their_cassette_not_dropped() -> None:
    a, out = _assembler(max_open_traces=1)
    a.orphan_wait_ns = 10**15  # (never, but for eviction)
    a.add(_span("a", kind="SERVER", library=None))
    _settle(a)
    a.add(_span("c", "7"))  # waits for its parent
    other = msgspec_replace(_span("e", kind="SERVER", library=None), trace_id="cd" * 16)
    a.add(msgspec_replace(_span("f", "e"), trace_id="cd" * 16))  # another trace: evicts the first's
    assert [(b.spans[0].name, b.late_root) for b in out if b.late] == [("c", "a" * 16)]
    assert a.orphan_spans == 1 and a.dropped_spans == 0
    a.add(other)
    _settle(a)
    assert [b.root.name for b in out if b.root is not None] == ["a", "e"]
    assert len(a.open) == 0


def msgspec_replace(span: SpanRecord, **changes: Any) -> SpanRecord:
    import msgspec

    return msgspec.structs.replace(span, **changes)


def test_in_process_too_a_late_span_that_came_before_its_late_parent_follows_it() -> None:
    out: list[TraceBatch] = []
    a = TraceAssembler(out.append)  # in-process: a root closes its trace as it ends
    a.add(_span("a", kind="SERVER", library=None))
    a.add(_span("g", "p"))  # after its trace was written, before its parent
    a.add(_span("p", "a", library=None))  # the parent, internal: the call under it follows it
    a.add(_span("g", "p"))  # delivered again
    a.close_all()
    assert [(b.late, [s.name for s in b.spans], b.late_root) for b in out] == [
        (False, ["a"], None), (True, ["g"], "a" * 16)]
    assert (a.late_spans, a.duplicate_spans, a.orphan_spans) == (2, 1, 0)


def test_parents_in_a_loop_neither_hang_nor_lose_their_spans() -> None:
    a, out = _assembler()
    a.orphan_wait_ns = 1
    a.add(_span("a", kind="SERVER", library=None, end=10))
    _settle(a)
    a.add(_span("b", "c", start=5))
    a.add(_span("c", "b", start=6))
    a.add(_span("d", "d", start=7))  # its own parent
    _settle(a)
    _settle(a)
    assert sorted(s.name for b in out if b.late for s in b.spans) == ["b", "c", "d"]
    assert {b.late_root for b in out if b.late} == {"a" * 16} and not a.open


# -- review of 6a8f45c: work per late span, secrets learned late, what orphan_spans counts ------


def _counting_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spans scanned by the assembler's passes over an open trace: routing it (``_routes``)
    and compacting it (``TraceBatch.compact``, where there is one)."""
    scanned = [0]
    routes = TraceAssembler._routes

    def counting_routes(batch: TraceBatch, known: dict[str, str | None]) -> Any:
        scanned[0] += len(batch.spans)
        return routes(batch, known)

    monkeypatch.setattr(TraceAssembler, "_routes", staticmethod(counting_routes))
    compact = getattr(TraceBatch, "compact", None)
    if compact is not None:
        def counting_compact(self: TraceBatch) -> Any:
            scanned[0] += len(self.spans)
            return compact(self)

        monkeypatch.setattr(TraceBatch, "compact", counting_compact)
    return scanned


def test_late_spans_cost_work_in_proportion_to_themselves_not_to_the_spans_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A retried request: W spans wait for a parent that never comes, then N late children of
    the written root come one by one. Each late span looks only below itself, never over the
    W waiting ones (which made N late spans cost N * W)."""
    n = w = 300
    a, out = _assembler(orphan_wait_ns=10**15)
    a.add(_span("a", kind="SERVER", library=None))
    _settle(a)
    scanned = _counting_scans(monkeypatch)
    for i in range(w):
        a.add(msgspec_replace(_span("x", "7"), span_id=f"w{i:015x}"))
    for i in range(n):
        a.add(msgspec_replace(_span("x", "a"), span_id=f"l{i:015x}"))
    assert scanned[0] <= 2 * (n + w), scanned
    assert sum(len(b.spans) for b in out if b.late) == n
    (waiting,) = a.open.values()
    assert len(waiting.ids) == w and a.late_spans == n


def test_spans_waiting_for_late_parents_follow_them_with_work_in_proportion_to_the_spans(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """W spans each wait for their own parent; the parents come late one by one, each taking
    its child (and its child's child) along: no pass over the spans still waiting per parent."""
    w = 300
    a, out = _assembler(orphan_wait_ns=10**15)
    a.add(_span("a", kind="SERVER", library=None))
    _settle(a)
    scanned = _counting_scans(monkeypatch)
    for i in range(w):
        a.add(msgspec_replace(_span("x", None), span_id=f"c{i:015x}", parent_id=f"p{i:015x}"))
        a.add(msgspec_replace(_span("x", None), span_id=f"g{i:015x}", parent_id=f"c{i:015x}"))
    for i in range(w):
        a.add(msgspec_replace(_span("x", "a", library=None), span_id=f"p{i:015x}"))
    assert scanned[0] <= 4 * 3 * w, scanned
    late = [[s.span_id[0] for s in b.spans] for b in out if b.late]
    assert late == [["c", "g"]] * w  # (each parent internal: only the calls are added)
    assert not a.open and a.late_spans == 3 * w and a.orphan_spans == 0


SECRET = "sk-live-9f8e7d6c5b4a3210"


def _call(span_id: str, parent: str, body: bytes = b"ok") -> SpanRecord:
    return SpanRecord(trace_id="ab" * 16, span_id=span_id * 16, parent_id=parent * 16,
                      name="GET", kind="CLIENT", start_ns=int(span_id, 16), end_ns=100,
                      library="httpx", key=f"httpx:{span_id}", label=f"GET http://up/{span_id}",
                      request={"method": "GET", "url": f"http://up/{span_id}"},
                      response={"status": 200, "headers": [], "body": body})


def _written(tmp_path: Path, **kw: Any) -> CassetteWriter:
    """A Collector's writer (driven here, on this thread) with trace ab..ab written: its root
    1 and a call 2 under it."""
    w = CassetteWriter(str(tmp_path / "w"), via="collector", quiet_ns=1, **kw)
    w.assembler.add(_span("1", kind="SERVER", library=None, end=100), {"service.name": "svc"})
    w.assembler.add(_call("2", "1"))
    _settle(w.assembler)
    w.flush_now(False)
    return w


def test_late_spans_are_scrubbed_of_secrets_learned_after_they_were_captured(
    tmp_path: Path,
) -> None:
    """A call whose parent never comes and a late child of the root, both captured before the
    app sent the token in their responses as a secret: the late path scrubs them as a
    cassette's own calls are scrubbed when it is written."""
    from timetracer_otel.replay_shims.base import STATE

    w = _written(tmp_path)
    body = f'{{"issued": "{SECRET}"}}'.encode()
    orphan, late = _call("3", "f", body), _call("4", "1", body)  # (captured now)
    w.assembler.add(orphan)  # waits for its parent
    STATE.redactor.token(SECRET, sure=True)  # the app sends it in a header later on
    w.assembler.add(late)
    w.close_now()  # the orphan goes into the cassette
    (path,) = sorted((tmp_path / "w").rglob("*.msgpack"))
    assert [s.span_id[0] for s in load_cassette(path).spans] == ["1", "2", "3", "4"]
    assert SECRET.encode() not in path.read_bytes()
    assert w.assembler.orphan_spans == 1


def test_orphan_spans_counts_the_spans_added_internal_ones_kept_with_their_chain() -> None:
    """An internal span whose parent never comes, with a call under it: both go into the
    cassette (the chain as it ran), and orphan_spans counts the two spans written."""
    a, out = _assembler(orphan_wait_ns=1)
    a.add(_span("a", kind="SERVER", library=None, end=100))
    _settle(a)
    a.add(_span("b", "9", start=10, library=None))  # internal, its parent never comes
    a.add(_span("c", "b", start=20))  # a call under it
    _settle(a)
    _settle(a)
    late = [b for b in out if b.late]
    assert [[s.name for s in b.spans] for b in late] == [["b", "c"]]
    assert a.orphan_spans == sum(len(b.spans) for b in late) == 2
    assert [b.orphans for b in late] == [2] and not a.open
    assert [b.complete for b in late] == [False]  # (its cassette will say it lacks "9")


def test_orphan_spans_does_not_count_spans_the_writer_could_not_add(tmp_path: Path) -> None:
    """The trace's cassette was left out (errors only): the call whose parent never came
    has nowhere to go, and is not counted as added to it."""
    w = _written(tmp_path, errors_only=True)
    assert w.skipped == 1
    w.assembler.add(_call("3", "f"))
    w.close_now()
    assert w.assembler.orphan_spans == 0
    assert sorted((tmp_path / "w").rglob("*.msgpack")) == []


def test_a_late_span_under_a_cassette_without_root_is_added_to_it(tmp_path: Path) -> None:
    """A trace whose span ids were forgotten (more traces written since) gets a span whose
    parent never comes: with no cassette of its trace known it is written on its own,
    without root. A late child of that span goes into that cassette, not nowhere."""
    w = _written(tmp_path, max_open_traces=1)
    other = "cd" * 16
    w.assembler.add(msgspec_replace(_span("5", kind="SERVER", library=None), trace_id=other))
    _settle(w.assembler)  # trace cd..cd written: ab..ab's span ids are forgotten
    w.assembler.add(_call("3", "f"))  # ab..ab: waits for its parent
    w.assembler.add(msgspec_replace(_span("6", "e"), trace_id="ef" * 16))  # makes room: written
    w.flush_now(False)
    rootless = [p for p in sorted((tmp_path / "w").rglob("*.msgpack"))
                if load_cassette(p).root is None]
    assert [[s.span_id[0] for s in load_cassette(p).spans] for p in rootless] == [["3"]]
    w.assembler.add(_call("4", "3"))  # a late child of the span without its parent
    w.flush_now(False)
    assert [s.span_id[0] for s in load_cassette(rootless[0]).spans] == ["3", "4"]
    assert load_cassette(rootless[0]).complete is False
    w.close_now()


# -- a cassette that took spans whose parent never came says complete: false ---------------------


def test_only_the_cassette_that_took_a_span_whose_parent_never_came_says_it_is_incomplete(
    tmp_path: Path,
) -> None:
    """Two local roots of one trace make two cassettes, both complete; a call whose parent
    never comes goes into the one whose root's time holds its start, which from then on says
    ``complete: false``; the other one still says ``complete: true``."""
    w = CassetteWriter(str(tmp_path / "w"), via="collector", quiet_ns=1)
    w.assembler.add(_span("1", kind="SERVER", library=None, end=100), {"service.name": "a"})
    w.assembler.add(_call("2", "1"))
    w.assembler.add(_span("5", "9", remote=True, kind="SERVER", library=None, start=200, end=300),
                    {"service.name": "b"})
    _settle(w.assembler)
    w.flush_now(False)
    paths = sorted((tmp_path / "w").rglob("*.msgpack"))
    assert [load_cassette(p).complete for p in paths] == [True, True]
    w.assembler.add(msgspec_replace(_call("3", "f"), start_ns=250))  # its parent never comes
    w.close_now()
    assert sorted((tmp_path / "w").rglob("*.msgpack")) == paths
    got = {c.root: c for c in map(load_cassette, paths)}
    assert [s.span_id[0] for s in got["1" * 16].spans] == ["1", "2"]
    assert [s.span_id[0] for s in got["5" * 16].spans] == ["5", "3"]
    assert got["1" * 16].complete is True
    assert got["5" * 16].complete is False
    assert w.assembler.orphan_spans == 1


def test_in_process_a_cassette_that_took_a_span_whose_parent_never_ended_is_incomplete(
    tmp_path: Path,
) -> None:
    """In-process (CassetteSpanProcessor) the same: a call that ends after its trace was
    written, under a span that never ends, is added to the trace's cassette at shutdown, and
    the cassette says ``complete: false``: it lacks that span."""
    writer = CassetteWriter(str(tmp_path))
    provider = TracerProvider()
    processor = CassetteSpanProcessor(writer=writer)
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    root = tracer.start_span("GET /x", kind=SpanKind.SERVER)
    with trace.use_span(root, end_on_exit=False):
        work = tracer.start_span("work")  # never ends
    root.end()
    with trace.use_span(work, end_on_exit=False), \
            tracer.start_as_current_span("db", kind=SpanKind.CLIENT):
        pass
    assert writer.flush()
    [path] = writer.written
    assert [s.name for s in load_cassette(path).spans] == ["GET /x"]
    assert load_cassette(path).complete is True  # (all that ended so far)
    processor.shutdown()  # (the app ends: spans still waiting for a parent are written)
    assert writer.written == [path]
    cassette = load_cassette(path)
    assert [s.name for s in cassette.spans] == ["GET /x", "db"]
    assert cassette.complete is False
