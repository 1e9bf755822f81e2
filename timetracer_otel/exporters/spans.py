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
from opentelemetry.sdk.util import BoundedList
from opentelemetry.trace import SpanContext, SpanKind, StatusCode

from timetracer_otel.cassette import Event, SpanRecord, reject_ext
from timetracer_otel.redaction import Redactor
from timetracer_otel.replay_shims.base import (
    ATTR_ERROR,
    ATTR_KEY,
    ATTR_LABEL,
    ATTR_LIBRARY,
    ATTR_PAYLOAD,
    ATTR_REQUEST,
    ATTR_RESPONSE,
    ATTR_SHAPE,
    ATTR_TRUNCATED,
    DEFERRED,
    PAYLOAD_ATTRS,
    STATE,
    Payload,
    deferred_of,
    deferred_payload,
    span_attributes,
)
from timetracer_otel.text import printable

log = logging.getLogger("timetracer_otel")
# Payloads from other processes (OTLP) are checked as they are decoded: an extension type in
# one would make the whole cassette unreadable, so it makes that span's payload unreadable.
_unpack = msgspec.msgpack.Decoder(ext_hook=reject_ext).decode
_unjson = msgspec.json.Decoder().decode


def _keys_checked(tree: Any) -> Any:
    # TypeError for a map key JSON cannot write (an array, a bool, null).
    return msgspec.to_builtins(tree, builtin_types=(bytes, bytearray, memoryview), str_keys=True)


class BadSpan(Exception):
    """A span from another process (OTLP) whose payload attributes have the wrong types or
    hold values no cassette can store: the receiver rejects it (``str(exc)``: why)."""


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


# Redacted attribute sets by their msgpack bytes, kept while a batch of spans is converted.
Memo = dict[bytes, tuple[Redactor, int, dict[str, Any], bool]]
_pack = msgspec.msgpack.Encoder().encode


# URL attributes the instrumentations set on client spans; the shims' request trees carry the
# same URL (``request["url"]``), already through ``Redactor.url``.
_URL_ATTRS = ("url.full", "http.url")


def record_from_attributes(
    base: dict[str, Any], attributes: Mapping[str, Any], memo: Memo | None = None,
    raw: bool = False, *, foreign: bool = False,
) -> SpanRecord:
    """Finish a SpanRecord: split payload attributes from the ordinary ones."""
    return record_from_parts(base, attributes, attributes, memo, raw, foreign=foreign)


def record_from_parts(
    base: dict[str, Any], attrs: Mapping[str, Any], payloads: Mapping[str, Any],
    memo: Memo | None = None, raw: bool = False, *, foreign: bool = False,
) -> SpanRecord:
    """Finish a SpanRecord from the ordinary attributes (``attrs``; payload attributes in it
    are left out) and the payload attributes (``payloads``: any mapping holding them,
    ordinary ones are not read).

    ``raw``: keep the request, response and error of a :data:`ATTR_PAYLOAD` as the msgpack
    bytes they are (``msgspec.Raw``), for a msgpack cassette that embeds them unchanged. Only
    for payloads this process made; bytes from elsewhere (OTLP) are decoded, which checks them.

    ``foreign``: the span came from another process (OTLP). Payload attributes of the wrong
    type, and payload trees a cassette cannot hold (a map key that is no string, an integer
    beyond 64 bits), raise :class:`BadSpan` instead of being dropped from the record.
    """
    fields = _payload_fields(payloads, raw, base.get("name"), foreign=foreign)
    return SpanRecord(**STATE.redactor.span_fields(base), attributes=_ordinary(attrs, fields[4], memo),
                      **dict(zip(_PAYLOAD_FIELDS, fields, strict=True)))


_unpack_payload = msgspec.msgpack.Decoder(Payload).decode
_unjson_payload = msgspec.json.Decoder(Payload).decode


class _RequestUrl(msgspec.Struct):
    url: Any = None


# A stored request's URL alone: the other fields (an upload body...) are skipped, not built.
_request_url = msgspec.msgpack.Decoder(_RequestUrl, ext_hook=reject_ext).decode


_PAYLOAD_FIELDS = ("library", "key", "shape", "label", "request", "response", "error", "truncated")
_NO_PAYLOAD = (None, None, None, None, None, None, None, False)
PayloadFields = tuple[Any, Any, Any, Any, Any, Any, Any, bool]


