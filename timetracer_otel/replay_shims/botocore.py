"""botocore (boto3): every API call, beneath the OTel botocore span.

The OTel instrumentation wraps ``BaseClient._make_api_call``; this shim sits beneath that
wrapper (the span is current), where the call is still its operation and parameters: that is
the key. Below it, ``Endpoint._send`` is where botocore hands a signed request to its HTTP
session: record keeps each raw HTTP response it returned (status, headers, body bytes; a
streamed body of up to 1 MiB is read once and handed on from memory, a larger one or an event
stream kept as the app reads it: see :class:`_LiveRaw`) or the error it raised, in order,
retries included; replay answers those sends from the recording, so botocore itself parses
them again: ``StreamingBody`` for S3 objects, datetimes, ``ClientError`` with the same code
and message, checksums validated, retries and waiters as they ran. Replay signs no request, so
it needs no credentials, and opens no socket; a presigned URL or POST is built locally, with
placeholder credentials when none resolve (only those: a miss sent to AWS without credentials
raises ``NoCredentialsError`` as live does).

The key is the service, the operation and its parameters (bytes over 1 KiB by size and hash,
an upload stream as ``<stream>``, a boto3 condition by its expression); never the endpoint or
region. Secrets never reach the cassette: parameters the service model marks ``sensitive``
(and those named like secrets) become redaction tokens; the values of sensitive members of
the parsed response (STS and IAM keys, tokens, SecretString...) are learned and replaced in
the stored bodies' own bytes (never re-serialized), with the body's checksum headers dropped
and its length fixed. The app's data (an S3 object, DynamoDB items, an uploaded JSON object
in the key) gets the built-in secret field names too, as MongoDB documents do, and the user's
own rules, replaced in its own bytes (content-encoded ones inside); under a built-in name a
DynamoDB number, binary or boolean stays as it is; so does the app's JSON carried inside a
string (an SQS message body, a Kinesis record as base64 text). Replay also keeps botocore from
asking the instance metadata service for credentials or a region.

Under a timetracer writer the sends are left beside the span as they came, and the writer
(its process, where it has one) redacts them and makes the payload (``base.Deferrable``); the
request path only learns the secrets of the response's headers and parsed result, so the
payloads other shims make in the app are scrubbed of them.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import fnmatch
import functools
import hashlib
import io
import json
import logging
import re
import struct
import threading
import types
from collections.abc import Callable, Iterator
from contextvars import ContextVar, copy_context
from typing import Any

import botocore.client
import botocore.credentials
import botocore.endpoint
import botocore.exceptions
import botocore.signers
import botocore.utils
from botocore.awsrequest import AWSResponse
from opentelemetry import context as otel_context
from opentelemetry.trace import Span

from timetracer_otel.codec import Tree, as_bytes, from_tree, to_tree
from timetracer_otel.config import Mode
from timetracer_otel.index import Match
from timetracer_otel.keys import Call
from timetracer_otel.redaction import SECRET_FIELDS, TooLarge, _NameSet, unpacked_codings
from timetracer_otel.replay_shims.base import (
    LIVE,
    READ_WHOLE_UP_TO,
    STATE,
    Deferrable,
    Shim,
    _suppressed,
    decide,
    error_tree,
    finish_late,
    hold_end,
    instantiate,
    ready_late,
    rebuild_error,
    stopped_reading,
    stream_ended,
    stream_opened,
    streamed_type,
    unsupported,
)

LIBRARY = "botocore"
SCOPE = "opentelemetry.instrumentation.botocore"
_DIGEST_OVER = 1024
log = logging.getLogger("timetracer_otel")


# --- the request -----------------------------------------------------------------------------


def _param(value: Any) -> Any:
    """A parameter as the key and the stored request hold it: the same in every process."""
    if isinstance(value, dict):
        return {str(k): _param(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_param(v) for v in value]
    if isinstance(value, str) and len(value) > _DIGEST_OVER:
        value = value.encode()
    if isinstance(value, bytes | bytearray):
        if len(value) <= _DIGEST_OVER:
            return bytes(value)
        return f"<{len(value)} bytes, blake2b {hashlib.blake2b(value, digest_size=16).hexdigest()}>"
    if hasattr(value, "read"):  # an upload stream: reading it here would consume it
        return "<stream>"
    expression = getattr(value, "get_expression", None)
    if callable(expression):  # a boto3 DynamoDB condition: what it says, not where it lives
        return {"$condition": _param(expression())}
    if hasattr(value, "name") and type(value).__module__.startswith("boto3."):
        return {"$attribute": str(value.name)}  # boto3's Key("id") / Attr("price")
    tree = to_tree(value)
    if isinstance(tree, dict) and "$unsupported" in tree:  # its repr may hold an address
        return f"<{type(value).__module__}.{type(value).__qualname__}>"
    return tree


# Members that hold credentials whether or not the service model marks them sensitive (STS
# marks SecretAccessKey, not SessionToken), compared in lower case.
_SECRET_MEMBERS = frozenset({
    "sessiontoken", "secretaccesskey", "accesstoken", "refreshtoken", "idtoken", "password",
    "secretstring", "secretbinary", "privatekey", "clientsecret", "authorizationtoken",
})


def _sensitive(shape: Any) -> bool:
    return bool(shape.metadata.get("sensitive"))


def _children(shape: Any) -> list[tuple[str, Any]]:
    kind = shape.type_name
    if kind == "structure":
        return list(shape.members.items())
    if kind == "list":
        return [("", shape.member)]
    if kind == "map":
        return [("", shape.value)]
    return []


# (the service model's shape resolver, shape name) -> whether any part below the shape holds
# a secret. Most operations hold none, and their values are then not walked. By name: member
# shapes are built anew as they are read, and recursive shapes (DynamoDB's AttributeValue)
# would never end by identity.
_HOLDS_SECRETS: dict[tuple[int, str], tuple[Any, bool]] = {}


def _holds_secrets(shape: Any, seen: frozenset[str] = frozenset()) -> bool:
    resolver = getattr(shape, "_shape_resolver", None)
    key = (id(resolver), shape.name)
    known = _HOLDS_SECRETS.get(key)
    if known is not None and known[0] is resolver:
        return known[1]
    if shape.name in seen:  # a recursive shape: decided where it was first met
        return False
    below = seen | {shape.name}
    found = any(_sensitive(child) or name.lower() in _SECRET_MEMBERS
                or _holds_secrets(child, below) for name, child in _children(shape))
    if not seen:  # (only a whole answer is kept; one cut at a cycle may be partial)
        _HOLDS_SECRETS[key] = (resolver, found)
    return found


def _token(value: Any) -> str:
    r = STATE.redactor
    return r.token(value) if isinstance(value, str | bytes) else r.token(repr(value))


def _without_secrets(shape: Any, value: Any) -> Any:
    """``value`` with the parts the service model marks sensitive, and structure members named
    like credentials, replaced by redaction tokens (which also teaches the redactor their
    values); ``value`` itself when ``shape`` holds none."""
    if shape is None or value is None:
        return value
    if _sensitive(shape):
        return _token(value)
    if not _holds_secrets(shape):
        return value
    kind = shape.type_name
    if kind == "structure" and isinstance(value, dict):
        members = shape.members
        return {k: v if k not in members or v is None
                else _token(v) if str(k).lower() in _SECRET_MEMBERS
                else _without_secrets(members[k], v)
                for k, v in value.items()}
    if kind == "list" and isinstance(value, list | tuple):
        return [_without_secrets(shape.member, v) for v in value]
    if kind == "map" and isinstance(value, dict):
        return {k: _without_secrets(shape.value, v) for k, v in value.items()}
    return value


def _api_call(client: Any, operation: str, params: dict[str, Any]) -> Call:
    service = client.meta.service_model.service_name
    try:
        shape = client.meta.service_model.operation_model(operation).input_shape
    except Exception:  # an operation the model lacks: botocore raises its own error later
        shape = None
    params = _without_secrets(shape, params)
    r = STATE.redactor
    tree = _param(params)
    # Items and keys: DynamoDB's types kept (see _data_doc); an uploaded JSON object (S3):
    # as its answer will be.
    tree = _expression_values(r, _data_doc(r, tree, typed=True)) if service in _DATA_SERVICES \
        else _json_blobs(r, r.document(tree))
    tree = _embedded(r, tree)  # (a message body that is JSON text, a blob as base64 text)
    tree = r.scrub(tree)  # (secrets seen earlier, anywhere)
    request = {"service": service, "operation": operation, "params": tree}
    shape = {"service": service, "operation": operation, "params": sorted(tree)}
    named = [f"{k}={v}" for k, v in tree.items() if isinstance(v, str) and len(v) <= 60][:2]
    label = " ".join([f"{service}.{operation}", *named])
    return Call(LIBRARY, request, request, shape, label if len(label) <= 120 else label[:117] + "...")


# --- the HTTP exchanges of one call ------------------------------------------------------------


class _NoSocket:
    def settimeout(self, timeout: float | None) -> None:
        pass


# What ``StreamingBody.set_socket_timeout`` reaches through (``_fp.fp.raw._sock``): a socket
# whose timeout changes nothing, as a body read from memory waits on none.
_NO_FP = types.SimpleNamespace(fp=types.SimpleNamespace(raw=types.SimpleNamespace(_sock=_NoSocket())))


def _decoder(encoding: str) -> Any:
    """urllib3's decoder for a Content-Encoding, as its response picks one (None where it
    decodes nothing: no coding, or none it knows)."""
    from urllib3.response import HTTPResponse, _get_decoder

    coding = encoding.strip().lower()
    known = HTTPResponse.CONTENT_DECODERS
    if coding in known or ("," in coding and any(c.strip() in known for c in coding.split(","))):
        with contextlib.suppress(Exception):
            return _get_decoder(coding)
    return None


def _lines(chunks: Iterator[bytes], encoding: str) -> Iterator[bytes]:
    """urllib3's ``HTTPResponse.__iter__`` over a body's raw chunks: decoded as it decodes
    them (the only read path that does, botocore reading raw), split after each newline."""
    decoder = _decoder(encoding)

    def pieces() -> Iterator[bytes]:
        for chunk in chunks:
            yield decoder.decompress(chunk) if decoder is not None else chunk
        flush = getattr(decoder, "flush", None)
        if flush is not None:
            yield flush()

    buffer: list[bytes] = []
    for chunk in pieces():
        if b"\n" in chunk:
            parts = chunk.split(b"\n")
            yield b"".join(buffer) + parts[0] + b"\n"
            for part in parts[1:-1]:
                yield part + b"\n"
            buffer = [parts[-1]] if parts[-1] else []
        elif chunk:
            buffer.append(chunk)
    if buffer:
        yield b"".join(buffer)


def _read_into(self: Any, b: Any) -> int:
    """``readinto`` by ``self.read``: the reads that keep (``_LiveRaw``) or refuse past the
    kept bytes (``_CutBody``) apply to it too."""
    data = self.read(len(b))
    b[:len(data)] = data
    return len(data)


class _Body(io.BytesIO):
    """A response body botocore reads from memory as it would from urllib3 (of this
    Content-Encoding, which only iteration decodes, as urllib3's does)."""

    _fp = _NO_FP

    def __init__(self, body: bytes = b"", encoding: str = "") -> None:
        super().__init__(body)
        self._encoding = encoding

    def stream(self, amt: int = 64 * 1024, decode_content: bool | None = None) -> Iterator[bytes]:
        while chunk := self.read(amt):
            yield chunk

    def __iter__(self) -> Iterator[bytes]:
        return _lines(self.stream(), self._encoding)

    def readlines(self, hint: int | None = -1, /) -> list[bytes]:
        return list(self)  # (as io.IOBase's, by iteration: decoded, as urllib3's are)


class _CutBody(_Body):
    """A replayed streamed body the recording holds only part of: the bytes the app read
    while recording, then, where the live body went on, the error it broke off with or a
    clear refusal to make up the rest (the app stopped reading there, or the run ended).
    Every way of reading it (``read()`` whole, lines, iteration) stops there alike."""

    def __init__(self, body: bytes, error: Tree, label: str, truncated: bool = False,
                 encoding: str = "") -> None:
        super().__init__(body, encoding)
        self._error, self._label, self._truncated = error, label, truncated

    def _refuse(self) -> BaseException:
        if self._error is not None:
            return rebuild_error(self._error, _build_error)
        if self._truncated:
            return unsupported(
                f"{self._label}: its streamed body was longer than the payload limit, and only "
                "its start is stored; raise TIMETRACER_MAX_PAYLOAD_BYTES and record again.",
                f"{self._label} (stored truncated)")
        return stopped_reading(self._label)  # (counted in the replay's report)

    def read(self, size: int | None = -1, /) -> bytes:
        if size is None or size < 0:  # the rest, which the recording does not hold
            raise self._refuse()
        data = super().read(size)
        if data or size == 0:
            return data
        raise self._refuse()

    def read1(self, size: int | None = -1, /) -> bytes:
        if size is None or size < 0:  # what has come: the kept bytes left, if any
            if data := super().read():
                return data
            raise self._refuse()
        return self.read(size)

    readinto = _read_into

    def readline(self, size: int | None = -1, /) -> bytes:
        line = super().readline(size)
        whole = line.endswith(b"\n") or (size is not None and 0 <= size == len(line))
        if whole:
            return line
        raise self._refuse()  # (the line went on past the kept bytes, or none was left)

    def __next__(self) -> bytes:
        return self.readline()

    def stream(self, amt: int = 64 * 1024, decode_content: bool | None = None) -> Iterator[bytes]:
        while True:
            yield self.read(amt)


def _read_whole(response: AWSResponse, events: bool) -> bool:
    """Whether a streamed answer is read whole while recording, as the HTTP shims read one:
    a stated length up to ``READ_WHOLE_UP_TO`` and no streamed type. A longer one, one of no
    stated length, or an event stream (``events``: the operation's model says so, whatever
    its Content-Type) reaches the app as it comes, kept as it reads it (see _LiveRaw)."""
    headers = response.headers
    if events or streamed_type(str(headers.get("content-type", ""))):
        return False
    length = str(headers.get("content-length", ""))
    return length.isdigit() and int(length) <= READ_WHOLE_UP_TO


class _LiveRaw:
    """The live urllib3 response of a streamed answer, read only as the app (botocore's
    ``StreamingBody`` or ``EventStream``, or the app itself through ``with body as f``) reads
    it: ``stream()`` as urllib3 streams it (a chunked body chunk by chunk, as it arrives), and
    every read kept, up to the payload limit (one byte past it, so the call is stored
    truncated). The send is finished once, with what was read: at the body's end, when it
    breaks (raised as urllib3 raised it), when the app closes it before its end (the body is
    then ``open``), when it is dropped unclosed (on ``base``'s late calls' thread), or when
    the run it was opened in ends first (read so far, ``open``; the app may read on). Other
    attributes are the live response's own."""

    def __init__(self, live: Any, send: Tree) -> None:
        self._live = live
        self._send = send
        self._pending = b""  # read from the live body (and kept) for a line, not yet given
        self._kept = bytearray()
        self._room = STATE.max_payload_bytes
        self._lock = threading.Lock()
        self._finished = False
        self._ended = False  # the live body gave its end
        self._last = False
        self._then: Callable[[bool], None] | None = None
        self._context = copy_context()
        ready_late()
        stream_opened(self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live, name)

    def _keep(self, data: bytes) -> bytes:
        room = self._room
        if data and room >= 0 and not self._finished:
            self._kept += data if len(data) <= room else data[:room + 1]
            self._room = room - len(data)
        return data

    def _read(self, amt: int | None = None, *args: Any, one: bool = False, **kwargs: Any) -> bytes:
        """A read of the live body (``one``: ``read1``, what has come, up to ``amt``), kept."""
        live = self._live
        try:
            read = live.read1 if one and hasattr(live, "read1") else live.read
            data = self._keep(read(amt, *args, **kwargs))
        except Exception as exc:
            self._finish(exc)
            raise
        if ((amt is None or amt < 0) and not one) or (not data and amt != 0):
            self._ended = True
            self._finish()
        return data

    def read(self, amt: int | None = None, *args: Any, **kwargs: Any) -> bytes:
        """As urllib3 reads: ``amt`` bytes unless the body ends first (those read ahead for
        a line first)."""
        pending = self._pending
        if not pending:
            return self._read(amt, *args, **kwargs)
        if amt is not None and 0 <= amt <= len(pending):
            self._pending = pending[amt:]
            return pending[:amt]
        self._pending = b""
        rest = None if amt is None or amt < 0 else amt - len(pending)
        return pending + self._read(rest, *args, **kwargs)

    def read1(self, amt: int | None = None, *args: Any, **kwargs: Any) -> bytes:
        """What has come, up to ``amt``: the bytes read ahead for a line, else the live body's."""
        pending = self._pending
        if not pending:
            return self._read(amt, *args, one=True, **kwargs)
        end = len(pending) if amt is None or amt < 0 else amt
        self._pending = pending[end:]
        return pending[:end]

    def tell(self) -> int:
        """Bytes given to the app (the live count, less those read ahead for a line)."""
        return int(self._live.tell()) - len(self._pending)

    readinto = _read_into

    def readline(self, limit: int | None = -1) -> bytes:
        if limit is None or limit < 0:
            limit = -1
        whole = limit < 0
        while (at := self._pending.find(b"\n")) < 0 and (whole or len(self._pending) < limit):
            more = self._read(64 * 1024, one=True)  # (what has come: kept, given out by line)
            if not more:
                break
            self._pending += more
        end = len(self._pending) if at < 0 else at + 1
        if not whole:
            end = min(end, limit)
        line, self._pending = self._pending[:end], self._pending[end:]
        return line

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return list(self)  # (as io.IOBase's, by iteration: decoded, as urllib3's are)

    def __iter__(self) -> Iterator[bytes]:
        """As urllib3's: chunks as they come, decoded by their Content-Encoding, as lines."""
        return _lines(self.stream(decode_content=False),
                      str(self._live.headers.get("content-encoding", "")))

    def __enter__(self) -> _LiveRaw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def data(self) -> bytes:
        return self.read()

    def stream(self, amt: int = 64 * 1024, decode_content: bool | None = None) -> Iterator[bytes]:
        while self._pending:  # (read for a line, not given yet)
            piece, self._pending = self._pending[:amt], self._pending[amt:]
            yield piece
        chunks = self._live.stream(amt, decode_content=decode_content)
        while True:
            try:
                data = next(chunks, None)
            except Exception as exc:
                self._finish(exc)
                raise
            if data is None:
                self._ended = True
                self._finish()
                return
            yield self._keep(data)

    def close(self) -> None:
        ended = self._at_end()  # (before the close, which closes its file too)
        try:
            self._live.close()
        finally:
            self._finish(ended=ended)

    def __del__(self) -> None:
        if not self._finished:  # dropped unclosed: finished on another thread
            finish_late(self._context, functools.partial(
                self._finish, ended=self._at_end(by_file=False), last=True))

    def record_now(self) -> None:
        """Its run ends with the body still open: recorded as read so far (``base.end_streams``)."""
        self._finish(last=True)

    def then(self, done: Callable[[bool], None]) -> None:
        """Run ``done`` once the send is finished (now, if it is), with whether nothing will
        end its call's span after it (``_finisher``)."""
        with self._lock:
            if not self._finished:
                self._then = done
                return
            last = self._last
        done(last)

    def _at_end(self, by_file: bool = True) -> bool:
        """Whether the live body was read to its end: it gave its end, or nothing of its
        stated length is left, or (``by_file``, while the app still holds it: not for one
        dropped, which the collector may have closed) http.client closed its file at the
        end of a body read by size."""
        if self._ended or getattr(self._live, "length_remaining", None) == 0:
            return True
        if not by_file:
            return False
        fp = getattr(self._live, "_fp", None)
        return fp is None or bool(getattr(fp, "isclosed", lambda: True)())

    def _finish(self, exc: BaseException | None = None, ended: bool | None = None,
                last: bool = False) -> None:
        """Finish the send: at the body's end or close (the instrumentation ends the span
        then), or ``last`` (the run ended, the body was dropped, it broke): then nothing may
        come to end the span (OTel's Bedrock extension ends its span only at a stream's end
        or close), so :func:`_finisher` ends it."""
        last = last or exc is not None
        with self._lock:
            if self._finished:
                return
            self._finished = True
            self._last = last
            done, self._then = self._then, None
            send = self._send
            send["body"] = bytes(self._kept)
            if self._room < 0:  # (past the payload limit: what came after was not kept)
                send["body_truncated"] = True
            if exc is not None:
                send["body_error"] = _body_error_of(exc)
            elif not (self._at_end() if ended is None else ended):
                send["body_open"] = True
        stream_ended(self)
        if done is not None:
            try:
                done(last)
            except Exception:  # never the app's
                log.warning("timetracer-otel: a streamed botocore response could not be "
                            "recorded", exc_info=True)


def _body_error_of(exc: BaseException) -> Tree:
    """The error a streamed body broke off with, as a replay can raise it again, so botocore
    wraps it as it wrapped the live one: as it is where its arguments are plain values
    (urllib3's ``ReadTimeoutError``: ``ReadTimeoutError`` to the app); urllib3's
    ``ProtocolError`` around an ``http.client.IncompleteRead`` (``ResponseStreamingError``)
    with its message in place of the object."""
    if all(isinstance(a, _PLAIN) for a in exc.args):
        return _error_of(exc)
    try:
        plain = type(exc)(str(exc))
    except Exception:  # a class that takes no message
        plain = Exception(str(exc))
    return _error_of(plain)


class _Exchange:
    """The sends of the API call running in this context: recorded as they happen, or the
    recorded ones answered in order."""

    __slots__ = ("events", "label", "next", "replay", "sends", "stream")

    def __init__(self, replay: list[Tree] | None = None, label: str = "",
                 events: bool = False) -> None:
        self.sends: list[Tree] = []
        self.replay = replay
        self.next = 0
        self.label = label
        self.events = events  # the operation answers with an event stream
        self.stream: _LiveRaw | None = None  # a streamed answer the app is still reading

    def answer(self, url: str) -> AWSResponse:
        assert self.replay is not None
        if self.next >= len(self.replay):
            from timetracer_otel.errors import ReplayMissError

            raise ReplayMissError("botocore sent more requests for this call than the recording "
                                  "holds (a retry the live run did not make); record it again.",
                                  library=LIBRARY)
        send = self.replay[self.next]
        self.next += 1
        if send.get("error") is not None:
            raise rebuild_error(send["error"], _build_error)
        body = as_bytes(send["body"])
        if send.get("messages") is not None:  # an event stream, kept unframed (see _unframed)
            body = _framed(send["messages"]) + body
        headers = send["headers"]
        truncated = bool(send.get("body_truncated"))
        cut = send.get("body_open") or send.get("body_error") is not None or truncated
        if body and not cut:  # (a body scrubbed after it was stored: its length is what botocore reports)
            headers = _length_fixed(headers, body)
        encoding = next((str(v) for k, v in headers if str(k).lower() == "content-encoding"), "")
        raw = _CutBody(body, send.get("body_error"), self.label, truncated, encoding) if cut \
            else _Body(body, encoding)
        return AWSResponse(send.get("url") or url, send["status"], [(k, v) for k, v in headers], raw)


_EXCHANGE: ContextVar[_Exchange | None] = ContextVar("timetracer_botocore_exchange", default=None)
# Headers that vouch for a body's bytes: dropped when redaction changed the body.
_CHECKSUM_HEADERS = ("content-md5", "x-amz-checksum-", "x-amz-crc32")


def _kept(response: AWSResponse, body: bytes) -> Tree:
    """One live response as it came (redacted, headers and body, as the call's payload is
    made: see :func:`_redacted_sends`); the app's redactor learns the secrets of its headers
    now, so the payloads other shims make from here on are scrubbed of them."""
    headers = [[str(k), str(v)] for k, v in response.headers.items()]
    STATE.redactor.learn_header_pairs(headers)
    return {"url": response.url, "status": response.status_code, "headers": headers,
            "body": body}


# Services whose answers are the app's own data (DynamoDB items), and not only where the
# operation's output is a payload blob (an S3 object, a Lambda function's answer).
_DATA_SERVICES = frozenset({"dynamodb", "dynamodbstreams"})


def _data_plane(client: Any, operation: str) -> bool:
    """Whether this operation's responses carry the app's data: an S3 object's bytes, a
    Lambda payload, DynamoDB attribute values. Those are redacted in their own bytes, never
    re-serialized if it can be helped (see :func:`_data_doc`, :func:`_redacted`)."""
    model = client.meta.service_model
    if model.service_name in _DATA_SERVICES:
        return True
    try:
        shape = model.operation_model(operation).output_shape
    except Exception:
        return False
    payload = shape.serialization.get("payload") if shape is not None else None
    member = shape.members.get(payload) if payload else None
    return member is not None and member.type_name == "blob"


_DEFAULT_NAMES = frozenset(f.lower() for f in SECRET_FIELDS)


@functools.lru_cache(maxsize=16)
def _user_rules(r: Any) -> tuple[_NameSet, tuple[tuple[str, ...], ...]]:
    """The field names (``json:**.x``, ``mongo:x``) and JSON paths the user configured, without
    the built-in secret names; once per redactor (its rules are fixed when it is made)."""
    names = _NameSet([*(r.json_anywhere.exact | r.field_names.exact) - _DEFAULT_NAMES,
                      *r.json_anywhere.globs, *r.field_names.globs])
    return names, tuple(r.json_paths)


# DynamoDB's typed values that cannot hold a token, and the string type that takes it.
_AS_STRING = {"N": "S", "B": "S", "NS": "SS", "BS": "SS"}


def _tokens(r: Any, value: Any, typed: bool = False) -> Any:
    """A matched value with every leaf a token, its structure kept (DynamoDB's ``{"S": ...}``;
    with ``typed``, a DynamoDB number or binary becomes a string holding its token, which
    botocore can parse)."""
    if isinstance(value, dict):
        if typed and len(value) == 1:
            (kind, inner), = value.items()
            if kind in _AS_STRING:
                return {_AS_STRING[kind]: _tokens(r, inner)}
        return {k: _tokens(r, v, typed) for k, v in value.items()}
    if isinstance(value, list):
        return [_tokens(r, v, typed) for v in value]
    if value is None:
        return None
    if isinstance(value, str | bytes):
        return r.token(value)
    return r.token(json.dumps(value, sort_keys=True, default=repr))


# DynamoDB's non-string types (and codec tags of the request's Python values: Decimal,
# bytes...): a built-in secret name leaves them as they are, so they still parse.
_NOT_STRINGS = frozenset({"N", "NS", "B", "BS", "BOOL", "NULL"})
_STRING_TAGS = frozenset({"$set", "$frozenset", "$tuple", "$list"})


def _string_tokens(r: Any, value: Any) -> Any:
    """A value under a built-in secret name in DynamoDB's data: its strings tokens (``{"S":
    token}``, a string set's members), its numbers, binaries and booleans kept."""
    if isinstance(value, dict):
        return {k: v if k in _NOT_STRINGS or (str(k).startswith("$") and k not in _STRING_TAGS)
                else _string_tokens(r, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_string_tokens(r, v) for v in value]
    return r.token(value) if isinstance(value, str) else value




_EXPRESSIONS = ("ConditionExpression", "FilterExpression", "KeyConditionExpression",
                "UpdateExpression")
_EXPRESSION_WORD = re.compile(r"#?[A-Za-z_][A-Za-z0-9_-]*")


def _expression_values(r: Any, tree: Any) -> Any:
    """DynamoDB request parameters whose expressions name an attribute with a secret name
    (``password = :p``, directly or through ``ExpressionAttributeNames``): the strings of
    every ``ExpressionAttributeValues`` entry become tokens (which value goes with which name
    is not parsed; numbers, binaries and booleans kept, as in items)."""
    if not isinstance(tree, dict):
        return tree
    named, _ = _user_rules(r)

    def secret(name: Any) -> bool:
        return str(name).lower() in _DEFAULT_NAMES or str(name) in named

    for key in _EXPRESSIONS:  # boto3's condition objects (Attr("password").eq(x)), as kept
        condition = tree.get(key)
        if isinstance(condition, dict) and "$condition" in condition \
                and any(secret(n) for n in _attributes(condition)):
            tree = {**tree, key: _condition_tokens(r, condition)}
    values = tree.get("ExpressionAttributeValues")
    if not isinstance(values, dict) or not values:
        return tree
    aliases = tree.get("ExpressionAttributeNames")
    aliases = aliases if isinstance(aliases, dict) else {}
    for key in _EXPRESSIONS:
        expression = tree.get(key)
        if not isinstance(expression, str):
            continue
        for word in _EXPRESSION_WORD.findall(expression):
            if secret(aliases.get(word, word)):
                return {**tree, "ExpressionAttributeValues": {
                    k: _string_tokens(r, v) for k, v in values.items()}}
    return tree


def _attributes(node: Any) -> list[Any]:
    """The attribute names a kept boto3 condition tree mentions (``{"$attribute": name}``)."""
    if isinstance(node, dict):
        if "$attribute" in node:
            return [node["$attribute"]]
        return [n for v in node.values() for n in _attributes(v)]
    if isinstance(node, list):
        return [n for v in node for n in _attributes(v)]
    return []


def _condition_tokens(r: Any, node: Any) -> Any:
    """A kept boto3 condition tree with the strings among its values tokens (attribute names,
    operators and nested conditions kept)."""
    if isinstance(node, dict):
        if "$attribute" in node:
            return node
        return {k: [_condition_value(r, v) for v in val] if k == "values" and isinstance(val, list)
                else _condition_tokens(r, val) for k, val in node.items()}
    return node


def _condition_value(r: Any, value: Any) -> Any:
    if isinstance(value, dict) and ("$condition" in value or "$attribute" in value):
        return _condition_tokens(r, value)
    return _string_tokens(r, value)


def _data_doc(r: Any, node: Any, typed: bool = False) -> Any:
    """The app's data (a decoded JSON object, DynamoDB items) with the built-in secret names
    (``redaction.SECRET_FIELDS``, as MongoDB documents get them) and the user's own rules
    (see :func:`_user_rules`) applied. A built-in name makes every leaf a token (``typed``,
    DynamoDB's wire form: only strings, see :func:`_string_tokens`); a user rule every leaf
    (typed: see :func:`_tokens`)."""
    named, paths = _user_rules(r)

    def hit(k: Any, v: Any) -> Any:
        if k in named:
            return _tokens(r, v, typed)
        if isinstance(k, str) and k.lower() in _DEFAULT_NAMES:
            return _string_tokens(r, v) if typed else _tokens(r, v)
        return anywhere(v)

    def anywhere(n: Any) -> Any:
        if isinstance(n, dict):
            return {k: hit(k, v) for k, v in n.items()}
        if isinstance(n, list):
            return [anywhere(v) for v in n]
        return n

    def path(n: Any, segs: tuple[str, ...]) -> Any:
        if not segs:
            return _tokens(r, n, typed)
        if isinstance(n, list):
            return [path(v, segs) for v in n]
        if not isinstance(n, dict):
            return n
        head, rest = segs[0], segs[1:]
        if head == "**":
            here = path(n, rest)
            return {k: path(v, segs) for k, v in here.items()} if isinstance(here, dict) else here
        low = head.lower()
        return {k: path(v, rest) if fnmatch.fnmatchcase(str(k).lower(), low) else v
                for k, v in n.items()}

    node = anywhere(node)
    for segs in paths:
        node = path(node, segs)
    return node


# How a JSON object or array starts in base64 ({", { ", {\n, {\r, {\t, [{, [", [ , [\n).
_B64_JSON = ("eyJ", "eyA", "ewo", "ew0", "ewk", "W3s", "WyI", "WyA", "Wwo")


def _embedded(r: Any, node: Any) -> Any:
    """``node`` (a decoded JSON answer, or request parameters) with the app's JSON carried
    inside its strings redacted as the app's data (see :func:`_data_doc`): a message body
    that is JSON text (SQS, SNS, EventBridge), or a blob sent as base64 text whose bytes are
    JSON (a Kinesis or Firehose record); each in its own text or bytes where it can be (see
    :func:`_in_place`). ``node`` itself when nothing changed."""
    if isinstance(node, dict):
        new = {k: _embedded(r, v) for k, v in node.items()}
        return node if all(new[k] is v for k, v in node.items()) else new
    if isinstance(node, list):
        items = [_embedded(r, v) for v in node]
        return node if all(a is b for a, b in zip(items, node, strict=True)) else items
    if not isinstance(node, str) or len(node) < 2:
        return node
    if node.lstrip()[:1] in ("{", "["):
        inner = node.encode()
        changed = _json_redacted(r, inner)
        return node if changed is None else changed.decode()
    if node.startswith(_B64_JSON) and len(node) % 4 == 0:
        try:
            inner = base64.b64decode(node, validate=True)
        except (ValueError, binascii.Error):
            return node
        changed = _json_redacted(r, inner)
        return node if changed is None else base64.b64encode(changed).decode()
    return node


def _json_redacted(r: Any, text: bytes) -> bytes | None:
    """JSON text of the app's redacted as its data (:func:`_data_doc`, in its own bytes where
    it can be); None when it is no JSON, or nothing in it changed."""
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    if not isinstance(doc, dict | list):
        return None
    new_doc = _data_doc(r, doc)
    if new_doc == doc:
        return None
    return _in_place(text, doc, new_doc) or json.dumps(new_doc, ensure_ascii=False).encode()


def _changed_strings(old: Any, new: Any, out: dict[str, str]) -> bool:
    """The string leaves of ``old`` that ``new`` replaced, into ``out``; False when anything
    else changed (a number made a token), which no in-place substitution can express."""
    if isinstance(old, dict) and isinstance(new, dict) and old.keys() == new.keys():
        return all(_changed_strings(v, new[k], out) for k, v in old.items())
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return all(_changed_strings(a, b, out) for a, b in zip(old, new, strict=True))
    if type(old) is type(new) and old == new:
        return True
    if isinstance(old, str) and isinstance(new, str):
        out[old] = new
        return True
    return False


def _in_place(body: bytes, doc: Any, new_doc: Any) -> bytes | None:
    """``body`` (JSON) with the strings ``new_doc`` replaced substituted in its own bytes: its
    whitespace, key order and escapes kept. None when that cannot give ``new_doc``."""
    pairs: dict[str, str] = {}
    if not _changed_strings(doc, new_doc, pairs):
        return None
    for old, tok in sorted(pairs.items(), key=lambda p: -len(p[0])):
        repl = json.dumps(tok).encode()
        for form in {json.dumps(old).encode(), json.dumps(old, ensure_ascii=False).encode()}:
            body = body.replace(form, repl)
    try:
        return body if json.loads(body) == new_doc else None
    except ValueError:
        return None


# Content encodings that pack the bytes; any other value (an object stored with
# ``ContentEncoding="utf-8"``, a charset name) leaves them as they are.
_PACKINGS = frozenset({"gzip", "x-gzip", "deflate", "br", "zstd", "compress", "x-compress"})


def _packed(encoding: str, data: bool) -> bool:
    """Whether a Content-Encoding value (one coding, or several in the order applied:
    ``gzip, br``) packs the bytes: for the app's data only the packing codings count."""
    codings = [c for c in (c.strip() for c in encoding.split(",")) if c not in ("", "identity")]
    return bool(codings) and (not data or all(c in _PACKINGS for c in codings))


def _json_body(headers: list[Any], body: bytes, sniff: bool = False) -> Any:
    """The decoded JSON of a plain (not content-encoded) JSON body; _MISSING otherwise.
    ``sniff`` (the app's data: an S3 object stored with the default ``binary/octet-stream``
    or ``text/plain``): JSON whatever its content type when it reads as a JSON object or
    array, as an upload kept in the key is (see :func:`_json_blobs`)."""
    ctype = encoding = ""
    for h in headers:
        name = str(h[0]).lower()
        if name == "content-type":
            ctype = str(h[1]).split(";")[0].strip().lower()
        elif name == "content-encoding":
            encoding = str(h[1]).strip().lower()
    if _packed(encoding, sniff):
        return _MISSING
    if not (ctype == "application/json" or ctype.endswith("+json") or ctype == "text/json"
            or ctype.startswith("application/x-amz-json")) \
            and not (sniff and body.lstrip()[:1] in (b"{", b"[")):
        return _MISSING
    try:
        return json.loads(body)
    except ValueError:
        return _MISSING


def _body_redacted(r: Any, headers: list[Any], body: bytes, data: bool,
                   typed: bool = False, partial: bool = False) -> bytes | None:
    """A response body as stored, its secrets replaced in its own bytes (a content-encoded
    body inside, then packed again: see ``redaction.unpacked``); None to leave it to ``Redactor.response`` (a
    control-plane body that is not JSON or whose secret is not a string, a content encoding
    that cannot be unpacked). A data-plane body (``data``) gets the built-in secret names and
    the user's rules (see :func:`_data_doc`), and is never re-serialized but where a value
    that is not a string becomes a token (``typed``: DynamoDB's wire form). ``partial``: a
    streamed body kept only in part, a content-encoded one unpacked as far as it goes."""
    if not body:
        return body
    encoding = next((str(h[1]).strip().lower() for h in headers
                     if str(h[0]).lower() == "content-encoding"), "")
    if _packed(encoding, data):
        try:
            found = unpacked_codings(encoding, body, r.unpack_limit, partial)
        except TooLarge:  # (Redactor.response scans it, and may withhold it)
            return None
        if found is None:  # (no module for br or zstd, a broken stream: the old path, scrubbed after)
            return None
        plain, pack = found
        inner = [h for h in headers if str(h[0]).lower() != "content-encoding"]
        new_plain = _body_redacted(r, inner, plain, data, typed)
        if new_plain is None:
            new_plain = r.body(inner, plain)
        return body if new_plain == plain else pack(new_plain)
    doc = _json_body(headers, body, sniff=data)
    if doc is not _MISSING:
        ruled = _data_doc(r, doc, typed) if data else r.json(doc)
        new_doc = _embedded(r, ruled)
        if new_doc != doc:
            new = _in_place(body, doc, new_doc)
            if new is None:  # (a rule on a number, a string escaped otherwise: no way to keep the bytes)
                if not data and new_doc is ruled:
                    return None
                new = json.dumps(new_doc, ensure_ascii=False, separators=(",", ":")).encode()
            body = new
    elif not data:
        return None
    return _scrubbed(r, body)


# The headers of a bytes value that is the app's JSON (an upload kept in the key, an event's
# records), for _body_redacted.
_JSON = [("Content-Type", "application/json")]


def _json_blobs(r: Any, tree: Any, headers: list[Any] | None = None) -> Any:
    """Request parameters with each bytes value that is a JSON object or array (an S3 upload
    kept in the key: at most 1 KiB) redacted as the object's answer is (see
    :func:`_data_doc`), in its own bytes; one sent content-encoded (``ContentEncoding``: gzip,
    deflate) inside, packed again."""
    if isinstance(tree, dict):
        if headers is None:
            encoding = tree.get("ContentEncoding")
            headers = [("Content-Type", "application/json"),
                       ("Content-Encoding", encoding if isinstance(encoding, str) else "")]
        return {k: _json_blobs(r, v, headers) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_json_blobs(r, v, headers) for v in tree]
    if isinstance(tree, bytes) and headers is not None and headers[1][1].strip():
        return _body_redacted(r, headers, tree, True) or _scrubbed(r, tree)
    if isinstance(tree, bytes) and tree.lstrip()[:1] in (b"{", b"["):
        return _body_redacted(r, _JSON, tree, True)
    return tree


def _encoded(headers: list[Any]) -> bool:
    return any(str(h[0]).lower() == "content-encoding" and str(h[1]).strip().lower()
               not in ("", "identity") for h in headers)


def _scrubbed(r: Any, body: bytes) -> bytes:
    scrubbed: bytes = r.scrub_bytes(body)
    return scrubbed


def _learn_secrets(client: Any, operation: str, result: Any) -> None:
    """The redactor learns the secret members of a parsed result (see
    :func:`_without_secrets`: only the tokens it makes matter)."""
    if result is None:
        return
    try:
        shape = client.meta.service_model.operation_model(operation).output_shape
    except Exception:
        shape = None
    _without_secrets(shape, result)


def _sends_tree(form: Any) -> Tree:
    """A finished call's response tree as the cassette keeps it, from the form
    :func:`_stored` leaves (in the writer, for a call left to it: see ``base.Deferrable``)."""
    data, typed, events, sends = form
    return {"sends": _redacted_sends(STATE.redactor, sends, data, typed, events)}


def _redacted_sends(r: Any, sends: list[Tree], data: bool, typed: bool,
                    events: bool) -> list[Tree]:
    """The sends of a finished call as the cassette keeps them: headers redacted by name,
    then every body's secrets replaced in its own bytes (JSON never re-serialized): every
    secret learned so far, and JSON fields named like secrets (for the app's data, ``data``:
    an S3 object or DynamoDB items, ``typed``: DynamoDB's wire form, see
    :func:`_data_plane` and :func:`_data_doc`); ``events``: the operation answers with an
    event stream. A body that changed gets its ``Content-Length`` fixed and loses the
    headers that vouch for its bytes (its ``ETag`` is kept: it names the object)."""
    out = []
    for send in sends:
        if "headers" in send:
            send = {**send, "headers": [list(h) for h in r.headers(send["headers"])]}
        body = send.get("body")
        if isinstance(body, bytes):
            status = send.get("status")
            cut = bool(send.get("body_open") or send.get("body_truncated")) \
                or send.get("body_error") is not None
            if events and isinstance(status, int) and status < 300 and body:
                # An event stream: kept as its messages, unframed and redacted, and framed at
                # replay (see _framed), so no scrub now or later can break its checksums.
                messages, tail = _unframed(r, body)
                out.append({**send, "headers": r.scrub(send["headers"]), "body": tail,
                            "messages": messages})
                continue
            plain = _body_redacted(r, send["headers"], body,
                                   data and isinstance(status, int) and status < 300, typed, cut)
            if plain is None:
                stored = r.response({"headers": send["headers"], "body": body, "body_open": cut})
                stored.pop("body_open", None)
                if _encoded(send["headers"]):
                    # (an encoding it cannot unpack keeps its bytes there: a known secret in
                    # them is masked all the same; a plain body Redactor.body scrubbed)
                    stored["body"] = _scrubbed(r, stored["body"])
            else:
                stored = {"headers": r.scrub(send["headers"]), "body": plain}
            if stored["body"] != body:
                headers = [h for h in stored["headers"]
                           if not str(h[0]).lower().startswith(_CHECKSUM_HEADERS)]
                # (a body kept only in part keeps the live length: its replay stops at the cut)
                stored["headers"] = headers if cut else _length_fixed(headers, stored["body"])
            send = {**send, **stored}
        out.append(send)
    return out


# AWS event-stream header value types: their encoded sizes (strings and bytes, 6 and 7,
# carry a length of two bytes before their value).
_FIXED = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}


def _headers_of(raw: bytes) -> list[list[Any]]:
    """An event-stream message's encoded headers as ``[name, type, value]`` (bytes)."""
    out: list[list[Any]] = []
    i = 0
    while i < len(raw):
        n = raw[i]
        name, kind = raw[i + 1:i + 1 + n], raw[i + 1 + n]
        i += 2 + n
        if kind in (6, 7):
            size = int.from_bytes(raw[i:i + 2], "big")
            value, i = raw[i + 2:i + 2 + size], i + 2 + size
        elif kind in _FIXED:
            value, i = raw[i:i + _FIXED[kind]], i + _FIXED[kind]
        else:
            raise ValueError(f"event-stream header type {kind}")
        if i > len(raw):
            raise ValueError("an event-stream header runs past its message's headers")
        out.append([name, kind, value])
    return out


def _records_redacted(r: Any, data: bytes) -> bytes:
    """The app's data in an event (a JSON document, or JSON lines: S3 Select's records, a
    model's output) redacted as an S3 object's is (secret field names, the user's rules, the
    secrets seen; never re-serialized where it can be helped), line by line."""
    lines = data.split(b"\n")
    out = [(_body_redacted(r, _JSON, line, True) or line) if line.strip() else line
           for line in lines]
    return b"\n".join(out)


def _payload_scrubbed(r: Any, payload: bytes) -> bytes:
    """A message's payload redacted as the app's data (:func:`_records_redacted`); inside the
    base64 ``bytes`` of a JSON payload too (Bedrock's ``chunk``: the model's own output),
    encoded again."""
    if payload[:1] == b"{" and b'"bytes"' in payload[:16]:
        with contextlib.suppress(ValueError, TypeError, binascii.Error):
            doc = json.loads(payload)
            inner = base64.b64decode(doc["bytes"], validate=True)
            scrubbed = _records_redacted(r, inner)
            if scrubbed != inner:
                doc["bytes"] = base64.b64encode(scrubbed).decode()
                payload = json.dumps(doc, separators=(",", ":")).encode()
    return _records_redacted(r, payload)


def _unframed(r: Any, body: bytes) -> tuple[list[list[Any]], bytes]:
    """An event stream's messages (AWS's framing: a prelude of total and headers length and
    its CRC, headers, payload, the message's CRC) as ``[headers, payload]``, the secrets seen
    replaced in string and bytes header values and in payloads; and what follows the last
    whole message (one cut short: a stream read part way), scrubbed where it stands."""
    messages: list[list[Any]] = []
    pos = 0
    while pos + 16 <= len(body):
        total, head = struct.unpack_from(">II", body, pos)
        if total < 16 or head > total - 16 or pos + total > len(body) \
                or binascii.crc32(body[pos:pos + 8]) != struct.unpack_from(">I", body, pos + 8)[0] \
                or binascii.crc32(body[pos:pos + total - 4]) \
                != struct.unpack_from(">I", body, pos + total - 4)[0]:
            break  # (cut short, or not whole: kept as it came, so a replay fails as live did)
        try:
            headers = _headers_of(body[pos + 12:pos + 12 + head])
        except (ValueError, IndexError):  # (not framing this shim knows: kept as it came)
            break
        for h in headers:
            if h[1] in (6, 7):
                h[2] = _scrubbed(r, h[2])
        messages.append([headers, _payload_scrubbed(r, body[pos + 12 + head:pos + total - 4])])
        pos += total
    return messages, _scrubbed(r, body[pos:])


def _framed(messages: list[Any]) -> bytes:
    """The bytes of :func:`_unframed`'s messages, each framed (lengths, CRCs) as AWS does."""
    out = bytearray()
    for headers, payload in messages:
        raw = bytearray()
        for name, kind, value in headers:
            name, value = as_bytes(name), as_bytes(value)
            raw += bytes((len(name),)) + name + bytes((kind,))
            raw += (len(value).to_bytes(2, "big") + value) if kind in (6, 7) else value
        payload = as_bytes(payload)
        prelude = struct.pack(">II", 16 + len(raw) + len(payload), len(raw))
        prelude += struct.pack(">I", binascii.crc32(prelude))
        message = prelude + bytes(raw) + payload
        out += message + struct.pack(">I", binascii.crc32(message))
    return bytes(out)


def _length_fixed(headers: list[Any], body: bytes) -> list[Any]:
    """``headers`` with ``Content-Length`` the length of ``body``."""
    return [[h[0], str(len(body))] if str(h[0]).lower() == "content-length" else h
            for h in headers]


_PLAIN = (str, int, float, bool, type(None))


def _kwarg(value: Any) -> Any:
    """A keyword argument of a botocore error as recorded: plain values as they are, an
    exception (``EndpointConnectionError(error=NewConnectionError(...))``) as its own error
    tree, anything else as its text."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, BaseException):
        return {"error_tree": _error_of(value)}
    return str(value)


def _error_of(exc: BaseException) -> Tree:
    """A send's error as recorded: botocore's errors with their keyword arguments (an
    exception among them as its error tree), other errors with their plain attributes (an
    object such as urllib3's ``conn`` by name only: it comes back as None)."""
    kwargs = getattr(exc, "kwargs", None)
    if isinstance(exc, botocore.exceptions.BotoCoreError) and isinstance(kwargs, dict):
        return error_tree(exc, {"kwargs": {str(k): _kwarg(v) for k, v in kwargs.items()}})
    fields: dict[str, Any] = {}
    unset: list[str] = []
    for name, value in vars(exc).items():
        if name.startswith("__"):
            continue
        if isinstance(value, _PLAIN):
            fields[name] = value
        else:
            unset.append(name)
    return error_tree(exc, {"fields": fields, "unset": unset} if fields or unset else None)


def _rebuilt(value: Any) -> Any:
    if isinstance(value, dict) and isinstance(value.get("error_tree"), dict):
        return rebuild_error(value["error_tree"], _build_error)
    return value


def _build_error(cls: type[BaseException], tree: Tree) -> BaseException:
    attrs = tree.get("attrs") or {}
    kwargs = attrs.get("kwargs")
    if isinstance(kwargs, dict) and issubclass(cls, botocore.exceptions.BotoCoreError):
        try:
            return cls(**{k: _rebuilt(v) for k, v in kwargs.items()})
        except Exception:
            pass
        return instantiate(cls, tree["message"])
    args = from_tree(tree["args"]) if tree.get("args") is not None else (tree["message"],)
    exc = instantiate(cls, *args)
    fields = attrs.get("fields")
    for name, value in [*(fields.items() if isinstance(fields, dict) else ()),
                        *((n, None) for n in attrs.get("unset") or () if isinstance(n, str))]:
        if getattr(exc, name, _MISSING) is not value:
            with contextlib.suppress(Exception):  # (a property: the class computes it)
                setattr(exc, name, value)
    return exc


_MISSING = object()


def _send(original: Any) -> Any:
    def _send(self: Any, request: Any) -> Any:
        exchange = _EXCHANGE.get()
        if exchange is None:
            return original(self, request)
        if exchange.replay is not None:
            return exchange.answer(request.url)
        try:
            response = original(self, request)
        except Exception as exc:
            exchange.sends.append({"error": _error_of(exc)})
            raise
        if getattr(request, "stream_output", False) and response.status_code < 300 \
                and not _read_whole(response, exchange.events):
            send = _kept(response, b"")  # its body kept as the app reads it
            exchange.sends.append(send)
            exchange.stream = response.raw = _LiveRaw(response.raw, send)
            return response
        body = response.content  # the whole body, once; a streamed one is then read from memory
        response.raw = _Body(body, str(response.headers.get("content-encoding", "")))
        exchange.sends.append(_kept(response, body))
        return response

    return _send


# What a replay signs with when no credentials resolve: a presigned URL or POST is built
# locally, never sent, so it needs none (see _sign).
PLACEHOLDER_ACCESS_KEY = "AKIATIMETRACERREPLAY"
_PLACEHOLDER = botocore.credentials.Credentials(PLACEHOLDER_ACCESS_KEY,
                                                "timetracer-replay-placeholder-secret")


def _sign(original: Any) -> Any:
    def sign(self: Any, *args: Any, **kwargs: Any) -> Any:
        exchange = _EXCHANGE.get()
        if exchange is not None and exchange.replay is not None:
            return None  # nothing is sent: no credentials needed
        if self._credentials is None and _presigning(args, kwargs) and _replaying():
            # A presigned URL or POST (generate_presigned_url/post) in a replay without
            # credentials: signed locally with placeholder ones, as the app's code expects
            # a URL; a copy of the signer, so no other thread's client sees them. A request
            # really sent (a miss passed through or recorded) is signed as live is: without
            # credentials botocore raises NoCredentialsError, nothing reaches AWS.
            signer = copy.copy(self)
            signer._credentials = _PLACEHOLDER
            return original(signer, *args, **kwargs)
        return original(self, *args, **kwargs)

    return sign


def _presigning(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``RequestSigner.sign(operation_name, request, region_name, signing_type, ...)``
    presigns (``presign-url``, ``presign-post``: a URL or POST form built locally, never sent)
    rather than signing a request about to be sent (``standard``)."""
    kind = kwargs.get("signing_type", args[3] if len(args) > 3 else "standard")
    return str(kind) != "standard"


def _replaying() -> bool:
    return STATE.mode is Mode.REPLAY and not STATE.is_live(LIBRARY) \
        and not _suppressed(otel_context.get_current())


def _assert_enabled(original: Any) -> Any:
    def _assert_enabled(self: Any) -> Any:
        if _replaying():  # replay needs no credentials or region from the instance
            raise self._RETRIES_EXCEEDED_ERROR_CLS()
        return original(self)

    return _assert_enabled


def _make_api_call(original: Any) -> Any:
    def _make_api_call(self: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
        if STATE.mode is Mode.OFF:
            return original(self, operation_name, api_params)
        call = _api_call(self, operation_name, api_params)
        action = decide(call)
        if isinstance(action, Match):
            span = action.span
            if span.error is not None:  # it failed before anything was sent
                raise rebuild_error(span.error, _build_error)
            token = _EXCHANGE.set(_Exchange(replay=list(span.response["sends"]), label=call.label))
            try:
                return original(self, operation_name, api_params)
            finally:
                _EXCHANGE.reset(token)
        if action is LIVE:
            return original(self, operation_name, api_params)
        exchange = _Exchange(events=_event_stream(self, operation_name))
        with _RECORDING(call) as cap:
            token = _EXCHANGE.set(exchange)
            try:
                result = original(self, operation_name, api_params)
            except Exception as exc:
                # A ClientError or a connection error after its sends: replay sends the same
                # answers and botocore raises it again. Nothing sent: the error itself.
                if exchange.stream is not None:  # (a body left unread: stored as read, open)
                    exchange.stream.record_now()
                    exchange.stream = None
                if exchange.sends:
                    _stored(cap, self, operation_name, None, exchange.sends, exchange.events)
                else:
                    cap.fail(exc, _error_of(exc).get("attrs"))
                raise
            finally:
                _EXCHANGE.reset(token)
            stream, exchange.stream = exchange.stream, None
            if stream is None:
                _stored(cap, self, operation_name, result, exchange.sends, exchange.events)
            else:  # the call ends with the body the app reads as it comes (see _LiveRaw)
                _learn_secrets(self, operation_name, result)  # (now: the finisher keeps no
                sends, events = exchange.sends, exchange.events  # reference to the body,
                stream.then(_finisher(cap.span, lambda: _stored(  # which may then be dropped)
                    cap, self, operation_name, None, sends, events)))
        return result

    return _make_api_call


def _stored(cap: Any, client: Any, operation: str, result: Any, sends: list[Tree],
            events: bool) -> None:
    """The call's sends put on its span (a Capture), or left beside it for the writer (a
    Left), with what their redaction needs to know of the operation; the secret members of
    the parsed result learned now (see :func:`_without_secrets`). Redacted by
    :func:`_sends_tree`; stored without them where a body may hold a secret it cannot be
    redacted of (``Withheld``, caught where the payload is made)."""
    _learn_secrets(client, operation, result)
    typed = client.meta.service_model.service_name in _DATA_SERVICES
    cap.ok((_data_plane(client, operation), typed, events, sends))


# The recording side: a call left to the writer where it runs in the instrumentation's span
# (base.Deferrable), else captured here; both finish with _stored's form.
_RECORDING = Deferrable(LIBRARY, SCOPE, _sends_tree)


def _event_stream(client: Any, operation: str) -> bool:
    try:
        return bool(client.meta.service_model.operation_model(operation).has_event_stream_output)
    except Exception:  # an operation the model lacks: botocore raises its own error later
        return False


def _finisher(span: Span, finish: Callable[[], None]) -> Callable[[bool], None]:
    """``finish`` the call, then end ``span``, whose end waits until then (``base.hold_end``).
    ``last``: nothing else will end it (see ``_LiveRaw._finish``): ended here, and a later
    ``end()`` (the app reading on to the stream's end) does nothing."""
    release = hold_end(span)

    def done(last: bool) -> None:
        try:
            finish()
        finally:
            release()
            if last and span.is_recording():
                span.end()
                with contextlib.suppress(AttributeError, TypeError):
                    span.end = _ended  # type: ignore[method-assign]

    return done


def _ended(end_time: int | None = None) -> None:
    """A span's ``end()`` once :func:`_finisher` has ended it."""


class BotocoreShim(Shim):
    library = LIBRARY
    requires = "botocore"
    scope = SCOPE
    instrumentor = "opentelemetry.instrumentation.botocore:BotocoreInstrumentor"

    def patch(self) -> None:
        self.wrap(botocore.client.BaseClient, "_make_api_call", _make_api_call)
        self.wrap(botocore.endpoint.Endpoint, "_send", _send)
        self.wrap(botocore.signers.RequestSigner, "sign", _sign)
        self.wrap(botocore.utils.IMDSFetcher, "_assert_enabled", _assert_enabled)
