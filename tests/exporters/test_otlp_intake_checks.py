"""The OTLP receiver's intake checks, over real HTTP on 127.0.0.1: spans a cassette cannot hold
are rejected (OTLP partial success) and counted instead of spoiling a cassette or dying in the
writer; bodies are read only once the request is acceptable and has one of the in-flight
slots; bad framing and bad command-line values get one clear answer."""

from __future__ import annotations

import gzip
import socket
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from timetracer_otel.cassette import Cassette, dumps, load_cassette, loads
from timetracer_otel.exporters.otlp import OTLPReceiver, ReceiverLimits
from timetracer_otel.exporters.writer import CassetteWriter
from timetracer_otel.replay_shims import base

TID = "ab" * 16
ROOT = "0" * 15 + "1"
LIB = {"key": "timetracer.library", "value": {"stringValue": "httpx"}}
NON_STR_KEY_MAP = b"\x81\x91\x61\x01"  # msgpack {[97]: 1}: a map whose key is an array


def attr(key: str, **value: Any) -> dict[str, Any]:
    return {"key": key, "value": value}


def json_span(n: int, name: str, *attrs: dict[str, Any], **fields: Any) -> dict[str, Any]:
    span = {"traceId": TID, "spanId": f"{n:016x}", "name": name, "kind": 1 if n == 1 else 3,
            "startTimeUnixNano": str(10 + n), "endTimeUnixNano": "99",
            "attributes": list(attrs), **fields}
    if n != 1:
        span["parentSpanId"] = ROOT
    return span


def json_body(*spans: dict[str, Any]) -> bytes:
    return msgspec.json.encode({"resourceSpans": [{"scopeSpans": [{"spans": list(spans)}]}]})


def post(url: str, body: bytes, content_type: str = "application/json",
         **headers: str) -> httpx.Response:
    with suppress_instrumentation():
        return httpx.post(url, content=body, headers={"Content-Type": content_type, **headers},
                          timeout=60)


def start(tmp_path: Path, fmt: str = "msgpack", **limits: Any) -> OTLPReceiver:
    writer = CassetteWriter(str(tmp_path / "out"), fmt=fmt,  # type: ignore[arg-type]
                            via="collector", quiet_ns=100_000_000)
    return OTLPReceiver(writer, host="127.0.0.1", port=0, limits=ReceiverLimits(**limits)).start()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[OTLPReceiver]:
    r = start(tmp_path)
    yield r
    r.stop()


def written(r: OTLPReceiver) -> list[Cassette]:
    """Every cassette the receiver wrote, loaded, after checking that each also survives a
    conversion to the other format (what ``show --json`` and ``convert`` do)."""
    assert r.writer.stats()["errors"] == 0, r.writer.stats()
    out = []
    for path in r.writer.written:
        cassette = load_cassette(path)
        for fmt in ("json", "msgpack"):
            loads(dumps(cassette, fmt), "converted")  # type: ignore[arg-type]
        out.append(cassette)
    return out