def _payload_fields(payloads: Mapping[str, Any], raw: bool, name: Any,
                    deferred: Any = None, foreign: bool = False) -> PayloadFields:
    """The SpanRecord payload fields of a span (in :data:`_PAYLOAD_FIELDS` order): from its
    deferred call (built now, see ``base.defer``), from :data:`ATTR_PAYLOAD`, or from the
    separate attributes of earlier releases; all empty for a span that carries none, or
    (logged) whose payload cannot be read or built. ``foreign``: see :func:`record_from_parts`
    (a payload of the wrong type raises :class:`BadSpan`; one that does not decode is logged
    and left out, as for any span)."""
    try:
        combined = payloads.get(ATTR_PAYLOAD) if deferred is None else deferred_payload(deferred)
    except Exception as exc:  # a builder's failure loses this call, never the trace
        log.warning("timetracer-otel: the recorded call on span %s could not be encoded: %s",
                    printable(name, 200), printable(repr(exc), 200))
        return _NO_PAYLOAD
    try:
        if combined is not None:
            if type(combined) is Payload:  # built here from a deferred call
                p, decode = combined, _unpack
            elif isinstance(combined, bytes | bytearray):
                p, decode = _unpack_payload(combined), _unpack
            elif isinstance(combined, str):  # a pipeline turned the bytes into JSON text
                p, decode = _unjson_payload(combined), _unjson
            else:
                raise _WrongType(f"{ATTR_PAYLOAD} is {type_phrase(combined)}, not bytes")
            if raw and (type(combined) is Payload or type(combined) is bytes):
                # This process's payload in a msgpack cassette: its parts kept as they are.
                return (p.library, p.key, p.shape, p.label, p.request or None,
                        p.response or None, p.error or None, p.truncated)
            request, response, error = (decode(part) if part else None
                                        for part in (p.request, p.response, p.error))
            if foreign:
                _check_trees(ATTR_PAYLOAD, decode is _unjson, request, response, error)
            return (p.library, p.key, p.shape, p.label, request, response, error, p.truncated)
        library = payloads.get(ATTR_LIBRARY)
        if library is None or library == "":
            return _NO_PAYLOAD
        key, shape, label = (payloads.get(ATTR_KEY), payloads.get(ATTR_SHAPE),
                             payloads.get(ATTR_LABEL))
        truncated = payloads.get(ATTR_TRUNCATED, False)
        for attr, value in ((ATTR_LIBRARY, library), (ATTR_KEY, key), (ATTR_SHAPE, shape),
                            (ATTR_LABEL, label)):
            if value is not None and type(value) is not str:
                raise _WrongType(f"{attr} is {type_phrase(value)}, not a string")
        if truncated is not None and type(truncated) is not bool:
            raise _WrongType(f"{ATTR_TRUNCATED} is {type_phrase(truncated)}, not true or false")
        parts = [payloads.get(ATTR_REQUEST), payloads.get(ATTR_RESPONSE), payloads.get(ATTR_ERROR)]
        for attr, value in zip((ATTR_REQUEST, ATTR_RESPONSE, ATTR_ERROR), parts, strict=True):
            if value is not None and not isinstance(value, bytes | bytearray | str):
                raise _WrongType(f"{attr} is {type_phrase(value)}, not bytes")
        request, response, error = (decode_payload(v) for v in parts)
        if foreign:
            for attr, value, tree in zip((ATTR_REQUEST, ATTR_RESPONSE, ATTR_ERROR), parts,
                                         (request, response, error), strict=True):
                _check_trees(attr, isinstance(value, str), tree)
        return (str(library), str(key), shape, label, request, response, error, bool(truncated))
    except _WrongType as exc:
        if foreign:
            raise BadSpan(str(exc)) from None
        log.warning("timetracer-otel: unreadable payload on span %s: %s", printable(name, 200),
                    printable(str(exc), 200))
        return _NO_PAYLOAD
    except (msgspec.DecodeError, ValueError) as exc:
        log.warning("timetracer-otel: unreadable payload on span %s: %s", printable(name, 200),
                    printable(str(exc), 200))
        return _NO_PAYLOAD


def type_phrase(value: Any) -> str:
    """``value``'s type with its article, for a message: "an int", "a list"."""
    name = type(value).__name__
    return ("an " if name[:1] in "aeiou" else "a ") + name


