"""TraceAssembler: spans arrive one by one, cassettes leave one per local trace.

A trace is ready when its local root has arrived (after ``quiet_ns`` without new spans, for
the Collector path where spans of one trace come in several requests). Lone client spans with
no inbound parent (a plain script's calls) gather into one per-process batch, flushed at
shutdown. Memory is bounded: past ``max_open_traces`` the oldest open trace is dropped and
its cassette, if its root comes later, says ``complete: false``.

OTLP delivery is at least once (a Collector retries a request it saw fail), so a span that
comes again (the same span id) is dropped, in an open trace or one already written; a new
span of a trace already written (a retry after the quiet period) leaves as a ``late`` batch,
which the writer adds to that trace's cassette.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from timetracer_otel.cassette import SpanRecord

OUTBOUND_KINDS = frozenset({"CLIENT", "PRODUCER"})


@dataclass
class TraceBatch:
    """The spans of one cassette. ``root`` is None for the per-process batch."""

    trace_id: str
    spans: list[SpanRecord] = field(default_factory=list)
    root: SpanRecord | None = None
    complete: bool = True
    last_ns: int = 0
    resource: dict[str, Any] | None = None  # the root's service (its first span's until then)
    ids: set[str] = field(default_factory=set)  # its spans' ids
    late: bool = False  # spans of a trace already written, for its cassette
    late_root: str | None = None  # (the root span id of that cassette)


class TraceAssembler:
    """Not thread-safe: one writer thread (or one receiver lock) owns it."""

    def __init__(
        self,
        emit: Callable[[TraceBatch], None],
        *,
        max_open_traces: int = 1000,
        max_spans_per_trace: int = 10_000,
        quiet_ns: int = 0,
    ) -> None:
        self.emit = emit
        self.max_open_traces = max_open_traces
        self.max_spans_per_trace = max_spans_per_trace
        self.quiet_ns = quiet_ns
        self.open: OrderedDict[str, TraceBatch] = OrderedDict()
        self.process = TraceBatch(trace_id="process")
        self.dropped: OrderedDict[str, None] = OrderedDict()  # trace ids that lost spans
        self.closed: OrderedDict[str, None] = OrderedDict()  # recently written trace ids
        # The span ids of the latest max_open_traces of them, each with the root span id of
        # the cassette it went to (a trace may have several local roots).
        self.closed_ids: OrderedDict[str, dict[str, str | None]] = OrderedDict()
        self.dropped_spans = 0
        self.late_spans = 0
        self.duplicate_spans = 0

    def mark_dropped(self, trace_id: str, *, count: bool = True) -> None:
        """``trace_id`` lost a span: its cassette will say ``complete: false``. ``count``: add
        it to :attr:`dropped_spans` (not for spans the caller counted when it dropped them)."""
        self.dropped_spans += count
        self.dropped[trace_id] = None
        while len(self.dropped) > 10 * self.max_open_traces:
            self.dropped.popitem(last=False)

    def add(self, span: SpanRecord, resource: dict[str, Any] | None = None) -> None:
        batch = self.open.get(span.trace_id)
        is_root = span.parent_id is None or span.remote_parent
        if span.trace_id in self.closed and self._late(span, is_root, batch is None):
            return
        if batch is not None and span.span_id in batch.ids:
            self.duplicate_spans += 1  # delivered again
            return
        if batch is None:
            if is_root and span.kind in OUTBOUND_KINDS:
                self._to_process(span)  # a lone dependency call of a plain script
                if self.process.resource is None:
                    self.process.resource = resource
                return
            batch = self.open[span.trace_id] = TraceBatch(span.trace_id)
        if len(batch.spans) >= self.max_spans_per_trace:
            batch.complete = False
            self.dropped_spans += 1
        else:
            batch.spans.append(span)
            batch.ids.add(span.span_id)
        batch.last_ns = time.monotonic_ns()
        if resource is not None and (batch.resource is None or is_root):
            batch.resource = resource
        if is_root:
            batch.root = span
            if self.quiet_ns == 0:
                self._close(batch)
        # After a root closes its own trace, so a late root never evicts another trace.
        self._evict()

    def _late(self, span: SpanRecord, is_root: bool, alone: bool) -> bool:
        """A span of a trace already written, taken here (True) when it came before (a span
        id a cassette of the trace holds) or is the child of a span of such a cassette: a late
        batch for the writer to add to that cassette, unless it carries nothing to replay (an
        internal span that ended after its trace was written, Starlette's streaming "receive"
        span: dropped, its id kept for its own children). Another local root of the trace and
        its spans (a service calling itself) make a cassette of their own (False). ``alone``:
        no other batch of the trace is open."""
        ids = self.closed_ids.get(span.trace_id)
        if ids is not None and span.span_id in ids:
            self.duplicate_spans += 1
            return True
        if is_root:
            return False
        if ids is None:  # (an older trace, whose span ids are no longer kept)
            if span.library is None and alone:
                self.late_spans += 1
                return True
            return False
        if span.parent_id not in ids:
            return False
        root = ids[span.span_id] = ids[span.parent_id]
        self.late_spans += 1
        if span.library is not None:
            self.emit(TraceBatch(span.trace_id, spans=[span], late=True, late_root=root))
        return True

    def _to_process(self, span: SpanRecord) -> None:
        if span.span_id in self.process.ids:
            self.duplicate_spans += 1
            return
        if len(self.process.spans) >= self.max_spans_per_trace * 10:
            self.process.complete = False
            self.dropped_spans += 1
            return
        self.process.spans.append(span)
        self.process.ids.add(span.span_id)

    def _evict(self) -> None:
        while len(self.open) > self.max_open_traces:
            trace_id, _ = self.open.popitem(last=False)
            self.mark_dropped(trace_id)

    def _close(self, batch: TraceBatch) -> None:
        self.open.pop(batch.trace_id, None)
        self.closed[batch.trace_id] = None
        while len(self.closed) > 10 * self.max_open_traces:
            self.closed.popitem(last=False)
        ids = self.closed_ids.pop(batch.trace_id, None) or {}
        root = batch.root.span_id if batch.root is not None else None
        ids.update(dict.fromkeys(batch.ids, root))
        self.closed_ids[batch.trace_id] = ids  # (the latest again)
        while len(self.closed_ids) > self.max_open_traces:
            self.closed_ids.popitem(last=False)
        if batch.trace_id in self.dropped:
            batch.complete = False
        self.emit(batch)

    def flush_idle(self) -> None:
        """Close rooted traces that have been quiet for ``quiet_ns``."""
        now = time.monotonic_ns()
        for batch in list(self.open.values()):
            if batch.root is not None and now - batch.last_ns >= self.quiet_ns:
                self._close(batch)

    def flush_process(self) -> None:
        if self.process.spans:
            batch, self.process = self.process, TraceBatch(trace_id="process")
            self.emit(batch)

    def close_all(self) -> None:
        """Shutdown: every open trace (rooted or not) and the process batch."""
        for batch in list(self.open.values()):
            if batch.root is None:
                batch.complete = False
            self._close(batch)
        self.flush_process()
