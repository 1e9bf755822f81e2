"""The Collector path: an OTLP/HTTP trace receiver that writes the same cassettes in-process
recording writes.

    $ timetracer-otel collect --listen 127.0.0.1:4318 --dir cassettes

``POST /v1/traces`` takes protobuf or JSON, plain or gzip. Spans become :class:`SpanRecord` s
through :func:`~timetracer_otel.exporters.spans.record_from_attributes` (the in-process
exporter's own function) and go to a :class:`CassetteWriter` in ``via="collector"`` mode:
spans of one trace may arrive in several requests and in any order, and a trace is written
once its root has arrived and no span of it came for the quiet period (or at shutdown), one
cassette per local root (see :mod:`~timetracer_otel.exporters.assembler`).

Limits keep memory bounded: the body size and type are checked from the headers before a byte
is read, and a body is read only once one of a fixed number of request slots is free (else
``503`` with ``Retry-After``, the body unread); gzip is cut off at a decompressed-size limit, an
OTLP/JSON body that is not an object of ``resourceSpans`` objects is refused before it is
built, and a full writer queue answers ``503`` with ``Retry-After`` so the Collector retries.

A span a cassette could not hold (payload attributes of the wrong type, an integer beyond its
64 bits, a payload map key that is no string) is rejected on its own: the reply is an OTLP
partial success naming it, and the count is in the shutdown summary.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any

import msgspec
from google.protobuf.message import DecodeError  # type: ignore[import-untyped,unused-ignore]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTracePartialSuccess,
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from timetracer_otel.cassette import Event, SpanRecord, remove_temp_files
from timetracer_otel.config import Settings
from timetracer_otel.errors import ConfigError
from timetracer_otel.exporters.spans import (
    BadSpan,
    Memo,
    record_from_attributes,
    record_from_parts,
    type_phrase,
)
from timetracer_otel.exporters.storage import storage_for
from timetracer_otel.exporters.writer import CassetteWriter
from timetracer_otel.redaction import TooLarge, unpack_streams
from timetracer_otel.replay_shims.base import PAYLOAD_ATTRS
from timetracer_otel.text import printable

log = logging.getLogger("timetracer_otel")

TRACES_PATH = "/v1/traces"
_LENGTH = re.compile(r"[0-9]{1,19}")  # ASCII digits only: not "1_0", "+2", " 2" or "²"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"

# OTLP enums by number, named as the SDK names them in-process (SpanKind.name, StatusCode.name).
_KINDS = ("INTERNAL", "INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER")
_STATUSES = ("UNSET", "OK", "ERROR")
_HAS_IS_REMOTE = 0x100  # SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_IS_REMOTE = 0x200  # SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK


@dataclass(frozen=True, slots=True)
class ReceiverLimits:
    """Bounds on what one receiver holds at once."""

    max_body_bytes: int = 16 * 1024 * 1024  # as sent (compressed)
    max_decompressed_bytes: int = 64 * 1024 * 1024
    max_inflight: int = 8  # requests parsed at the same time
    max_queue: int = 200_000  # spans waiting for the writer thread
    max_open_traces: int = 10_000
    read_timeout: float = 30.0  # seconds a client may take to send its request


class RejectedRequest(Exception):
    """A request answered with a 4xx/5xx; ``reason`` is one sentence for the sender."""

    def __init__(self, status: int, reason: str, *, retry_after: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


# -- OTLP → SpanRecord ------------------------------------------------------------------------


def _pb_value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_pb_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _pb_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


_NESTED = frozenset({"array_value", "kvlist_value"})


def _pb_attributes(kvs: Iterable[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:  # the hot loop of the receiver: scalars inline, nested values recurse
        value = kv.value
        which = value.WhichOneof("value")
        out[kv.key] = (
            None if which is None
            else _pb_value(value) if which in _NESTED
            else getattr(value, which)
        )
    return out


@dataclass(slots=True)
class Converted:
    """What one export request carried: the spans, the rejected ones, and the resource."""

    records: list[SpanRecord]
    rejected: int = 0
    reason: str = ""
    resource: dict[str, Any] | None = None
    # The resource (service.name...) each record came with, one per record: one request may
    # carry spans of several services.
    resources: list[dict[str, Any] | None] = field(default_factory=list)

    def reject(self, name: Any, why: str) -> None:
        """Count one rejected span; the reason (for the sender) names the last one."""
        self.rejected += 1
        self.reason = f"span '{printable(name, 80)}' was rejected: {printable(why, 200)}"


def _base(
    trace_id: bytes, span_id: bytes, parent: bytes, flags: int, name: str, kind: int,
    start: int, end: int, code: int, message: str, events: list[Event],
) -> dict[str, Any]:
    return {
        "trace_id": trace_id.hex(),
        "span_id": span_id.hex(),
        "parent_id": parent.hex() if parent else None,
        "remote_parent": bool(parent) and flags & _IS_REMOTE != 0,
        "name": name,
        "kind": _KINDS[kind] if 0 <= kind < len(_KINDS) else "INTERNAL",
        "start_ns": start,
        "end_ns": end,
        "status": _STATUSES[code] if 0 <= code < len(_STATUSES) else "UNSET",
        "status_message": message or None,
        "events": events,
    }


def _pb_split(kvs: Iterable[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A span's attributes as (ordinary, payload) dicts, in one pass."""
    ordinary: dict[str, Any] = {}
    payload: dict[str, Any] = {}
    for kv in kvs:
        key = kv.key
        value = kv.value
        which = value.WhichOneof("value")
        (payload if key in PAYLOAD_ATTRS else ordinary)[key] = (
            None if which is None
            else _pb_value(value) if which in _NESTED
            else getattr(value, which)
        )
    return ordinary, payload