class _WrongType(Exception):
    """A payload attribute of the wrong type (see :func:`_payload_fields`)."""


def _check_trees(attr: str, from_json: bool, *trees: Any) -> None:
    """Refuse (:class:`BadSpan`) payload trees from another process that a cassette cannot
    hold: from JSON text, integers beyond 64 bits (msgpack cannot store them); from msgpack, a
    map key that is no string or number (JSON cannot). One pass in C, no Python walk (for
    msgpack, a copy of the containers that leaves bytes as they are: no base64 of bodies)."""
    for tree in trees:
        if type(tree) is dict or type(tree) is list:
            pass
        elif not from_json or type(tree) is not int:
            continue  # a scalar: no map keys; only an int from JSON can be out of range
        try:
            _pack(tree) if from_json else _keys_checked(tree)
        except OverflowError:
            raise BadSpan(f"{attr} holds an integer beyond 64 bits") from None
        except (TypeError, ValueError, UnicodeEncodeError):
            raise BadSpan(f"{attr} holds a map key that is not a string") from None


def _redact(attrs: dict[str, Any], memo: Memo | None, copy: bool = True) -> dict[str, Any]:
    """``Redactor.attributes(attrs)``; an attribute set seen before in the same batch (client
    spans repeat theirs: method, server address, port...) is redacted once. The key is the
    msgpack encoding, so ``1``, ``1.0``, ``True`` and ``"1"`` never share an entry; an entry is
    used only while the redactor is the same and has learned no secret since (a secret learned
    later must still be scrubbed from this set of attributes)."""
    redactor = STATE.redactor
    if memo is None or not attrs:
        return redactor.attributes(attrs)
    try:
        key = _pack(attrs)
    except (TypeError, ValueError, OverflowError):
        return redactor.attributes(attrs)
    hit = memo.get(key)
    if hit is not None and hit[0] is redactor and hit[1] == redactor.generation:
        done, lists = hit[2], hit[3]
    else:
        # The generation before redacting: a secret learned meanwhile (by this redaction or
        # by an app thread) makes the entry stale, and the next span redacts afresh.
        generation = redactor.generation
        done = redactor.attributes(attrs)
        lists = any(type(v) is list for v in done.values())
        if hit is not None or len(memo) < 256:
            memo[key] = (redactor, generation, done, lists)
    # Every record owns its attributes, list values included (``copy=False``: the caller
    # builds a new dict from this one, so only lists need copying).
    if not lists:
        return dict(done) if copy else done
    return {k: list(v) if isinstance(v, list) else v for k, v in done.items()}


def _url_of(attrs: Mapping[str, Any], request: Any) -> str | None:
    """The URL of the span's own request tree when a URL attribute equals it byte for byte:
    that string goes into the cassette verbatim as ``request["url"]`` anyway (the shim
    tokenized it when it captured the call), so a second redaction of the attribute cannot
    keep anything out of the file; it only costs a URL parse per span. A URL attribute that
    differs in any byte (as one from another process's instrumentation may) is redacted."""
    url: Any = None
    if type(request) is msgspec.Raw:
        if _URL_ATTRS[0] in attrs or _URL_ATTRS[1] in attrs:
            try:
                url = _request_url(request).url
            except (msgspec.DecodeError, ValueError):  # not a map: no URL of its own
                url = None
    elif type(request) is dict:
        url = request.get("url")
    if type(url) is not str or (attrs.get(_URL_ATTRS[0]) != url and attrs.get(_URL_ATTRS[1]) != url):
        return None
    return url


# Enum .name is a descriptor call each time, and hashing a member a Python call too: the
# names, read once, by the members' identity (members are singletons).
_KIND_NAMES = {id(k): k.name for k in SpanKind}
_STATUS_NAMES = {id(c): c.name for c in StatusCode}

# What the writer reads of a finished SDK span: trace id, span id, parent span id (or None),
# parent is remote, name, kind, start ns, end ns, status, events, attributes (the dict beneath
# the SDK's proxy), resource, deferred call (see base.defer) or None.
Snapshot = tuple[int, int, "int | None", bool, str, SpanKind, int, int, Any, tuple[Any, ...],
                 Mapping[str, Any], Any, Any]


