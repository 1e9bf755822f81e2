"""What every shim shares: the mode switch, span attributes, miss policy, patching.

A shim is installed once, beneath the OpenTelemetry instrumentation of its library, and reads
the process-wide :data:`STATE` on every call, so record, replay and off switch without
re-patching. Per call, a shim does::

    call = keys.http_call("httpx", ...)           # canonical request, key, shape
    action = decide(call)                         # Match (replay), LIVE or RECORD
    if isinstance(action, Match): return rebuild(action.span)
    if action is LIVE: return original(...)
    with capture(call, SCOPE) as cap:             # RECORD: real call, payload onto the span
        result = original(...)
        cap.ok(response_tree)

"""

from __future__ import annotations

import contextlib
import enum
import importlib
import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextvars import Context, ContextVar, Token
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import msgspec
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.instrumentation.utils import is_instrumentation_enabled
from opentelemetry.trace import Span, SpanKind

from timetracer_otel.cassette import SpanRecord
from timetracer_otel.codec import Tree, from_tree, to_tree
from timetracer_otel.config import Mode, OnMiss
from timetracer_otel.errors import ConfigError, ReplayMissError, ReplayUnsupportedError
from timetracer_otel.index import Answers, Match
from timetracer_otel.keys import Call
from timetracer_otel.redaction import Redactor, Withheld, default_redactor

log = logging.getLogger("timetracer_otel")

# The span attribute that carries a call's payload: msgpack bytes of a map with ``library``,
# ``key``, ``shape``, ``label``, ``request``, then ``response`` or ``error``, and ``truncated``
# (see :class:`Payload`). One attribute, set once when the call ends: the SDK cleans
# and locks per attribute, and the Collector path ships and parses one value instead of six.
ATTR_PAYLOAD = "timetracer.payload"
# The separate attributes earlier releases set (and the readers still accept, so spans from
# an older recorder through a Collector still become interactions).
ATTR_LIBRARY = "timetracer.library"
ATTR_KEY = "timetracer.key"
ATTR_SHAPE = "timetracer.shape"
ATTR_LABEL = "timetracer.label"
ATTR_REQUEST = "timetracer.request"
ATTR_RESPONSE = "timetracer.response"
ATTR_ERROR = "timetracer.error"
ATTR_TRUNCATED = "timetracer.truncated"
# Set on a replayed call's span: "exact" or "shape" (how it matched).
ATTR_REPLAY = "timetracer.replay"
# On the span around an ASGI app's lifespan startup (replay_shims/asgi.py): "startup".
ATTR_LIFESPAN = "timetracer.lifespan"


def is_startup_span(span: SpanRecord) -> bool:
    """The span ``replay_shims.asgi`` opens around an app's lifespan startup."""
    return bool(span.attributes.get(ATTR_LIFESPAN) == "startup")
PAYLOAD_ATTRS = frozenset(
    {ATTR_PAYLOAD, ATTR_LIBRARY, ATTR_KEY, ATTR_SHAPE, ATTR_LABEL, ATTR_REQUEST, ATTR_RESPONSE,
     ATTR_ERROR, ATTR_TRUNCATED}
)

# Payloads are msgpack bytes: the SDK keeps bytes values as they are (no string truncation)
# and OTLP carries them as bytes_value, so raw bodies survive a Collector too.
_pack = msgspec.msgpack.Encoder().encode


# An absent part. The encoder leaves a default out only when it is this very object: a part
# given as another empty Raw would be written as nothing at all, breaking the map.
_NONE = msgspec.Raw()


class Payload(msgspec.Struct, omit_defaults=True, gc=False):
    """The :data:`ATTR_PAYLOAD` value of one call, written by the shims and read by the
    exporters. ``request``, ``response`` and ``error`` are the msgpack of the (redacted) trees,
    embedded as they are; an absent one is empty."""

    library: str
    key: str
    shape: str | None = None
    label: str | None = None
    request: msgspec.Raw = _NONE
    response: msgspec.Raw = _NONE
    error: msgspec.Raw = _NONE
    truncated: bool = False


def payload_attribute(
    library: str, key: str, shape: str, label: str, request: bytes, *,
    response: bytes | None = None, error: bytes | None = None, truncated: bool = False,
) -> bytes:
    """The encoded :class:`Payload` of one call, from the msgpack of its trees."""
    return _pack(_payload(library, key, shape, label, request, response, error, truncated))


def _payload(library: str, key: str, shape: str, label: str, request: bytes,
             response: bytes | None, error: bytes | None, truncated: bool) -> Payload:
    return Payload(
        library, key, shape, label, msgspec.Raw(request) if request else _NONE,
        msgspec.Raw(response) if response else _NONE,
        msgspec.Raw(error) if error else _NONE, truncated,
    )


def span_attributes(span: Any) -> Any:
    """A span's attributes, for reading. The SDK's ``span.attributes`` is a proxy over
    BoundedAttributes, whose every access is a Python call (and whose ``in`` raises and catches
    a KeyError on a miss); the plain dict beneath answers in C, with the public view as
    fallback."""
    inner = getattr(getattr(span, "_attributes", None), "_dict", None)
    return inner if type(inner) is dict else (getattr(span, "attributes", None) or {})


