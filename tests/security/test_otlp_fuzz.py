"""Fuzz the OTLP/HTTP receiver's parsing (protobuf, JSON, gzip): any body is converted or
refused with a 4xx RejectedRequest, never another exception. Bounded for CI."""

from __future__ import annotations

import gzip
import os
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from timetracer_otel.exporters.otlp import JSON, PROTOBUF, Converted, RejectedRequest, TraceIntake, _gunzip

EXAMPLES = int(os.environ.get("TIMETRACER_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=EXAMPLES <= 300)

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=40),
                    st.sampled_from(["0" * 32, "ab" * 8, "zz", "", "SPAN_KIND_CLIENT", "AAAA"]))
json_docs = st.recursive(
    scalars,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4),
        st.dictionaries(st.sampled_from(
            ["resourceSpans", "scopeSpans", "spans", "traceId", "spanId", "parentSpanId", "name",
             "attributes", "key", "value", "stringValue", "intValue", "bytesValue", "arrayValue",
             "kvlistValue", "values", "events", "status", "code", "kind", "flags", "startTimeUnixNano",
             "resource", "timeUnixNano"]), kids, max_size=5),
    ),
    max_leaves=30,
)


def check(body: bytes, fmt: str) -> None:
    try:
        got = TraceIntake._parse(body, fmt)
    except RejectedRequest as exc:
        assert 400 <= exc.status < 500 and "\n" not in exc.reason
        return
    assert type(got) is Converted


@FUZZ
@given(json_docs)
def test_json_shaped_documents(doc: Any) -> None:
    check(msgspec.json.encode(doc), JSON)


@FUZZ
@given(st.binary(max_size=512), st.sampled_from([PROTOBUF, JSON]))
def test_random_bytes(body: bytes, fmt: str) -> None:
    check(body, fmt)


def _valid_protobuf() -> bytes:
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    # The generic protobuf JSON mapping carries ids as base64.
    doc = {"resourceSpans": [{"scopeSpans": [{"spans": [{
        "traceId": "AAAAAAAAAAAAAAAAAAAAAQ==", "spanId": "AAAAAAAAAAI=", "name": "GET",
        "attributes": [{"key": "timetracer.library", "value": {"stringValue": "httpx"}}]}]}]}]}
    return bytes(json_format.ParseDict(doc, ExportTraceServiceRequest()).SerializeToString())


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 4096), st.integers(0, 255)), min_size=1, max_size=6))
def test_mutated_protobuf(flips: list[tuple[int, int]]) -> None:
    data = bytearray(_valid_protobuf())
    for at, value in flips:
        data[at % len(data)] = value
    check(bytes(data), PROTOBUF)


@FUZZ
@given(st.binary(max_size=256))
def test_gzip_bodies(payload: bytes) -> None:
    for body in (gzip.compress(payload), gzip.compress(payload)[:-3], payload):
        try:
            _gunzip(body, 1024)
        except RejectedRequest as exc:
            assert exc.status in (400, 413)


@pytest.mark.parametrize("body", [
    # Regressions found by this fuzzing: each escaped as RecursionError before the fix.
    b"[" * 100_000,
    b'{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"' + b"0" * 31 + b'1","spanId":"' + b"0" * 15
    + b'2","attributes":[{"key":"a","value":' + b'{"arrayValue":{"values":[' * 3000 + b"]}}" * 3000
    + b"}]}]}]}]}",
])
def test_regressions(body: bytes) -> None:
    with pytest.raises(RejectedRequest) as info:
        TraceIntake._parse(body, JSON)
    assert info.value.status == 400
