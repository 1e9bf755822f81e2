"""The OTLP/HTTP receiver: the SDK's own OTLP encoding of recorded spans, sent in pieces and
out of order, becomes the same cassette the in-process recorder writes; bad requests get a 4xx
and the receiver keeps serving."""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan

import timetracer_otel
from tests.exporters.span_tap import tap as span_tap
from tests.upstream_app import app
from timetracer_otel.cassette import Cassette, load_cassette
from timetracer_otel.exporters.otlp import OTLPReceiver, ReceiverLimits, records_from_otlp
from timetracer_otel.exporters.writer import CassetteWriter


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[OTLPReceiver]:
    writer = CassetteWriter(str(tmp_path / "collected"), via="collector", quiet_ns=200_000_000)
    r = OTLPReceiver(writer, host="127.0.0.1", port=0).start()
    yield r
    r.stop()


def post(url: str, body: bytes, content_type: str = "application/x-protobuf",
         **headers: str) -> httpx.Response:
    with suppress_instrumentation():  # httpx may be instrumented by other tests: not our spans
        return httpx.post(url, content=body, headers={"Content-Type": content_type, **headers})


def job(c: httpx.Client) -> list[Any]:
    return [c.get("/items", params={"page": 1}).json(), c.post("/echo", content=b"\x00ab\xff").content]


def record_job(
    base: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Any, list[ReadableSpan], list[str]]:
    tracer = trace.get_tracer("test")
    tap = span_tap()
    tap.spans = []
    # The tapped spans stand for what an app exports to a Collector: payloads on the spans.
    monkeypatch.setenv("TIMETRACER_SPAN_PAYLOADS", "1")
    with (timetracer_otel.record(dir=tmp_path / "inproc") as rec, tracer.start_as_current_span("job"),
          httpx.Client(base_url=base) as c):
        live = job(c)
    spans, tap.spans = tap.spans, None
    return live, spans, rec.paths


def to_json(request: ExportTraceServiceRequest) -> bytes:
    """The OTLP/JSON encoding: like protobuf's JSON mapping, but ids in hex."""
    doc = MessageToDict(request)

    for rs in doc["resourceSpans"]:
        for ss in rs["scopeSpans"]:
            for span in ss["spans"]:
                for field in ("traceId", "spanId", "parentSpanId"):
                    if field in span:
                        span[field] = base64.b64decode(span[field]).hex()
    return msgspec.json.encode(doc)


