"""CassetteWriter: the background thread that turns finished spans into cassette files.

The request path only enqueues (``submit``: a :func:`~timetracer_otel.exporters.spans.snapshot`
of the span, or for a writer process the span encoded by
:func:`~timetracer_otel.exporters.sink.wired`, and one ``SimpleQueue.put``); conversion,
grouping, encoding and the atomic write happen on this thread, under
``suppress_instrumentation`` so the writer's own I/O is never traced. In an app's process
(``isolate``, the default there with two CPUs or more) this thread only passes the encoded
spans on to a child process that runs the same writer (see
:mod:`~timetracer_otel.exporters.sink`), so the conversion does not hold the app's
interpreter lock. Encoded cassettes are written as soon as the queue runs empty (the child:
in rounds, see ``sink.BATCH_DELAY``), several together when spans arrive faster than files
can be made durable (their fsyncs overlap; each file is still renamed only after its own
fsync). Failures are counted and logged, never raised.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import itertools
import logging
import multiprocessing.util
import os
import pickle
import platform
import queue
import re
import secrets
import sys
import threading
import time
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec
from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation
from opentelemetry.sdk.trace import ReadableSpan

from timetracer_otel.cassette import SUFFIX, Cassette, Format, Recorder, SpanRecord, dumps
from timetracer_otel.config import Settings
from timetracer_otel.exporters import sink
from timetracer_otel.exporters.assembler import TraceAssembler, TraceBatch
from timetracer_otel.exporters.sink import (
    MAX_FRAME_SPANS,
    REPLY_TIMEOUT,
    SinkError,
    SinkProcess,
    rebuild_snapshot,
    spans_frame,
    wired,
)
from timetracer_otel.exporters.spans import Memo, Snapshot, plain, record_from_snapshot, snapshot
from timetracer_otel.exporters.storage import (
    LocalStorage,
    Storage,
    add_interactions,
    storage_for,
    write_many,
)
from timetracer_otel.redaction import Redactor
from timetracer_otel.replay_shims.base import STATE, is_startup_span

log = logging.getLogger("timetracer_otel")

_STOP = object()
_IDLE = object()
_CONTINUE = object()


class _Flush:
    """Queue command: write what is pending (and the process batch if asked), then ``done``."""

    __slots__ = ("done", "process", "timeout")

    def __init__(self, done: threading.Event, process: bool, timeout: float) -> None:
        self.done, self.process, self.timeout = done, process, timeout


class _Resource:
    """A provider's resource, queued before the first span of it for the writer process."""

    __slots__ = ("resource",)

    def __init__(self, resource: Any) -> None:
        self.resource = resource


class _Received:
    """A span received over OTLP with the resource it came with."""

    __slots__ = ("record", "resource")

    def __init__(self, record: SpanRecord, resource: dict[str, Any]) -> None:
        self.record, self.resource = record, resource
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def cassette_name(batch: TraceBatch, argv0: str | None = None) -> str:
    """``POST /orders/{id}`` → ``POST__orders_id``; the process batch → the script's name
    (``argv0``, this process's ``sys.argv[0]`` unless given)."""
    root = batch.root
    if root is None:
        if argv0 is None:
            argv0 = sys.argv[0] if sys.argv else ""
        script = os.path.basename(argv0) if argv0 not in ("", "-", "-c") else "process"
        # (no leading dot: a hidden file is one `ls` and replay never see)
        return _SAFE.sub("_", script.removesuffix(".py")).lstrip("._").rstrip("_") or "process"
    a = root.attributes
    method = a.get("http.request.method") or a.get("http.method")
    route = a.get("http.route")
    if method and route:
        text = f"{method}__{route}"
    elif method and (a.get("url.path") or a.get("http.target")):
        text = f"{method}__{a.get('url.path') or a.get('http.target')}"
    else:
        text = root.name
    text = _SAFE.sub("_", str(text).replace("/", "_").replace("{", "").replace("}", ""))
    return re.sub("_{3,}", "__", text).lstrip("._").rstrip("_")[:80] or "trace"


def _libraries() -> dict[str, str]:
    from timetracer_otel.replay_shims import REGISTRY

    out = {}
    for name in [*REGISTRY, "opentelemetry-sdk"]:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def _tool_version() -> str:
    try:
        return importlib.metadata.version("timetracer-otel")
    except importlib.metadata.PackageNotFoundError:
        return "0"


_encode_frame = msgspec.msgpack.Encoder().encode

# Encoded cassettes kept to be written again after their write failed, at most.
RETRY_MAX_BYTES = 256 * 1024 * 1024


