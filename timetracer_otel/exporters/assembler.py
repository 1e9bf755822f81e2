"""TraceAssembler: spans arrive one by one, cassettes leave one per local root.

A local root is a span whose parent is none or remote (another process's span), as the SDK
says in-process and OTLP's span flags say over the wire: each makes a cassette of its own, with
the spans below it. A trace is ready when a local root of it has arrived (after ``quiet_ns``
without new spans, for the Collector path where spans of one trace come in several requests,
in any order). Lone client spans with no inbound parent (a plain script's calls) gather into
one per-process batch, flushed at shutdown. Memory is bounded: past ``max_open_traces`` the
oldest open trace is dropped and its cassette, if its root comes later, says
``complete: false``.

In-process (``quiet_ns == 0``) a local root ends after the spans below it, and its cassette
takes every open span of its trace as it ends. On the Collector path the spans are grouped by
their parent links once the trace is quiet: several local roots of one trace (a service
calling itself, a consumer in another service) each get theirs, even from one request, and a
span whose parent has not been received waits for it, to go where its parent goes.

OTLP delivery is at least once (a Collector retries a request it saw fail), so a span that
comes again (the same span id) is dropped, in an open trace or one already written; a new
span of a trace already written (a retry after the quiet period) leaves as a ``late`` batch,
which the writer adds to that trace's cassette, and the spans that waited for it follow it.
A span whose parent never comes is not lost: after ``orphan_wait_ns`` (or when it must make
room, or at shutdown) it is added to its trace's cassette with the spans below it, internal
ones too, the one whose root's time holds its start when the trace has several, and counted in
:attr:`TraceAssembler.orphan_spans`, and that cassette says ``complete: false`` (it lacks the
parent); with no cassette of its trace to go to, it is written as a cassette of its own that
says ``complete: false`` too.

Late spans cost O(1) each whatever else of their trace waits: the spans that waited for a late
span are found by walking down from it through an index of the waiting spans by parent
(``TraceBatch.take_below``), never by a pass over all of them.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from timetracer_otel.cassette import SpanRecord
from timetracer_otel.replay_shims.base import is_startup_span

log = logging.getLogger("timetracer_otel")

OUTBOUND_KINDS = frozenset({"CLIENT", "PRODUCER"})


Resource = dict[str, Any] | None


@dataclass
class TraceBatch:
    """The spans of one cassette (``root`` is None for the per-process batch), or of an open
    trace: under local roots not written yet, or waiting for a parent not received yet."""

    trace_id: str
    spans: list[SpanRecord] = field(default_factory=list)
    root: SpanRecord | None = None
    complete: bool = True  # False: its cassette says so (spans lost; late: their parents never came)
    last_ns: int = 0  # (an open trace: when its latest span came, time.monotonic_ns)
    resource: dict[str, Any] | None = None  # the root's service (its first span's until then)
    ids: set[str] = field(default_factory=set)  # its spans' ids
    late: bool = False  # spans of a trace already written, for its cassette
    late_root: str | None = None  # (the root span id of that cassette)
    # An open trace's local roots after the first (``root``), each with its service.
    more_roots: list[tuple[SpanRecord, Resource]] | None = None
    # An open trace of a written trace, once a late span has looked for the spans waiting for
    # it: parent span id -> the spans here under it (see take_below).
    kids: dict[str, list[SpanRecord]] | None = None
    # Spans of ``spans`` taken out (by object id), until compact() drops them.
    gone: set[int] = field(default_factory=set)
    # A late batch: how many of its spans are there because their parent never came (the
    # writer takes them off TraceAssembler.orphan_spans if it cannot add them).
    orphans: int = 0

    def roots(self) -> list[tuple[SpanRecord, Resource]]:
        """An open trace's local roots, each with its service."""
        if self.root is None:
            return []
        return [(self.root, self.resource), *(self.more_roots or ())]

    def take_below(self, span_id: str) -> list[SpanRecord]:
        """Remove the spans below ``span_id`` (its children, theirs, and so on, local roots
        excepted) from this open trace, and return them. A walk down from ``span_id`` through
        ``kids``, built on the first call (one pass over the spans) and kept up to date by
        :meth:`TraceAssembler.add` from then on: O(1) for a span with nothing below it,
        whatever else waits. A span taken stays in ``spans`` (``ids`` says it is gone) until
        :meth:`compact`, which runs once they outnumber those left (amortized O(1) each)."""
        kids = self.kids
        if kids is None:
            kids = self.kids = {}
            for s in self.spans:
                if id(s) not in self.gone:
                    _index(kids, s)
        taken: list[SpanRecord] = []
        below = kids.pop(span_id, None)
        if below is None:
            return taken
        todo = [below]
        while todo:
            for child in todo.pop():
                if child.span_id in self.ids:  # (taken through a loop of parents already)
                    self.ids.discard(child.span_id)
                    self.gone.add(id(child))
                    taken.append(child)
                    more = kids.pop(child.span_id, None)
                    if more is not None:
                        todo.append(more)
        if len(self.gone) > len(self.ids):
            self.compact()
        return taken

    def compact(self) -> list[SpanRecord]:
        """``spans`` without those taken (see :meth:`take_below`), and returned: to be called
        before an open trace's spans are read."""
        if self.gone:
            gone, self.gone = self.gone, set()
            self.spans = [s for s in self.spans if id(s) not in gone]
        return self.spans


