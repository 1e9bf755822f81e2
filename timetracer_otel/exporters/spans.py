"""Spans to :class:`SpanRecord`: from the SDK's ReadableSpan here, from OTLP in ``otlp.py``.

Payload attributes (``timetracer.*``, msgpack bytes) move into the record's typed fields;
every other attribute is kept as the instrumentation set it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import msgspec
from opentelemetry.sdk.trace import ReadableSpan

from timetracer_otel.cassette import Event, SpanRecord
from timetracer_otel.replay_shims.base import (
    ATTR_ERROR,
    ATTR_KEY,
    ATTR_LABEL,
    ATTR_LIBRARY,
    ATTR_REQUEST,
    ATTR_RESPONSE,
    ATTR_SHAPE,
    ATTR_TRUNCATED,
    PAYLOAD_ATTRS,
    STATE,
)

log = logging.getLogger("timetracer_otel")
_unpack = msgspec.msgpack.Decoder().decode
_unjson = msgspec.json.Decoder().decode


def decode_payload(value: Any) -> Any:
    """A payload attribute: msgpack bytes in-process and over OTLP protobuf, text if a
    pipeline turned the bytes into a JSON string."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return _unpack(value)
    if isinstance(value, str):
        return _unjson(value)
    raise ValueError(f"unexpected payload attribute of type {type(value).__name__}")


def plain(value: Any) -> Any:
    """Attribute values as msgspec encodes them (tuples become lists)."""
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    return value


def record_from_attributes(
    base: dict[str, Any], attributes: Mapping[str, Any]
) -> SpanRecord:
    """Finish a SpanRecord: split payload attributes from the ordinary ones."""
    attrs = {k: plain(v) for k, v in attributes.items() if k not in PAYLOAD_ATTRS}
    # Instrumentations put URLs, headers and exception text on spans: redacted like payloads.
    attrs, base = STATE.redactor.attributes(attrs), STATE.redactor.span_fields(base)
    rec = SpanRecord(**base, attributes=attrs)
    library = attributes.get(ATTR_LIBRARY)
    if library:
        try:
            rec.library = str(library)
            rec.key = str(attributes.get(ATTR_KEY))
            rec.shape = attributes.get(ATTR_SHAPE)
            rec.label = attributes.get(ATTR_LABEL)
            rec.request = decode_payload(attributes.get(ATTR_REQUEST))
            rec.response = decode_payload(attributes.get(ATTR_RESPONSE))
            rec.error = decode_payload(attributes.get(ATTR_ERROR))
            rec.truncated = bool(attributes.get(ATTR_TRUNCATED, False))
        except (msgspec.DecodeError, ValueError) as exc:
            log.warning("timetracer-otel: unreadable payload on span %s: %s", rec.name, exc)
            rec.library = rec.key = None
    return rec


def record_from_readable(span: ReadableSpan) -> SpanRecord:
    ctx = span.context
    parent = span.parent
    base = {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{parent.span_id:016x}" if parent is not None else None,
        "remote_parent": bool(parent is not None and parent.is_remote),
        "name": span.name,
        "kind": span.kind.name,
        "start_ns": span.start_time or 0,
        "end_ns": span.end_time or 0,
        "status": span.status.status_code.name,
        "status_message": span.status.description,
        "events": [
            Event(name=e.name, time_ns=e.timestamp, attributes={
                k: plain(v) for k, v in (e.attributes or {}).items()
            })
            for e in span.events
        ],
    }
    return record_from_attributes(base, _attributes_of(span))


def _attributes_of(span: ReadableSpan) -> Mapping[str, Any]:
    # The SDK hands out a read-only proxy over BoundedAttributes, whose every access is a
    # Python call; the plain dict beneath is read once, with the public view as fallback.
    inner = getattr(getattr(span, "_attributes", None), "_dict", None)
    return inner if isinstance(inner, dict) else (span.attributes or {})