class Keeps(Protocol):
    """Where calls recorded live during a replay go: a list, or what routes each to the list
    of the ``replay()`` block it ran in."""

    def append(self, record: SpanRecord, /) -> None: ...


@dataclass
class State:
    """The process-wide switch every shim reads on each call."""

    mode: Mode = Mode.OFF
    index: Answers | None = None
    on_miss: OnMiss = OnMiss.ERROR
    live: frozenset[str] = frozenset()
    mock: frozenset[str] = frozenset()
    max_payload_bytes: int = 16 * 1024 * 1024
    # A timetracer writer takes this process's spans (record(), the timetracer exporter or
    # processor): shims that can, hand it their calls as captured (see defer()) instead of
    # redacting and encoding them on the request path.
    defer: bool = False
    redactor: Redactor = field(default_factory=lambda: _startup_redactor())
    # Interactions recorded live during a replay (on_miss="record"), to append to a cassette.
    appended: Keeps = field(default_factory=lambda: list[SpanRecord]())
    lock: threading.Lock = field(default_factory=threading.Lock)

    def policy(self) -> tuple[OnMiss, frozenset[str]]:
        """``on_miss`` and ``live`` for a call made now: those of the ``replay()`` run of this
        task or thread while runs are active (see ``runtime``), else these fields."""
        return _run_policy() if _run_policy is not None else (self.on_miss, self.live)

    def is_live(self, library: str, live: frozenset[str] | None = None) -> bool:
        if live is None:
            live = self.policy()[1]
        return library in live or bool(self.mock and library not in self.mock)

    def put(self, **values: Any) -> None:
        """Set fields from outside ``record()``/``replay()`` runs (an exporter, the pytest
        plugin): while runs are active, the runs' own values stay in force and these become
        what the last run to end restores (see ``runtime``)."""
        if _put_hook is not None:
            _put_hook(values)
        else:
            for name, value in values.items():
                setattr(self, name, value)


# Set by timetracer_otel.runtime, which keeps what runs lay over STATE.
_put_hook: Callable[[dict[str, Any]], None] | None = None
_run_policy: Callable[[], tuple[OnMiss, frozenset[str]]] | None = None


class _Unreadable:
    """Stands in for the redactor while the environment's rules (TIMETRACER_REDACT...) cannot
    be read: importing timetracer_otel still works (``--help``, ``show``), every entry point
    that records or replays stops with the ConfigError (``Settings.from_env`` asks for the
    redactor), and anything that reaches it anyway fails instead of storing unredacted data."""

    def __init__(self, error: ConfigError) -> None:
        self._error = error

    def __getattr__(self, name: str) -> Any:
        raise self._error


def _startup_redactor() -> Redactor:
    try:
        return default_redactor()
    except ConfigError as exc:
        return _Unreadable(exc)  # type: ignore[return-value]


STATE = State()


def _after_fork_in_child() -> None:
    """A lock another thread held when the process forked stays held in the child, where
    that thread does not exist: the child's start free."""
    STATE.lock = threading.Lock()
    redactor = STATE.redactor
    if isinstance(redactor, Redactor):
        redactor._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Action(enum.Enum):
    LIVE = "live"
    RECORD = "record"


LIVE = Action.LIVE
RECORD = Action.RECORD


try:  # the keys is_instrumentation_enabled() reads, read from one context lookup per call
    from opentelemetry.context import _SUPPRESS_INSTRUMENTATION_KEY as _SUPPRESS_KEY
    from opentelemetry.instrumentation.utils import (
        _SUPPRESS_INSTRUMENTATION_KEY_PLAIN as _SUPPRESS_KEY_PLAIN,
    )

    def _suppressed(ctx: otel_context.Context) -> bool:
        return bool(ctx.get(_SUPPRESS_KEY) or ctx.get(_SUPPRESS_KEY_PLAIN))
except ImportError:  # pragma: no cover - an OTel release that moved them
    _SUPPRESS_KEY = _SUPPRESS_KEY_PLAIN = None  # type: ignore[assignment]

    def _suppressed(ctx: otel_context.Context) -> bool:
        return not is_instrumentation_enabled()


def suppressed() -> bool:
    """Whether instrumentation is suppressed here: the call is not the app's own (an
    exporter's I/O, or a library's plumbing a shim runs untraced), so it goes live."""
    return _suppressed(otel_context.get_current())


# OTel's default runtime context keeps the current context in one ContextVar: read directly
# (with the SDK's span class) by deferrable_span, else None and the public calls are used.
_CURRENT: ContextVar[otel_context.Context] | None = None
try:
    from opentelemetry.context import _RUNTIME_CONTEXT
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
    from opentelemetry.sdk.trace import _Span as _SdkSpan
    from opentelemetry.trace.propagation import _SPAN_KEY

    _var = getattr(_RUNTIME_CONTEXT, "_current_context", None)
    if type(_RUNTIME_CONTEXT) is ContextVarsRuntimeContext and type(_var) is ContextVar \
            and _SUPPRESS_KEY is not None:
        _CURRENT = _var
except ImportError:  # pragma: no cover - an OTel release that moved them
    pass
_NO_DICT: dict[str, Any] = {}


