"""The exporter side: background writing, drops, failures, orphans, the SDK exporter contract."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from timetracer_otel.cassette import load_cassette
from timetracer_otel.exporters import CassetteSpanExporter, CassetteSpanProcessor, CassetteWriter
from timetracer_otel.exporters.storage import LocalStorage


def provider_with(processor: Any) -> TracerProvider:
    provider = TracerProvider()
    provider.add_span_processor(processor)
    return provider


class RecordingStorage(LocalStorage):
    """Local storage that remembers which thread wrote, and can be made to fail."""

    def __init__(self, root: Path, fail: bool = False) -> None:
        super().__init__(root)
        self.fail = fail
        self.threads: list[str] = []

    def write(self, relpath: str, data: bytes) -> str:
        self.threads.append(threading.current_thread().name)
        if self.fail:
            raise OSError(28, "No space left on device")
        return super().write(relpath, data)


def test_request_thread_never_writes_files(tmp_path: Path) -> None:
    storage = RecordingStorage(tmp_path)
    processor = CassetteSpanProcessor(storage)
    tracer = provider_with(processor).get_tracer("t")
    with (
        tracer.start_as_current_span("GET /x", kind=SpanKind.SERVER),
        tracer.start_as_current_span("db", kind=SpanKind.CLIENT),
    ):
        pass
    assert processor.force_flush()
    assert storage.threads == ["timetracer-cassette-writer"]
    assert threading.current_thread().name not in storage.threads
    [written] = processor.writer.written
    cassette = load_cassette(written)
    assert [s.name for s in cassette.spans] == ["GET /x", "db"] and cassette.complete


def test_storage_failures_are_counted_never_raised(tmp_path: Path) -> None:
    storage = RecordingStorage(tmp_path, fail=True)
    processor = CassetteSpanProcessor(storage)
    tracer = provider_with(processor).get_tracer("t")
    for _ in range(3):
        with tracer.start_as_current_span("req", kind=SpanKind.SERVER):
            pass  # the app carries on; nothing is raised here
    assert processor.force_flush()
    assert processor.writer.stats()["errors"] == 3
    assert processor.writer.written == []


def test_a_full_queue_drops_and_marks_the_cassette_incomplete(tmp_path: Path) -> None:
    writer = CassetteWriter(str(tmp_path), max_queue=0)  # no room: spans are dropped at submit
    processor = CassetteSpanProcessor(writer=writer)
    tracer = provider_with(processor).get_tracer("t")
    with tracer.start_as_current_span("req", kind=SpanKind.SERVER):
        with tracer.start_as_current_span("child", kind=SpanKind.CLIENT):
            pass
        writer.max_queue = 100  # room again before the root ends: it arrives, its child did not
    assert writer.stats()["dropped_spans"] == 1
    assert processor.force_flush()
    [path] = writer.written
    cassette = load_cassette(path)
    assert [s.name for s in cassette.spans] == ["req"] and cassette.complete is False


def test_open_traces_are_bounded_and_evicted_traces_are_incomplete(tmp_path: Path) -> None:
    writer = CassetteWriter(str(tmp_path), max_open_traces=2)
    tracer = provider_with(CassetteSpanProcessor(writer=writer)).get_tracer("t")
    roots = [tracer.start_span(f"req-{i}", kind=SpanKind.SERVER) for i in range(4)]
    for i, root in enumerate(roots):
        from opentelemetry import trace

        with trace.use_span(root, end_on_exit=False):
            tracer.start_span(f"child-{i}", kind=SpanKind.INTERNAL).end()
    for root in roots:
        root.end()
    assert writer.flush()
    by_name = {load_cassette(p).name: load_cassette(p) for p in writer.written}
    assert by_name["req-0"].complete is False and by_name["req-1"].complete is False
    assert by_name["req-2"].complete is True and by_name["req-3"].complete is True
    assert len(writer.assembler.open) == 0


def test_lone_client_calls_gather_into_one_process_cassette(tmp_path: Path) -> None:
    writer = CassetteWriter(str(tmp_path))
    tracer = provider_with(CassetteSpanProcessor(writer=writer)).get_tracer("t")
    for i in range(5):
        with tracer.start_as_current_span(f"GET {i}", kind=SpanKind.CLIENT):
            pass
    assert writer.flush()
    assert writer.written == []  # held until the process (or the recording) ends
    writer.close()
    [path] = writer.written
    assert [s.name for s in load_cassette(path).spans] == [f"GET {i}" for i in range(5)]


def test_exporter_entry_point_under_a_batch_processor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIMETRACER_DIR", str(tmp_path))
    monkeypatch.setenv("TIMETRACER_FORMAT", "json")
    from importlib.metadata import entry_points

    [ep] = [e for e in entry_points(group="opentelemetry_traces_exporter") if e.name == "timetracer"]
    assert ep.load() is CassetteSpanExporter
    exporter = CassetteSpanExporter()
    provider = provider_with(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("POST /orders", kind=SpanKind.SERVER):
        pass
    provider.shutdown()
    [path] = exporter.writer.written
    assert path.endswith(".json") and load_cassette(path).recorder.via == "exporter"


def test_exporter_failure_returns_failure_not_raise(tmp_path: Path) -> None:
    exporter = CassetteSpanExporter(str(tmp_path))
    exporter.writer.submit = None  # type: ignore[assignment,method-assign]
    provider = provider_with(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span("x"):
        pass  # SimpleSpanProcessor calls export() inline: it must not raise here
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExportResult

    assert exporter.export([ReadableSpan(name="y")]) is SpanExportResult.FAILURE


def test_late_internal_spans_of_a_written_trace_make_no_stray_cassette(tmp_path: Path) -> None:
    writer = CassetteWriter(str(tmp_path))
    tracer = provider_with(CassetteSpanProcessor(writer=writer)).get_tracer("t")
    from opentelemetry import trace

    root = tracer.start_span("GET /stream", kind=SpanKind.SERVER)
    with trace.use_span(root, end_on_exit=False):
        late = tracer.start_span("http receive", kind=SpanKind.INTERNAL)
    root.end()
    late.end()  # ends after the server span, as Starlette's streaming receive span does
    writer.close()
    [path] = writer.written
    assert [s.name for s in load_cassette(path).spans] == ["GET /stream"]
    assert writer.stats()["late_spans"] == 1