def _can_isolate(isolate: bool | None, storage: Storage, via: str,
                 on_written: Callable[[str, Cassette], None] | None) -> bool:
    """Whether a writer hands its spans to a child process: asked for (``isolate``, else
    ``TIMETRACER_WRITER``: ``process``, or ``auto`` where this process may use two CPUs or
    more; with one, the child's work would come out of the app's own CPU time), in an app's
    process (not the Collector's receiver, which is no app), to a local directory the child
    can open by name, with no ``on_written`` callback (it runs where the cassette is), and
    with an interpreter to start."""
    if isolate is None:
        from timetracer_otel.config import WriterKind

        kind = Settings.from_env().writer
        isolate = kind is WriterKind.PROCESS or (kind is WriterKind.AUTO and sink.cpus() >= 2)
    return (isolate and via != "collector" and type(storage) is LocalStorage
            and on_written is None and sink.available())


def rescrubbed(cassette: Cassette, redactor: Redactor | None = None) -> Cassette:
    """``cassette`` with every secret the redactor knows now scrubbed from its calls'
    payloads and labels. Each call was scrubbed when it was converted, as its span ended; a
    secret the app sent only later in the run (a token stored in Redis, then sent in a
    header) is known by the time its trace is written. Keys stay as the calls were made
    (a replay makes them the same way). One scan of each payload's bytes when nothing is
    left to scrub. ``redactor``: another than the app's (the pytest plugin's, which knows the
    secrets of every test so far)."""
    spans = rescrubbed_spans(cassette.spans, redactor)
    return cassette if spans is cassette.spans else msgspec.structs.replace(cassette, spans=spans)


def rescrubbed_spans(spans: list[SpanRecord], redactor: Redactor | None = None) -> list[SpanRecord]:
    """``spans`` (the list itself when nothing changed, else a new one) with every secret the
    redactor knows now scrubbed from their calls' payloads and labels: a cassette's spans
    (:func:`rescrubbed`), and late spans added to a cassette written before them."""
    r = STATE.redactor if redactor is None else redactor
    if r.generation == 0:  # no secret learned yet
        return spans
    given = spans
    for i, span in enumerate(given):
        if span.library is None:
            continue
        fields: dict[str, Any] = {}
        for name in ("request", "response", "error"):
            value = getattr(span, name)
            if type(value) is msgspec.Raw:
                raw = bytes(value)
                if raw and r.seen_in(raw):
                    fields[name] = msgspec.Raw(_encode_frame(r.scrub(msgspec.msgpack.decode(raw))))
            elif value is not None:
                scrubbed = r.scrub(value)
                if scrubbed is not value:
                    fields[name] = scrubbed
        if span.label and r.seen_in(span.label.encode()):
            fields["label"] = r.text(span.label)
        if fields:
            if spans is given:
                spans = list(spans)
            spans[i] = msgspec.structs.replace(span, **fields)
    return spans


def _rootless(cassette: Cassette) -> bool:
    """A cassette of a trace's spans whose root never came (their parents are spans of this
    process), not the per-process batch of lone calls (each a root)."""
    first = cassette.spans[0] if cassette.root is None and cassette.spans else None
    return first is not None and first.parent_id is not None and not first.remote_parent


def is_error_trace(batch: TraceBatch) -> bool:
    root = batch.root
    if root is None:
        return any(s.status == "ERROR" for s in batch.spans)
    status = root.attributes.get("http.response.status_code") or root.attributes.get(
        "http.status_code"
    )
    return root.status == "ERROR" or (isinstance(status, int) and status >= 500)


def _startup(batch: TraceBatch) -> bool:
    """An app's lifespan startup (see ``replay_shims.asgi``): kept whatever the sampling, as
    every replay of that app's requests starts the app with it."""
    return batch.root is not None and is_startup_span(batch.root)


def sampled(trace_id: str, rate: float) -> bool:
    """Deterministic per trace, so every process and the collector agree."""
    if rate >= 1.0:
        return True
    return (zlib.crc32(trace_id.encode()) & 0xFFFFFFFF) / 2**32 < rate