def decide(call: Call) -> Match | Action:
    """Record, replay (a :class:`Match`), or call live, for ``call`` under :data:`STATE`."""
    st = STATE
    if st.mode is Mode.OFF:
        return LIVE
    ctx = otel_context.get_current()
    if _suppressed(ctx):
        return LIVE  # suppressed: an exporter's or the writer's own I/O (S3, OTLP) is not the app's
    if st.mode is Mode.RECORD:
        return RECORD
    if st.mode is not Mode.REPLAY:
        return LIVE
    on_miss, live = st.policy()
    if (live or st.mock) and st.is_live(call.library, live):
        return LIVE
    if st.index is None:
        raise ReplayMissError("Replay is on but no cassette is loaded.", library=call.library)
    if on_miss is OnMiss.RECORD:
        # Build the stored request even for a call answered from the cassette: redacting it
        # teaches the redactor its secrets (an Authorization header...), so a later call
        # recorded live whose response echoes one is scrubbed before it is kept.
        _ = call.request
    match = st.index.take(call)
    if match is None and call.before is not None:  # (a cassette recorded before a key change)
        match = st.index.take(call.before())
    if match is not None:
        if match.span.truncated:
            raise unsupported(
                f"The recorded response of {call.label} was stored truncated: it was larger "
                "than the payload limit (raise TIMETRACER_MAX_PAYLOAD_BYTES and record again), "
                "or its packed body unpacked past what can be redacted and may have held a "
                "secret (the recording's warning said so).",
                f"{call.label} (stored truncated)",
            )
        span = trace.get_current_span(ctx)
        if span.is_recording():
            span.set_attribute(ATTR_REPLAY, "exact" if match.exact else "shape")
        return match
    if on_miss is OnMiss.ERROR:
        raise ReplayMissError(st.index.miss_message(call), library=call.library, key=call.key)
    st.index.miss_message(call)  # still counted in the report
    return LIVE if on_miss is OnMiss.PASSTHROUGH else RECORD


def unsupported(message: str, what: str) -> ReplayUnsupportedError:
    """The error for an operation the replay refuses (``what`` it is, for the report):
    counted in the replay's report, so a replay whose app swallows the error still fails."""
    index = STATE.index
    if STATE.mode is Mode.REPLAY and index is not None:
        index.refuse(what)
    return ReplayUnsupportedError(message)


def stopped_reading(label: str) -> ReplayUnsupportedError:
    """The error for reading a replayed streamed body past where the app stopped reading it
    while recording (it closed it, was cancelled, or the recording ended first): nothing
    after that was recorded."""
    return unsupported(
        f"{label}: the recording of this streamed response ends here, where the app stopped "
        "reading it while recording (it closed it, was cancelled, or the recording ended "
        "first); nothing after it was recorded. Record again with the app reading further.",
        f"{label} (read past where the recording stopped)",
    )


def stranded(call: Call) -> ReplayUnsupportedError:
    """The error for a miss that ``on_miss`` let go live on a connection the replay opened
    from the cassette, with no server behind it; counted in the replay's report (a replay
    whose app swallows the error still fails)."""
    if STATE.index is not None:
        STATE.index.strand(call)
    return ReplayUnsupportedError(
        f"{call.label} has no recording, and its connection was opened from the cassette "
        f"without a server; record it again, or keep {call.library} live with "
        f"TIMETRACER_LIVE_PLUGINS={call.library}."
    )


# --- record side -----------------------------------------------------------------------------

_tracer = trace.get_tracer("timetracer_otel")


def _dependency_span(scope: str) -> Span | None:
    """The instrumentation's span for this call, or None when there is none, or when another
    call has it: one still running in this context (a transport calling a second captured
    transport), or one that already put its payload on it (a hook re-sending)."""
    span = trace.get_current_span()
    if span.is_recording():
        sc = getattr(span, "instrumentation_scope", None)
        if sc is not None and sc.name.startswith(scope) and span is not _TAKEN.get() \
                and not carries_call(span):
            return span
    return None


def carries_call(span: Any) -> bool:
    """Whether ``span`` holds a recorded call: a payload attribute (of this release or an
    earlier one) or a call left to the writer (see :func:`defer`)."""
    attrs = span_attributes(span)
    return ATTR_PAYLOAD in attrs or ATTR_LIBRARY in attrs or deferred_of(span) is not None


# The instrumentation span a running capture has claimed (its payload is set only as it ends).
_TAKEN: ContextVar[Span | None] = ContextVar("timetracer_taken_span", default=None)


# --- deferred capture --------------------------------------------------------------------------
#
# Under a timetracer writer (STATE.defer) a shim may leave a recorded call as it captured it:
# ``(library, args)``, plain values only (str, bytes, numbers, lists, dicts), kept beside the
# span's attributes: as the DEFERRED instance attribute of the SDK's attribute container, which
# the ReadableSpan the SDK hands to processors shares with the live span (the span's own
# instance attributes are not copied there). The writer, in its own process where it has one,
# calls the library's builder on ``args`` as the span is converted, which returns exactly the
# ATTR_PAYLOAD bytes the shim would have set: same redaction (the app's redactor and the
# secrets it learned), same keys, same encoding. The request path then only copies references,
# and the values are never on a span attribute, so no other exporter of the app sees them,
# redacted or not.