def convert_protobuf(request: ExportTraceServiceRequest) -> Converted:
    out = Converted([])
    memo: Memo = {}
    for rs in request.resource_spans:
        resource = _pb_attributes(rs.resource.attributes)
        if out.resource is None:
            out.resource = resource
        for ss in rs.scope_spans:
            for span in ss.spans:
                tid, sid, parent = span.trace_id, span.span_id, span.parent_span_id
                if len(tid) != 16 or len(sid) != 8 or len(parent) not in (0, 8):
                    out.reject(span.name, "trace_id must be 16 bytes and span_id 8 bytes")
                    continue
                events = [
                    Event(name=e.name, time_ns=e.time_unix_nano,
                          attributes=_pb_attributes(e.attributes))
                    for e in span.events
                ] if span.events else []
                status = span.status
                base = _base(
                    tid, sid, parent, span.flags, span.name, span.kind,
                    span.start_time_unix_nano, span.end_time_unix_nano,
                    status.code, status.message, events,
                )
                ordinary, payload = _pb_split(span.attributes)
                try:
                    record = record_from_parts(base, ordinary, payload, memo, foreign=True)
                except BadSpan as exc:
                    out.reject(span.name, str(exc))
                    continue
                out.records.append(record)
                out.resources.append(resource)
    return out


def records_from_otlp(request: ExportTraceServiceRequest) -> list[SpanRecord]:
    """The spans of an OTLP export request as cassette records, exactly as the in-process
    exporter makes them.

        >>> records_from_otlp(ExportTraceServiceRequest.FromString(body))[0].library
        'httpx'
    """
    return convert_protobuf(request).records


def _get(obj: Mapping[str, Any], camel: str, snake: str, default: Any = None) -> Any:
    # The OTLP JSON mapping uses lowerCamelCase; protobuf JSON parsers also accept the field names.
    value = obj.get(camel, obj.get(snake, default))
    return default if value is None else value