def pb_request(*attr_sets: list[tuple[str, Any]], tid: str = TID) -> bytes:
    """A protobuf export request: the root span, then one child per attribute set."""
    request = ExportTraceServiceRequest()
    spans = request.resource_spans.add().scope_spans.add().spans
    for n, attrs in enumerate([[], *attr_sets], start=1):
        span = spans.add()
        span.trace_id, span.span_id = bytes.fromhex(tid), n.to_bytes(8, "big")
        span.name, span.kind = ("job" if n == 1 else f"call{n}"), (1 if n == 1 else 3)
        span.start_time_unix_nano, span.end_time_unix_nano = 10 + n, 99
        if n != 1:
            span.parent_span_id = (1).to_bytes(8, "big")
        for key, value in attrs:
            v = span.attributes.add(key=key).value
            if type(value) is bytes:
                v.bytes_value = value
            elif type(value) is int:
                v.int_value = value
            else:
                v.string_value = value
    return request.SerializeToString()


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_spans_whose_payload_attributes_have_the_wrong_type_are_rejected_and_counted(
    tmp_path: Path, fmt: str,
) -> None:
    r = start(tmp_path, fmt)
    try:
        resp = post(r.url, json_body(
            json_span(1, "job"),
            json_span(2, "GET good", LIB, attr("timetracer.key", stringValue="httpx:good")),
            json_span(3, "label int", LIB, attr("timetracer.label", intValue="5")),
            json_span(4, "shape list", LIB, attr("timetracer.shape", arrayValue={"values": [
                {"intValue": "1"}]})),
            json_span(5, "truncated text", LIB, attr("timetracer.truncated", stringValue="no")),
            json_span(6, "request int", LIB, attr("timetracer.request", intValue="5")),
            json_span(7, "library int", attr("timetracer.library", intValue="5")),
            json_span(8, "key bool", LIB, attr("timetracer.key", boolValue=True)),
        ))
        assert resp.status_code == 200
        partial = resp.json()["partialSuccess"]
        assert partial["rejectedSpans"] == "6"
        assert "rejected" in partial["errorMessage"] and "timetracer." in partial["errorMessage"]

        pb = post(r.url, pb_request([("timetracer.library", "httpx"), ("timetracer.label", 7)],
                                    tid="cd" * 16), "application/x-protobuf")
        answer = ExportTraceServiceResponse.FromString(pb.content)
        assert pb.status_code == 200 and answer.partial_success.rejected_spans == 1
        assert "timetracer.label" in answer.partial_success.error_message
    finally:
        r.stop()
    assert r.intake.rejected_spans == 7
    by_trace = {c.spans[0].trace_id: c for c in written(r)}
    assert [s.name for s in by_trace[TID].spans] == ["job", "GET good"]
    assert by_trace[TID].interactions[0].key == "httpx:good"
    assert [s.name for s in by_trace["cd" * 16].spans] == ["job"]


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_integers_beyond_64_bits_are_rejected_at_intake_and_the_rest_is_written(
    tmp_path: Path, fmt: str,
) -> None:
    r = start(tmp_path, fmt)
    try:
        resp = post(r.url, json_body(
            json_span(1, "job", attr("n", intValue="7"), attr("ok", boolValue=True)),
            json_span(2, "int 2**64", attr("n", intValue=str(2**64))),
            json_span(3, "int 1e300", attr("n", intValue=1e300)),
            json_span(4, "start 2**70", startTimeUnixNano=str(2**70)),
            json_span(5, "event time", events=[{"name": "e", "timeUnixNano": str(2**64)}]),
            json_span(6, "flags", flags=2**40),
            json_span(7, "request text", LIB, attr("timetracer.key", stringValue="k"),
                      attr("timetracer.request", stringValue=f'{{"n": {2**64}}}')),
        ))
        assert resp.status_code == 200
        assert resp.json()["partialSuccess"]["rejectedSpans"] == "6"
    finally:
        r.stop()
    assert r.intake.rejected_spans == 6
    (cassette,) = written(r)
    (job,) = cassette.spans
    assert job.attributes == {"n": 7, "ok": True}


def test_values_of_the_wrong_form_are_rejected_not_coerced(receiver: OTLPReceiver) -> None:
    resp = post(receiver.url, json_body(
        json_span(1, "job", attr("b", boolValue=False)),
        json_span(2, "bool text", attr("b", boolValue="false")),  # was read as True
        json_span(3, "int 1_0", attr("n", intValue="1_0")),  # was read as 10
        json_span(4, "int 2.5", attr("n", intValue=2.5)),  # was read as 2
    ))
    assert resp.status_code == 200
    assert resp.json()["partialSuccess"]["rejectedSpans"] == "3"
    receiver.stop()
    (cassette,) = written(receiver)
    assert [(s.name, s.attributes) for s in cassette.spans] == [("job", {"b": False})]


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_a_payload_map_whose_key_is_not_a_string_is_rejected(tmp_path: Path, fmt: str) -> None:
    r = start(tmp_path, fmt)
    combined = base.payload_attribute("httpx", "httpx:k", "s", "GET", NON_STR_KEY_MAP)
    good = base.payload_attribute("httpx", "httpx:good", "s", "GET", msgspec.msgpack.encode(
        {"url": "http://x/", 1: "an int key is kept"}))
    try:
        resp = post(r.url, pb_request(
            [("timetracer.library", "httpx"), ("timetracer.key", "k"),
             ("timetracer.request", NON_STR_KEY_MAP)],
            [(base.ATTR_PAYLOAD, combined)],
            [(base.ATTR_PAYLOAD, good)],
        ), "application/x-protobuf")
        answer = ExportTraceServiceResponse.FromString(resp.content)
        assert resp.status_code == 200 and answer.partial_success.rejected_spans == 2
    finally:
        r.stop()
    (cassette,) = written(r)
    assert [s.name for s in cassette.spans] == ["job", "call4"]


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    return s


