"""requests: ``HTTPAdapter.send``, beneath the instrumentation's ``Session.send`` patch.

Record reads the urllib3 response's raw bytes (still content-encoded) and swaps in an
equivalent in-memory urllib3 response, so requests decodes and extracts cookies as usual.
Replay builds the same urllib3 response from the cassette and lets ``build_response`` make the
``requests.Response``; recorded errors come back as their ``requests.exceptions`` class.

A body that breaks while it is read (a read timeout, a connection closed early) is stored as
the bytes read before the error and the urllib3 error (the response's ``"error"``); in both
modes the response is returned and its in-memory body raises that urllib3 error after those
bytes, so requests maps it where it maps a live one (``iter_content``: ``ConnectionError``,
``ChunkedEncodingError``...; inside ``get()`` when the body is not streamed).

``Response.elapsed``: ``Session.send`` times ``adapter.send`` and sets it once that returns.
The recording reads the body inside ``adapter.send``, which requests' measure would then
include: ``Session.send`` (wrapped) takes that read off, and the recording keeps the result
as ``"elapsed_us"``; a replay gives it back there (see :func:`_session_send`). The response
hooks, which run inside ``Session.send``, see requests' own measure. A cassette written
before it was kept leaves requests' measure of the replay.

A body the app asked to stream (``stream=True``: a download, a watch, a log tail, of any type)
or of a streamed type (``base.STREAMED_TYPES``: server-sent events, NDJSON) is not read first:
the swapped-in urllib3 response reads the live one as the app reads it (see
:class:`_LiveBody`), so the app gets each piece as it arrives, and the call ends, with what
the app read, when the body ends, breaks, or the app closes the response (an endless
stream). The instrumentation's span ends with it (``base.hold_end``).

Under a timetracer writer the call is left on its span as captured and :func:`_payload_of`
makes its payload in the writer (see ``base.defer``), with the same functions the
request-path :class:`~.base.Capture` uses.
"""

from __future__ import annotations

import bisect
import http.client
import io
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import copy_context
from datetime import timedelta
from typing import Any, NoReturn

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPResponse
from urllib3._collections import HTTPHeaderDict
from urllib3.exceptions import DecodeError, ProtocolError, ReadTimeoutError, SSLError

from timetracer_otel.codec import Tree, as_bytes
from timetracer_otel.config import Mode
from timetracer_otel.index import Match
from timetracer_otel.keys import PROPAGATION_HEADERS, Call, http_call
from timetracer_otel.replay_shims.base import (
    _TAKEN,
    BUILDERS,
    LIVE,
    STATE,
    Payload,
    Shim,
    bodiless,
    built_payload,
    capture,
    decide,
    defer,
    deferrable_span,
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
)

SCOPE = "opentelemetry.instrumentation.requests"
log = logging.getLogger("timetracer_otel")

# The urllib3 errors of a body read that requests maps (``Response.iter_content``), and to what.
BODY_ERRORS: dict[type[BaseException], type[requests.RequestException]] = {
    ProtocolError: requests.exceptions.ChunkedEncodingError,
    DecodeError: requests.exceptions.ContentDecodingError,
    ReadTimeoutError: requests.exceptions.ConnectionError,
    SSLError: requests.exceptions.SSLError,
}
_BODY_ERROR_TYPES = tuple(BODY_ERRORS)


def _body(request: requests.PreparedRequest) -> bytes:
    body = request.body
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    # A file or generator upload: read it once and send the bytes, so both modes see them.
    data = body.read() if hasattr(body, "read") else b"".join(
        c.encode() if isinstance(c, str) else c for c in body
    )
    data = data.encode() if isinstance(data, str) else data
    request.body = data
    request.headers.pop("Transfer-Encoding", None)
    request.headers["Content-Length"] = str(len(data))
    return data


def _request_headers(pairs: Iterable[Sequence[Any]]) -> list[list[str]]:
    """A request's headers as stored: redacted, without the trace context."""
    return [[k, v] for k, v in STATE.redactor.headers(
        (k, v if isinstance(v, str) else v.decode("latin-1"))
        for k, v in pairs if k.lower() not in PROPAGATION_HEADERS)]