DEFERRED = "_timetracer_deferred"
# library -> builder(args) -> the call's Payload (encoded, the ATTR_PAYLOAD bytes a capture sets).
# A shim registers its own on import.
BUILDERS: dict[str, Callable[[Any], Payload]] = {}


# What a recorded ``prepare`` answered (a statement's parameter and column types), by its
# call's key, from every cassette a replay of many recorded requests loaded: a request
# recorded on a connection that had the statement prepared already (SQLAlchemy's cache)
# and replayed on a fresh one prepares it again, and the description depends on the
# statement and the schema only, not on which request first prepared it. Only while such a
# replay runs (:func:`statements`: `replay --asgi`, the pytest plugin's replay-dir items);
# asyncpg's ``_prepare`` reads it when a ``prepare`` finds no recorded call.
STATEMENTS: dict[str, Any] = {}


def learn_statements(spans: Iterable[Any], into: dict[str, Any]) -> None:
    """Keep the description of every successful recorded ``prepare`` among ``spans`` (any
    one of a statement's: it depends on the statement and the schema only)."""
    for span in spans:
        request = span.request
        if span.error is None and span.key and isinstance(request, dict) \
                and request.get("op") == "prepare" and span.response is not None:
            into[span.key] = span.response


@contextlib.contextmanager
def statements(learned: dict[str, Any]) -> Iterator[None]:
    """:data:`STATEMENTS` is ``learned`` inside, as it was outside."""
    global STATEMENTS
    before, STATEMENTS = STATEMENTS, learned
    try:
        yield
    finally:
        STATEMENTS = before


def deferrable_span(scope: str) -> Span | None:
    """The instrumentation span to leave this call on, when it can be deferred: recording
    under a timetracer writer, not suppressed, the instrumentation's span free for it, and an
    SDK span (another implementation gets the payload attribute).

    With OTel's default (contextvars) runtime context and an SDK span, every check reads the
    objects' fields directly: :func:`_dependency_span`'s public calls (the current context
    twice, ``is_recording``, two properties, :func:`carries_call`) are ~15 Python calls on
    each recorded call."""
    st = STATE
    if not st.defer or st.mode is not Mode.RECORD:
        return None
    if _CURRENT is None:
        return _public_deferrable(scope)
    ctx = _CURRENT.get()
    if ctx.get(_SUPPRESS_KEY) or ctx.get(_SUPPRESS_KEY_PLAIN):
        return None
    span: Any = ctx.get(_SPAN_KEY)
    if type(span) is not _SdkSpan:  # another span class: the public checks
        return _public_deferrable(scope)
    return span if _free_sdk_span(span, scope) else None


def _free_sdk_span(span: Any, scope: str) -> bool:
    """Whether an SDK span of ``scope`` can still take a call: not ended, not claimed by a
    running capture, no payload set or left on it."""
    if span._end_time is not None or span is _TAKEN.get():
        return False
    sc = span._instrumentation_scope
    attributes = span._attributes
    inner = getattr(attributes, "_dict", None)
    return not (sc is None or not sc._name.startswith(scope) or type(inner) is not dict
                or ATTR_PAYLOAD in inner or ATTR_LIBRARY in inner
                or DEFERRED in getattr(attributes, "__dict__", _NO_DICT))


def deferrable_given(span: Any, scope: str) -> Span | None:
    """:func:`deferrable_span` for an instrumentation span that is not current during its
    call (pymongo's, which a CommandListener keeps): ``span`` when the call can be left on it."""
    st = STATE
    if not st.defer or st.mode is not Mode.RECORD or _CURRENT is None \
            or type(span) is not _SdkSpan:
        return None
    ctx = _CURRENT.get()
    if ctx.get(_SUPPRESS_KEY) or ctx.get(_SUPPRESS_KEY_PLAIN):
        return None
    return span if _free_sdk_span(span, scope) else None


def _public_deferrable(scope: str) -> Span | None:
    """:func:`deferrable_span`'s checks through OTel's public calls."""
    if _suppressed(otel_context.get_current()):
        return None
    span = _dependency_span(scope)
    if span is None or not hasattr(getattr(span, "_attributes", None), "__dict__"):
        return None
    return span


# Response types an app reads as they come (events, lines): the HTTP shims record them as the
# app reads them, not read whole first (an endless stream would never answer).
STREAMED_TYPES = frozenset((
    "text/event-stream", "application/x-ndjson", "application/jsonl", "application/json-seq",
    "application/stream+json", "application/x-json-stream", "multipart/x-mixed-replace",
))


# A response body longer than this, or of no stated length (chunked, or until the connection
# closes: an endless watch or log tail of any type), reaches the app as it comes where the
# client cannot say whether the app streams it (httpx's transport): read whole first, it
# would arrive late, hold the whole download in memory, or never arrive.
READ_WHOLE_UP_TO = 1 << 20


def bodiless(method: str, status: int) -> bool:
    """Whether a response has no body whatever its headers say (RFC 9110 6.4.1): the answer
    to a HEAD, a 1xx, 204 or 304. Read whole, it is empty at once: never a stream."""
    return status < 200 or status == 204 or status == 304 or method == "HEAD"