def snapshot(span: ReadableSpan) -> Snapshot:
    """What the writer needs of ``span``, read as it ends (a plain tuple), so the span's own
    objects (locks, bounded lists, the attribute proxy, its context) are freed at once
    instead of waiting in the writer's queue.

    Spans still waiting when the collector runs are promoted to an older generation, and the
    app pays for them in full collections: with the span itself queued, scenario 1b's record
    blocks saw 13-14 full collections per 42 blocks; with this tuple, 3 (its GC rows)."""
    try:  # the SDK's ReadableSpan: its fields, without a property call for each
        ctx, parent, events = span._context, span._parent, span._events
        # SpanContext is a tuple (trace id, span id, is remote, ...); its properties read the
        # same items through a Python call each.
        if type(ctx) is SpanContext and type(events) is BoundedList and (
                parent is None or type(parent) is SpanContext):
            dq = events._dq  # type: ignore[attr-defined]
            return (ctx[0], ctx[1], None if parent is None else parent[1],
                    parent is not None and parent[2], span._name, span._kind,
                    span._start_time or 0, span._end_time or 0, span._status,
                    tuple(dq) if dq else (), span._attributes._dict,  # type: ignore[union-attr]
                    span._resource, span._attributes.__dict__.get(DEFERRED))
    except AttributeError:
        pass
    return _public_snapshot(span)


def _public_snapshot(span: ReadableSpan) -> Snapshot:
    """:func:`snapshot` of a span from another implementation, through its public view."""
    ctx, parent = span.context, span.parent
    if ctx is None:
        raise ValueError(f"span {span.name!r} has no span context")
    return (ctx.trace_id, ctx.span_id, None if parent is None else parent.span_id,
            parent is not None and parent.is_remote, span.name, span.kind,
            span.start_time or 0, span.end_time or 0, span.status, tuple(span.events),
            span_attributes(span), span.resource, deferred_of(span))


def record_from_snapshot(snap: Snapshot, memo: Memo | None = None, raw: bool = False) -> SpanRecord:
    """The SpanRecord of a :func:`snapshot`: as :func:`record_from_parts` makes it, without
    the intermediate dicts (the writer's per-span path)."""
    trace_id, span_id, parent_id, remote, name, kind, start, end, status, events, attributes, _, \
        deferred = snap
    library, key, shape, label, request, response, error, truncated = _payload_fields(
        attributes, raw, name, deferred)
    message = status.description
    recorded_events = [
        Event(name=e.name, time_ns=e.timestamp,
              attributes={k: plain(v) for k, v in (e.attributes or {}).items()})
        for e in events
    ] if events else []
    if message is not None or recorded_events:
        fields = STATE.redactor.span_fields({"status_message": message, "events": recorded_events})
        message, recorded_events = fields["status_message"], fields["events"]
    code = status.status_code
    return SpanRecord(
        trace_id=f"{trace_id:032x}", span_id=f"{span_id:016x}",
        parent_id=None if parent_id is None else f"{parent_id:016x}", remote_parent=remote,
        name=name, kind=_KIND_NAMES.get(id(kind)) or kind.name, start_ns=start, end_ns=end,
        status=_STATUS_NAMES.get(id(code)) or code.name, status_message=message,
        attributes=_ordinary(attributes, request, memo), events=recorded_events,
        library=library, key=key, shape=shape, label=label, request=request,
        response=response, error=error, truncated=truncated,
    )


def _ordinary(attributes: Mapping[str, Any], request: Any, memo: Memo | None) -> dict[str, Any]:
    """A span's attributes for its record: the payload attributes left out, sequences as
    lists, redacted, in the span's order; a URL attribute that is the request's own URL (see
    :func:`_url_of`) is kept as it is."""
    url = _url_of(attributes, request)
    if url is None:
        return _redact({k: plain(v) if type(v) is tuple or type(v) is list else v
                        for k, v in attributes.items() if k not in PAYLOAD_ATTRS}, memo)
    rest = _redact({k: plain(v) if type(v) is tuple or type(v) is list else v
                    for k, v in attributes.items()
                    if k not in PAYLOAD_ATTRS and (k not in _URL_ATTRS or v != url)}, memo, copy=False)
    return {k: rest.get(k, url) for k in attributes if k not in PAYLOAD_ATTRS}


def record_from_readable(
    span: ReadableSpan, memo: Memo | None = None, raw: bool = False
) -> SpanRecord:
    return record_from_snapshot(snapshot(span), memo, raw)