class CassetteWriter:
    """Owns the queue, the assembler and the storage; one daemon thread.

    ``on_written(path, cassette)`` runs on that thread after each write. In a msgpack
    writer's cassettes the payloads of this process's spans (``request``, ``response``,
    ``error``) are the ``msgspec.Raw`` msgpack they were recorded as; decode one with
    ``msgspec.msgpack.decode`` (or load the file) to get the tree.
    """

    def __init__(
        self,
        location: str | Storage,
        *,
        fmt: Format = "msgpack",
        via: str = "processor",
        max_queue: int = 100_000,
        max_open_traces: int = 1000,
        quiet_ns: int = 0,
        sample_rate: float = 1.0,
        errors_only: bool = False,
        on_written: Callable[[str, Cassette], None] | None = None,
        isolate: bool | None = None,
    ) -> None:
        self.storage = storage_for(location) if isinstance(location, str) else location
        self.fmt = fmt
        self.via = via
        self.max_queue = max_queue
        self.sample_rate = sample_rate
        self.errors_only = errors_only
        self.on_written = on_written
        self.max_batch = 64
        self.max_batch_bytes = 16 * 1024 * 1024
        self.max_batch_delay = 0.2
        # Seconds the thread lets spans gather once it has caught up (see _loop).
        self.gather_interval = 0.05
        self._closed = False
        self._start_over(max_open_traces, quiet_ns)
        _WRITERS.add(self)
        self._recorder = Recorder(
            version=_tool_version(), via=via, python=platform.python_version(),
            libraries=_libraries(),
        )
        # The process batch's name: this script's (a child writer is told the app's).
        self.script: str | None = None
        # Isolated: the writer thread passes snapshots to a child process (started by the
        # thread, off the request path) and the child converts and writes them.
        self.isolate = _can_isolate(isolate, self.storage, via, on_written)
        # The writer process's CPU priority (TIMETRACER_WRITER_PRIORITY, read now: a wrong
        # value is the app's ConfigError, not a writer failure later).
        self.priority = Settings.from_env().writer_priority.value if self.isolate else "normal"

    def _start_over(self, max_open_traces: int, quiet_ns: int) -> None:
        """What this process's writer holds: its queue, thread, writer process and what they
        have gathered. Set when the writer is made, and again in a forked child (see
        :func:`_after_fork_in_child`)."""
        self.assembler = TraceAssembler(
            self._emit, max_open_traces=max_open_traces, quiet_ns=quiet_ns
        )
        self.written: list[str] = []
        self.dropped_spans = 0
        self.errors = 0
        self.skipped = 0
        self._resource: dict[str, Any] = {}  # the first seen: for batches that carry none
        # Resources by id: converted (this process), and the objects, kept so no id is reused
        # (the request thread adds those it announces to the writer process).
        self._resources: dict[int, dict[str, Any]] = {}
        self._resources_by_id: dict[int, Any] = {}
        self._memo: Memo = {}
        self._memo_left = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Encoded cassettes not yet on disk: written together when the queue runs empty, when
        # this many are waiting, or when the oldest has waited max_batch_delay seconds.
        self._unwritten: list[tuple[str, bytes, Cassette]] = []
        # (trace id, root span id) -> its cassette
        self._where: OrderedDict[tuple[str, str | None], str] = OrderedDict()
        # Cassettes whose write failed (a full disk, a bucket out of reach), tried again with
        # the next ones and at the end, up to RETRY_MAX_BYTES; past it, or at the end, lost
        # and counted in ``unwritten``.
        self._retry: list[tuple[str, bytes, Cassette]] = []
        self.unwritten = 0
        self.recovered = 0  # written after a failed try (each counted in errors once)
        self._unwritten_bytes = 0
        self._unwritten_since = 0.0
        self._wake = threading.Event()
        # Cassette ids: a random half per writer and a counter, not 8 random bytes each time
        # (os.urandom is a system call, one more wait for the GIL per cassette).
        self._id_pid = os.getpid()
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._dropped_traces: set[str] = set()
        self._thread: threading.Thread | None = None
        self._sink: SinkProcess | None = None
        self._sink_failed_ns = 0
        self._outbox: list[bytes] = []  # spans encoded for the writer process
        self._statuses: dict[Any, Any] = {}
        self._sent_redactor: Any = None
        self._sent_generation = 0
        self._remote = {"dropped_spans": 0, "late_spans": 0, "duplicate_spans": 0, "errors": 0,
                        "skipped": 0, "unwritten": 0, "recovered": 0}

    def _forked(self) -> None:
        """In a child forked from this process (Celery's prefork pool, gunicorn --preload,
        multiprocessing): the writer thread did not come along, and the writer process, its
        pipes and what was queued for them are the parent's, which writes them. The child
        starts over with nothing; its first span starts its own thread and writer process."""
        sink = self._sink
        if sink is not None:
            sink.disown()
        self._start_over(self.assembler.max_open_traces, self.assembler.quiet_ns)

    # -- request path ----------------------------------------------------------------------

    def submit(self, span: ReadableSpan | SpanRecord, resource: dict[str, Any] | None = None) -> None:
        """Enqueue a finished span (with the resource it came with, for spans received over
        OTLP). Never blocks, never raises; drops (and counts) when full. An SDK span is queued
        as its :func:`~timetracer_otel.exporters.spans.snapshot`, which frees the span's own
        objects now rather than after the writer has caught up."""
        if self._closed:
            return
        if self._queue.qsize() >= self.max_queue:
            self._drop(span)
            return
        if self._thread is None:
            self._start()
        if isinstance(span, ReadableSpan):
            if not self.isolate:
                try:
                    self._queue.put(snapshot(span))
                except Exception:  # a span this SDK could not have made: counted, never raised
                    self._drop(span)
                return
            # For the writer process: encoded here, where the span's objects are still in
            # this core's cache (the writer thread, on the other core, spent 8-13 µs per call
            # reading them cold), and queued as one bytes object the collector never scans.
            try:
                res = getattr(span, "_resource", None) or span.resource
                rid = id(res)
                if rid not in self._resources_by_id:  # announced before its first span, then kept
                    self._queue.put(_Resource(res))
                    self._resources_by_id[rid] = res
                self._queue.put(_encode_frame(wired(span, rid)))
            except Exception as exc:  # msgpack cannot carry it (an integer beyond 64 bits...)
                log.warning("timetracer-otel: span %r cannot be recorded: %s",
                            getattr(span, "name", None), exc)
                self._drop(span)
            return
        self._queue.put(span if resource is None else _Received(span, resource))

    def _drop(self, span: ReadableSpan | SpanRecord) -> None:
        """Count a span that will not be written, and mark its trace (its cassette says
        ``complete: false``); never raises, whatever the span lacks."""
        try:
            tid = (f"{span.context.trace_id:032x}" if isinstance(span, ReadableSpan)
                   else span.trace_id)
        except Exception:  # no trace id to mark: counted only
            tid = None
        with self._lock:
            self.dropped_spans += 1
            if tid is not None and len(self._dropped_traces) < 10_000:
                self._dropped_traces.add(tid)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="timetracer-cassette-writer", daemon=True
                )
                self._thread.start()

    # -- writer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        # The whole thread runs suppressed (the context is this thread's own), so nothing the
        # writer does is traced, without entering and leaving the context for every span.
        with suppress_instrumentation():
            if self.isolate:
                self._open_sink()
            self._loop()

    def _loop(self) -> None:
        while True:
            waited = time.perf_counter() - self._unwritten_since
            if self._unwritten and (self._queue.empty() or waited > self.max_batch_delay):
                # Caught up (or the oldest cassette has waited long enough): write what is
                # encoded, with the fsyncs of several cassettes made together.
                self._safely(self._write_unwritten)
            if self.gather_interval > 0 and self._queue.empty():
                # Caught up: let spans gather instead of waking for each one. An app thread
                # back from I/O then finds the GIL free far more often than when this thread
                # converted each span as it ended (scenario 4's psycopg record overhead 52-66
                # -> 30-37 µs/query, scenario 6's inbound 54-56 -> 39-41 µs/request, with
                # 50 ms); flush() and close() cut the wait short.
                self._wake.wait(self.gather_interval)
                self._wake.clear()
            item = self._add_run(self._next())
            if self._outbox:
                self._ship()
            if item is _CONTINUE:
                continue
            if type(item) is _Flush:
                self.flush_now(item.process, max(REPLY_TIMEOUT, item.timeout))
                item.done.set()
            elif item is _IDLE:
                self._safely(self.assembler.flush_idle)
                if self._retry and not self._unwritten:  # (a quiet receiver: try them again)
                    self._safely(self._write_unwritten)
            elif item is _STOP:
                self.close_now()
                return

    def _next(self) -> Any:
        """The next queued item; while an idle writer process may still be working on what
        it was sent, a look at whether it is starved every ``sink.WATCH_INTERVAL`` until
        something comes (see ``SinkProcess.check_starved``)."""
        child = self._sink
        while child is not None and child.watching():
            try:
                return self._queue.get(timeout=sink.WATCH_INTERVAL)
            except queue.Empty:
                child.check_starved()
        return self._queue.get()

    # The commands, run on the thread that owns the writer (its own, or a child's only one).

    def flush_now(self, process: bool, timeout: float = REPLY_TIMEOUT) -> None:
        """Write every trace closed so far (and the process batch if ``process``)."""
        self._drain_drops()
        if self._sink is not None:
            self._ask_sink("flush", process, timeout=timeout)
        if process:
            self._safely(self.assembler.flush_process)
        self._safely(self._write_unwritten)

    def close_now(self) -> None:
        """Write everything, open traces included (they say ``complete: false``)."""
        self._drain_drops()
        if self._sink is not None:
            self._ask_sink("close")
            if self._sink is not None:
                self._sink.close()
                self._sink = None
        self._safely(self.assembler.close_all)
        self._safely(lambda: self._write_unwritten(last=True))

    def add_now(self, item: Snapshot) -> None:
        """Convert and add one span, as the writer thread's loop does (which inlines these
        lines: a call per span is a tenth of what it does for the writer process); failures
        are counted."""
        if self._dropped_traces:  # before the root of a trace that lost spans closes it
            self._drain_drops()
        try:
            self._add(item)
        except Exception:
            self._failed()

    def _drain_drops(self) -> None:
        with self._lock:
            dropped, self._dropped_traces = self._dropped_traces, set()
        if dropped and self._sink is not None:
            self._ship()  # after the spans that came before the drops, as in this process
            if self._sink is not None:
                try:
                    self._sink.send("drop", list(dropped))
                    return
                except SinkError as exc:
                    self._sink_failed(exc)
        for tid in dropped:  # each counted in dropped_spans as it was dropped
            self.assembler.mark_dropped(tid, count=False)

    def _add_run(self, item: Any) -> Any:
        """Add spans (snapshots of SDK spans, records received over OTLP) one after another
        while the queue holds nothing else (the main loop's checks per item would cost a
        tenth of a conversion). Returns the first command met, or :data:`_CONTINUE` once the
        queue is empty or encoded cassettes have waited long enough to be written."""
        get = self._queue.get_nowait
        last_yield = time.perf_counter()
        while True:
            if type(item) is tuple or type(item) is bytes:  # a snapshot, encoded or not
                resource = None
            elif type(item) is _Received:
                item, resource = item.record, item.resource
            elif type(item) is SpanRecord:
                resource = None
            elif type(item) is _Resource:
                self._announce(item.resource)
                item = None
            else:
                return item
            if self._dropped_traces:  # before the root of a trace that lost spans closes it
                self._drain_drops()
            if item is not None:
                try:
                    self._add(item, resource)
                except Exception:
                    self._failed()
            now = time.perf_counter()
            if now - last_yield > 0.0005:
                # Hand the GIL back every half millisecond of work: an app thread waking from
                # I/O would otherwise wait up to the 5 ms switch interval behind these
                # conversions.
                time.sleep(0)
                last_yield = now = time.perf_counter()
            if self._unwritten and now - self._unwritten_since > self.max_batch_delay:
                return _CONTINUE
            if len(self._outbox) >= MAX_FRAME_SPANS:
                return _CONTINUE
            try:
                item = get()
            except queue.Empty:
                return _CONTINUE

    def _add(self, item: bytes | Snapshot | SpanRecord,
             resource: dict[str, Any] | None = None) -> None:
        if isinstance(item, bytes):  # encoded for the writer process
            if self._sink is not None:
                self._outbox.append(item)
                return
            item = self._unwire(item)  # it is gone: converted here
        if isinstance(item, tuple):
            span_resource = item[11]
            resource = self._resources.get(id(span_resource))
            if resource is None:  # one Resource object per provider: convert it once
                resource = {k: plain(v) for k, v in span_resource.attributes.items()}
                self._resources[id(span_resource)] = resource
                self._resources_by_id.setdefault(id(span_resource), span_resource)
            self._memo_left -= 1
            if self._memo_left < 0:
                # Attribute sets repeat across spans and requests: each is redacted once (an
                # entry is used only while the redactor has learned no secret since, see
                # spans._redact) and the memo starts afresh every few thousand spans, so sets
                # that stopped coming make room. By count, not by time: the same spans are
                # converted the same way on any machine (under callgrind too).
                self._memo, self._memo_left = {}, 4096
            # A msgpack cassette embeds this process's payload bytes as they are: no decode
            # into trees (and no garbage for the collector, which runs in the app's threads
            # too), no second encode.
            item = record_from_snapshot(item, self._memo, raw=self.fmt == "msgpack")
        if resource is not None and not self._resource:
            self._resource = resource
        self.assembler.add(item, resource)

    # -- the child process (isolate) ----------------------------------------------------------

    def _open_sink(self) -> None:
        root = self.storage.root if isinstance(self.storage, LocalStorage) else None
        try:
            self._sink = SinkProcess({
                "location": os.path.abspath(root) if root is not None else "",
                "fmt": self.fmt, "via": self.via, "max_queue": self.max_queue,
                "max_open_traces": self.assembler.max_open_traces,
                "quiet_ns": self.assembler.quiet_ns, "sample_rate": self.sample_rate,
                "errors_only": self.errors_only,
                "script": self.script if self.script is not None else (sys.argv[0] if sys.argv else ""),
                "recorder": msgspec.to_builtins(self._recorder),
                "max_payload_bytes": STATE.max_payload_bytes,
                "priority": self.priority,
            })
        except Exception as exc:  # never the writer thread's end: it writes them itself
            log.warning("timetracer-otel: cannot start the cassette writer process (%s); "
                        "writing cassettes in this process", exc)
            self.isolate = False

    def _announce(self, resource: Any) -> None:
        """Tell the child a resource's attributes before the first span of it (``submit``
        queues each resource once)."""
        if self._sink is None:
            return
        self._ship()  # the spans before it, as they came
        if self._sink is not None:
            try:
                self._sink.send("resource", id(resource),
                                {k: plain(v) for k, v in resource.attributes.items()})
            except Exception as exc:  # gone, or a value msgpack cannot carry: written here
                self._sink_failed(exc)

    def _ship(self) -> None:
        """Send the spans gathered in the outbox (each already encoded) to the child, after
        the redactor's secrets learned since the last frame."""
        sink, spans, self._outbox = self._sink, self._outbox, []
        if sink is None:
            for item in spans:  # the child is gone: converted here
                try:
                    self._add(item)
                except Exception:
                    self._failed()
            return
        try:
            redactor = STATE.redactor
            if type(redactor) is not Redactor:
                # A subclass may not exist in the child (defined in __main__), or importing
                # it there would run the app's module: this process redacts with it.
                raise SinkError(f"the redactor is a {type(redactor).__name__}, not a Redactor")
            if redactor is not self._sent_redactor:
                generation, _ = redactor.learned_since(redactor.generation)
                sink.send("redactor", pickle.dumps(redactor))
                self._sent_redactor, self._sent_generation = redactor, generation
            elif redactor.generation != self._sent_generation:
                self._sent_generation, learned = redactor.learned_since(self._sent_generation)
                sink.send("learn", learned)
            sink.send_encoded(spans_frame(spans))
        except Exception as exc:  # gone, or it cannot take this: written here from now on
            self._sink_failed(exc)
            self._outbox = spans + self._outbox
            self._ship()

    def _unwire(self, data: bytes) -> Snapshot:
        """An encoded span back as a snapshot, for this process to convert."""
        return rebuild_snapshot(data, self._resources_by_id, self._statuses)

    def _ask_sink(self, *message: Any, timeout: float = REPLY_TIMEOUT) -> None:
        """Ask the child to flush or close, and take its answer: the cassettes it wrote since
        the last one, and its counters."""
        assert self._sink is not None
        try:
            written, stats = self._sink.ask(*message, timeout=timeout)
        except SinkError as exc:
            self._sink_failed(exc)
            return
        self.written.extend(written)
        for name in ("errors", "skipped", "unwritten", "recovered"):
            setattr(self, name, getattr(self, name) + stats[name] - self._remote[name])
        self._remote = {k: stats[k] for k in self._remote}

    def _sink_failed(self, exc: BaseException) -> None:
        sink, self._sink = self._sink, None
        self.isolate = False
        self.errors += 1
        # Spans the child held are lost with it: a trace begun before now may lack some, so
        # its cassette (and the process batch) will say complete: false.
        self._sink_failed_ns = time.time_ns()
        log.warning("timetracer-otel: %s; spans sent to it since its last answer may be lost, "
                    "the rest are written by this process", exc)
        if sink is not None:
            with contextlib.suppress(Exception):
                sink.proc.kill()
                sink.close()

    def _safely(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            self._failed()

    def _failed(self, exc: BaseException | None = None) -> None:
        self.errors += 1
        sink.report_failure()
        log.warning("timetracer-otel: cassette writer failed (%d so far)", self.errors,
                    exc_info=exc or True)

    def _emit(self, batch: TraceBatch) -> None:
        if not batch.spans:
            return
        if batch.late:
            self._add_late(batch)
            return
        root, startup = batch.root, _startup(batch)
        if startup and root is not None:
            # What began after the startup answered and came before its root did (TraceAssembler
            # .add re-roots what comes after it) is dropped: it is not the startup's.
            batch.spans = [s for s in batch.spans if s.start_ns <= root.end_ns]
            if len(batch.spans) == 1:
                return  # only the startup's own span: replay runs it as well without a cassette
        if not startup and ((root is not None and not sampled(batch.trace_id, self.sample_rate))
                            or (self.errors_only and not is_error_trace(batch))):
            self.skipped += 1
            return
        cassette = rescrubbed(self.build(batch))
        day = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
        # The whole trace id and the local root's span id: one trace can have several local
        # roots here (a service calling itself), and 64-bit ids padded to 128 bits (B3,
        # Zipkin) share their first half, so a shorter name let one cassette replace another.
        trace_part = (f"{batch.trace_id}_{batch.root.span_id}" if batch.root is not None
                      else cassette.id)
        relpath = f"{day}/{cassette.name}__{trace_part}{SUFFIX[self.fmt]}"
        data = dumps(cassette, self.fmt)
        if not self._unwritten:
            self._unwritten_since = time.perf_counter()
        self._unwritten.append((relpath, data, cassette))
        self._unwritten_bytes += len(data)
        if len(self._unwritten) >= self.max_batch or self._unwritten_bytes >= self.max_batch_bytes:
            self._write_unwritten()

    def _add_late(self, batch: TraceBatch) -> None:
        """Spans of a trace whose cassette was made (OTLP spans retried after the quiet
        period, spans whose parent never came): added to that cassette where they started,
        scrubbed of the secrets learned since they were captured, as a cassette is when it is
        written. Nothing is added to a trace left out (sampling, errors only) or whose
        cassette could not be written; spans whose parent never came that are not added are
        taken off ``assembler.orphan_spans`` (which counted them as added)."""
        if any(c.root == batch.late_root and c.spans[0].trace_id == batch.trace_id
               for _, _, c in self._unwritten):
            self._write_unwritten()  # (its cassette first)
        key = (batch.trace_id, batch.late_root)
        where = self._where.get(key)
        end = self.assembler.startups.get(batch.late_root) if batch.late_root else None
        if where is not None and end is not None:
            # An app's startup takes what began before it answered (a task it started
            # already calling), not what the tasks it left running call later, for as long
            # as the app runs (a refresher every few ms): those are not its to replay.
            batch.spans = [s for s in batch.spans if s.start_ns <= end]
            if not batch.spans:
                where = None
        if where is None:
            self.assembler.orphan_spans -= batch.orphans
            return
        try:
            add_interactions(where, rescrubbed_spans(batch.spans), self.via, self.fmt,
                             by_start=True, complete=batch.complete)
        except Exception as exc:
            self.assembler.orphan_spans -= batch.orphans
            self._failed(exc)

    @property
    def failing(self) -> bool:
        """Cassettes are waiting to be written again (the last write failed): the Collector's
        receiver refuses new spans meanwhile (503), so the Collector keeps and retries them."""
        return bool(self._retry)

    def _write_unwritten(self, last: bool = False) -> None:
        """Write the encoded cassettes waiting in ``_unwritten`` (see :func:`storage.write_many`),
        those that failed before first; each failure is counted and logged in one line, and
        kept to be tried again (``last``: lost, counted in ``unwritten``)."""
        pending, self._unwritten, self._unwritten_bytes = self._unwritten, [], 0
        tried = len(self._retry)  # (the first ``tried`` of ``pending`` failed before)
        if tried:
            pending, self._retry = [*self._retry, *pending], []
        if not pending:
            return
        results = write_many(self.storage, [(relpath, data) for relpath, data, _ in pending])
        kept = 0
        for i, (item, where) in enumerate(zip(pending, results, strict=True)):
            cassette = item[2]
            if isinstance(where, Exception):
                kept += len(item[1])
                first = i >= tried
                if first:  # an error, counted and said once however often it is tried
                    self.errors += 1
                    sink.report_failure()
                if last or kept > RETRY_MAX_BYTES:
                    self.unwritten += 1
                    log.warning("timetracer-otel: cassette %s was not written (%s); its %d "
                                "span(s) are lost", item[0], where, len(cassette.spans))
                else:
                    self._retry.append(item)
                    if first:
                        log.warning("timetracer-otel: cassette %s could not be written (%s); "
                                    "it will be tried again", item[0], where)
                continue
            if i < tried:
                self.recovered += 1
            self.written.append(where)
            if cassette.root is not None or _rootless(cassette):
                # Where spans of its trace that come late go (those under a span of a
                # cassette without a root: the latest of its trace's such cassettes).
                self._where[(cassette.spans[0].trace_id, cassette.root)] = where
                while len(self._where) > 10 * self.assembler.max_open_traces:
                    self._where.popitem(last=False)
            if self.on_written is not None:
                try:
                    self.on_written(where, cassette)
                except Exception:
                    self._failed()

    def build(self, batch: TraceBatch) -> Cassette:
        spans = sorted(batch.spans, key=lambda s: s.start_ns)
        if self._id_pid != os.getpid():
            self._id_pid, self._id_prefix = os.getpid(), secrets.token_hex(4)
        complete = batch.complete and not (
            self._sink_failed_ns and (batch.root is None or batch.root.start_ns < self._sink_failed_ns))
        return Cassette(
            id=f"{self._id_prefix}{next(self._ids) & 0xFFFFFFFF:08x}",
            name=cassette_name(batch, self.script),
            created=dt.datetime.now(dt.timezone.utc).isoformat(),
            resource=dict(batch.resource or self._resource),
            recorder=self._recorder,
            complete=complete,
            root=batch.root.span_id if batch.root is not None else None,
            spans=spans,
        )

    # -- control ---------------------------------------------------------------------------

    def flush(self, timeout: float = 30.0, *, process: bool = False) -> bool:
        """Wait until everything submitted so far is written; ``process`` also writes the
        per-process batch of lone calls now."""
        if self._thread is None:
            if process or self._pending():
                self._start()
            else:
                return True
        done = threading.Event()
        self._queue.put(_Flush(done, process, timeout))
        self._wake.set()
        return done.wait(timeout)

    def flush_idle(self) -> None:
        """Ask the writer thread to close rooted traces quiet for ``quiet_ns`` (collector path)."""
        if self._thread is not None and not self._closed:
            self._queue.put(_IDLE)
            self._wake.set()

    def backlog(self) -> int:
        """Spans and commands queued for the writer thread (approximate)."""
        return self._queue.qsize()

    def _pending(self) -> bool:
        return bool(self.assembler.process.spans)

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._wake.set()
        self._thread.join(timeout)

    def stats(self) -> dict[str, int]:
        """Counters, the child's included (as of its last answer) when isolated."""
        return {
            "written": len(self.written),
            "dropped_spans": self.dropped_spans + self.assembler.dropped_spans
            + self._remote["dropped_spans"],
            # Spans that ended after their trace was written and carried nothing to replay.
            "late_spans": self.assembler.late_spans + self._remote["late_spans"],
            # Spans delivered again (OTLP's retries): dropped, each cassette holds them once.
            "duplicate_spans": self.assembler.duplicate_spans + self._remote["duplicate_spans"],
            "errors": self.errors,
            "skipped": self.skipped,
            # Cassettes given up on after their writes failed (their spans are lost), and
            # those written after a failed try (both in errors).
            "unwritten": self.unwritten,
            "recovered": self.recovered,
        }


# --- forked children ---------------------------------------------------------------------------

# This process's writers: a forked child starts each over (see CassetteWriter._forked).
_WRITERS: weakref.WeakSet[CassetteWriter] = weakref.WeakSet()


def finish_child(timeout: float = 30.0, *, always: bool = False) -> None:
    """Write what this process recorded before it ends without its ``atexit`` handlers
    (``os._exit``, the way Celery's prefork pool and multiprocessing end their children): the
    tracer provider flushed (a BatchSpanProcessor may still hold spans), then every writer
    closed (a trace still open is written, ``complete: false``). Never raises. ``always``:
    flush the provider even with no cassette writer here (spans exported over OTLP)."""
    if not always and all(w._closed for w in list(_WRITERS)):
        return
    try:
        flush = getattr(trace.get_tracer_provider(), "force_flush", None)
        if flush is not None:
            flush(int(timeout * 1000))
    except Exception:
        log.warning("timetracer-otel: flushing the tracer provider failed", exc_info=True)
    for writer in list(_WRITERS):
        try:
            writer.close(timeout)
        except Exception:
            log.warning("timetracer-otel: closing the cassette writer failed", exc_info=True)


def finish_on_sigterm() -> None:
    """In a program recorded through a launcher (``timetracer-otel record``,
    ``opentelemetry-instrument``): a SIGTERM (``timeout``, ``docker stop``, ``kill``) that
    the program leaves to Python's default, which ends it without ``atexit``, first writes
    what it recorded (:func:`finish_child`; a batch span processor may hold seconds of spans,
    a script's calls wait for its end), then ends it by the same signal, as before. A program
    that sets its own handler (uvicorn, gunicorn, Celery) replaces this one. Main thread
    only; never raises."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _finish_then_end)
    except (ValueError, OSError):  # (no signals here)
        pass


def _finish_then_end(signum: int, frame: Any) -> None:
    import signal

    signal.signal(signum, signal.SIG_DFL)
    try:
        finish_child(timeout=10.0, always=True)
    finally:
        os.kill(os.getpid(), signum)


def _after_fork_in_child() -> None:
    for writer in list(_WRITERS):
        writer._forked()


def _finish_at_exit(finish: Callable[[], None]) -> None:
    # A multiprocessing child ends with os._exit after running its finalizers (a forked child
    # clears the parent's first, so this is registered in the child, after the fork).
    multiprocessing.util.Finalize(None, finish, exitpriority=10)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
# (the registry holds its key object weakly: the module's function lives as long as it)
multiprocessing.util.register_after_fork(finish_child, _finish_at_exit)