def _call_of(method: str | None, url: str | None, pairs: Iterable[Sequence[Any]],
             body: bytes) -> Call:
    # Headers built only when the stored request is needed.
    return http_call("requests", method or "GET", STATE.redactor.url(url or ""),
                     lambda: _request_headers(pairs), body)


def _call(request: requests.PreparedRequest) -> Call:
    body = _body(request)  # first: an upload read here changes the headers
    return _call_of(request.method, request.url, request.headers.items(), body)


def _response_tree_of(status: int, reason: str | None, version: int,
                      headers: Iterable[Sequence[Any]], elapsed_us: int | None, body: bytes,
                      chunks: list[int] | None = None, error: Tree = None,
                      body_open: bool = False) -> Tree:
    tree: dict[str, Any] = {
        "status": status,
        "reason": reason,
        "version": version,
        "headers": [list(h) for h in STATE.redactor.headers(headers)],  # type: ignore[arg-type]
        "body": body,
        "elapsed_us": elapsed_us,  # Response.elapsed, in whole microseconds (as timedelta's)
    }
    # Each key only when there is something to say: the tree as older versions wrote it.
    if chunks is not None:  # a chunked body's chunk lengths, when more than one
        tree["chunk_sizes"] = chunks
    if error is not None:  # the body broke after ``body``
        tree["error"] = error
    if body_open:  # the app stopped reading after ``body`` (a streamed body)
        tree["body_open"] = True
    return tree


def _payload_of(args: Sequence[Any]) -> Payload:
    """A deferred call's Payload, whose encoding :class:`~.base.Capture` would have set:
    request built (and its secrets learned) first, then the response scrubbed and packed."""
    method, url, pairs, body, status, reason, version, headers, elapsed, read, error = args
    return built_payload(_call_of(method, url, pairs, body), error, lambda: _response_tree_of(
        status, reason, version, headers, elapsed[0] if elapsed else None, *read))


BUILDERS["requests"] = _payload_of


class _Fp(io.IOBase):
    """What urllib3 asks of an HTTP response's file beyond ``read`` (http.client's): whether
    it is closed, and a chunked body's framing as ``fp`` (a :class:`_Wire`) with
    ``_safe_read``."""

    fp: _File | None
    chunked = False  # (read by clients that frame a chunked body themselves: docker-py's
    # events loop reads one byte, then ``chunk_left``, the rest of the chunk)

    @property
    def chunk_left(self) -> int | None:
        """http.client's: the bytes left of the chunk being read; None between chunks."""
        return None

    def readable(self) -> bool:
        return True

    def isclosed(self) -> bool:
        return self.closed

    def _safe_read(self, amt: int) -> bytes:
        assert isinstance(self.fp, _Wire)
        return self.fp.read(amt)


class _Body(_Fp):
    """The recorded body as urllib3 reads a socket's: closed once read to its end (urllib3's
    ``stream()`` loops until its fp is closed), and raising the recorded error, if any, after
    the bytes read before it (``read()`` with no size raises it at once: http.client's read
    is all or nothing). A chunked body also has the chunked framing as ``fp``, which urllib3's
    ``read_chunked`` reads (``stream()`` yields each chunk, or pieces of it, as they came)."""

    def __init__(self, data: bytes, error: BaseException | Callable[[], BaseException] | None = None,
                 chunks: list[int] | None = None) -> None:
        super().__init__()
        self._data = memoryview(data)
        self._pos = 0
        self._error = error
        self._ends: list[int] = []
        if chunks is not None:
            self.chunked = True
            self._ends = list(itertools.accumulate(chunks))
            self.fp = _Wire(self, _slices(self._data, chunks),
                            (lambda: None) if error is None else self._fail)
        else:
            self.fp = _File()

    def close(self) -> None:
        super().close()
        if hasattr(self, "fp"):
            self.fp = None  # as http.client's response: read_chunked stops there

    @property
    def chunk_left(self) -> int | None:
        ends, pos = self._ends, self._pos
        i = bisect.bisect_right(ends, pos)  # (the chunk that ends first after pos)
        if i == len(ends) or pos == 0 or (i > 0 and ends[i - 1] == pos):  # between chunks
            return None
        return ends[i] - pos

    def read(self, amt: int | None = None) -> bytes:
        if self.closed:
            return b""
        end = len(self._data)
        if amt is None or amt < 0:
            if self._error is not None:
                self._fail()
            stop = end
        else:
            stop = min(end, self._pos + amt)
        data = bytes(self._data[self._pos:stop])
        self._pos = stop
        if data:
            if stop == end and self._error is None:
                self.close()  # as http.client closes a response read to its end
            return data
        if self._error is not None and amt != 0:
            self._fail()
        if amt != 0:
            self.close()
        return b""

    read1 = read

    def _fail(self) -> NoReturn:
        error, self._error = self._error, None
        self.close()
        assert error is not None
        raise error if isinstance(error, BaseException) else error()


