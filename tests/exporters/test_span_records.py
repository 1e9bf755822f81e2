"""Span → SpanRecord: URL attributes are redacted unless they are, byte for byte, the URL the
shim already stored (redacted) in the span's own request; the same through OTLP."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    set_span_in_context,
)

from timetracer_otel.cassette import SpanRecord
from timetracer_otel.exporters.otlp import records_from_otlp
from timetracer_otel.exporters.spans import record_from_readable, record_from_snapshot, snapshot
from timetracer_otel.replay_shims import base

SECRET = "s3cr3t-Value-12345"


def _ended(fill: Callable[[Span], object]) -> ReadableSpan:
    """One client span of the SDK, filled by ``fill`` and ended."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("GET", kind=SpanKind.CLIENT) as span:
        fill(span)
    [done] = exporter.get_finished_spans()
    return done


def _span(attributes: dict[str, Any]) -> ReadableSpan:
    return _ended(lambda span: span.set_attributes(attributes))


def _client_span(url_attr: str, request_url: str) -> ReadableSpan:
    request = {"method": "GET", "url": request_url, "headers": [], "body": b""}
    return _span({
        "http.request.method": "GET", "url.full": url_attr, "http.url": url_attr,
        base.ATTR_PAYLOAD: base.payload_attribute(
            "httpx", "httpx:k", "httpx:s", "GET x", msgspec.msgpack.encode(request)),
    })


def _both(span: ReadableSpan) -> list[SpanRecord]:
    """The record the in-process writer makes and the one the collector makes."""
    [collected] = records_from_otlp(encode_spans([span]))
    return [record_from_readable(span), collected]


def test_a_url_attribute_with_a_secret_is_redacted_even_next_to_a_request_tree() -> None:
    raw = f"http://api.example/v1/items?token={SECRET}&page=2"
    redacted = base.STATE.redactor.url(raw)
    assert SECRET not in redacted
    for rec in _both(_client_span(raw, redacted)):
        for key in ("url.full", "http.url"):
            value: Any = rec.attributes[key]
            assert SECRET not in value and "page=2" in value
        assert rec.request["url"] == redacted and rec.library == "httpx"


def test_a_url_attribute_equal_to_the_stored_request_url_is_kept_as_stored() -> None:
    url = "http://api.example/v1/items?page=2&token=redacted:0123456789abcdef"
    for rec in _both(_client_span(url, url)):
        assert rec.attributes["url.full"] == rec.attributes["http.url"] == url == rec.request["url"]
        assert list(rec.attributes) == ["http.request.method", "url.full", "http.url"]


def test_a_userinfo_password_in_a_url_attribute_is_redacted() -> None:
    raw = f"https://user:{SECRET}@db.example/x"
    for rec in _both(_client_span(raw, "https://db.example/x")):
        assert SECRET not in rec.attributes["url.full"]
        assert SECRET not in msgspec.json.encode(rec).decode()


def test_equal_looking_attribute_sets_in_one_request_keep_their_own_values() -> None:
    from timetracer_otel.exporters.otlp import convert_json

    values = [{"intValue": "1"}, {"boolValue": True}, {"doubleValue": 1.0}, {"stringValue": "1"},
              {"intValue": "1"}, {"doubleValue": -0.0}, {"doubleValue": 0.0}]
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [
        {"traceId": "ab" * 16, "spanId": f"{i + 1:016x}", "name": "s",
         "attributes": [{"key": "n", "value": v}, {"key": "http.request.method", "value":
                                                    {"stringValue": "GET"}}]}
        for i, v in enumerate(values)]}]}]}
    records = convert_json(doc).records
    got = [r.attributes["n"] for r in records]
    assert [(type(v), v) for v in got] == [(int, 1), (bool, True), (float, 1.0), (str, "1"),
                                           (int, 1), (float, -0.0), (float, 0.0)]
    assert str(got[5]) == "-0.0" and str(got[6]) == "0.0"
    records[0].attributes["n"] = 99  # each record owns its attributes
    assert records[4].attributes["n"] == 1