def streamed_type(content_type: str) -> bool:
    """Whether a Content-Type value is one of :data:`STREAMED_TYPES`."""
    return content_type.partition(";")[0].strip().lower() in STREAMED_TYPES


def hold_end(span: Span) -> Callable[[], None]:
    """Postpone ``span.end()`` until the returned function is called, for a call that goes on
    after its instrumentation ends its span: a response body the app reads as it comes (the
    instrumentation's span ends when the headers are in). The span, and the payload put on
    or left beside it meanwhile, then end with the body, so its exporter and the cassette
    writer see the whole call. Calling the function again does nothing."""
    if not span.is_recording():  # (ending it does nothing; it may be a shared no-op span)
        return lambda: None
    held: list[bool] = []

    def end(end_time: int | None = None) -> None:
        held.append(True)  # (the time of the body's end is the call's end)

    try:
        span.end = end  # type: ignore[method-assign]
    except (AttributeError, TypeError):  # a span class that takes no attribute: it ends as it would
        return lambda: None

    def release() -> None:
        if vars(span).get("end") is end:
            del span.end
            if held:
                span.end()

    return release


# Calls whose streamed response the garbage collector dropped unclosed, finished on a thread
# of their own: a finaliser runs on whatever thread, inside whatever lock, the collection
# started in (the redactor's, a span processor's), where finishing the call could wait for
# that very lock. SimpleQueue.put is safe there.
_LATE: queue.SimpleQueue[tuple[Context, Callable[[], None]]] = queue.SimpleQueue()
_late_thread: tuple[int, threading.Thread] | None = None
_late_lock = threading.Lock()


