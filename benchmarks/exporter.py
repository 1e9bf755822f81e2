"""Scenario 5: spans per second through the cassette processor and the OTLP receiver, and the
memory one open trace holds in the writer.

Spans are made once by the SDK (a server span with 10 client children, each child carrying
a payload attribute the size of a recorded JSON call), then fed to the component under test.
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.common import have, worker_main

CHILDREN = 10


def make_traces(count: int) -> list[list[Any]]:
    """``count`` traces of ended ReadableSpans, children first and the local root last."""
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
    from opentelemetry.trace import SpanKind

    from timetracer_otel.keys import http_call
    from timetracer_otel.replay_shims import base

    done: list[ReadableSpan] = []

    class Keep(SpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            done.append(span)

    provider = TracerProvider()
    provider.add_span_processor(Keep())
    tracer = provider.get_tracer("bench")
    pack = msgspec.msgpack.encode
    body = b'{"i": 1, "name": "item-1", "description": "' + b"x" * 180 + b'"}'
    response = pack({"status": 200, "headers": [["content-type", "application/json"],
                                                ["content-length", str(len(body))]],
                     "chunks": [body], "http_version": "HTTP/1.1", "reason": "OK"})
    traces: list[list[Any]] = []
    for t in range(count):
        start = len(done)
        with tracer.start_as_current_span("GET /fanout", kind=SpanKind.SERVER) as root:
            root.set_attribute("http.request.method", "GET")
            root.set_attribute("http.route", "/fanout")
            for i in range(CHILDREN):
                call = http_call("httpx", "GET", f"http://127.0.0.1:8000/items?i={i}&t={t}",
                                 [("accept", "*/*")], b"")
                with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as span:
                    span.set_attributes({
                        "http.request.method": "GET", "url.full": call.request["url"],
                        base.ATTR_PAYLOAD: base.payload_attribute(
                            "httpx", call.key, call.shape_key, call.label, pack(call.request),
                            response=response),
                    })
        traces.append(done[start:])
    return traces


def processor(args: dict[str, Any]) -> dict[str, Any]:
    from timetracer_otel.exporters.processor import CassetteSpanProcessor

    traces = make_traces(args["traces"])
    spans = [s for t in traces for s in t]
    enqueue: list[float] = []
    end_to_end: list[float] = []
    written = 0
    for r in range(args["runs"]):
        proc = CassetteSpanProcessor(dir=tempfile.mkdtemp(prefix=f"bench-proc-{r}-"))
        t0 = time.perf_counter()
        for s in spans:
            proc.on_end(s)
        t1 = time.perf_counter()
        proc.force_flush()
        t2 = time.perf_counter()
        written += len(proc.writer.written)
        proc.shutdown()
        enqueue.append(len(spans) / (t1 - t0))
        end_to_end.append(len(spans) / (t2 - t0))
    return {"enqueue_spans_per_s": enqueue, "written_spans_per_s": end_to_end,
            "spans": len(spans), "cassettes_written": written, "expected": len(traces) * args["runs"]}


class _Discard:
    """Storage that keeps nothing: the conversion is measured without the disk."""

    def write(self, relpath: str, data: bytes) -> str:
        return relpath

    def check(self) -> None:
        pass


def convert(args: dict[str, Any]) -> dict[str, Any]:
    """The writer's Python work per span (convert, redact, assemble, encode a cassette), on the
    calling thread: what shares the GIL with the app while recording."""
    from timetracer_otel.exporters.spans import Memo, record_from_readable, snapshot
    from timetracer_otel.exporters.writer import CassetteWriter

    traces = make_traces(args["traces"])
    spans = [s for t in traces for s in t]
    per_span: list[float] = []
    conversion: list[float] = []
    for _ in range(args["runs"]):
        writer = CassetteWriter(_Discard())
        t0 = time.perf_counter()
        for s in spans:
            writer._add(snapshot(s))
        writer._write_unwritten()
        per_span.append((time.perf_counter() - t0) / len(spans) * 1e6)
        assert len(writer.written) == len(traces)
        memo: Memo = {}  # one batch, as the writer keeps it
        t0 = time.perf_counter()
        for s in spans:
            record_from_readable(s, memo, raw=True)  # as the msgpack writer converts
        conversion.append((time.perf_counter() - t0) / len(spans) * 1e6)
    return {"us_per_span": per_span, "conversion_us_per_span": conversion}


def receiver(args: dict[str, Any]) -> dict[str, Any]:
    if not have("timetracer_otel.exporters.otlp"):
        return {"skipped": "timetracer_otel/exporters/otlp.py is not there yet"}
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    from timetracer_otel.exporters.otlp import TraceIntake
    from timetracer_otel.exporters.writer import CassetteWriter

    traces = make_traces(args["traces"])
    # One export request per 5 traces, as a BatchSpanProcessor would send them.
    bodies = [encode_spans([s for t in traces[i:i + 5] for s in t]).SerializeToString()
              for i in range(0, len(traces), 5)]
    total = sum(len(t) for t in traces)
    rates: list[float] = []
    written = 0
    for r in range(args["runs"]):
        writer = CassetteWriter(tempfile.mkdtemp(prefix=f"bench-otlp-{r}-"), via="collector")
        intake = TraceIntake(writer)
        t0 = time.perf_counter()
        for b in bodies:
            reply = intake.handle(b, "application/x-protobuf", None)
            assert reply.status == 200, reply
        writer.flush()
        rates.append(total / (time.perf_counter() - t0))
        writer.close()
        written += len(writer.written)
    return {"received_spans_per_s": rates, "spans": total, "requests": len(bodies),
            "cassettes_written": written}


def memory(args: dict[str, Any]) -> dict[str, Any]:
    from timetracer_otel.exporters.writer import CassetteWriter

    traces = make_traces(args["traces"])
    per_trace: list[float] = []
    for r in range(args["runs"]):
        # In this process, where tracemalloc sees it: a writer process holds the same
        # assembler on its side (and the app's process then holds none of it).
        writer = CassetteWriter(tempfile.mkdtemp(prefix=f"bench-mem-{r}-"),
                                max_open_traces=args["traces"] + 1, isolate=False)
        writer.flush()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for t in traces:
            for s in t[:-1]:  # the children only: every trace stays open
                writer.submit(s)
        writer.flush()
        held = tracemalloc.get_traced_memory()[0] - base
        tracemalloc.stop()
        assert len(writer.assembler.open) == len(traces)
        per_trace.append(held / len(traces))
        writer.close()
    return {"bytes_per_open_trace": per_trace, "spans_per_trace": CHILDREN}


def run(args: dict[str, Any]) -> dict[str, Any]:
    modes = {"processor": processor, "convert": convert, "receiver": receiver, "memory": memory}
    return modes[args["mode"]](args)


if __name__ == "__main__":
    worker_main(run)

_ = Path