def test_a_secret_learned_mid_batch_is_scrubbed_from_attribute_sets_seen_before() -> None:
    from timetracer_otel.exporters.spans import Memo, record_from_attributes
    from timetracer_otel.redaction import Redactor

    original = base.STATE.redactor
    base.STATE.redactor = Redactor(env={})
    try:
        memo: Memo = {}
        base_fields = {"trace_id": "ab" * 16, "span_id": "cd" * 8, "name": "s"}
        attrs = {"exception.message": f"upstream said {SECRET}", "peer": ["a", "b"]}
        first = record_from_attributes(dict(base_fields), attrs, memo)
        assert first.attributes["exception.message"] == f"upstream said {SECRET}"  # not known yet
        token = base.STATE.redactor.header("X-API-Key", SECRET)  # a later span's request header
        second = record_from_attributes(dict(base_fields), attrs, memo)
        assert second.attributes["exception.message"] == f"upstream said {token}"
        third = record_from_attributes(dict(base_fields), attrs, memo)  # the memo serves again
        assert third.attributes == second.attributes
        third.attributes["peer"].append("c")  # list values are each record's own too
        assert second.attributes["peer"] == ["a", "b"]
    finally:
        base.STATE.redactor = original


def test_status_message_and_event_attributes_are_scrubbed_of_seen_secrets() -> None:
    from opentelemetry.trace import Status, StatusCode

    token = base.STATE.redactor.header("X-API-Key", SECRET)  # the redactor has seen it
    def fill(span: Span) -> None:
        span.add_event("exception", {"exception.message": f"401 for key {SECRET}"})
        span.set_status(Status(StatusCode.ERROR, f"rejected {SECRET}"))

    done = _ended(fill)
    plain_span = _client_span("http://api.example/x", "http://api.example/x")  # no status, no events
    for rec in _both(done):
        assert rec.status == "ERROR" and rec.kind == "CLIENT"
        assert rec.status_message == f"rejected {token}"
        assert rec.events[0].attributes["exception.message"] == f"401 for key {token}"
        assert SECRET not in msgspec.json.encode(rec).decode()
    for rec in _both(plain_span):
        assert rec.status == "UNSET" and rec.status_message is None and rec.events == []


_REQUEST = {"method": "GET", "url": "http://api.example/x", "headers": [["accept", "*/*"]],
            "body": b""}
_RESPONSE = {"status": 200, "headers": [["content-type", "text/plain"]], "chunks": [b"\x00ok"],
             "http_version": "HTTP/1.1", "reason": "OK"}


def test_the_payload_attribute_and_the_separate_attributes_of_earlier_releases_agree() -> None:
    pack = msgspec.msgpack.encode
    current = _span({"http.request.method": "GET", base.ATTR_PAYLOAD: base.payload_attribute(
        "httpx", "httpx:k", "httpx:s", "GET x", pack(_REQUEST), response=pack(_RESPONSE))})
    earlier = _span({  # what a recorder before the payload attribute put on its spans
        "http.request.method": "GET", base.ATTR_LIBRARY: "httpx", base.ATTR_KEY: "httpx:k",
        base.ATTR_SHAPE: "httpx:s", base.ATTR_LABEL: "GET x", base.ATTR_REQUEST: pack(_REQUEST),
        base.ATTR_RESPONSE: pack(_RESPONSE)})
    records = _both(current) + _both(earlier)
    for rec in records:
        assert (rec.library, rec.key, rec.shape, rec.label) == ("httpx", "httpx:k", "httpx:s", "GET x")
        assert rec.request == _REQUEST and rec.response == _RESPONSE and rec.error is None
        assert type(rec.response["chunks"][0]) is bytes and rec.truncated is False
        assert rec.attributes == {"http.request.method": "GET"}  # no payload among them
    fields = {f: getattr(records[0], f) for f in ("library", "key", "request", "response")}
    assert all({f: getattr(r, f) for f in fields} == fields for r in records)


def test_an_error_and_a_truncated_outcome_travel_in_the_payload_attribute() -> None:
    pack = msgspec.msgpack.encode
    error = {"type": "httpx:ConnectTimeout", "message": "timed out", "args": ["timed out"],
             "attrs": None}
    failed = _span({base.ATTR_PAYLOAD: base.payload_attribute(
        "httpx", "httpx:k", "httpx:s", "GET x", pack(_REQUEST), error=pack(error))})
    cut = _span({base.ATTR_PAYLOAD: base.payload_attribute(
        "httpx", "httpx:k", "httpx:s", "GET x", pack(_REQUEST), truncated=True)})
    for rec in _both(failed):
        assert rec.error == error and rec.response is None and rec.truncated is False
    for rec in _both(cut):
        assert rec.truncated is True and rec.response is None and rec.error is None