class _File:
    """http.client's response file (``fp``) as a client that reaches through the response to
    its socket sees it: docker-py's ``CancellableStream.close()`` shuts ``raw._fp.fp.raw._sock``
    down (and raises for an SSH ``channel``), its ``_get_raw_response_socket`` keeps the
    response on ``raw._fp.fp.raw``. While recording, ``raw`` and ``channel`` are the live
    file's (and only they: a read past the response would not be recorded). In a replay,
    ``raw`` is a socket file of its own whose socket has nothing to shut: the recorded body
    already ends where the live one was cut."""

    _PASSED = frozenset({"raw", "channel"})

    def __init__(self, live: Any = None) -> None:
        self._live = live

    def __getattr__(self, name: str) -> Any:
        live = self.__dict__.get("_live")
        if live is not None and name in _File._PASSED:
            return getattr(live, name)
        if live is None and name == "raw":
            raw = self.__dict__["raw"] = _NoSocketFile()
            return raw
        raise AttributeError(name)


class _Wire(_File):
    """A chunked body's framing (size line, chunk, CRLF; the last chunk when it ended), made
    as urllib3's ``read_chunked`` reads it, one of ``chunks`` per size line, taken when that
    line is asked for (a recorded body's slices, no copy; a live body's chunks as they come).
    Where ``chunks`` runs out, ``at_end`` runs before the last chunk: a recorded body that
    broke raises its error there, instead of the size line that did not come."""

    def __init__(self, body: io.IOBase, chunks: Iterator[bytes | memoryview],
                 at_end: Callable[[], None], live: Any = None) -> None:
        super().__init__(live)
        self._body = body
        self._chunks = chunks
        self._at_end = at_end
        self._chunk = memoryview(b"")
        self._state = "size"  # then "data", "crlf", "size"... "trailer", "done"

    def readline(self, limit: int = -1) -> bytes:
        if self._state == "size":
            chunk = next(self._chunks, None)
            if chunk:
                self._chunk, self._state = memoryview(chunk), "data"
                return b"%x\r\n" % len(self._chunk)
            self._at_end()
            self._state = "trailer"
            return b"0\r\n"
        if self._state == "trailer":
            self._state = "done"
            self._body.close()
            return b"\r\n"
        return b""

    def read(self, amt: int = -1) -> bytes:
        if self._state == "data":
            n = len(self._chunk) if amt < 0 else min(amt, len(self._chunk))
            piece, self._chunk = bytes(self._chunk[:n]), self._chunk[n:]
            if not self._chunk:
                self._state = "crlf"
            return piece
        if self._state == "crlf":
            self._state = "size"
            return b"\r\n"
        return b""


class _NoSocket:
    """A replayed body's socket: shutting it down changes nothing, as its recorded body
    already ends where the live one was cut (with the error the live reader got then)."""

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


class _NoSocketFile:
    def __init__(self) -> None:
        self._sock = _NoSocket()


def _slices(data: memoryview, sizes: list[int]) -> Iterator[memoryview]:
    pos = 0
    for n in sizes:
        yield data[pos:pos + n]
        pos += n


