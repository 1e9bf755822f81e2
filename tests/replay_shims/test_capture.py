"""Capture: which span a recorded call's payload lands on, and what an unfinished call leaves."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, Tracer

from timetracer_otel.keys import http_call
from timetracer_otel.replay_shims import base

SCOPE = "opentelemetry.instrumentation.httpx"


@dataclass
class Traced:
    instrumentation: Tracer  # the httpx instrumentation's scope, whose spans capture reuses
    exporter: InMemorySpanExporter

    def spans(self) -> tuple[ReadableSpan, ...]:
        return self.exporter.get_finished_spans()


@pytest.fixture
def traced(monkeypatch: pytest.MonkeyPatch) -> Traced:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(base, "_tracer", provider.get_tracer("timetracer_otel"))  # own spans
    return Traced(provider.get_tracer(SCOPE), exporter)


def _payload(span: ReadableSpan) -> dict[str, object]:
    value = (span.attributes or {})[base.ATTR_PAYLOAD]
    assert isinstance(value, bytes)
    decoded = msgspec.msgpack.decode(value)
    assert isinstance(decoded, dict)
    return decoded


def test_a_second_call_under_a_used_instrumentation_span_gets_a_span_of_its_own(
    traced: Traced,
) -> None:
    first = http_call("httpx", "GET", "http://api.local/a", [("accept", "*/*")], b"")
    second = http_call("httpx", "GET", "http://api.local/b", [("accept", "*/*")], b"")
    with traced.instrumentation.start_as_current_span("GET", kind=SpanKind.CLIENT):
        with base.capture(first, SCOPE) as cap:  # an auth retry or hook re-sending beneath
            cap.ok({"status": 200, "headers": [], "chunks": [b"a"]})
        with base.capture(second, SCOPE) as cap:
            cap.ok({"status": 201, "headers": [], "chunks": [b"b"]})
    own, instrumentation = traced.spans()
    assert instrumentation.name == "GET" and own.name == second.label
    assert own.parent is not None and own.parent.span_id == instrumentation.context.span_id
    assert _payload(instrumentation)["key"] == first.key
    assert _payload(instrumentation)["response"] == {"status": 200, "headers": [], "chunks": [b"a"]}
    assert _payload(own)["key"] == second.key
    assert _payload(own)["request"] == msgspec.msgpack.decode(msgspec.msgpack.encode(second.request))


def test_a_call_that_never_finishes_leaves_no_payload(traced: Traced) -> None:
    call = http_call("httpx", "GET", "http://api.local/slow", [], b"")
    with (
        pytest.raises(KeyboardInterrupt),
        traced.instrumentation.start_as_current_span("GET", kind=SpanKind.CLIENT),
        base.capture(call, SCOPE),
    ):
        raise KeyboardInterrupt  # a cancelled task: neither ok() nor fail() runs
    [span] = traced.spans()
    assert not any(k.startswith("timetracer.") for k in span.attributes or {})


def test_a_call_nested_in_a_running_call_gets_a_span_of_its_own(traced: Traced) -> None:
    # A transport that makes a second captured call while its own is still running: the
    # outer call's payload is set only when it ends, so the span must be claimed before.
    outer = http_call("httpx", "GET", "http://api.local/outer", [], b"")
    inner = http_call("httpx", "GET", "http://api.local/inner", [], b"")
    with traced.instrumentation.start_as_current_span("GET", kind=SpanKind.CLIENT):
        with base.capture(outer, SCOPE) as out:
            with base.capture(inner, SCOPE) as cap:
                cap.ok({"status": 200, "headers": [], "chunks": [b"inner"]})
            out.ok({"status": 200, "headers": [], "chunks": [b"outer"]})
        with base.capture(outer, SCOPE) as again:  # the claim ended with the call
            again.ok({"status": 204, "headers": [], "chunks": []})
    own_inner, own_again, instrumentation = traced.spans()
    assert _payload(instrumentation)["key"] == outer.key
    assert _payload(instrumentation)["response"] == {"status": 200, "headers": [],
                                                      "chunks": [b"outer"]}
    assert _payload(own_inner)["key"] == inner.key and own_inner.name == inner.label
    assert _payload(own_again)["response"] == {"status": 204, "headers": [], "chunks": []}


def test_the_direct_deferrable_span_checks_agree_with_the_public_ones(
    traced: Traced, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """deferrable_span reads the SDK's fields directly; every case must answer as OTel's public
    calls (_public_deferrable) do."""
    from opentelemetry import context as otel_context
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    from timetracer_otel.config import Mode

    assert base._CURRENT is not None  # the default runtime context: the direct path is in use
    monkeypatch.setattr(base.STATE, "mode", Mode.RECORD)
    monkeypatch.setattr(base.STATE, "defer", True)
    other = TracerProvider().get_tracer("opentelemetry.instrumentation.requests")
    answers: list[tuple[str, object, object]] = []

    def check(case: str) -> None:
        answers.append((case, base.deferrable_span(SCOPE), base._public_deferrable(SCOPE)))

    check("no span")
    with traced.instrumentation.start_as_current_span("GET", kind=SpanKind.CLIENT) as span:
        check("a fresh span of the scope")
        with suppress_instrumentation():
            check("suppressed")
        token = base._TAKEN.set(span)
        check("claimed by a running call")
        base._TAKEN.reset(token)
        with other.start_as_current_span("GET", kind=SpanKind.CLIENT):
            check("another library's span")
        base.defer(span, "httpx", ("GET",))
        check("already carries a deferred call")
    with traced.instrumentation.start_as_current_span("GET", kind=SpanKind.CLIENT) as span:
        span.set_attribute(base.ATTR_PAYLOAD, b"x")
        check("already carries a payload")
    span = traced.instrumentation.start_span("GET", kind=SpanKind.CLIENT)
    span.end()
    ctx = otel_context.attach(base.trace.set_span_in_context(span))
    try:
        check("ended")
    finally:
        otel_context.detach(ctx)
    assert [(case, direct is public) for case, direct, public in answers] == [
        (case, True) for case, _, _ in answers]
    found = {case for case, direct, _ in answers if direct is not None}
    assert found == {"a fresh span of the scope"}