def ready_late() -> None:
    """Start (once per process) the thread :func:`finish_late` hands calls to; called where a
    streamed response starts, never from a finaliser."""
    global _late_thread
    pid = os.getpid()
    if _late_thread is not None and _late_thread[0] == pid:
        return
    with _late_lock:
        if _late_thread is None or _late_thread[0] != pid:  # (a forked child has no thread)
            thread = threading.Thread(target=_run_late, name="timetracer-late-calls", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # (no thread to be had: never the app's error)
                log.warning("timetracer-otel: cannot start the thread that records dropped "
                            "streamed responses (%s); they will be lost", exc)
                return
            _late_thread = (pid, thread)


def finish_late(ctx: Context, finish: Callable[[], None]) -> None:
    """Run ``finish`` in ``ctx`` (the context of the task that made the call, so its span
    goes to that task's recording) on the late calls' thread. Safe from a finaliser."""
    _LATE.put((ctx, finish))


def drain_late(timeout: float = 2.0) -> bool:
    """Wait until the calls handed to :func:`finish_late` so far are finished (a recording's
    end, so a response the collector dropped just before it still reaches its cassette);
    False if that took longer than ``timeout``."""
    if _late_thread is None or _late_thread[0] != os.getpid():
        return True
    done = threading.Event()
    _LATE.put((Context(), done.set))  # (after the calls before it: one thread, in order)
    return done.wait(timeout)


def _run_late() -> None:
    while True:
        ctx, finish = _LATE.get()
        try:
            ctx.run(finish)
        except Exception:  # never stops the thread
            log.warning("timetracer-otel: a dropped streamed response could not be recorded",
                        exc_info=True)


# The run (a ``record()`` or ``replay()`` block, a decorated call: ``runtime``'s frame) active
# in the current context; ``runtime`` sets it.
RUN: ContextVar[Any] = ContextVar("timetracer_run", default=None)


class OpenStream(Protocol):
    def record_now(self) -> None:
        """Finish the call with what has been read so far (the app may read on), once."""


# Streamed responses still open, by the run they were opened in, so the run's end can record
# them (see end_streams). Weak: a stream the app drops still goes to its finaliser.
_open_streams: weakref.WeakKeyDictionary[OpenStream, Any] = weakref.WeakKeyDictionary()
_streams_lock = threading.Lock()


def stream_opened(stream: OpenStream) -> None:
    """Register a streamed response the app reads as it comes with the current run, if any."""
    run = RUN.get()
    if run is not None:
        with _streams_lock:
            _open_streams[stream] = run


def stream_ended(stream: OpenStream) -> None:
    """Its call is finished (its body ended, broke, was closed): nothing left for its run."""
    with _streams_lock:
        _open_streams.pop(stream, None)


def end_streams(run: Any) -> None:
    """At ``run``'s end, finish the calls of the streams opened in it that are still open
    (read part way, or dropped and waiting for a collection): each is recorded with what was
    read so far, as read part way (``body_open``), in this run's cassette, not lost and not
    left to whichever run is active when it closes. The app may go on reading them. Then
    waits for the calls dropped earlier and being finished late (:func:`drain_late`)."""
    with _streams_lock:
        mine = [s for s, r in list(_open_streams.items()) if r is run]
        for stream in mine:
            del _open_streams[stream]
    for stream in mine:
        try:
            stream.record_now()
        except Exception:  # never the app's
            log.warning("timetracer-otel: a streamed response open at the end of its run could "
                        "not be recorded", exc_info=True)
    drain_late()


def defer(span: Span, library: str, args: Any) -> None:
    """Leave a captured call beside ``span``'s attributes for the writer (see :data:`BUILDERS`)."""
    span._attributes.__dict__[DEFERRED] = (library, args)  # type: ignore[attr-defined]


def built_payload(call: Call, error: Tree, response: Callable[[], Tree]) -> Payload:
    """A builder's result, as :class:`Capture` makes it (the :class:`Payload` whose encoding
    it sets; the writer takes its fields as they are, with no encoding and decoding in
    between): the request packed first (its secrets learned), then the error scrubbed, or
    the response tree (built only then) scrubbed and packed."""
    request = _pack(call.request)
    if error is not None:
        return finished_struct(call, request, "error", _pack(STATE.redactor.scrub(error)))
    try:
        packed = STATE.redactor.response_packed(response())[1]
    except Withheld as exc:
        return withheld_struct(call, request, exc)
    return finished_struct(call, request, "response", packed)


def deferred_call(call: Call, response: Any, error: Tree) -> tuple[Any, ...]:
    """A finished call of a shim that keys it with :class:`Call` trees (the SQL shims), as
    :func:`deferred_builder`'s builder takes it: the call's trees (its request only where it
    is not its identity, which :func:`~timetracer_otel.sql.sql_call` makes one tree), its
    keys where already known (the writer computes them otherwise), the shim's form of the
    response (see ``deferred_builder``) and the error tree. All of it is what msgpack carries
    unchanged, and each part is new to this call or never mutated."""
    request = call.request
    return (call.identity, None if request is call.identity else request, call.shape,
            call.label, call._key, call._shape_key, response, error)


def deferred_builder(library: str, response_tree: Callable[[Any], Tree]) -> Callable[[Any], Payload]:
    """The builder (see :data:`BUILDERS`) of :func:`deferred_call`'s tuples: the Payload a
    :class:`Capture` makes, the response tree made by ``response_tree`` from the shim's form."""
    def build(args: Any) -> Payload:
        identity, request, shape, label, key, shape_key, response, error = args
        call = Call(library, identity if request is None else request, identity, shape, label,
                    key, shape_key)
        return built_payload(call, error, lambda: response_tree(response))

    return build


def deferred_of(span: Any) -> Any:
    """The call a shim left with ``span`` (see :func:`defer`), or None."""
    return getattr(getattr(span, "_attributes", None), DEFERRED, None)


def deferred_payload(deferred: Any) -> Payload:
    """The :class:`Payload` of a deferred call, whose encoding is the ATTR_PAYLOAD bytes a
    capture would have set (raises what its builder raises)."""
    library, args = deferred
    build = BUILDERS.get(library)
    if build is None:  # the writer's process imports the shim when it first needs it
        importlib.import_module(f"timetracer_otel.replay_shims.{library}")
        build = BUILDERS[library]
    return build(args)


def finished_payload(call: Call, request: bytes, outcome: str, packed: bytes) -> bytes:
    """The ATTR_PAYLOAD bytes of a finished call (the encoding of :func:`finished_struct`)."""
    return _pack(finished_struct(call, request, outcome, packed))


def finished_struct(call: Call, request: bytes, outcome: str, packed: bytes) -> Payload:
    """The :class:`Payload` of a finished call: its packed request, and its packed
    ``response`` or ``error`` (left out, and ``truncated`` set, past the payload limit)."""
    truncated = len(packed) > STATE.max_payload_bytes
    kept = None if truncated else packed
    return _payload(call.library, call.key, call.shape_key, call.label, request,
                    kept if outcome == "response" else None,
                    kept if outcome == "error" else None, truncated)


def withheld_struct(call: Call, request: bytes, exc: Withheld) -> Payload:
    """The :class:`Payload` of a call whose response is not stored (see ``Withheld``):
    stored truncated, as one past the payload limit is, and the user told why."""
    log.warning("timetracer-otel: the response of %s is not stored: its %s-encoded body "
                "unpacks to more than %d bytes, too many to redact, and may hold a secret; a "
                "replay of this call is refused (TIMETRACER_MAX_UNPACKED_BYTES raises that "
                "limit).", call.label, exc, STATE.redactor.unpack_limit)
    return _payload(call.library, call.key, call.shape_key, call.label, request, None, None, True)


class Capture:
    """Puts one live call's request and outcome onto its span (and the replay log)."""

    __slots__ = ("call", "own", "request", "span", "start_ns", "token", "tree_of")

    def __init__(self, call: Call, scope: str,
                 tree_of: Callable[[Any], Tree] | None = None, span: Span | None = None) -> None:
        self.call = call
        self.tree_of = tree_of  # the shim's form of an outcome -> its response tree
        # Packed (and its secrets seen by the redactor) before the response is scrubbed.
        self.request = _pack(call.request)
        if span is None:  # (a shim whose instrumentation span is not current names it)
            span = _dependency_span(scope)
        self.own = span is None
        self.span = _tracer.start_span(call.label, kind=SpanKind.CLIENT) if span is None else span
        self.start_ns = time.time_ns()
        self.token: Token[Span | None] | None = None

    # A class, not @contextmanager: a generator per call costs more than the rest of this.
    def __enter__(self) -> Capture:
        if not self.own:  # claimed until the call ends: a call nested in it gets its own span
            self.token = _TAKEN.set(self.span)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            _TAKEN.reset(self.token)
        if self.own:
            self.span.end()

    def ok(self, response: Any) -> None:
        try:
            if self.tree_of is not None:  # (which may withhold it too: botocore's bodies)
                response = self.tree_of(response)
            tree, packed = STATE.redactor.response_packed(response)
        except Withheld as exc:
            self.withhold(exc)
            return
        self._finish("response", tree, packed)

    def withhold(self, exc: Withheld) -> None:
        """The call without its response (see :func:`withheld_struct`)."""
        span = self.span
        if span.is_recording():
            span.set_attribute(ATTR_PAYLOAD, _pack(withheld_struct(self.call, self.request, exc)))
        if STATE.mode is Mode.REPLAY:
            self._append("response", None, True)

    def fail(self, exc: BaseException, attrs: Tree = None) -> None:
        tree = STATE.redactor.scrub(error_tree(exc, attrs))
        self._finish("error", tree, _pack(tree))

    def _finish(self, outcome: str, tree: Tree, packed: bytes) -> None:
        span = self.span
        if span.is_recording():
            # One attribute for the whole call, set as it ends: a call that never ends (a
            # cancelled task) leaves no half-recorded interaction behind.
            span.set_attribute(ATTR_PAYLOAD, finished_payload(self.call, self.request, outcome, packed))
        if STATE.mode is Mode.REPLAY:  # on_miss="record": keep it for the cassette
            truncated = len(packed) > STATE.max_payload_bytes
            self._append(outcome, None if truncated else tree, truncated)

    def _append(self, outcome: str, tree: Tree, truncated: bool) -> None:
        ctx = self.span.get_span_context()
        record = SpanRecord(
            trace_id=f"{ctx.trace_id:032x}",
            span_id=f"{ctx.span_id:016x}",
            name=self.call.label,
            kind="CLIENT",
            start_ns=self.start_ns,
            end_ns=time.time_ns(),
            library=self.call.library,
            key=self.call.key,
            shape=self.call.shape_key,
            label=self.call.label,
            request=self.call.request,
            response=tree if outcome == "response" else None,
            error=tree if outcome == "error" else None,
            truncated=truncated,
        )
        with STATE.lock:
            STATE.appended.append(record)


def capture(call: Call, scope: str) -> Capture:
    """Open (or reuse) the dependency span for ``call``; use as ``with capture(call, SCOPE) as
    cap:`` and end with ``cap.ok(tree)`` or ``cap.fail(exc)``, which put the payload on the
    span (a span of our own ends with the block)."""
    return Capture(call, scope)


class Left:
    """A :class:`Capture`'s counterpart for a call left to the writer (see :func:`defer`):
    ``ok`` and ``fail`` leave the shim's form of the outcome beside the span, and the
    writer's builder (:func:`deferred_builder`) makes the payload a Capture would have set."""

    __slots__ = ("call", "library", "span", "token")

    def __init__(self, call: Call, span: Span, library: str) -> None:
        self.call, self.span, self.library = call, span, library
        self.token: Token[Span | None] | None = None

    def __enter__(self) -> Left:
        self.token = _TAKEN.set(self.span)  # claimed until the call ends, as a capture does
        return self

    def __exit__(self, *exc: object) -> None:
        if self.token is not None:
            _TAKEN.reset(self.token)

    def ok(self, response: Any) -> None:
        defer(self.span, self.library, deferred_call(self.call, response, None))

    def fail(self, exc: BaseException, attrs: Tree = None) -> None:
        defer(self.span, self.library, deferred_call(self.call, None, error_tree(exc, attrs)))


class Deferrable:
    """The recording side of a shim whose calls can be left to the writer (the SQL shims):
    ``with recording(call) as cap:`` gives a :class:`Left` when the call runs in an
    instrumentation span it can be left on (:func:`deferrable_span`), a :class:`Capture`
    otherwise; both end with ``cap.ok(form)`` or ``cap.fail(exc, attrs)``. ``tree_of`` turns
    the shim's form of an outcome into its response tree (the form is the tree itself when
    None); the writer's builder for ``library`` applies it too, so both ways record alike."""

    def __init__(self, library: str, scope: str,
                 tree_of: Callable[[Any], Tree] | None = None) -> None:
        self.library, self.scope, self.tree_of = library, scope, tree_of
        BUILDERS[library] = deferred_builder(library, tree_of or _itself)

    def __call__(self, call: Call) -> Capture | Left:
        span = deferrable_span(self.scope) if STATE.defer else None
        if span is not None:
            return Left(call, span, self.library)
        return Capture(call, self.scope, self.tree_of)


def _itself(tree: Tree) -> Tree:
    return tree


# --- errors ----------------------------------------------------------------------------------


def error_tree(exc: BaseException, attrs: Tree = None) -> Tree:
    """The recorded form of an exception: class path, message, args, shim-specific attrs."""
    cls = type(exc)
    try:
        args = to_tree(exc.args)
        _pack(args)
    except Exception:
        args = None
    return {
        "type": f"{cls.__module__}:{cls.__qualname__}",
        "message": str(exc),
        "args": args,
        "attrs": attrs,
    }


# An async call the app cancelled live (``asyncio.wait_for`` timing out, a task cancelled): kept
# as its CancelledError, so the recording's order stays the live one.
CANCELLED_TYPE = "asyncio.exceptions:CancelledError"


def was_cancelled(span: Any) -> bool:
    """Whether a recorded call was cancelled by the app as it ran (see :func:`answer_cancelled`)."""
    error = span.error
    return isinstance(error, dict) and error.get("type") == CANCELLED_TYPE


async def answer_cancelled(span: Any) -> Any:
    """Replay a call the app cancelled live: it never answers, as live, until the app cancels
    it again (its ``wait_for`` runs out: it raises TimeoutError as live did). Nothing cancels
    it within ten times the time it ran live (five seconds at least): refused, saying so."""
    import asyncio

    live = max(0, span.end_ns - span.start_ns) / 1e9
    await asyncio.sleep(max(5.0, 10 * live))
    raise unsupported(
        f"The recorded call {span.label} was cancelled by the app after {live * 1000:.0f} ms "
        "(a timeout, a task cancelled) and never answered; in this replay nothing cancelled "
        "it. Record it again, or keep the library live.", f"{span.label} (cancelled live)")


ErrorBuilder = Callable[[type[BaseException], Tree], BaseException]


def rebuild_error(tree: Tree, build: ErrorBuilder | None = None, *,
                  fallback: Callable[[Tree], BaseException] | None = None) -> BaseException:
    """Recreate the recorded exception with its own class.

    ``build(cls, tree)`` lets a shim construct classes whose ``__init__`` needs more than the
    args (a request object, a response); otherwise ``cls(*args)`` is tried, then a bare instance.
    A class this process cannot import gives ``fallback(tree)`` (the stand-in the library
    itself would make), else a :class:`ReplayUnsupportedError`, counted as refused.
    """
    module, _, qualname = tree["type"].partition(":")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
        cls: type[BaseException] = obj
    except (ImportError, AttributeError):
        if fallback is not None:
            return fallback(tree)
        return unsupported(
            f"The recorded error {tree['type']} cannot be rebuilt here ({tree['message']}).",
            f"error {tree['type']} (cannot be rebuilt)")
    if build is not None:
        return build(cls, tree)
    args = from_tree(tree["args"]) if tree.get("args") is not None else (tree["message"],)
    return instantiate(cls, *args)


def instantiate(cls: type[BaseException], *args: Any) -> BaseException:
    """``cls(*args)``, or a bare instance carrying ``args`` when its ``__init__`` wants more."""
    try:
        return cls(*args)
    except Exception:
        exc = cls.__new__(cls)
        BaseException.__init__(exc, *args)
        return exc


# --- patching and the shim contract ----------------------------------------------------------


def _is_wrapt_wrapper(obj: Any) -> bool:
    return hasattr(obj, "__wrapped__") and hasattr(obj, "_self_wrapper")


@dataclass
class Patch:
    """One replaced attribute, installed beneath an OTel wrapt wrapper when there is one."""

    owner: Any
    name: str
    original: Any
    replacement: Any
    beneath: Any = None  # the wrapt wrapper we slid under, if any

    @classmethod
    def apply(cls, owner: Any, name: str, make: Callable[[Any], Any]) -> Patch:
        current = owner.__dict__[name] if name in getattr(owner, "__dict__", {}) else getattr(owner, name)
        if _is_wrapt_wrapper(current):
            original = current.__wrapped__
            replacement = make(original)
            current.__wrapped__ = replacement
            return cls(owner, name, original, replacement, beneath=current)
        replacement = make(current)
        setattr(owner, name, replacement)
        return cls(owner, name, current, replacement)

    def undo(self) -> None:
        if self.beneath is not None:
            if self.beneath.__wrapped__ is self.replacement:
                self.beneath.__wrapped__ = self.original
            return
        if getattr(self.owner, self.name, None) is self.replacement:
            setattr(self.owner, self.name, self.original)


class Shim:
    """One library's interception point. Subclasses set the class vars and ``patch()``."""

    library: ClassVar[str]
    requires: ClassVar[str]  # the module that must import for this shim to apply
    scope: ClassVar[str]  # instrumentation scope name prefix of the library's spans
    instrumentor: ClassVar[str | None] = None  # "module:Class" of the OTel instrumentor

    def __init__(self) -> None:
        self.patches: list[Patch] = []

    def patch(self) -> None:
        raise NotImplementedError

    def install(self) -> None:
        if not self.patches:
            self.patch()

    def uninstall(self) -> None:
        for p in reversed(self.patches):
            p.undo()
        self.patches.clear()

    def wrap(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        self.patches.append(Patch.apply(owner, name, make))

    def instrument(self) -> None:
        """Run the library's OTel instrumentor (after :meth:`install`), unless already done."""
        if self.instrumentor is None:
            return
        module, _, cls_name = self.instrumentor.partition(":")
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except ImportError:
            log.debug("no OpenTelemetry instrumentation for %s; timetracer spans only", self.library)
            return
        inst = cls()
        if not inst.is_instrumented_by_opentelemetry:
            inst.instrument(**self.instrument_kwargs())

    def instrument_kwargs(self) -> dict[str, Any]:
        return {}
