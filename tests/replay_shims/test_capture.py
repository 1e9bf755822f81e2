"""Capture: which span a recorded call's payload lands on, and what an unfinished call leaves."""

from __future__ import annotations

import msgspec
import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.trace import SpanKind

from timetracer_otel.keys import http_call
from timetracer_otel.replay_shims import base

SCOPE = "opentelemetry.instrumentation.httpx"


class _Keep(SpanProcessor):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def on_end(self, span: ReadableSpan) -> None:
        self.spans.append(span)


def _payload(span: ReadableSpan) -> dict[str, object]:
    value = (span.attributes or {})[base.ATTR_PAYLOAD]
    assert isinstance(value, bytes)
    decoded = msgspec.msgpack.decode(value)
    assert isinstance(decoded, dict)
    return decoded


def test_a_second_call_under_a_used_instrumentation_span_gets_a_span_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keep = _Keep()
    provider = TracerProvider()
    provider.add_span_processor(keep)
    monkeypatch.setattr(base, "_tracer", provider.get_tracer("timetracer_otel"))
    first = http_call("httpx", "GET", "http://api.local/a", [("accept", "*/*")], b"")
    second = http_call("httpx", "GET", "http://api.local/b", [("accept", "*/*")], b"")
    with provider.get_tracer(SCOPE).start_as_current_span("GET", kind=SpanKind.CLIENT):
        with base.capture(first, SCOPE) as cap:  # an auth retry or hook re-sending beneath
            cap.ok({"status": 200, "headers": [], "chunks": [b"a"]})
        with base.capture(second, SCOPE) as cap:
            cap.ok({"status": 201, "headers": [], "chunks": [b"b"]})
    own, instrumentation = keep.spans
    assert instrumentation.name == "GET" and own.name == second.label
    assert own.parent is not None and own.parent.span_id == instrumentation.context.span_id
    assert _payload(instrumentation)["key"] == first.key
    assert _payload(instrumentation)["response"] == {"status": 200, "headers": [], "chunks": [b"a"]}
    assert _payload(own)["key"] == second.key and _payload(own)["request"] == second.request


def test_a_call_that_never_finishes_leaves_no_payload() -> None:
    keep = _Keep()
    provider = TracerProvider()
    provider.add_span_processor(keep)
    call = http_call("httpx", "GET", "http://api.local/slow", [], b"")
    with (
        pytest.raises(KeyboardInterrupt),
        provider.get_tracer(SCOPE).start_as_current_span("GET", kind=SpanKind.CLIENT),
        base.capture(call, SCOPE),
    ):
        raise KeyboardInterrupt  # a cancelled task: neither ok() nor fail() runs
    [span] = keep.spans
    assert not any(k.startswith("timetracer.") for k in span.attributes or {})


def test_a_call_nested_in_a_running_call_gets_a_span_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A transport that makes a second captured call while its own is still running: the
    # outer call's payload is set only when it ends, so the span must be claimed before.
    keep = _Keep()
    provider = TracerProvider()
    provider.add_span_processor(keep)
    monkeypatch.setattr(base, "_tracer", provider.get_tracer("timetracer_otel"))
    outer = http_call("httpx", "GET", "http://api.local/outer", [], b"")
    inner = http_call("httpx", "GET", "http://api.local/inner", [], b"")
    with provider.get_tracer(SCOPE).start_as_current_span("GET", kind=SpanKind.CLIENT):
        with base.capture(outer, SCOPE) as out:
            with base.capture(inner, SCOPE) as cap:
                cap.ok({"status": 200, "headers": [], "chunks": [b"inner"]})
            out.ok({"status": 200, "headers": [], "chunks": [b"outer"]})
        with base.capture(outer, SCOPE) as again:  # the claim ended with the call
            again.ok({"status": 204, "headers": [], "chunks": []})
    own_inner, own_again, instrumentation = keep.spans
    assert _payload(instrumentation)["key"] == outer.key
    assert _payload(instrumentation)["response"] == {"status": 200, "headers": [],
                                                      "chunks": [b"outer"]}
    assert _payload(own_inner)["key"] == inner.key and own_inner.name == inner.label
    assert _payload(own_again)["response"] == {"status": 204, "headers": [], "chunks": []}
