"""The exporter side: background writing, drops, failures, orphans, the SDK exporter contract."""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, set_span_in_context

import timetracer_otel
from tests.upstream_app import app
from timetracer_otel.cassette import atomic_write_many, load_cassette
from timetracer_otel.errors import CassetteError
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
    assert writer.stats()["dropped_spans"] == 1  # counted once, not again as its trace closes
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
    # Called directly: the SDK's processors would swallow an exception themselves, so only
    # the return value shows the exporter's own handling.
    exporter = CassetteSpanExporter(str(tmp_path))
    exporter.writer.submit = None  # type: ignore[assignment,method-assign]
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.trace.export import SpanExportResult

    assert exporter.export([ReadableSpan(name="y")]) is SpanExportResult.FAILURE
    exporter.shutdown()


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


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


linux_only = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")


@linux_only
def test_batched_writes_rename_a_file_only_after_its_own_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: set[str] = set()
    renamed: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        path = _fd_path(fd)
        if path.endswith("bad.msgpack.tmp") or ".bad.msgpack." in path:
            raise OSError(5, "Input/output error")
        real_fsync(fd)
        synced.add(path)

    def replace(src: str, dst: str) -> None:
        assert str(src) in synced, "renamed before its bytes were durable"
        renamed.append(str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    items = [(tmp_path / "day" / f"c{i}.msgpack", f"cassette {i}".encode()) for i in range(5)]
    items.insert(2, (tmp_path / "day" / "bad.msgpack", b"never visible"))
    results = atomic_write_many(items)
    assert isinstance(results[2], CassetteError) and "Input/output error" in str(results[2])
    assert [r for i, r in enumerate(results) if i != 2] == [p for i, (p, _) in enumerate(items) if i != 2]
    assert sorted(p.name for p in (tmp_path / "day").iterdir()) == [f"c{i}.msgpack" for i in range(5)]
    assert (tmp_path / "day" / "c3.msgpack").read_bytes() == b"cassette 3"
    assert len(renamed) == 5


def test_batched_writes_still_land_when_no_thread_can_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # At interpreter shutdown (an atexit flush on Python 3.12+) Thread.start raises
    # RuntimeError: the fsync pool must fsync in the calling thread instead of losing the batch.
    from timetracer_otel import cassette

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(cassette, "_FSYNC_POOL", cassette._FsyncPool(4))
    monkeypatch.setattr(threading.Thread, "start", refuse)
    items = [(tmp_path / f"c{i}.msgpack", f"cassette {i}".encode()) for i in range(6)]
    assert atomic_write_many(items) == [p for p, _ in items]
    assert [p.read_bytes() for p, _ in items] == [d for _, d in items]
    monkeypatch.undo()  # threads can start again: the same pool starts them and is used
    pool = cassette._FsyncPool(2)
    monkeypatch.setattr(cassette, "_FSYNC_POOL", pool)
    later = [(tmp_path / f"later{i}.msgpack", b"later") for i in range(3)]
    assert atomic_write_many(later) == [p for p, _ in later]
    assert pool._pid == os.getpid()


def test_the_writer_batches_cassettes_and_flush_waits_for_them(tmp_path: Path) -> None:
    class Counting(LocalStorage):
        def __init__(self, root: Path) -> None:
            super().__init__(root)
            self.batches: list[int] = []

        def write_many(self, items: Sequence[tuple[str, bytes]]) -> list[str | Exception]:
            self.batches.append(len(items))
            return super().write_many(items)

    storage = Counting(tmp_path)
    processor = CassetteSpanProcessor(storage)
    tracer = provider_with(processor).get_tracer("t")
    for i in range(150):
        with (
            tracer.start_as_current_span(f"GET /r{i}", kind=SpanKind.SERVER),
            tracer.start_as_current_span("db", kind=SpanKind.CLIENT),
        ):
            pass
    assert processor.force_flush()
    written = processor.writer.written
    assert len(written) == 150 == sum(storage.batches)
    assert max(storage.batches) <= processor.writer.max_batch
    assert max(storage.batches) > 1  # cassettes ended during a write went out together
    assert sorted(load_cassette(p).name for p in written) == sorted(f"GET__r{i}" for i in range(150))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    processor.shutdown()


def test_a_storage_failing_a_whole_batch_counts_every_cassette(tmp_path: Path) -> None:
    class Broken(LocalStorage):
        def write_many(self, items: Sequence[tuple[str, bytes]]) -> list[str | Exception]:
            raise OSError(28, "No space left on device")

    writer = CassetteWriter(Broken(tmp_path))
    tracer = provider_with(CassetteSpanProcessor(writer=writer)).get_tracer("t")
    for i in range(4):
        with tracer.start_as_current_span(f"req-{i}", kind=SpanKind.SERVER):
            pass
    assert writer.flush()
    assert writer.stats()["errors"] == 4 and writer.written == []
    writer.close()


def test_msgpack_cassettes_embed_payload_bytes_and_load_as_json_ones_do(tmp_path: Path) -> None:
    # The msgpack writer keeps this process's payload bytes as they are (no decode, no second
    # encode); the JSON writer decodes them. Both files must load to the same typed trees.
    import datetime as dt
    import uuid
    from decimal import Decimal

    import msgspec

    from timetracer_otel.codec import as_bytes, from_tree, to_tree
    from timetracer_otel.replay_shims.base import ATTR_PAYLOAD, payload_attribute

    rows = [[1, Decimal("1.50"), dt.datetime(2026, 1, 2, tzinfo=dt.timezone.utc), uuid.uuid4(),
             b"\x00\xff", None]]
    request = {"method": "GET", "url": "http://api.local/x?page=2", "headers": [["accept", "*/*"]],
               "body": b""}
    pack = msgspec.msgpack.encode
    kept: dict[str, Any] = {}
    writers = {fmt: CassetteWriter(str(tmp_path / fmt), fmt=fmt,
                                   on_written=lambda _, c, fmt=fmt: kept.setdefault(fmt, c))
               for fmt in ("msgpack", "json")}
    for writer in writers.values():
        tracer = provider_with(CassetteSpanProcessor(writer=writer)).get_tracer("t")
        with tracer.start_as_current_span("GET /x", kind=SpanKind.SERVER):
            with tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as span:
                span.set_attribute("url.full", request["url"])
                span.set_attribute(ATTR_PAYLOAD, payload_attribute(
                    "httpx", "httpx:k", "httpx:s", "GET x", pack(request),
                    response=pack({"rows": to_tree(rows)})))
            with tracer.start_as_current_span("fetch", kind=SpanKind.CLIENT) as span:
                span.set_attribute(ATTR_PAYLOAD, payload_attribute(
                    "asyncpg", "asyncpg:k", "asyncpg:s", "fetch", pack({"statement": "SELECT 1"}),
                    error=pack({"type": "asyncpg:PostgresError", "message": "boom", "args": None,
                                "attrs": None})))
        writer.close()
    loaded = {fmt: load_cassette(w.written[0]) for fmt, w in writers.items()}
    assert writers["msgpack"].written[0].endswith(".msgpack")
    embedded = [type(s.response) for s in kept["msgpack"].spans if s.library]
    assert embedded == [msgspec.Raw, type(None)]  # the msgpack writer never decoded them
    assert writers["json"].written[0].endswith(".json")
    for fmt, cassette in loaded.items():
        http, sql = cassette.interactions
        assert {k: v for k, v in http.request.items() if k != "body"} == \
            {k: v for k, v in request.items() if k != "body"}
        assert as_bytes(http.request["body"]) == b""  # JSON carries raw bytes as base64 text
        assert fmt == "json" or type(http.request["body"]) is bytes
        got = from_tree(http.response["rows"])
        assert got == rows and [type(v) for v in got[0]] == [type(v) for v in rows[0]]
        assert got[0][2].tzinfo is dt.timezone.utc
        assert sql.response is None and sql.error["message"] == "boom"
        assert http.attributes == {"url.full": request["url"]}
    assert [from_tree(s.response) for s in loaded["msgpack"].spans] == \
        [from_tree(s.response) for s in loaded["json"].spans]


def test_flush_and_close_cut_the_writers_gathering_wait_short(tmp_path: Path) -> None:
    # Once caught up, the writer lets spans gather; a flush must not wait that out.
    writer = CassetteWriter(str(tmp_path))
    writer.gather_interval = 600.0
    tracer = provider_with(CassetteSpanProcessor(writer=writer)).get_tracer("t")
    for round_ in range(3):  # each flush finds the thread in (or entering) its wait
        with tracer.start_as_current_span(f"GET /{round_}", kind=SpanKind.SERVER):
            pass
        assert writer.flush(timeout=20)
        assert len(writer.written) == round_ + 1
    with tracer.start_as_current_span("GET /last", kind=SpanKind.SERVER):
        pass
    writer.close(timeout=20)
    assert writer._thread is not None and not writer._thread.is_alive()
    assert [load_cassette(p).spans[0].name for p in writer.written] == \
        ["GET /0", "GET /1", "GET /2", "GET /last"]


def test_forked_children_of_one_writer_name_their_process_cassettes_apart(tmp_path: Path) -> None:
    # A writer made before a fork (gunicorn --preload): each child's lone calls land in its own
    # process cassette, none replacing another's.
    writer = CassetteWriter(str(tmp_path))
    tracer = provider_with(CassetteSpanProcessor(writer=writer)).get_tracer("t")
    children = []
    for n in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            tracer.start_span(f"GET child{n}", kind=SpanKind.CLIENT).end()
            writer.close()
            os._exit(0 if len(writer.written) == 1 else 1)
        children.append(pid)
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in children)
    names = sorted(s.name for path in tmp_path.glob("*/*") for s in load_cassette(path).spans)
    assert names == ["GET child0", "GET child1"]