class _LiveBody(_Fp):
    """A live body of a streamed type, read from the live urllib3 response only as the app
    reads it (as :class:`_Body` reads a recorded one: ``read(n)`` gives n bytes unless the
    body ends first, ``read1`` what arrived; a chunked body goes through ``fp``, one live
    chunk per size line). What is read is kept in one buffer (chunk lengths for a chunked
    body), up to the payload limit, past which the call is stored truncated. The call is
    finished once with what was read (see :data:`Read`): at the body's end, at its error
    (raised to the app as urllib3 raised it), when the app closes the response before its end
    (the body is then ``open``), when the response is dropped unclosed (finished on
    ``base``'s late calls' thread, never in the finaliser), or when the run it was opened in
    ends first (read so far, ``open``; the app may read on)."""

    def __init__(self, live: HTTPResponse, finish: Callable[[Read], None]) -> None:
        super().__init__()
        self._live = live
        self._finish: Callable[[Read], None] | None = finish
        self._kept = bytearray()
        self._sizes: list[int] | None = None
        self._room = STATE.max_payload_bytes
        self._ended = False
        self._released = False
        self._pending: BaseException | None = None
        self._mid = False  # the last piece kept left its live chunk unfinished
        self._context = copy_context()
        ready_late()
        stream_opened(self)
        self.chunked = bool(live.chunked)
        file = getattr(live._fp, "fp", None)
        if live.chunked and live.supports_chunked_reads():
            self._sizes = []
            self.fp = _Wire(self, self._live_chunks(), self._at_chunked_end, file)
        else:
            self.fp = _File(file)

    @property
    def chunk_left(self) -> int | None:
        return getattr(getattr(self._live, "_fp", None), "chunk_left", None)

    def _live_chunks(self) -> Iterator[bytes]:
        """The live chunks, each kept as it is taken; a break ends the call with its error."""
        chunks = self._live.read_chunked(None, decode_content=False)
        while True:
            try:
                chunk = next(chunks, None)
            except _BODY_ERROR_TYPES as exc:
                self._end(exc)
                raise
            if chunk is None:
                return
            yield self._keep(chunk)

    def _at_chunked_end(self) -> None:
        self._ended = True

    def _keep(self, piece: bytes) -> bytes:
        if piece and self._room >= 0:  # (one piece past the limit: the payload says truncated)
            self._kept += piece
            self._room -= len(piece)
            sizes = self._sizes
            if sizes is not None:  # the live chunks' sizes, whatever pieces the app reads
                if self._mid and sizes:
                    sizes[-1] += len(piece)
                else:
                    sizes.append(len(piece))
                self._mid = bool(self.chunk_left)
        return piece

    def read(self, amt: int | None = None, *, one: bool = False) -> bytes:
        if self.closed:
            return b""
        live = self._live
        try:
            if self._pending is not None:  # the body ended short in the read before this one
                pending, self._pending = self._pending, None
                raise pending
            if amt is None or amt < 0:
                data = self._keep(live.read(decode_content=False))
            elif one or not _READ1:  # (urllib3 before 2.3: one whole read)
                data = self._keep(live.read1(amt, decode_content=False) if _READ1
                                  else live.read(amt, decode_content=False))
            else:  # as http.client's read(n): n bytes, unless the body ends first
                data = self._read_n(amt)
        except _BODY_ERROR_TYPES as exc:
            self._end(exc)
            raise
        if (data and not _at_end(live)) or amt == 0 or self._pending is not None:
            return data
        self._ended = True  # (read to its end: http.client closed it, or nothing more came)
        self.close()
        return data

    def _read_n(self, amt: int) -> bytes:
        """``amt`` bytes from pieces of the live body, as http.client's ``read(amt)`` gives
        them: fewer if the body ends first (cut short of its stated length: those bytes now,
        the error at the next read), none if the connection fails first or a chunked body
        breaks (what came is lost with the error, here as live, so it is not kept for a
        replay either)."""
        live = self._live
        parts: list[bytes] = []
        left = amt
        sizes = self._sizes or []
        kept, room, mid, count, last = (len(self._kept), self._room, self._mid, len(sizes),
                                        sizes[-1] if sizes else 0)
        try:
            while left > 0 and (part := self._keep(live.read1(left, decode_content=False))):
                parts.append(part)
                left -= len(part)
        except _BODY_ERROR_TYPES as exc:
            if parts and _ended_short(exc) and not live.chunked:  # (http.client's chunked
                # read raises at once, and loses the bytes with the error)
                self._pending = exc
                return b"".join(parts)
            del self._kept[kept:]
            self._room, self._mid = room, mid
            del sizes[count:]
            if sizes:
                sizes[-1] = last
            raise
        return b"".join(parts)

    def read1(self, amt: int = -1) -> bytes:
        return self.read(amt, one=True)

    def close(self) -> None:
        if hasattr(self, "fp"):
            self.fp = None  # as http.client's response: read_chunked stops there
        if not self.closed:
            super().close()
            self._end()

    def __del__(self) -> None:
        if not self._released:  # dropped unclosed: finished on another thread
            finish_late(self._context, self.close)

    def _end(self, exc: BaseException | None = None) -> None:
        """The body ended, broke or was closed: the connection returned (or closed, unless
        read to its end), and the call recorded if its run has not done so already."""
        if not self._released:
            self._released = True
            live = self._live
            try:
                if not self._ended:  # closed early (or broken): the connection cannot be reused
                    live.close()
                live.release_conn()
            except Exception:  # never the app's
                log.warning("timetracer-otel: a streamed requests response could not be released",
                            exc_info=True)
        self._record(exc)

    def record_now(self) -> None:
        """Its run ends with the body still open: recorded as read so far, the connection left
        to the app, which may read on (``base.end_streams``)."""
        self._record()

    def _record(self, exc: BaseException | None = None) -> None:
        finish, self._finish = self._finish, None
        if finish is None:
            return
        stream_ended(self)
        try:
            sizes = self._sizes
            finish((bytes(self._kept), None if sizes is None or len(sizes) < 2 else list(sizes),
                    None if exc is None else error_tree(exc), not self._ended and exc is None))
        except Exception:  # never the app's
            log.warning("timetracer-otel: a streamed requests response could not be recorded",
                        exc_info=True)