def _head(s: socket.socket) -> bytes:
    """Read one response head (status line and headers)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _request(content_length: str, content_type: str = "application/json",
             extra: str = "") -> bytes:
    return (f"POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {content_length}\r\n{extra}\r\n").encode()


def test_a_body_is_read_only_with_a_free_slot_and_an_otlp_content_type(tmp_path: Path) -> None:
    r = start(tmp_path, max_inflight=2, read_timeout=20)
    stalled = [_connect(r.port) for _ in range(2)]
    try:
        for s in stalled:  # each sends part of its body, then nothing: each holds a slot
            s.sendall(_request("100000") + b"{" * 10)
        time.sleep(0.5)
        # A third request is refused at once, from its headers: its body is never waited for.
        with _connect(r.port) as s:
            s.sendall(_request("100000"))
            head = _head(s)
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head, head
    finally:
        for s in stalled:
            s.close()
    try:
        deadline = time.monotonic() + 10
        while post(r.url, json_body(json_span(1, "job"))).status_code != 200:  # slots freed
            assert time.monotonic() < deadline
            time.sleep(0.1)
        with _connect(r.port) as s:  # not OTLP: refused before its body is read
            s.sendall(_request("100000", "text/plain"))
            head = _head(s)
        assert head.startswith(b"HTTP/1.1 415"), head
    finally:
        r.stop()


def test_a_json_body_that_is_no_object_of_spans_is_refused_without_being_built(
    receiver: OTLPReceiver,
) -> None:
    n = 3_000_000  # 9 MB of empty lists, a few KB gzipped
    lists = b"[]," * (n - 1) + b"[]"
    cases = [(b"[" + lists + b"]", 400), (b'{"resourceSpans":[' + lists + b"]}", 400),
             (b'{"somethingElse":[' + lists + b"]}", 200)]
    for raw, status in cases:
        body = gzip.compress(raw, 6)
        tracemalloc.start()
        try:
            resp = post(receiver.url, body, **{"Content-Encoding": "gzip"})
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert resp.status_code == status, resp.text
        # The inflated text and a copy of it: not millions of Python lists (~200 MB).
        assert peak < 64 * 1024 * 1024, (raw[:20], peak)


def test_http_framing_errors_are_refused(receiver: OTLPReceiver) -> None:
    body = json_body(json_span(1, "job"))
    for head, want in [
        (_request(str(len(body)), extra=f"Content-Length: {len(body) + 5}\r\n"), 400),
        (_request("1_0"), 400),
        (_request("+2"), 400),
        (_request("999999999", extra="Expect: 100-continue\r\n"), 413),
    ]:
        with _connect(receiver.port) as s:
            s.sendall(head)
            got = _head(s)
        assert int(got.split(b" ", 2)[1]) == want, (head, got)  # (never "100 Continue")
    # An acceptable request with Expect: 100-continue is invited, then answered.
    with _connect(receiver.port) as s:
        s.sendall(_request(str(len(body)), extra="Expect: 100-continue\r\n"))
        assert _head(s).startswith(b"HTTP/1.1 100")
        s.sendall(body)
        assert _head(s).startswith(b"HTTP/1.1 200")


def test_span_names_are_logged_with_control_characters_escaped(
    receiver: OTLPReceiver, caplog: pytest.LogCaptureFixture,
) -> None:
    name = "x\x1b]0;OWNED\x07\x1b[2Jred"
    resp = post(receiver.url, json_body(
        json_span(1, name, attr(base.ATTR_PAYLOAD, stringValue="not json")),
        json_span(2, name, LIB, attr("timetracer.label", intValue="5")),
    ))
    assert resp.status_code == 200
    receiver.stop()
    assert "unreadable payload on span" in caplog.text
    assert "\x1b" not in caplog.text and "\x07" not in caplog.text
    assert "\\x1b]0;OWNED" in caplog.text
    assert "rejected 1 span" in caplog.text  # (that line names the span too, escaped)


@pytest.mark.parametrize("args", [
    ["--listen", "127.0.0.1:0", "--quiet-period", "1e308"],
    ["--listen", "127.0.0.1:\u00b2"],
])
def test_bad_collect_arguments_get_one_line_and_exit_2(tmp_path: Path, args: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "timetracer_otel.cli", "collect",
                          "--dir", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert ("--quiet-period" if "--quiet-period" in args else "--listen") in out.stderr


def test_collect_reports_the_spans_it_rejected_when_it_stops(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "timetracer_otel.cli", "collect", "--listen", f"127.0.0.1:{port}",
         "--dir", str(tmp_path), "--quiet-period", "0.1"],
        stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        assert "receiving OTLP/HTTP traces" in proc.stderr.readline()
        resp = post(f"http://127.0.0.1:{port}/v1/traces", json_body(
            json_span(1, "job"), json_span(2, "label int", LIB, attr("timetracer.label", intValue="5"))))
        assert resp.json()["partialSuccess"]["rejectedSpans"] == "1"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "received 1 spans in 1 requests (0 refused, 1 span(s) rejected)" in err
    assert "span 'label int' was rejected: timetracer.label is an int, not a string" in err