_INT64 = (-(1 << 63), (1 << 63) - 1, "a 64-bit integer")
_UINT64 = (0, (1 << 64) - 1, "an unsigned 64-bit integer")
_UINT32 = (0, (1 << 32) - 1, "an unsigned 32-bit integer")
_WHOLE = re.compile(r"-?[0-9]{1,20}")  # ASCII digits only (no "1_0", " 1", "+1", "²")
_SPECIAL_DOUBLES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _json_int(value: Any, bounds: tuple[int, int, str], what: str) -> int:
    """An OTLP/JSON integer (a number, or a string of digits as int64 fields are sent),
    within ``bounds``: anything else is a ValueError naming ``what``."""
    lo, hi, kind = bounds
    if type(value) is int:
        n = value
    elif (type(value) is str and _WHOLE.fullmatch(value)) or (
            type(value) is float and value.is_integer()):
        n = int(value)
    elif type(value) is str and value.lstrip("-").isascii() and value.lstrip("-").isdigit():
        n = hi + 1  # more digits than any 64-bit integer has
    else:
        raise ValueError(f"{what} {printable(value, 40)} is not a whole number")
    if not lo <= n <= hi:
        raise ValueError(f"{what} {printable(value, 40)} is not {kind}")
    return n


def _json_value(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError("an attribute value is not an object")
    for key, v in value.items():
        if key in ("stringValue", "string_value"):
            if type(v) is not str:
                raise ValueError(f"a stringValue is {type_phrase(v)}, not a string")
            return v
        if key in ("boolValue", "bool_value"):
            if type(v) is not bool:
                raise ValueError(f"a boolValue is {type_phrase(v)}, not true or false")
            return v
        if key in ("intValue", "int_value"):
            return _json_int(v, _INT64, "intValue")
        if key in ("doubleValue", "double_value"):
            if type(v) is float or type(v) is int:
                try:
                    return float(v)
                except OverflowError:
                    raise ValueError(f"doubleValue {printable(v, 40)} is out of range") from None
            if type(v) is str and v in _SPECIAL_DOUBLES:
                return _SPECIAL_DOUBLES[v]
            raise ValueError(f"doubleValue {printable(v, 40)} is not a number")
        if key in ("bytesValue", "bytes_value"):
            if type(v) is not str:
                raise ValueError(f"a bytesValue is {type_phrase(v)}, not base64 text")
            return base64.b64decode(v, validate=True)
        if key in ("arrayValue", "array_value"):
            return [_json_value(x) for x in (v or {}).get("values") or []]
        if key in ("kvlistValue", "kvlist_value"):
            return _json_attributes((v or {}).get("values") or [])
    return None


def _json_attributes(kvs: Any) -> dict[str, Any]:
    if not isinstance(kvs, list):
        raise ValueError("attributes are not a list")
    return {str(kv["key"]): _json_value(kv.get("value") or {}) for kv in kvs}


def _json_id(text: Any, size: int) -> bytes:
    # OTLP/JSON carries ids as hex, unlike the generic protobuf JSON mapping (base64).
    if not text:
        return b""
    raw = bytes.fromhex(str(text))
    if len(raw) != size:
        raise ValueError(f"an id is {len(raw)} bytes, expected {size}")
    return raw


def _json_enum(value: Any, names: tuple[str, ...], prefix: str) -> int:
    if isinstance(value, str) and not _WHOLE.fullmatch(value):
        name = value.removeprefix(prefix)
        return names.index(name) if name in names else 0
    return _json_int(value or 0, _INT64, prefix.lower().rstrip("_"))


# What makes one span of an OTLP/JSON request unusable (it is rejected, the others kept).
_SPAN_ERRORS = (ValueError, TypeError, KeyError, AttributeError, binascii.Error, OverflowError,
                BadSpan)


def convert_json(doc: Any) -> Converted:
    """The spans of a decoded OTLP/JSON export request. A span with a bad field (an id of the
    wrong length, a value of the wrong type, an integer out of its range, payload attributes
    a cassette cannot hold) is rejected and counted; a request whose structure is wrong raises
    ValueError (or TypeError...)."""
    if not isinstance(doc, dict):
        raise ValueError("the body is not a JSON object")
    out = Converted([])
    memo: Memo = {}
    for rs in _get(doc, "resourceSpans", "resource_spans", []):
        resource = _json_attributes(_get(rs.get("resource") or {}, "attributes", "attributes", []))
        if out.resource is None:
            out.resource = resource
        for ss in _get(rs, "scopeSpans", "scope_spans", []):
            for span in ss.get("spans") or []:
                if not isinstance(span, dict):
                    raise ValueError("a span is not an object")
                try:
                    record = _json_span(span, memo)
                except _SPAN_ERRORS as exc:
                    out.reject(span.get("name", ""), _why(exc))
                    continue
                out.records.append(record)
                out.resources.append(resource)
    return out


def _why(exc: BaseException) -> str:
    """What was wrong with a span, from the exception its conversion raised."""
    if isinstance(exc, KeyError):
        return f"the field {printable(exc.args[0] if exc.args else '', 40)!r} is missing"
    if isinstance(exc, TypeError | AttributeError):
        return f"a field has the wrong type ({exc})"
    return str(exc) or type(exc).__name__


def _json_span(span: dict[str, Any], memo: Memo) -> SpanRecord:
    tid = _json_id(_get(span, "traceId", "trace_id"), 16)
    sid = _json_id(_get(span, "spanId", "span_id"), 8)
    parent = _json_id(_get(span, "parentSpanId", "parent_span_id"), 8)
    if not tid or not sid:
        raise ValueError("traceId and spanId are required")
    status = span.get("status") or {}
    events = [
        Event(name=str(e.get("name", "")),
              time_ns=_json_int(_get(e, "timeUnixNano", "time_unix_nano", 0), _UINT64,
                                "timeUnixNano"),
              attributes=_json_attributes(e.get("attributes") or []))
        for e in span.get("events") or []
    ]
    base = _base(
        tid, sid, parent, _json_int(span.get("flags") or 0, _UINT32, "flags"),
        str(span.get("name", "")),
        _json_enum(span.get("kind"), ("UNSPECIFIED", *_KINDS[1:]), "SPAN_KIND_"),
        _json_int(_get(span, "startTimeUnixNano", "start_time_unix_nano", 0), _UINT64,
                  "startTimeUnixNano"),
        _json_int(_get(span, "endTimeUnixNano", "end_time_unix_nano", 0), _UINT64,
                  "endTimeUnixNano"),
        _json_enum(status.get("code"), _STATUSES, "STATUS_CODE_"),
        str(status.get("message") or ""), events,
    )
    attrs = _json_attributes(span.get("attributes") or [])
    return record_from_attributes(base, attrs, memo, foreign=True)


# -- request handling (no sockets: the HTTP layer below only moves bytes) ----------------------


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _status_body(fmt: str, code: int, message: str) -> bytes:
    """A google.rpc.Status, as the OTLP spec asks for error bodies (hand-encoded: two fields)."""
    if fmt == JSON:
        return msgspec.json.encode({"code": code, "message": message})
    text = message.encode()
    return b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text


def _gunzip(body: bytes, limit: int) -> bytes:
    """Inflate every gzip member of ``body``, refusing to produce more than ``limit`` bytes."""
    try:
        return unpack_streams(lambda: zlib.decompressobj(wbits=31), body, limit)
    except zlib.error as exc:
        raise RejectedRequest(400, f"the gzip body is corrupt ({exc}).") from None
    except TooLarge:
        raise RejectedRequest(413, f"the body inflates past {limit} bytes; send smaller batches.") from None
    except EOFError:
        raise RejectedRequest(400, "the gzip body is truncated.") from None


def _one_line(exc: BaseException) -> str:
    return printable(" ".join(str(exc).split()) or type(exc).__name__, 200)


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


@dataclass(slots=True)
class Reply:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str]


