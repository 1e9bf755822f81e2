"""ReplayIndex: recorded interactions by key, answered in recorded order in O(1).

Matching is a ladder (DESIGN principle 5): the exact key first, then the next unused
interaction of the same *shape* (volatile values dropped), then a miss. Every shape match is
kept in the :class:`ReplayReport`, so nothing is silently approximate::

    >>> index = ReplayIndex.from_paths(["cassettes/run.msgpack"])
    >>> match = index.take(call)          # a Match, or None on a miss
    >>> index.report().shape_matches
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from timetracer_otel.cassette import Cassette, CassetteHeads, SpanHead, SpanRecord, gc_paused
from timetracer_otel.keys import Call, field_diff
from timetracer_otel.redaction import TOKEN_BYTES_RE


@dataclass(slots=True)
class _Entry:
    span: SpanRecord | SpanHead
    source: str
    used: bool = False

    def record(self) -> SpanRecord:
        """The full span; a head from a large cassette decodes its payloads the first time."""
        if isinstance(self.span, SpanHead):
            self.span = self.span.materialize(self.source)
        return self.span


class _Fifo:
    """Entries of one key or shape in recorded order, consumed from the front in O(1).

    A cursor instead of ``list.pop(0)``, which moves every later entry: a cassette that polls
    one URL 10,000 times would otherwise pay O(n) per call.
    """

    __slots__ = ("by_tokens", "head", "items")

    def __init__(self) -> None:
        self.items: list[_Entry] = []
        self.head = 0
        # The entries by the redaction tokens of their stored requests, once a call needed
        # them: None until then, {} when every entry has the same (see ReplayIndex._by_secrets).
        self.by_tokens: dict[tuple[bytes, ...], _Fifo] | None = None

    def pop(self) -> _Entry | None:
        # Entries sit in two queues; one used through the other is skipped here, lazily.
        items = self.items
        while self.head < len(items):
            entry = items[self.head]
            self.head += 1
            if not entry.used:
                return entry
        return None


_pack = msgspec.msgpack.Encoder().encode


def _tokens(request: Any) -> tuple[bytes, ...]:
    """The redaction tokens of a stored request (a tree, or its msgpack still encoded), in
    order; bytes a JSON cassette keeps as base64 text show none."""
    if isinstance(request, msgspec.Raw):
        raw = bytes(request)
    else:
        try:
            raw = _pack(request)
        except (TypeError, ValueError, OverflowError):
            return ()
    return tuple(TOKEN_BYTES_RE.findall(raw)) if b"redacted:" in raw else ()


@dataclass(slots=True)
class Match:
    """The interaction chosen for a call; ``exact`` is False for a shape match."""

    span: SpanRecord
    source: str
    exact: bool
    diff: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ShapeMatch:
    label: str
    source: str
    diff: list[str]


@dataclass(slots=True)
class ReplayReport:
    """What a replay used, approximated and left over."""

    exact: int = 0
    shape_matches: list[ShapeMatch] = field(default_factory=list)
    misses: list[str] = field(default_factory=list)
    unused: list[tuple[str, str]] = field(default_factory=list)  # (label, source)
    # on_miss="record": why calls recorded live could not be kept in the cassette.
    unkept: list[str] = field(default_factory=list)
    # Misses on_miss let go live that could not: their connection came from the cassette.
    stranded: list[str] = field(default_factory=list)
    # Operations the replay refused (ReplayUnsupportedError: COPY, LISTEN...), each failing
    # the replay even when the app swallowed the error.
    unsupported: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.misses

    def failed(self, misses_fail: bool) -> bool:
        """Whether the replay failed: a miss, where misses fail (``on_miss="error"``), or a
        miss let go live that could not, or an operation replay refused, whatever ``on_miss``
        said."""
        return (misses_fail and bool(self.misses)) or bool(self.stranded) \
            or bool(self.unsupported)

    def summary(self) -> str:
        parts = [f"{self.exact} exact", f"{len(self.shape_matches)} by shape"]
        parts.append(f"{len(self.misses)} missed")
        parts.append(f"{len(self.unused)} recorded but unused")
        if self.stranded:
            parts.append(f"{len(self.stranded)} could not go live")
        if self.unsupported:
            parts.append(f"{len(self.unsupported)} unsupported")
        return "replay: " + ", ".join(parts)

    def render(self) -> str:
        lines = [self.summary()]
        for sm in self.shape_matches:
            lines.append(f"  shape match: {sm.label}")
            lines.extend(f"      {d}" for d in sm.diff)
        lines.extend(f"  miss: {m}" for m in self.misses)
        lines.extend(f"  could not go live (connection from the cassette): {m}"
                     for m in self.stranded)
        lines.extend(f"  unsupported in replay: {m}" for m in self.unsupported)
        lines.extend(f"  unused: {label} ({src})" for label, src in self.unused)
        lines.extend(f"  not kept: {why}" for why in self.unkept)
        return "\n".join(lines)


class Answers(Protocol):
    """What a replay shim asks of the cassettes: a :class:`ReplayIndex`, or what routes each
    call to one (``replay()`` blocks running at once)."""

    def take(self, call: Call) -> Match | None: ...

    def miss_message(self, call: Call, *, hint: str = "") -> str: ...

    def strand(self, call: Call) -> None: ...

    def refuse(self, what: str) -> None: ...

    def first(self, library: str,
              where: Callable[[SpanRecord], bool] | None = None) -> SpanRecord | None: ...


class ReplayIndex:
    """Recorded interactions grouped by key and by shape, each group a FIFO in start order."""

    def __init__(
        self, sources: Sequence[tuple[str, Cassette | CassetteHeads]], *, strict: bool = False
    ) -> None:
        self.strict = strict
        self._sources = list(sources)
        self.sources = [name for name, _ in sources]
        self._by_key: dict[str, _Fifo] = {}
        self._by_shape: dict[str, _Fifo] = {}
        self._entries: list[_Entry] = []
        self._lock = threading.Lock()
        _INDEXES.add(self)
        self._report = ReplayReport()
        # One recording's cassettes share a clock: order every interaction by when it started,
        # so a fixture's call (written last, in the process cassette) still comes first.
        with gc_paused():
            merged: list[tuple[SpanRecord | SpanHead, str]] = [
                (span, name) for name, cassette in sources for span in cassette.interactions
            ]
            merged.sort(key=lambda item: item[0].start_ns)
            for span, name in merged:
                self._add(span, name)

    @classmethod
    def from_paths(cls, paths: Iterable[str | Path], *, strict: bool = False) -> ReplayIndex:
        """Load every cassette at ``paths`` (files, directories or ``s3://`` URLs) into one index."""
        from timetracer_otel.exporters.storage import load_replay_sources  # exporters import us

        return cls([item for p in paths for item in load_replay_sources(p)], strict=strict)

    def key_counts(self) -> dict[str, int]:
        """How many interactions of each key the index holds (used or not)."""
        counts: dict[str, int] = {}
        for entry in self._entries:
            key = entry.span.key or ""
            counts[key] = counts.get(key, 0) + 1
        return counts

    def fresh(self) -> ReplayIndex:
        """A new index of the same cassettes with nothing used yet, for replaying them again."""
        return ReplayIndex(self._sources, strict=self.strict)

    def _add(self, span: SpanRecord | SpanHead, source: str) -> None:
        if span.key is None or span.kind in ("SERVER", "CONSUMER"):  # inbound calls answer nothing
            return
        entry = _Entry(span, source)
        self._entries.append(entry)
        queue = self._by_key.get(span.key)
        if queue is None:  # not setdefault: that builds a queue per call just to drop it
            queue = self._by_key[span.key] = _Fifo()
        queue.items.append(entry)
        if span.shape is not None:
            queue = self._by_shape.get(span.shape)
            if queue is None:
                queue = self._by_shape[span.shape] = _Fifo()
            queue.items.append(entry)

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _pop(queue: _Fifo | None) -> _Entry | None:
        return None if queue is None else queue.pop()

    def take(self, call: Call) -> Match | None:
        """The next unused interaction for ``call``, or None when nothing matches."""
        with self._lock:
            queue = self._by_key.get(call.key)
            entry = None
            if queue is not None:
                if len(queue.items) > 1 and queue.by_tokens != {}:
                    entry = self._by_secrets(queue, call)
                if entry is None:
                    entry = queue.pop()
            if entry is not None:
                entry.used = True
                self._report.exact += 1
                span = entry.span
                return Match(span if type(span) is SpanRecord else entry.record(), entry.source,
                             exact=True)
            if not self.strict:
                entry = self._pop(self._by_shape.get(call.shape_key))
                if entry is not None:
                    entry.used = True
                    span = entry.record()
                    diff = field_diff(span.request, call.request)
                    self._report.shape_matches.append(ShapeMatch(call.label, entry.source, diff))
                    return Match(span, entry.source, exact=False, diff=diff)
            return None

    @staticmethod
    def _by_secrets(queue: _Fifo, call: Call) -> _Entry | None:
        """Among interactions of one key whose stored requests carry different redaction
        tokens (keys fold tokens, so two calls that differ only in a secret share a key), the
        next unused one with the live call's tokens. Tokens are equal across processes only
        with a shared ``TIMETRACER_REDACTION_KEY``; otherwise none is equal, and the key's
        next interaction answers, in recorded order."""
        groups = queue.by_tokens
        if groups is None:
            groups = {}
            for entry in queue.items:
                tokens = _tokens(entry.span.request)
                group = groups.get(tokens)
                if group is None:
                    group = groups[tokens] = _Fifo()
                group.items.append(entry)
            queue.by_tokens = groups = groups if len(groups) > 1 else {}
            if not groups:
                return None
        live = _tokens(call.request)
        group = groups.get(live) if live else None
        return group.pop() if group is not None else None  # (used ones skipped, as here)

    def miss_message(self, call: Call, *, hint: str = "") -> str:
        """Explain a miss: the call, the cassettes, and the closest recorded candidates."""
        with self._lock:
            self._report.misses.append(call.label)
            candidates = [e for e in self._entries if e.span.library == call.library]
        where = ", ".join(self.sources[:3]) + (" ..." if len(self.sources) > 3 else "")
        lines = [f"No recorded {call.library} call matches {call.label} (cassette: {where or 'none'})."]
        scored = []
        for entry in candidates[:5000]:
            diff = field_diff(entry.record().request, call.request, limit=6)
            same_shape = entry.span.shape == call.shape_key
            scored.append((not same_shape, len(diff), entry.used, entry, diff))
        scored.sort(key=lambda item: item[:3])
        if scored:
            lines.append("Closest recorded calls:")
            for _, _, used, entry, diff in scored[:3]:
                state = "already used" if used else "unused"
                lines.append(f"  - {entry.span.label} ({state})")
                lines.extend(f"      {d}" for d in diff)
        else:
            lines.append(f"The cassette holds no {call.library} calls.")
        lines.append(
            hint
            or f"Record again, or let {call.library} stay live with "
            f"on_miss='passthrough' / TIMETRACER_LIVE_PLUGINS={call.library}."
        )
        return "\n".join(lines)

    def strand(self, call: Call) -> None:
        """A miss let go live that could not (its connection came from the cassette)."""
        with self._lock:
            self._report.stranded.append(call.label)

    def refuse(self, what: str) -> None:
        """An operation the replay refused with a ReplayUnsupportedError (``what`` it was)."""
        with self._lock:
            self._report.unsupported.append(what)

    def first(self, library: str,
              where: Callable[[SpanRecord], bool] | None = None) -> SpanRecord | None:
        """The earliest recorded call of ``library`` (for which ``where`` holds), used or not
        (not taken): what a shim needs to know of the recording before its first call
        (pymongo: the server's kind)."""
        with self._lock:
            for entry in self._entries:
                if entry.span.library == library:
                    span = entry.record()
                    if where is None or where(span):
                        return span
        return None

    def unused(self) -> list[_Entry]:
        with self._lock:
            return [e for e in self._entries if not e.used]

    def report(self) -> ReplayReport:
        """A snapshot of exact and shape matches, misses and unused interactions so far."""
        with self._lock:
            r = self._report
            unused = [(e.span.label or e.span.name, e.source) for e in self._entries if not e.used]
            return ReplayReport(r.exact, list(r.shape_matches), list(r.misses), unused,
                                stranded=list(r.stranded), unsupported=list(r.unsupported))


# Every index of this process: a forked child's start with their locks free (another thread
# of the parent may have held one at the fork, and it does not exist in the child).
_INDEXES: weakref.WeakSet[ReplayIndex] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for index in list(_INDEXES):
        index._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