def test_an_unreadable_payload_attribute_keeps_the_span_but_not_as_an_interaction(
    caplog: Any,
) -> None:
    for value in (b"\xc1 not msgpack", msgspec.msgpack.encode([1, 2]),
                  msgspec.msgpack.encode({"library": "httpx"})):
        for rec in _both(_span({"http.request.method": "GET", base.ATTR_PAYLOAD: value})):
            assert rec.library is None and rec.key is None and rec.name == "GET"
            assert rec.attributes == {"http.request.method": "GET"}
    assert "unreadable payload on span GET" in caplog.text


def test_a_payload_holding_a_msgpack_extension_type_spoils_only_its_own_span(caplog: Any) -> None:
    # Trees never hold extension types; a cassette with one does not load at all. A payload
    # from elsewhere (OTLP) that holds one is refused as it is decoded, so the cassette of the
    # trace keeps every other interaction.
    from timetracer_otel.cassette import Cassette, dumps, loads

    pack = msgspec.msgpack.encode
    bad_response = pack({"status": 200, "body": msgspec.msgpack.Ext(5, b"\x01")})
    bad = _span({"http.request.method": "GET", base.ATTR_PAYLOAD: base.payload_attribute(
        "httpx", "httpx:bad", "httpx:s", "GET bad", pack(_REQUEST), response=bad_response)})
    legacy_bad = _span({base.ATTR_LIBRARY: "httpx", base.ATTR_KEY: "httpx:old",
                        base.ATTR_REQUEST: pack(_REQUEST), base.ATTR_RESPONSE: bad_response})
    good = _span({base.ATTR_PAYLOAD: base.payload_attribute(
        "httpx", "httpx:good", "httpx:s", "GET good", pack(_REQUEST), response=pack(_RESPONSE))})
    records = [*_both(bad), *_both(legacy_bad), *_both(good)]
    assert [r.key for r in records] == [None, None, None, None, "httpx:good", "httpx:good"]
    assert "unreadable payload" in caplog.text
    cassette = Cassette(id="c", name="c", created="2026-11-27T00:00:00+00:00", spans=records)
    for fmt in ("msgpack", "json"):
        back = loads(dumps(cassette, fmt), "memory")
        assert [s.key for s in back.interactions] == ["httpx:good", "httpx:good"]


class _PublicView:
    """A ReadableSpan from elsewhere: only the public properties, none of the SDK's fields."""

    def __init__(self, span: ReadableSpan) -> None:
        self._span = span

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._span, name)


def test_the_snapshot_taken_at_on_end_keeps_everything_the_record_needs() -> None:
    remote = SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(1))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span(
        "POST /orders", kind=SpanKind.SERVER, context=set_span_in_context(NonRecordingSpan(remote)),
    ) as span:
        span.set_attributes({"http.request.method": "POST", "tags": ("a", "b"), "n": 3})
        span.add_event("exception", {"exception.message": f"password={SECRET}",
                                     "lines": (1, 2)})
        span.set_status(Status(StatusCode.ERROR, f"failed with password={SECRET}"))
    [done] = exporter.get_finished_spans()

    snap = snapshot(done)
    fields = (snap[0], snap[1], snap[2], snap[3], snap[4], snap[6], snap[7])
    assert fields == (0xABC, done.context.span_id, 0xDEF, True, "POST /orders",
                      done.start_time, done.end_time)
    records = [record_from_snapshot(snap), record_from_readable(_PublicView(done)),  # type: ignore[arg-type]
               *records_from_otlp(encode_spans([done]))]
    for rec in records:
        assert rec == records[0]
        assert (rec.trace_id, rec.parent_id, rec.remote_parent, rec.kind, rec.status) == (
            f"{0xABC:032x}", f"{0xDEF:016x}", True, "SERVER", "ERROR")
        assert rec.attributes == {"http.request.method": "POST", "tags": ["a", "b"], "n": 3}
        assert [e.name for e in rec.events] == ["exception"]
        assert rec.events[0].attributes["lines"] == [1, 2]
        assert SECRET not in msgspec.json.encode(rec).decode()