def test_an_empty_library_attribute_keeps_the_span_as_a_plain_one(tmp_path: Path) -> None:
    from timetracer_otel.replay_shims.base import ATTR_LIBRARY

    writer = CassetteWriter(str(tmp_path))
    tracer = provider_with(CassetteSpanProcessor(writer=writer)).get_tracer("t")
    with tracer.start_as_current_span("GET /x", kind=SpanKind.SERVER), \
            tracer.start_as_current_span("GET", kind=SpanKind.CLIENT) as span:
        span.set_attribute(ATTR_LIBRARY, "")
    writer.close()
    assert writer.errors == 0
    [path] = writer.written
    spans = load_cassette(path).spans
    assert [(s.name, s.library) for s in spans] == [("GET /x", None), ("GET", None)]



class _PaddedIds(RandomIdGenerator):
    """64-bit trace ids padded to 128 bits, as B3 and Zipkin propagators give them."""

    def generate_trace_id(self) -> int:
        return random.getrandbits(64)


def test_traces_whose_ids_share_their_first_half_each_keep_their_cassette(tmp_path: Path) -> None:
    processor = CassetteSpanProcessor(str(tmp_path))
    provider = TracerProvider(id_generator=_PaddedIds())
    provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    for _ in range(3):  # three traces whose ids share their first 16 hex digits (all zeros)
        with tracer.start_as_current_span("GET /orders", kind=SpanKind.SERVER):
            pass
    processor.shutdown()
    written = processor.writer.written
    assert len(set(written)) == 3
    assert sorted(str(p) for p in tmp_path.rglob("*.msgpack")) == sorted(written)


def test_two_local_roots_of_one_trace_each_keep_their_cassette(serve: Any, tmp_path: Path) -> None:
    # A service calling itself: two server spans continue one remote parent, each with a call.
    server = serve(app)
    remote = SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=True,
                         trace_flags=TraceFlags(TraceFlags.SAMPLED))
    with timetracer_otel.record(dir=tmp_path) as rec:
        tracer = trace.get_tracer("t")
        for page in (1, 2):
            with tracer.start_as_current_span("GET /orders", kind=SpanKind.SERVER,
                                              context=set_span_in_context(NonRecordingSpan(remote))):
                httpx.get(f"{server.url}/items", params={"page": page})
    assert len(rec.paths) == len(set(rec.paths)) == 2
    assert sorted(str(p) for p in tmp_path.rglob("*.msgpack")) == sorted(rec.paths)
    labels = sorted(load_cassette(p).interactions[0].label for p in rec.paths)
    assert labels == [f"GET {server.url}/items?page=1", f"GET {server.url}/items?page=2"]
