"""TraceAssembler: spans arrive one by one, cassettes leave one per local trace.

A trace is ready when its local root has arrived (after ``quiet_ns`` without new spans, for
the Collector path where spans of one trace come in several requests). Lone client spans with
no inbound parent (a plain script's calls) gather into one per-process batch, flushed at
shutdown. Memory is bounded: past ``max_open_traces`` the oldest open trace is dropped and
its cassette, if its root comes later, says ``complete: false``.
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
        self.dropped_spans = 0
        self.late_spans = 0

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
        if batch is None and span.library is None and span.trace_id in self.closed:
            # An internal span that ended after its trace was written (Starlette's streaming
            # "receive" span): nothing to replay, so no stray cassette for it.
            self.late_spans += 1
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
        batch.last_ns = time.monotonic_ns()
        if resource is not None and (batch.resource is None or is_root):
            batch.resource = resource
        if is_root:
            batch.root = span
            if self.quiet_ns == 0:
                self._close(batch)
        # After a root closes its own trace, so a late root never evicts another trace.
        self._evict()

    def _to_process(self, span: SpanRecord) -> None:
        if len(self.process.spans) >= self.max_spans_per_trace * 10:
            self.process.complete = False
            self.dropped_spans += 1
            return
        self.process.spans.append(span)

    def _evict(self) -> None:
        while len(self.open) > self.max_open_traces:
            trace_id, _ = self.open.popitem(last=False)
            self.mark_dropped(trace_id)

    def _close(self, batch: TraceBatch) -> None:
        self.open.pop(batch.trace_id, None)
        self.closed[batch.trace_id] = None
        while len(self.closed) > 10 * self.max_open_traces:
            self.closed.popitem(last=False)
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
