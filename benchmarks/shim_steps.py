"""Our own per-call record steps for one httpx call, without network or a running app:
``python -m benchmarks.shim_steps``. Best of 5 blocks of 20,000 calls each.

The difference between "span + full record path" and "span only" is what the httpx shim adds
to an OTel span when recording: building the Call (redaction, key, shape), the response tree,
the payload attribute and the redaction of the stored copy. The rows between split it: each
step alone (the attribute row is over a bare span, like the last).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import httpx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind

from timetracer_otel.config import Mode
from timetracer_otel.replay_shims import base
from timetracer_otel.replay_shims import httpx as shim


def best_of(fn: Callable[[], object], n: int = 20_000, blocks: int = 5) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def main() -> None:
    logging.disable(logging.WARNING)
    trace.set_tracer_provider(TracerProvider())
    base.STATE.mode = Mode.RECORD
    tracer = trace.get_tracer(shim.SCOPE)  # the shim reuses a span of the httpx scope
    request = httpx.Request("GET", "http://api.local/items?page=3&q=abc",
                            headers={"accept": "application/json"})
    body = b'{"items": [1, 2, 3], "name": "x"}'
    response = httpx.Response(200, headers=[(b"content-type", b"application/json")], content=body)

    def span_only() -> None:
        with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT):
            pass

    def full() -> None:
        with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT):
            call = shim._call(request)
            with base.capture(call, shim.SCOPE) as cap:
                cap.ok(shim._response_tree(response, [body]))

    call = shim._call(request)
    tree = shim._response_tree(response, [body])
    packed_request = base._pack(call.request)
    packed_response = base._pack(tree)

    def attributes() -> None:  # the payload attribute, built and set through the SDK
        with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as span:
            span.set_attribute(base.ATTR_PAYLOAD, base.payload_attribute(
                call.library, call.key, call.shape_key, call.label, packed_request,
                response=packed_response))

    bare = best_of(span_only)
    rows = [
        ("span only (OTel)", bare),
        ("Call: redaction + key + shape", best_of(lambda: shim._call(request))),
        ("Call + stored request, packed", best_of(lambda: base._pack(shim._call(request).request))),
        ("response tree", best_of(lambda: shim._response_tree(response, [body]))),
        ("response: pack + redaction scan", best_of(lambda: base.STATE.redactor.response_packed(tree))),
        ("payload attribute: build + set", best_of(attributes) - bare),
        ("span + full record path", best_of(full)),
    ]
    for label, us in rows:
        print(f"{label:32s} {us:8.2f} µs")
    print(f"{'record path over the span':32s} {rows[-1][1] - bare:8.2f} µs")


if __name__ == "__main__":
    main()