def wait_for_files(directory: Path, n: int, timeout: float = 10.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = sorted(directory.rglob("*.msgpack")) if directory.exists() else []
        if len(files) >= n:
            return files
        time.sleep(0.05)
    raise AssertionError(f"{n} cassette(s) expected in {directory}")


def test_collected_cassette_equals_the_in_process_one_and_replays(
    serve: Any, tmp_path: Path, receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(app)
    live, spans, paths = record_job(server.url, tmp_path, monkeypatch)
    assert len(paths) == 1 and len(spans) == 3
    inproc = load_cassette(paths[0])

    # The root first, then the children in reverse, over two requests in two encodings.
    by_start = sorted(spans, key=lambda s: s.start_time or 0)
    first = encode_spans([by_start[0]])
    second = encode_spans(by_start[:0:-1])
    assert len(records_from_otlp(second)) == 2
    r1 = post(receiver.url, gzip.compress(first.SerializeToString()), **{"Content-Encoding": "gzip"})
    r2 = post(receiver.url, to_json(second), "application/json")
    assert (r1.status_code, r2.status_code) == (200, 200)
    assert ExportTraceServiceResponse.FromString(r1.content).HasField("partial_success") is False
    assert r2.json() == {}

    files = wait_for_files(tmp_path / "collected", 1)
    collected: Cassette = load_cassette(files[0])
    assert type(collected) is Cassette and collected.recorder.via == "collector"
    assert collected.spans == inproc.spans
    assert collected.root == inproc.root and collected.name == inproc.name == "job"
    assert collected.complete is True
    assert collected.resource == inproc.resource
    echo = collected.interactions[1]
    assert echo.library == "httpx" and type(echo.response) is type(inproc.interactions[1].response)

    server.stop()
    with timetracer_otel.replay([files[0]]) as rep, httpx.Client(base_url=server.url) as c:
        replayed = job(c)
    assert replayed == live and type(replayed[1]) is bytes
    assert rep.report.exact == 2 and not rep.report.misses


def test_spans_delivered_again_or_late_end_up_once_in_their_trace_cassette(
    serve: Any, tmp_path: Path, receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OTLP delivery is at least once: a request the Collector retries comes twice, and a
    retried span can come after the quiet period wrote its trace. Each span is in the trace's
    one cassette once, in the order the spans started, and it replays strictly."""
    server = serve(app)
    live, spans, _ = record_job(server.url, tmp_path, monkeypatch)
    by_start = sorted(spans, key=lambda s: s.start_time or 0)
    root, get, echo = by_start
    first = encode_spans([root, echo]).SerializeToString()
    assert post(receiver.url, first).status_code == 200
    assert post(receiver.url, first).status_code == 200  # the same request again
    files = wait_for_files(tmp_path / "collected", 1)  # written after the quiet period
    time.sleep(0.3)
    late = encode_spans([get]).SerializeToString()
    assert post(receiver.url, late).status_code == 200  # the retry of a lost request, late
    assert post(receiver.url, late).status_code == 200  # and once more
    assert post(receiver.url, first).status_code == 200
    receiver.writer.flush()
    assert sorted((tmp_path / "collected").rglob("*.msgpack")) == files  # no stray cassette
    collected = load_cassette(files[0])
    assert [s.name for s in collected.spans] == ["job", "GET", "POST"]
    assert collected.complete is True
    stats = receiver.writer.stats()
    assert stats["duplicate_spans"] == 5 and stats["late_spans"] == 1, stats
    server.stop()
    with timetracer_otel.replay([files[0]], strict=True) as rep, httpx.Client(base_url=server.url) as c:
        assert job(c) == live
    assert rep.report.exact == 2 and rep.report.unused == []


def test_a_trace_waits_for_its_root_and_shutdown_writes_open_traces(tmp_path: Path) -> None:
    writer = CassetteWriter(str(tmp_path), via="collector", quiet_ns=50_000_000)
    r = OTLPReceiver(writer, host="127.0.0.1", port=0).start()
    tid, root, child = "ab" * 16, "01" * 8, "02" * 8
    body = {"resourceSpans": [{"resource": {"attributes": [
        {"key": "service.name", "value": {"stringValue": "svc"}}]},
        "scopeSpans": [{"spans": [{"traceId": tid, "spanId": child, "parentSpanId": root,
                                   "name": "child", "kind": 3, "startTimeUnixNano": "5",
                                   "endTimeUnixNano": "9",
                                   "attributes": [{"key": "n", "value": {"intValue": "7"}},
                                                  {"key": "b", "value": {"bytesValue": "AP8="}}]}]}]}]}
    resp = post(r.url, msgspec.json.encode(body), "application/json")
    assert resp.status_code == 200
    time.sleep(0.3)  # well past the quiet period: still no root, so nothing is written
    assert not list(tmp_path.rglob("*.msgpack"))
    r.stop()  # shutdown writes it, marked incomplete
    (path,) = tmp_path.rglob("*.msgpack")
    c = load_cassette(path)
    assert c.complete is False and c.resource == {"service.name": "svc"}
    (span,) = c.spans
    assert span.attributes == {"n": 7, "b": b"\x00\xff"} and type(span.attributes["n"]) is int
    assert span.kind == "CLIENT" and span.parent_id == root


def test_late_spans_find_their_cassette_through_an_internal_parent_and_beside_another_root(
    serve: Any, tmp_path: Path, receiver: OTLPReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A late call under an internal span that came late too joins its trace's cassette; a
    second local root of the trace, written on its own, does not swallow the first root's
    late or retried spans."""
    server = serve(app)
    live, spans, _ = record_job(server.url, tmp_path, monkeypatch)
    # One export request per span (each in its own scope), edited as protobuf messages.
    root_r, get_r, echo_r = (encode_spans([s]) for s in sorted(spans, key=lambda s: s.start_time or 0))

    def only(r: Any) -> Any:
        return r.resource_spans[0].scope_spans[0].spans[0]

    def copy(r: Any) -> Any:
        out = type(r)()
        out.CopyFrom(r)
        return out

    def body(*picked: Any) -> bytes:
        out = type(root_r)()
        for r in picked:
            out.resource_spans.extend(r.resource_spans)
        return out.SerializeToString()

    root = only(root_r)
    work_r = copy(root_r)
    work = only(work_r)
    work.span_id, work.parent_span_id, work.name = b"\x11" * 8, root.span_id, "work"
    del work.attributes[:]
    only(get_r).parent_span_id = work.span_id  # GET now runs under the internal span "work"
    other_r = copy(root_r)  # another local root of the same trace (a service calling itself)
    other = only(other_r)
    other.span_id, other.parent_span_id, other.name = b"\x22" * 8, b"\x33" * 8, "again"
    other.flags = 0x300  # (its parent is remote)
    assert post(receiver.url, body(root_r, echo_r)).status_code == 200
    wait_for_files(tmp_path / "collected", 1)
    assert post(receiver.url, body(other_r)).status_code == 200
    time.sleep(0.3)
    files = wait_for_files(tmp_path / "collected", 2)
    assert post(receiver.url, body(work_r)).status_code == 200  # late, internal: nothing to add
    assert post(receiver.url, body(get_r)).status_code == 200  # late, under it
    assert post(receiver.url, body(echo_r)).status_code == 200  # again
    receiver.writer.flush()
    time.sleep(0.3)
    receiver.writer.flush()
    assert sorted((tmp_path / "collected").rglob("*.msgpack")) == files  # no stray cassette
    by_name = {load_cassette(f).name: load_cassette(f) for f in files}
    assert [s.name for s in by_name["job"].spans] == ["job", "GET", "POST"]
    assert [s.name for s in by_name["again"].spans] == ["again"]
    server.stop()
    with timetracer_otel.replay([str(f) for f in files], strict=True) as rep, \
            httpx.Client(base_url=server.url) as c:
        assert job(c) == live
    assert rep.report.exact == 2 and rep.report.unused == []


def _trace_body(tid: str) -> bytes:
    spans = [{"traceId": tid, "spanId": "0" * 15 + str(n), "name": name, "kind": kind,
              "startTimeUnixNano": str(n), "endTimeUnixNano": "9",
              **({"parentSpanId": "0" * 15 + "1"} if n == 2 else {})}
             for n, name, kind in ((1, "job", 1), (2, "call", 3))]
    return msgspec.json.encode({"resourceSpans": [{"resource": {}, "scopeSpans": [{"spans": spans}]}]})


def test_while_cassettes_cannot_be_written_spans_are_refused_and_nothing_taken_is_lost(
    tmp_path: Path,
) -> None:
    """A directory that stops taking files (here the day's folder is a file in its way): the
    cassette is kept and tried again, new spans are refused with 503 so the Collector keeps
    them, and once the directory takes files again every accepted trace is written."""
    writer = CassetteWriter(str(tmp_path), via="collector", quiet_ns=50_000_000)
    r = OTLPReceiver(writer, host="127.0.0.1", port=0).start()
    day = tmp_path / dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    day.write_text("in the way")
    try:
        assert post(r.url, _trace_body("a1" * 16), "application/json").status_code == 200
        deadline = time.monotonic() + 10
        while not writer.failing and time.monotonic() < deadline:
            time.sleep(0.05)
        assert writer.failing
        refused = post(r.url, _trace_body("b2" * 16), "application/json")
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        day.unlink()  # the directory takes files again: the kept cassette is written
        while writer.failing and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not writer.failing
        assert post(r.url, _trace_body("b2" * 16), "application/json").status_code == 200  # retried
    finally:
        r.stop()
    names = sorted(p.name.split("__")[1][:4] for p in tmp_path.rglob("*.msgpack"))
    assert names == ["a1a1", "b2b2"]
    stats = writer.stats()  # one failure, written at last
    assert (stats["errors"], stats["recovered"], stats["unwritten"]) == (1, 1, 0)


def test_partial_success_for_spans_with_bad_ids(receiver: OTLPReceiver) -> None:
    body = {"resourceSpans": [{"scopeSpans": [{"spans": [
        {"traceId": "ab" * 16, "spanId": "01" * 8, "name": "ok"},
        {"traceId": "abcd", "spanId": "01" * 8, "name": "bad"}]}]}]}
    resp = post(receiver.url, msgspec.json.encode(body), "application/json")
    assert resp.status_code == 200
    assert resp.json()["partialSuccess"]["rejectedSpans"] == "1"
    request = ExportTraceServiceRequest()
    span = request.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = b"\x01" * 3, b"\x02" * 8, "bad"
    resp = post(receiver.url, request.SerializeToString())
    answer = ExportTraceServiceResponse.FromString(resp.content)
    assert resp.status_code == 200 and answer.partial_success.rejected_spans == 1
    assert "16 bytes" in answer.partial_success.error_message


def test_overload_answers_503_with_retry_after(tmp_path: Path) -> None:
    writer = CassetteWriter(str(tmp_path), via="collector", quiet_ns=10**9)
    r = OTLPReceiver(writer, host="127.0.0.1", port=0, limits=ReceiverLimits(max_queue=1)).start()
    try:
        body = {"resourceSpans": [{"scopeSpans": [{"spans": [
            {"traceId": "ab" * 16, "spanId": f"{i:016x}", "name": "s"} for i in range(1, 4)]}]}]}
        resp = post(r.url, msgspec.json.encode(body), "application/json")
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "2"
        assert "retry later" in resp.json()["message"]
    finally:
        r.stop()


def _raw(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send raw bytes; the status and the whole answer (headers and Content-Length body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            data += chunk
            head_end = data.find(b"\r\n\r\n")
            if not chunk or (head_end >= 0 and data.startswith(b"HTTP/1.")):
                break
        if head_end >= 0 and data.startswith(b"HTTP/1."):
            length = int(data.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
            while len(data) < head_end + 4 + length and (chunk := s.recv(65536)):
                data += chunk
    if not data.startswith(b"HTTP/1."):
        return -1, data  # http.server answers an unparsable request line with a bare error page
    return int(data.split(b" ", 2)[1]), data


def test_bad_requests_get_a_4xx_and_the_receiver_keeps_serving(receiver: OTLPReceiver) -> None:
    url, port = receiver.url, receiver.port
    valid = ExportTraceServiceRequest()
    span = valid.resource_spans.add().scope_spans.add().spans.add()
    span.trace_id, span.span_id, span.name = b"\x01" * 16, b"\x02" * 8, "ok"
    good = valid.SerializeToString()

    def still_serving() -> None:
        assert post(url, good).status_code == 200

    cases: list[tuple[str, httpx.Response, int]] = [
        ("garbage", post(url, b"\xff\xfe\xfd garbage \x00" * 50), 400),
        ("text", post(url, b"hello world, not protobuf"), 400),
        ("truncated", post(url, good[: len(good) - 5]), 400),
        ("bad json", post(url, b"{not json", "application/json"), 400),
        ("json not otlp", post(url, b'{"resourceSpans": 3}', "application/json"), 400),
        ("wrong type", post(url, good, "text/plain"), 415),
        ("no type", post(url, good, ""), 415),
        ("bad encoding", post(url, good, **{"Content-Encoding": "br"}), 415),
        ("corrupt gzip", post(url, b"\x1f\x8b\x08\x00garbage", **{"Content-Encoding": "gzip"}), 400),
        ("truncated gzip", post(url, gzip.compress(good)[:-8], **{"Content-Encoding": "gzip"}), 400),
    ]
    # Gzip bombs (80 MiB in one member; 1 GiB in 128 members of 1 MB total): cut off at the
    # decompressed-size limit.
    bomb = gzip.compress(b"\x00" * (80 * 1024 * 1024), compresslevel=1)
    cases.append(("gzip bomb", post(url, bomb, **{"Content-Encoding": "gzip"}), 413))
    bombs = gzip.compress(b"\x00" * (8 * 1024 * 1024), compresslevel=9) * 128
    cases.append(("gzip members bomb", post(url, bombs, **{"Content-Encoding": "gzip"}), 413))
    two = gzip.compress(good[:7]) + gzip.compress(good[7:])  # two members are one valid body
    cases.append(("two members", post(url, two, **{"Content-Encoding": "gzip"}), 200))
    for name, resp, status in cases:
        assert resp.status_code == status, (name, resp.status_code, resp.text)
        still_serving()
    assert "Retry-After" not in cases[0][1].headers

    # 100 MB body: refused from its Content-Length, before it is read.
    size = 100 * 1024 * 1024
    head = (f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\n"
            f"Content-Length: {size}\r\n\r\n").encode()
    sent = threading.Event()

    def send_all() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(head)
                chunk = b"\x00" * (1 << 20)
                for _ in range(100):
                    s.sendall(chunk)
        except OSError:
            pass
        finally:
            sent.set()

    status, data = _raw(port, head, b"\x00" * 65536)
    assert status == 413 and b"104857600 bytes" in data
    threading.Thread(target=send_all, daemon=True).start()
    assert sent.wait(30)
    still_serving()

    for name, head2, want in [
        ("chunked", b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                    b"Content-Type: application/x-protobuf\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 411),
        ("no length", b"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n", 411),
        ("wrong path", b"POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 404),
        ("get", b"GET /v1/traces HTTP/1.1\r\nHost: x\r\n\r\n", 405),
        ("not http", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", -1),
    ]:
        got, data = _raw(port, head2)
        assert got == want, name
        assert got != -1 or b"Error code: 400" in data
        still_serving()
    assert receiver.intake.rejected_requests >= sum(1 for _, _, want in cases if want >= 400)


def test_each_cassette_carries_its_own_services_resource(receiver: OTLPReceiver, tmp_path: Path) -> None:
    """One export request may carry several services' spans (a Collector batches them)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans: list[ReadableSpan] = []
    for service in ("orders", "billing"):
        memory = InMemorySpanExporter()
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(SimpleSpanProcessor(memory))
        with provider.get_tracer("t").start_as_current_span(f"GET /{service}",
                                                             kind=trace.SpanKind.SERVER):
            pass
        spans.extend(memory.get_finished_spans())
    assert post(receiver.url, encode_spans(spans).SerializeToString()).status_code == 200
    receiver.stop()  # graceful shutdown writes every open trace
    by_name = {c.name: c for c in (load_cassette(p) for p in receiver.writer.written)}
    assert by_name["GET__orders"].resource["service.name"] == "orders"
    assert by_name["GET__billing"].resource["service.name"] == "billing"