def _ended_short(exc: BaseException) -> bool:
    """Whether urllib3's error says the body ended before its stated length (an
    ``IncompleteRead``), not that the connection failed."""
    return any(isinstance(e, http.client.IncompleteRead) for e in (exc, exc.__cause__, *exc.args))


def _at_end(live: HTTPResponse) -> bool:
    """Whether the live body has been read to its end (http.client closes its response
    then)."""
    fp = getattr(live, "_fp", None)
    return fp is None or bool(fp.isclosed())


def _streamed(response: requests.Response, stream: Any) -> bool:
    """A body the app asked to stream (``stream=True``: a download, a watch, a log tail, of
    any type) or of a streamed type (``base.STREAMED_TYPES``), on http.client's own response
    (a wrapper's, CacheControl's, is read whole as it expects)."""
    live = response.raw
    return type(getattr(live, "_fp", None)) is http.client.HTTPResponse \
        and (bool(stream) or streamed_type(live.headers.get("content-type", ""))) \
        and not bodiless(str(response.request.method), live.status)


def _stream_flag(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``HTTPAdapter.send``'s ``stream`` argument (``Session.send`` passes it by name)."""
    return kwargs.get("stream", args[0] if args else False)


def _streaming(request: requests.PreparedRequest, response: requests.Response,
               headers: list[tuple[str, str]], finish: Callable[[Read], None],
               release: Callable[[], None]) -> requests.Response:
    """``response`` reading the live body as the app reads it (see :class:`_LiveBody`);
    ``release`` (the span's held end) runs at once if that cannot be set up."""
    live = response.raw
    try:
        replacement = _raw(live.status, live.reason, live.version, headers, b"", request,
                           fp=_LiveBody(live, finish))
    except BaseException:  # (the span must still end)
        release()
        raise
    replacement._original_response = live._original_response
    response.raw = replacement
    return response


def _raw(status: int, reason: str | None, version: int, headers: list[tuple[str, str]], body: bytes,
         request: requests.PreparedRequest,
         error: BaseException | Callable[[], BaseException] | None = None,
         chunks: list[int] | None = None, fp: io.IOBase | None = None) -> HTTPResponse:
    hd = HTTPHeaderDict()
    msg = http.client.HTTPMessage()
    for k, v in headers:
        hd.add(k, v)
        msg[k] = v
    if chunks is None and "chunked" in hd.get("transfer-encoding", "").lower():
        chunks = [len(body)] if body else []
    raw = HTTPResponse(
        body=_Body(body, error, chunks) if fp is None else fp,
        headers=hd,
        status=status,
        reason=reason,
        version=version,
        preload_content=False,
        decode_content=False,  # as requests' adapter opens it: raw.read() gives encoded bytes
        request_method=request.method,
        request_url=request.url,
    )
    # requests extracts cookies from the http.client message behind the urllib3 response.
    raw._original_response = _Original(msg, request.method)  # type: ignore[assignment]
    return raw


class _Original:
    def __init__(self, msg: http.client.HTTPMessage, method: str | None) -> None:
        self.msg = msg
        self._method = method  # urllib3's read_chunked asks whether it answers a HEAD

    def isclosed(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _build_exc(request: requests.PreparedRequest) -> Any:
    def build(cls: type[BaseException], tree: Tree) -> BaseException:
        if issubclass(cls, requests.RequestException):
            return cls(tree["message"], request=request)
        if issubclass(cls, _BODY_ERROR_TYPES):
            # Recorded before the body's error was kept with its response: raised mapped as
            # requests maps it when it reads a body (no request on it, as there).
            mapped = next(v for k, v in BODY_ERRORS.items() if issubclass(cls, k))
            return mapped(_body_error(cls, tree))
        return instantiate(cls, tree["message"])

    return build


def _handler(original: Any) -> Any:
    def send(
        self: HTTPAdapter, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        if STATE.mode is Mode.OFF:
            return original(self, request, *args, **kwargs)  # type: ignore[no-any-return]
        entered = time.perf_counter_ns()
        dep = deferrable_span(SCOPE) if STATE.defer else None
        if dep is not None:  # left to the writer (see base.defer)
            body = _body(request)
            sent = (request.method, request.url, list(request.headers.items()), body)
            # The app's redactor learns the request's secrets (headers, URL, configured body
            # fields), as a capture here would: other shims' payloads are scrubbed of them.
            STATE.redactor.learn_header_pairs(sent[2])
            STATE.redactor.url(request.url or "")
            if body:
                STATE.redactor.body(_request_headers(sent[2]), body)
            token = _TAKEN.set(dep)  # claimed until the call ends, as a capture does
            try:
                try:
                    start = time.perf_counter_ns()
                    response: requests.Response = original(self, request, *args, **kwargs)
                    sent_us = (time.perf_counter_ns() - start) // 1000
                    # Until Session.send puts in what requests measured, less what this
                    # added (a cell, read by the writer once the span has ended).
                    elapsed = [sent_us]
                    if _streamed(response, _stream_flag(args, kwargs)):
                        return _timed(_left_stream(dep, sent, request, response, elapsed),
                                      elapsed, entered, False)
                    live, read = _read(response)
                except Exception as exc:
                    defer(dep, "requests",
                          (*sent, None, None, None, None, None, None, error_tree(exc)))
                    raise
                headers = list(live.headers.items())
                STATE.redactor.learn_header_pairs(headers)  # as the request's, above
                defer(dep, "requests", (*sent, live.status, live.reason, live.version, headers,
                                        elapsed, read, None))
            finally:
                _TAKEN.reset(token)
            return _timed(_swapped(request, response, headers, read), elapsed, entered, False)
        call = _call(request)
        action = decide(call)
        if isinstance(action, Match):
            # Its secret headers learned, as a recording learns them (see httpx's _replayed).
            STATE.redactor.learn_header_pairs(request.headers.items())
            span = action.span
            if span.error is not None:
                raise rebuild_error(span.error, _build_exc(request))
            r = span.response
            broke = r.get("error")
            label = span.label or span.name
            raw = _raw(r["status"], r["reason"], r["version"], [tuple(h) for h in r["headers"]],
                       as_bytes(r["body"]), request,
                       rebuild_error(broke, _body_error) if broke is not None
                       else (lambda: stopped_reading(label)) if r.get("body_open") else None,
                       r.get("chunk_sizes"))
            replayed = self.build_response(request, raw)
            elapsed_us = r.get("elapsed_us")
            if elapsed_us is not None:  # (else requests' own measure of the replay)
                replayed.__dict__[_ELAPSED] = timedelta(microseconds=elapsed_us)
            return replayed
        if action is LIVE:
            return original(self, request, *args, **kwargs)  # type: ignore[no-any-return]
        with capture(call, SCOPE) as cap:
            try:
                start = time.perf_counter_ns()
                response = original(self, request, *args, **kwargs)
                sent_us = (time.perf_counter_ns() - start) // 1000
                if _streamed(response, _stream_flag(args, kwargs)):
                    return _timed(_captured_stream(cap, request, response, sent_us),
                                  [sent_us], entered, True)
                live, read = _read(response)
            except Exception as exc:
                cap.fail(exc)
                raise
            headers = list(live.headers.items())
            cap.ok(_response_tree_of(live.status, live.reason, live.version, headers,
                                     sent_us, *read))
        # (the payload is set already, with the live send's own time)
        return _timed(_swapped(request, response, headers, read), [sent_us], entered, True)

    return send


def _left_stream(dep: Any, sent: tuple[Any, ...], request: requests.PreparedRequest,
                 response: requests.Response, elapsed: list[int]) -> requests.Response:
    """A streamed body under a timetracer writer: the call left beside its span once the body
    ends, and the span ended then."""
    live = response.raw
    headers = list(live.headers.items())
    STATE.redactor.learn_header_pairs(headers)
    release = hold_end(dep)

    def finish(read: Read) -> None:
        try:
            defer(dep, "requests", (*sent, live.status, live.reason, live.version, headers,
                                    elapsed, read, None))
        finally:
            release()

    return _streaming(request, response, headers, finish, release)


def _captured_stream(cap: Any, request: requests.PreparedRequest, response: requests.Response,
                     sent_us: int) -> requests.Response:
    """A streamed body captured on the request path: its payload put on the span once the
    body ends, and the span ended then."""
    live = response.raw
    headers = list(live.headers.items())
    release = hold_end(cap.span)

    def finish(read: Read) -> None:
        try:
            cap.ok(_response_tree_of(live.status, live.reason, live.version, headers, sent_us,
                                     *read))
        finally:
            release()

    return _streaming(request, response, headers, finish, release)


# On a response this shim made: the recorded elapsed (a replay), or (record) the cell of the
# recording's elapsed and the µs its early body read added to requests' measure.
_ELAPSED = "_timetracer_elapsed"
_TIMED = "_timetracer_timed"


def _timed(response: requests.Response, cell: list[int], entered: int,
           kept: bool) -> requests.Response:
    """Mark a recorded response for :func:`_set_elapsed`: the cell of the elapsed the
    recording keeps (until then the live send's own time: what a caller of the adapter
    itself, with no Session, keeps), and the µs this adapter call took beyond that send (the
    early body read, the capture), which requests' measure then includes. ``kept``: the
    payload is set already, with the cell's value."""
    added = (time.perf_counter_ns() - entered) // 1000 - cell[0]
    response.__dict__[_TIMED] = (cell, added, kept)
    return response


def _session_send(original: Any) -> Any:
    """``Session.send``, which sets ``elapsed`` once ``adapter.send`` returns: a replayed
    response then gets the recorded value; a recorded one requests' measure less the body read
    the recording added (the body of a call not streamed is read after requests measures),
    and that is what the recording keeps (an adapter that sends twice, a retry, is measured
    whole, as requests measures it). Each response of a redirect chain went through a send
    of its own. The response hooks, which run inside, see requests' measure."""

    def send(self: requests.Session, request: requests.PreparedRequest, **kwargs: Any) -> Any:
        response = original(self, request, **kwargs)
        if isinstance(response, requests.Response):
            # (the first of a redirect chain is in the history of the last, which its own
            # send returned: each response is set once, by the send that made it or this one)
            for r in (*response.history, response):
                _set_elapsed(r)
        return response

    return send


def _set_elapsed(response: requests.Response) -> None:
    attrs = response.__dict__
    elapsed = attrs.pop(_ELAPSED, None)
    if elapsed is not None and response.elapsed:  # (requests set it: Session.send sent it)
        response.elapsed = elapsed
    timed = attrs.pop(_TIMED, None)
    if timed is not None:
        cell, added_us, kept = timed
        measured = response.elapsed // timedelta(microseconds=1)
        if measured > added_us:  # (set by requests, which a direct adapter caller's is not)
            off = measured - added_us  # what requests would have measured without the recording
            if not kept:
                cell[0] = off
            elif abs(off - cell[0]) < 1000:  # one send, as recorded: exactly what replays
                off = cell[0]
            # (else an adapter that sent more than once: measured whole, replayed as the last)
            response.elapsed = timedelta(microseconds=off)


def _body_error(cls: type[BaseException], tree: Tree) -> BaseException:
    # One argument, the recorded message: its str is the live error's (a urllib3 error's
    # arguments, a connection pool or a nested exception, are not kept).
    return instantiate(cls, tree["message"])


# What :func:`_read` (or a streamed body, :class:`_LiveBody`) read: the raw bytes, a chunked
# body's chunk lengths (when more than one), the tree of the error that broke the body (None
# for none), and whether the app stopped reading it before its end (a streamed body).
Read = tuple[bytes, list[int] | None, Tree, bool]


def _read(response: requests.Response) -> tuple[HTTPResponse, Read]:
    """The urllib3 response and what was read (see :data:`Read`): its raw bytes (still
    content-encoded) and, when the body broke with an error requests maps, the bytes before
    it and that error; the connection goes back to the pool.

    A chunked body is read chunk by chunk (as fast as http.client's whole read), so the chunks
    before an error are kept. Another body is read as it comes (``read1``: what arrived, in
    one socket read at most), so an error keeps the bytes before it too: one whole read loses
    them with a read timeout (http.client's buffered read drops what it had). urllib3 before
    2.3 has no ``read1``: one whole read there, whose bytes only a connection closed early
    keeps (http.client's IncompleteRead carries them)."""
    live = response.raw
    broke: Tree = None
    lengths: list[int] | None = None
    if live.chunked and live.supports_chunked_reads():
        chunks: list[bytes] = []
        try:
            for chunk in live.read_chunked(None, decode_content=False):
                chunks.append(chunk)
        except _BODY_ERROR_TYPES as exc:
            broke = error_tree(exc)
        content = b"".join(chunks)
        if len(chunks) > 1:
            lengths = [len(c) for c in chunks]
    else:
        buffer = io.BytesIO()  # (getvalue: the bytes it grew, not a copy)
        try:
            if _READ1 and type(getattr(live, "_fp", None)) is http.client.HTTPResponse:
                while part := live.read1(_PIECE, decode_content=False):
                    buffer.write(part)
                    if live.length_remaining == 0:  # its Content-Length read (and closed)
                        break
            else:  # (a wrapper's read (CacheControl's) does more than read: called as is)
                buffer.write(live.read(decode_content=False))
        except _BODY_ERROR_TYPES as exc:
            broke = error_tree(exc)
            if not buffer.tell():
                buffer.write(_partial(exc))
        content = buffer.getvalue()
    live.release_conn()
    return live, (content, lengths, broke, False)


# urllib3 >= 2.3's read1, and the most one call asks for (a socket read gives what came).
_READ1 = hasattr(HTTPResponse, "read1")
_PIECE = 1 << 18


def _partial(exc: BaseException) -> bytes:
    """The bytes an IncompleteRead behind ``exc`` carries (http.client's), else none."""
    for arg in (exc, *exc.args, exc.__cause__):
        partial = getattr(arg, "partial", None)
        if isinstance(partial, bytes):
            return partial
    return b""


def _swapped(request: requests.PreparedRequest, response: requests.Response,
             headers: list[tuple[str, str]], read: Read) -> requests.Response:
    """``response`` reading the recorded bytes from memory (the live ones were read), and
    raising the error that broke them after them, as a replay does."""
    live = response.raw
    content, chunks, broke, _ = read
    replacement = _raw(live.status, live.reason, live.version, headers, content, request,
                       None if broke is None else rebuild_error(broke, _body_error), chunks)
    replacement._original_response = live._original_response
    response.raw = replacement
    return response


class RequestsShim(Shim):
    library = "requests"
    requires = "requests"
    scope = SCOPE
    instrumentor = "opentelemetry.instrumentation.requests:RequestsInstrumentor"

    def patch(self) -> None:
        self.wrap(HTTPAdapter, "send", _handler)
        self.wrap(requests.Session, "send", _session_send)