class _JsonRequest(msgspec.Struct, gc=False):
    """The top level of an OTLP/JSON export request, decoded typed: other fields are skipped
    without being built, and ``resourceSpans`` holding anything but objects is refused at its
    first item (``[[], [], ...]`` inflated from a small gzip body would otherwise be built
    into gigabytes of Python lists before any check)."""

    resourceSpans: list[dict[str, Any]] | None = None  # (the OTLP/JSON name)
    resource_spans: list[dict[str, Any]] | None = None


_decode_json_request = msgspec.json.Decoder(_JsonRequest).decode
_OBJECT_START = re.compile(rb"[ \t\r\n]*\{")  # (JSON's whitespace; no copy of the body)


class TraceIntake:
    """Parses export requests and feeds the writer; thread-safe, shared by every handler."""

    def __init__(self, writer: CassetteWriter, limits: ReceiverLimits | None = None) -> None:
        self.writer = writer
        self.limits = limits or ReceiverLimits()
        self._slots = threading.BoundedSemaphore(self.limits.max_inflight)
        self._lock = threading.Lock()
        self.requests = 0
        self.spans = 0
        self.rejected_requests = 0
        self.rejected_spans = 0  # spans of accepted requests refused one by one (partial success)

    def check_length(self, content_length: int) -> None:
        if content_length > self.limits.max_body_bytes:
            raise RejectedRequest(
                413, f"the body is {content_length} bytes, over the {self.limits.max_body_bytes} "
                "byte limit; send smaller batches."
            )

    @staticmethod
    def check_type(content_type: str | None) -> str:
        """The media type of an OTLP request (RejectedRequest 415 for any other)."""
        fmt = media_type(content_type)
        if fmt not in (PROTOBUF, JSON):
            raise RejectedRequest(
                415, f"content type {fmt or 'missing'!r} is not OTLP; use {PROTOBUF} or {JSON}."
            )
        return fmt

    def acquire(self) -> None:
        """Take one of the ``max_inflight`` request slots (RejectedRequest 503 when all are
        taken): the HTTP handler takes it before reading a body, so at most that many bodies
        are held at once."""
        if not self._slots.acquire(blocking=False):
            raise RejectedRequest(503, "the receiver is busy; retry later.", retry_after=1)

    def release(self) -> None:
        self._slots.release()

    def refused(self) -> None:
        """Count a request the HTTP layer refused before its body reached :meth:`handle`."""
        with self._lock:
            self.rejected_requests += 1

    def handle(self, body: bytes, content_type: str | None, content_encoding: str | None,
               *, slot_held: bool = False) -> Reply:
        """One ``POST /v1/traces``: the reply to send back (never raises). ``slot_held``: the
        caller took a slot with :meth:`acquire` (and releases it)."""
        fmt = media_type(content_type)
        reply_fmt = fmt if fmt in (PROTOBUF, JSON) else JSON
        try:
            if slot_held:
                return self._handle(body, fmt, content_encoding)
            self.acquire()
            try:
                return self._handle(body, fmt, content_encoding)
            finally:
                self._slots.release()
        except RejectedRequest as exc:
            return self.reply_for(exc, reply_fmt)

    def reply_for(self, exc: RejectedRequest, reply_fmt: str = JSON) -> Reply:
        """The reply refusing a request (counted)."""
        self.refused()
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else {}
        code = 14 if exc.status in (429, 503) else 3  # UNAVAILABLE / INVALID_ARGUMENT
        return Reply(exc.status, reply_fmt, _status_body(reply_fmt, code, exc.reason), headers)

    def _handle(self, body: bytes, fmt: str, content_encoding: str | None) -> Reply:
        self.check_type(fmt)
        encoding = (content_encoding or "identity").strip().lower()
        if encoding == "gzip":
            body = _gunzip(body, self.limits.max_decompressed_bytes)
        elif encoding not in ("identity", ""):
            raise RejectedRequest(415, f"content encoding {encoding!r} is not supported; use gzip.")
        converted = self._parse(body, fmt)
        records = converted.records
        if self.writer.failing:  # taken now, they could only wait in memory or be lost
            raise RejectedRequest(503, "cassettes cannot be written at the moment (the "
                                  "receiver's log says why); retry later.", retry_after=5)
        if self.writer.backlog() + len(records) > self.limits.max_queue:
            raise RejectedRequest(503, "the cassette writer is behind; retry later.", retry_after=2)
        for record, resource in zip(records, converted.resources, strict=True):
            self.writer.submit(record, resource)
        with self._lock:
            self.requests += 1
            self.spans += len(records)
            self.rejected_spans += converted.rejected
        if converted.rejected:
            log.warning("timetracer-otel: rejected %d span(s) of a request (told the sender): %s",
                        converted.rejected, converted.reason)
        return Reply(200, fmt, self._success(fmt, converted), {})

    @staticmethod
    def _parse(body: bytes, fmt: str) -> Converted:
        if fmt == PROTOBUF:
            try:
                request = ExportTraceServiceRequest.FromString(body)
            except (DecodeError, RuntimeError, ValueError) as exc:
                raise RejectedRequest(
                    400, f"the body is not an OTLP protobuf export request ({exc})."
                ) from None
            if body and not request.resource_spans:
                # Random bytes can parse as unknown fields; an empty export serializes to b"".
                raise RejectedRequest(
                    400, "the body is not an OTLP protobuf export request (no resource spans)."
                )
            try:
                return convert_protobuf(request)
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                raise RejectedRequest(400, f"the export request is invalid ({exc}).") from None
        if not _OBJECT_START.match(body):
            raise RejectedRequest(400, "the body is not an OTLP JSON export request (not a JSON "
                                  "object).")
        try:
            top = _decode_json_request(body)
        except msgspec.ValidationError as exc:
            raise RejectedRequest(
                400, f"the body is not an OTLP JSON export request ({_one_line(exc)})."
            ) from None
        except (msgspec.DecodeError, RecursionError) as exc:  # RecursionError: nested too deeply
            raise RejectedRequest(400, f"the body is not JSON ({_one_line(exc)}).") from None
        spans = top.resourceSpans if top.resourceSpans is not None else top.resource_spans
        doc = {"resourceSpans": spans or []}
        try:
            return convert_json(doc)
        except (ValueError, TypeError, KeyError, AttributeError, binascii.Error, RecursionError,
                OverflowError) as exc:
            raise RejectedRequest(
                400, f"the body is not an OTLP JSON export request ({_one_line(exc)})."
            ) from None

    @staticmethod
    def _success(fmt: str, converted: Converted) -> bytes:
        if fmt == JSON:
            if not converted.rejected:
                return b"{}"
            return msgspec.json.encode({"partialSuccess": {
                "rejectedSpans": str(converted.rejected), "errorMessage": converted.reason}})
        response = ExportTraceServiceResponse()
        if converted.rejected:
            response.partial_success.CopyFrom(ExportTracePartialSuccess(
                rejected_spans=converted.rejected, error_message=converted.reason))
        data: bytes = response.SerializeToString()
        return data