def _index(kids: dict[str, list[SpanRecord]], span: SpanRecord) -> None:
    """Add ``span`` under its parent in an open trace's index of children (a local root, whose
    parent is in another process or none, is in no one's)."""
    if span.parent_id is not None and not span.remote_parent:
        below = kids.get(span.parent_id)
        if below is None:
            kids[span.parent_id] = [span]
        else:
            below.append(span)


# Where a span of an open trace goes (see TraceAssembler._routes): under a local root of the
# open trace, under a span of a cassette already made (the root span id of that cassette), or
# nowhere yet (the span id at the top of its chain, whose parent has not come).
_NEW, _LATE, _WAIT = 0, 1, 2
Route = tuple[int, Any]

DEFAULT_ORPHAN_WAIT_NS = 60_000_000_000


class TraceAssembler:
    """Not thread-safe: one writer thread (or one receiver lock) owns it."""

    def __init__(
        self,
        emit: Callable[[TraceBatch], None],
        *,
        max_open_traces: int = 1000,
        max_spans_per_trace: int = 10_000,
        quiet_ns: int = 0,
        orphan_wait_ns: int | None = None,
    ) -> None:
        self.emit = emit
        self.max_open_traces = max_open_traces
        self.max_spans_per_trace = max_spans_per_trace
        self.quiet_ns = quiet_ns
        # How long a span of a written trace waits for a parent not received (a Collector
        # retries a failed request for minutes) before it goes into a cassette of its trace.
        self.orphan_wait_ns = (max(30 * quiet_ns, DEFAULT_ORPHAN_WAIT_NS)
                               if orphan_wait_ns is None else orphan_wait_ns)
        self.open: OrderedDict[str, TraceBatch] = OrderedDict()
        self.process = TraceBatch(trace_id="process")
        self.dropped: OrderedDict[str, None] = OrderedDict()  # trace ids that lost spans
        self.closed: OrderedDict[str, None] = OrderedDict()  # recently written trace ids
        # The span ids of the latest max_open_traces of them, each with the root span id of
        # the cassette it went to (a trace may have several local roots), and (on the
        # Collector path) those roots' (start, end) times, for spans whose parent never came.
        self.closed_ids: OrderedDict[str, dict[str, str | None]] = OrderedDict()
        self.closed_roots: dict[str, dict[str, tuple[int, int]]] = {}
        # The end of each app startup's span (by its span id) among the latest 64: see add.
        self.startups: OrderedDict[str, int] = OrderedDict()
        self.dropped_spans = 0
        self.late_spans = 0
        self.duplicate_spans = 0
        # Spans whose parent never came, added to a cassette of their trace anyway (also in
        # late_spans): those handed to the writer, which takes back those it could not add.
        self.orphan_spans = 0

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
        startup_end = self.startups.get(span.parent_id) if self.startups and span.parent_id else None
        if startup_end is not None and span.start_ns > startup_end:
            # Under an app's startup span, begun after the startup answered: the work of a task
            # the startup left running (a refresher, a job loop), which took its context. Not
            # the startup's to replay, and it must not keep that trace open for as long as the
            # app runs: recorded as it was without the startup span, a lone call in the
            # process cassette, a span of its own (a job's) a root with its own cassette.
            span = msgspec.structs.replace(span, parent_id=None)
            if span.kind in OUTBOUND_KINDS:
                self._to_process(span, resource)
                return
            is_root = True
        if span.trace_id in self.closed and self._late(span, is_root, batch):
            return
        if batch is not None and span.span_id in batch.ids:
            self.duplicate_spans += 1  # delivered again
            return
        if batch is None:
            if is_root and span.kind in OUTBOUND_KINDS:
                self._to_process(span, resource)  # a lone dependency call of a plain script
                return
            batch = self.open[span.trace_id] = TraceBatch(span.trace_id)
        if len(batch.ids) >= self.max_spans_per_trace:
            batch.complete = False
            self.dropped_spans += 1
        else:
            batch.spans.append(span)
            batch.ids.add(span.span_id)
            if batch.kids is not None:
                _index(batch.kids, span)
        batch.last_ns = time.monotonic_ns()
        if is_root:
            if is_startup_span(span):
                self.startups[span.span_id] = span.end_ns
                while len(self.startups) > 64:
                    self.startups.popitem(last=False)
            if batch.root is None:
                batch.root = span
                if resource is not None:
                    batch.resource = resource
            elif batch.more_roots is None:
                batch.more_roots = [(span, resource)]
            else:
                batch.more_roots.append((span, resource))
            if self.quiet_ns == 0:
                self._close(batch)
        elif resource is not None and batch.resource is None:
            batch.resource = resource
        # After a root closes its own trace, so a late root never evicts another trace.
        self._evict()

    def _late(self, span: SpanRecord, is_root: bool, batch: TraceBatch | None) -> bool:
        """A span of a trace already written, taken here (True) when it came before (a span
        id a cassette of the trace holds) or is the child of a span of such a cassette: a late
        batch for the writer to add to that cassette, with the spans of the open trace
        ``batch`` that waited for it, unless it carries nothing to replay (an internal span
        that ended after its trace was written, Starlette's streaming "receive" span: dropped,
        its id kept for its own children). Another local root of the trace and its spans (a
        service calling itself) make a cassette of their own, and a span whose parent has not
        come waits in the open trace (False)."""
        ids = self.closed_ids.get(span.trace_id)
        if ids is not None and span.span_id in ids:
            self.duplicate_spans += 1
            return True
        if is_root:
            return False
        if ids is None:  # (an older trace, whose span ids are no longer kept)
            if span.library is None and batch is None:
                self.late_spans += 1
                return True
            return False
        if span.parent_id not in ids:
            return False
        root = ids[span.parent_id]
        spans = [span]
        if batch is not None and batch.ids:  # the spans that waited for it follow it
            waited = batch.take_below(span.span_id)
            if waited:
                spans += waited
                if not batch.ids and batch.root is None:
                    del self.open[batch.trace_id]
        self._add_late(span.trace_id, root, spans)
        return True

    def _add_late(self, trace_id: str, root: str | None, spans: list[SpanRecord], *,
                  orphans: int = 0) -> None:
        """``spans`` go to the cassette of ``root``: their ids are kept (for their children
        and their next deliveries), those with a call to replay are added to it. ``orphans``:
        ``spans`` are chains whose parent never came (that many spans), added whole, internal
        spans too (the chain as it ran), counted in :attr:`orphan_spans`, and the cassette
        says ``complete: false`` from then on (it lacks their parents)."""
        ids = self.closed_ids.get(trace_id)
        if ids is not None:
            ids.update(dict.fromkeys([s.span_id for s in spans], root))
        self.late_spans += len(spans)
        calls = spans if orphans else [s for s in spans if s.library is not None]
        if calls:
            self.orphan_spans += orphans
            self.emit(TraceBatch(trace_id, spans=calls, late=True, late_root=root,
                                 complete=not orphans, orphans=orphans))

    @staticmethod
    def _routes(batch: TraceBatch, known: dict[str, str | None]) -> dict[str, Route]:
        """Where each span of ``batch`` goes, following parent links: under a local root of
        the batch (``_NEW``, its id), under a span in ``known`` (``_LATE``, the root span id
        that span maps to), or, its chain broken by a parent not received, nowhere yet
        (``_WAIT``, the id of the span at the top of its chain)."""
        by_id = {s.span_id: s for s in batch.spans}
        routes: dict[str, Route] = {r.span_id: (_NEW, r.span_id) for r, _ in batch.roots()}
        limit = len(by_id)
        for span in batch.spans:
            path: list[str] = []
            cur = span
            while True:
                route = routes.get(cur.span_id)
                if route is not None:
                    break
                path.append(cur.span_id)
                parent = cur.parent_id
                if parent is None or cur.remote_parent:  # (a root kept out past the limit)
                    route = (_WAIT, cur.span_id)
                    break
                if parent in known:
                    route = (_LATE, known[parent])
                    break
                nxt = by_id.get(parent)
                if nxt is None or len(path) > limit:  # not received (or a loop of parents)
                    route = (_WAIT, cur.span_id)
                    break
                cur = nxt
            for sid in path:
                routes[sid] = route
        return routes

    def _to_process(self, span: SpanRecord, resource: dict[str, Any] | None = None) -> None:
        if self.process.resource is None:
            self.process.resource = resource
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
            trace_id, batch = self.open.popitem(last=False)
            if batch.root is not None:
                self.mark_dropped(trace_id)
            # Spans of a written trace that waited for a parent are written, not dropped: into
            # a cassette of the trace, or (its cassettes no longer known) one of their own.
            elif not self._settle(batch):
                if trace_id in self.closed:
                    self._write_rootless(batch)
                else:
                    self.mark_dropped(trace_id)

    def _close(self, batch: TraceBatch) -> None:
        """Write the cassettes of ``batch``'s local roots. In-process (``quiet_ns == 0``) its
        one root takes every span; otherwise each root takes the spans below it, spans below
        a span of a written cassette go to that cassette, and those whose parent has not come
        stay open, waiting."""
        self.open.pop(batch.trace_id, None)
        batch.compact()
        root = batch.root
        assert root is not None
        if self.quiet_ns == 0 or (batch.more_roots is None and all(
                s.parent_id in batch.ids or s is root for s in batch.spans)):
            # (in-process, or one root and every other span's parent at hand: all of them)
            self._remember(batch.trace_id, batch.ids, root)
            if batch.trace_id in self.dropped:
                batch.complete = False
            self.emit(batch)
            return
        known = self.closed_ids.get(batch.trace_id) or {}
        routes = self._routes(batch, known)
        roots = batch.roots()
        groups: dict[str, list[SpanRecord]] = {r.span_id: [] for r, _ in roots}
        late: dict[str | None, list[SpanRecord]] = {}
        waiting: list[SpanRecord] = []
        for span in batch.spans:
            kind, where = routes[span.span_id]
            if kind == _NEW:
                groups[where].append(span)
            elif kind == _LATE:
                late.setdefault(where, []).append(span)
            else:
                waiting.append(span)
        for root, resource in roots:
            spans = groups[root.span_id]
            out = TraceBatch(batch.trace_id, spans=spans, root=root, complete=batch.complete,
                             last_ns=batch.last_ns,
                             resource=resource if resource is not None else batch.resource,
                             ids={s.span_id for s in spans})
            self._remember(batch.trace_id, out.ids, root)
            if batch.trace_id in self.dropped:
                out.complete = False
            self.emit(out)
        for where, spans in late.items():
            self._add_late(batch.trace_id, where, spans)
        if waiting:  # open again, with its time: it waits orphan_wait_ns from its last span
            self.open[batch.trace_id] = TraceBatch(
                batch.trace_id, waiting, complete=batch.complete, last_ns=batch.last_ns,
                resource=batch.resource, ids={s.span_id for s in waiting})

    def _remember(self, trace_id: str, ids: set[str], root: SpanRecord | None) -> None:
        """Keep the ids of a cassette's spans, for late spans and deliveries again."""
        self.closed[trace_id] = None
        while len(self.closed) > 10 * self.max_open_traces:
            self.closed.popitem(last=False)
        known = self.closed_ids.pop(trace_id, None) or {}
        root_id = root.span_id if root is not None else None
        known.update(dict.fromkeys(ids, root_id))
        self.closed_ids[trace_id] = known  # (the latest again)
        if root is not None and self.quiet_ns:  # (in-process, a root ends after its spans)
            self.closed_roots.setdefault(trace_id, {})[root.span_id] = (root.start_ns, root.end_ns)
        while len(self.closed_ids) > self.max_open_traces:
            old, _ = self.closed_ids.popitem(last=False)
            self.closed_roots.pop(old, None)

    def _settle(self, batch: TraceBatch) -> bool:
        """Spans of a written trace whose parent never came (``batch``, rootless): added to
        a cassette of the trace, each chain to the one whose root's time holds the start of
        its top span (the innermost), else to the latest that started before it, else to the
        first (in-process, where roots' times are not kept, to one of them), internal spans
        too: counted in :attr:`orphan_spans`, each of them written. False, with nothing
        done, when no cassette of the trace is known."""
        known = self.closed_ids.get(batch.trace_id)
        if not known or batch.root is not None:
            return False
        roots = self.closed_roots.get(batch.trace_id) or {
            rid: (0, 0) for rid in set(known.values()) if rid is not None}
        if not roots:
            return False
        self.open.pop(batch.trace_id, None)
        by_id = {s.span_id: s for s in batch.compact()}
        groups: dict[str | None, list[SpanRecord]] = {}
        orphans: dict[str | None, int] = {}
        routes = self._routes(batch, known)
        for span in batch.spans:
            kind, where = routes[span.span_id]
            if kind == _WAIT:
                top = by_id[where]
                where = _home(roots, top.start_ns)
                orphans[where] = orphans.get(where, 0) + 1
            groups.setdefault(where, []).append(span)
        for where, spans in groups.items():
            self._add_late(batch.trace_id, where, spans, orphans=orphans.get(where, 0))
        log.info("timetracer-otel: %d span(s) of trace %s came without their parent; added to "
                 "its cassette(s)", len(batch.spans), batch.trace_id)
        return True

    def flush_idle(self) -> None:
        """Close traces with a local root that have been quiet for ``quiet_ns``; add the spans
        of written traces that waited ``orphan_wait_ns`` for a parent to their cassettes."""
        now = time.monotonic_ns()
        for batch in list(self.open.values()):
            quiet = now - batch.last_ns
            if batch.root is not None:
                if quiet >= self.quiet_ns:
                    self._close(batch)
            elif quiet >= self.orphan_wait_ns:
                self._settle(batch)

    def flush_process(self) -> None:
        if self.process.spans:
            batch, self.process = self.process, TraceBatch(trace_id="process")
            self.emit(batch)

    def close_all(self) -> None:
        """Shutdown: every open trace (rooted or not) and the process batch. Spans still
        waiting for a parent go to a cassette of their trace, or (none) make one of their
        own that says ``complete: false``."""
        for batch in list(self.open.values()):
            if batch.root is not None:
                self._close(batch)
        for batch in list(self.open.values()):
            if not self._settle(batch):
                self._write_rootless(batch)
        self.flush_process()

    def _write_rootless(self, batch: TraceBatch) -> None:
        """A cassette of spans whose root never came, which says ``complete: false``."""
        self.open.pop(batch.trace_id, None)
        batch.compact()
        self._remember(batch.trace_id, batch.ids, None)
        batch.complete = False
        self.emit(batch)


def _home(roots: dict[str, tuple[int, int]], start: int) -> str:
    """The root (of ``roots``: id -> (start, end)) a span starting at ``start`` most likely
    ran under."""
    holding = [(s, rid) for rid, (s, e) in roots.items() if s <= start <= e]
    if holding:
        return max(holding)[1]
    before = [(s, rid) for rid, (s, _) in roots.items() if s <= start]
    if before:
        return max(before)[1]
    return min((s, rid) for rid, (s, _) in roots.items())[1]