# -- HTTP -------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a Collector sends many requests per connection
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("collect: " + format, *args)

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.intake.limits.read_timeout)

    def _send(self, reply: Reply, *, close: bool = False) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(reply.body)

    def _refuse(self, status: int, reason: str, *, close: bool = False) -> None:
        self._send(Reply(status, "text/plain; charset=utf-8", (reason + "\n").encode(), {}), close=close)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._refuse(200, "ok")
        else:
            self._refuse(405 if self.path == TRACES_PATH else 404, f"use POST {TRACES_PATH}.")

    def do_PUT(self) -> None:
        self._refuse(405, f"use POST {TRACES_PATH}.", close=True)

    _expect_continue = False

    def parse_request(self) -> bool:
        self._expect_continue = False  # (set again by handle_expect_100, for this request)
        return super().parse_request()

    def handle_expect_100(self) -> bool:
        # http.server answers "100 Continue" as it parses the headers; here it is sent only
        # once do_POST has found the request acceptable, so a refused body is never invited.
        self._expect_continue = True
        return True

    def do_POST(self) -> None:
        expect_continue, self._expect_continue = self._expect_continue, False
        if self.path.split("?", 1)[0] != TRACES_PATH:
            self._refuse(404, f"this receiver takes traces only, at POST {TRACES_PATH}.", close=True)
            return
        intake = self.server.intake
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self._refuse(411, "send the body with a Content-Length.", close=True)
            return
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or ()}
        if not lengths:
            self._refuse(411, "send the body with a Content-Length.", close=True)
            return
        if len(lengths) > 1:
            intake.refused()
            self._refuse(400, "the request has conflicting Content-Length headers; send one.",
                         close=True)
            return
        (text,) = lengths
        if not _LENGTH.fullmatch(text):
            intake.refused()
            self._refuse(400, "the Content-Length is not a number of bytes; send a valid one.",
                         close=True)
            return
        length = int(text)
        content_type = self.headers.get("Content-Type")
        try:
            # Everything that can refuse the request before its body is read: its size, its
            # type, and a free slot (so at most max_inflight bodies are in memory at once).
            intake.check_length(length)
            intake.check_type(content_type)
            intake.acquire()
        except RejectedRequest as exc:
            fmt = media_type(content_type)
            self._send(intake.reply_for(exc, fmt if fmt in (PROTOBUF, JSON) else JSON), close=True)
            self._drain()
            return
        try:
            if expect_continue:
                self.send_response_only(100)
                self.end_headers()
            body = self._read_body(length, intake.limits.read_timeout)
            if body is None:
                self.close_connection = True  # the client went away or stalled mid-body
                return
            reply = intake.handle(body, content_type, self.headers.get("Content-Encoding"),
                                  slot_held=True)
        finally:
            intake.release()
        self._send(reply)

    def _read_body(self, length: int, timeout: float) -> bytes | None:
        """The ``length`` bytes of the body, or None when the client closes the connection or
        takes more than ``timeout`` seconds in all to send them."""
        buf = bytearray(length)
        view = memoryview(buf)
        got = 0
        deadline = time.monotonic() + timeout
        try:
            while got < length:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.connection.settimeout(left)
                n = self.rfile.readinto(view[got:got + (1 << 20)])
                if not n:
                    return None
                got += n
        except OSError:  # (socket timeouts included)
            return None
        finally:
            view.release()
        self.connection.settimeout(timeout)
        return bytes(buf)

    def _drain(self) -> None:
        # A lingering close: the refused body is read and thrown away for a moment, so the
        # client sees our answer instead of a reset, without storing any of it.
        self.wfile.flush()
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.5)
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline and self.connection.recv(1 << 16):
                pass
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    intake: TraceIntake


class OTLPReceiver:
    """The OTLP/HTTP receiver: an HTTP server in a thread plus the idle-trace ticker.

        >>> receiver = OTLPReceiver(CassetteWriter("cassettes", via="collector", quiet_ns=2_000_000_000))
        >>> receiver.start(); ...; receiver.stop()   # stop() writes every open trace
    """

    def __init__(
        self,
        writer: CassetteWriter,
        *,
        host: str = "127.0.0.1",
        port: int = 4318,
        limits: ReceiverLimits | None = None,
    ) -> None:
        self.writer = writer
        self.intake = TraceIntake(writer, limits)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_Server", (_Server,), {"address_family": family})
        self.server: _Server = server_class((host, port), _Handler)
        self.server.intake = self.intake
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        host = str(self.server.server_address[0])
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}{TRACES_PATH}"

    def start(self) -> OTLPReceiver:
        serve = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                 name="timetracer-otlp-receiver", daemon=True)
        tick = threading.Thread(target=self._tick, name="timetracer-otlp-idle", daemon=True)
        self._threads = [serve, tick]
        for t in self._threads:
            t.start()
        return self

    def _tick(self) -> None:
        quiet_s = self.writer.assembler.quiet_ns / 1e9
        interval = min(1.0, max(0.05, quiet_s / 4))
        while not self._stopping.wait(interval):
            self.writer.flush_idle()

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop listening, let requests in flight finish, then write every open trace; False
        when the writer had not finished within ``timeout`` seconds. Stopping again only waits
        for the writer (the slots are already held)."""
        if not self._stopping.is_set():
            self._stopping.set()
            self.server.shutdown()
            self.server.server_close()
            deadline = time.monotonic() + min(timeout, 5.0)
            # Handlers in flight hold a slot; wait until all slots are free again.
            for _ in range(self.intake.limits.max_inflight):
                if not self.intake._slots.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    break
        self.writer.close(timeout)
        thread = self.writer._thread
        return thread is None or not thread.is_alive()


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:4318`` for IPv6) → (host, port)."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not _LENGTH.fullmatch(port) or not 0 <= int(port) < 65536:
        raise ConfigError(f"--listen {listen!r} is not HOST:PORT; use e.g. 127.0.0.1:4318.")
    return host, int(port)


MAX_QUIET_PERIOD = 7 * 24 * 3600  # seconds: a trace quiet for a week is long finished


def collect_command(listen: str, directory: str | None, fmt: str | None, quiet_period: float) -> int:
    """``timetracer-otel collect``: serve until SIGTERM/SIGINT, then write every open trace."""
    settings = Settings.from_env()
    limits = ReceiverLimits()
    host, port = parse_listen(listen)
    if not math.isfinite(quiet_period) or not 0 <= quiet_period <= MAX_QUIET_PERIOD:
        raise ConfigError(f"--quiet-period {quiet_period:g} is not a number of seconds from 0 "
                          f"to {MAX_QUIET_PERIOD}; use e.g. --quiet-period 2.")
    location = directory or settings.dir
    storage = storage_for(location)
    storage.check()
    writer = CassetteWriter(
        storage,
        fmt=(fmt or settings.format),  # type: ignore[arg-type]
        via="collector",
        max_queue=limits.max_queue + 10_000,  # the intake refuses (503) before the writer drops
        max_open_traces=limits.max_open_traces,
        quiet_ns=int(quiet_period * 1e9),
        sample_rate=settings.sample_rate,
        errors_only=settings.errors_only,
    )
    try:
        receiver = OTLPReceiver(writer, host=host, port=port, limits=limits)
    except OSError as exc:
        raise ConfigError(
            f"cannot listen on {listen} ({exc.strerror or exc}); choose another --listen."
        ) from None
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # a second signal: give up on the traces still being written
            remove_temp_files()  # (those being written now: no .tmp file is left behind)
            sys.stderr.write("timetracer-otel: stopped before every open trace was written\n")
            os._exit(1)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    receiver.start()
    sys.stderr.write(f"timetracer-otel: receiving OTLP/HTTP traces on {receiver.url}; "
                     f"cassettes go to {location}\n")
    sys.stderr.flush()
    while not stop.wait(0.5):
        pass
    sys.stderr.write("timetracer-otel: stopping; writing every open trace (signal again to abort)\n")
    sys.stderr.flush()
    finished = receiver.stop(timeout=24 * 3600.0)
    stats = writer.stats()
    intake = receiver.intake
    sys.stderr.write(
        f"timetracer-otel: received {intake.spans} spans in {intake.requests} requests "
        f"({intake.rejected_requests} refused"
        + (f", {intake.rejected_spans} span(s) rejected" if intake.rejected_spans else "")
        + f"); wrote {stats['written']} cassette(s), "
        f"dropped {stats['dropped_spans']} span(s)"
        + (f"; {orphans} span(s) whose parent never came were added to their trace's cassette"
           if (orphans := writer.assembler.orphan_spans) else "")
        + (f"; {stats['unwritten']} cassette(s) could not be written, their spans are lost"
           if stats["unwritten"] else "") + "\n"
    )
    # (a cassette written after a failed try is no failure of the run)
    return 0 if finished and stats["errors"] == stats["recovered"] else 1


__all__ = [
    "OTLPReceiver",
    "ReceiverLimits",
    "RejectedRequest",
    "TraceIntake",
    "collect_command",
    "records_from_otlp",
]
