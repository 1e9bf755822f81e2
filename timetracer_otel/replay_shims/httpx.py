"""httpx: ``HTTPTransport.handle_request`` and ``AsyncHTTPTransport.handle_async_request``.

The OTel instrumentation wraps the same two methods; this shim sits beneath its wrapper, so
its span is current. Record reads the raw response stream (chunk boundaries kept, content
still encoded) and hands the client an equivalent in-memory stream; replay returns an
``httpx.Response`` built from those bytes, or raises the recorded ``httpx`` exception.

Under a timetracer writer the call is left on its span as captured (method, URL, header
triples, body, status, chunks: references, no copies of bodies) and :func:`_payload_of` makes
its payload in the writer (see ``base.defer``); otherwise :class:`~.base.Capture` makes it on
the request path. Both build the trees with the same functions.

A body that breaks off after the response started (a read timeout, a peer closing before the
declared length) is recorded as the response with the chunks that arrived and a
``body_error`` (its error tree); the client's stream, live and replayed, yields those chunks
and then raises the error, where plain httpx raises it (while the body is read). A response
without ``body_error`` (every response of an older cassette) ends after its chunks.

A body the app may read as it comes is not read first: one of a streamed type (server-sent
events, NDJSON and the others of ``base.STREAMED_TYPES``: an LLM's tokens, an event feed), of
no stated length (chunked: a watch, a log tail, any dynamic body) or longer than
``base.READ_WHOLE_UP_TO`` (a download). The app gets each chunk as it arrives, the call keeps
it as the app reads it, and the call ends with the body (see :class:`_Tee`): read to its end,
broken off, or closed by the app, which then recorded what it read. The instrumentation's span
ends with it (``base.hold_end``). A response that has no body (to a HEAD, a 204...) is read
whole, whatever its headers say.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import copy_context
from typing import Any

import httpx

from timetracer_otel.codec import Tree, as_bytes
from timetracer_otel.config import Mode
from timetracer_otel.errors import CassetteError
from timetracer_otel.index import Match
from timetracer_otel.keys import PROPAGATION_HEADERS, Call, http_call
from timetracer_otel.replay_shims.base import (
    _TAKEN,
    BUILDERS,
    LIVE,
    READ_WHOLE_UP_TO,
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

SCOPE = "opentelemetry.instrumentation.httpx"
_PROPAGATION_RAW = frozenset(h.encode() for h in PROPAGATION_HEADERS)
log = logging.getLogger("timetracer_otel")


class _Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """The recorded body, yielded in the chunks the live server sent.

    Plain iterators, not generators: asyncio registers every async generator that starts
    (a weak set entry and a finalizer hook, ~50 bytecodes per recorded call)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.chunks)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return _AsyncChunks(iter(self.chunks))


class _BrokenChunks(_Chunks):
    """A body that broke off: the chunks that arrived, then the error that ended it (the live
    exception under record; in replay a function rebuilding the recorded one, called only
    when the app reaches it, as a refused rebuild is counted then)."""

    def __init__(self, chunks: list[bytes], error: BaseException | Callable[[], BaseException]) -> None:
        super().__init__(chunks)
        self.error = error

    def _error(self) -> BaseException:
        error = self.error
        return error if isinstance(error, BaseException) else error()

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks
        raise self._error()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk
        raise self._error()


class _AsyncChunks:
    __slots__ = ("chunks",)

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = chunks

    def __aiter__(self) -> _AsyncChunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = next(self.chunks, None)
        if chunk is None:
            raise StopAsyncIteration
        return chunk


class _Tee(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A live body of a streamed type, passed to the app chunk by chunk as it arrives, each
    kept as it goes (up to the payload limit, past which the call is stored truncated), and
    the call finished once, with what was read: at the body's end, when it breaks off (with
    its error), when the app stops reading it (closes it, is cancelled: the body is then
    ``open``, see :func:`_open_tree`), when the response is dropped unclosed (finished on
    ``base``'s late calls' thread, never in the finaliser), or when the run it was opened in
    ends first (read so far, ``open``; the app may read on)."""

    def __init__(self, stream: Any, finish: Finish | None) -> None:
        self.stream = stream
        self.chunks: list[bytes] = []
        self.finish: Finish | None = finish
        self.room = STATE.max_payload_bytes
        self.done = False  # read to its end
        self.context = copy_context()
        ready_late()
        stream_opened(self)

    def _keep(self, chunk: bytes) -> bytes:
        chunk = bytes(chunk)
        if self.room >= 0:  # (one chunk past the limit: the payload says truncated)
            self.chunks.append(chunk)
            self.room -= len(chunk)
        return chunk

    def _end(self, exc: BaseException | None = None) -> None:
        finish, self.finish = self.finish, None
        if finish is not None:
            # What the app reads after this (its run ended first) is not kept: the call, which
            # may hold this list already, is what was read until now.
            chunks, self.chunks, self.room = self.chunks, [], -1
            stream_ended(self)
            try:
                finish(chunks, exc, not self.done and exc is None)
            except Exception:  # never the app's
                log.warning("timetracer-otel: a streamed httpx response could not be recorded",
                            exc_info=True)

    def record_now(self) -> None:
        """Its run ends with the body still open: recorded as read so far (``base.end_streams``)."""
        self._end()

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self.stream:
                yield self._keep(chunk)
        except Exception as exc:
            self._end(exc)
            raise
        self.done = True
        self._end()

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            self._end()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.stream:
                yield self._keep(chunk)
        except Exception as exc:
            self._end(exc)
            raise
        self.done = True
        self._end()

    async def aclose(self) -> None:
        try:
            await self.stream.aclose()
        finally:
            self._end()

    def __del__(self) -> None:
        if self.finish is not None:
            finish_late(self.context, self._end)


# A streamed call's end: (chunks read, the error that broke the body, whether the app stopped
# reading before its end).
Finish = Callable[[list[bytes], BaseException | None, bool], None]


def _open_tree(tree: Tree) -> Tree:
    """A response tree whose body the app stopped reading before its end, while recording:
    a replay gives the chunks read, then refuses to make up what came after."""
    tree["body_open"] = True
    return tree


def _streamed(request: httpx.Request, response: httpx.Response) -> bool:
    """Whether the body reaches the app as it comes rather than read whole first: a type an
    app reads as it comes (``base.STREAMED_TYPES``), or a body of no stated length or one
    longer than ``base.READ_WHOLE_UP_TO``. The transport cannot tell ``client.stream()``
    from ``client.get()``, so this is read from the response: an endless body (a watch, a
    log tail) has no length, whatever its type. A response that has no body is not one."""
    length = None
    for triple in _triples(response.headers):
        name = triple[1]
        if name == b"content-length":
            length = triple[2]
        elif name == b"content-type" and streamed_type(triple[2].decode("latin-1")):
            return not bodiless(request.method, response.status_code)
    # (A stated length of up to six digits is under the limit: no int() on the common path.)
    if length is not None and length.isdigit() and (
            len(length) < 7 or int(length) <= READ_WHOLE_UP_TO):
        return False
    return not bodiless(request.method, response.status_code)


def _left_stream(span: Any, request: httpx.Request, live: httpx.Response) -> _Tee:
    """A streamed body under a timetracer writer: the call left beside its span once the body
    ends, and the span ended then."""
    release = hold_end(span)
    try:
        tee = _Tee(live.stream, None)
        captured = _captured(request, live, tee.chunks, None)  # (its secrets learned now)
    except BaseException:  # (the span must still end)
        release()
        raise

    def finish(chunks: list[bytes], exc: BaseException | None, body_open: bool) -> None:
        try:
            error = None if exc is None else error_tree(exc, _error_attrs(exc))
            defer(span, "httpx", (*captured[:9], error, body_open))
        finally:
            release()

    tee.finish = finish
    return tee


def _captured_stream(cap: Any, response: httpx.Response) -> _Tee:
    """A streamed body captured on the request path: its payload put on the span once the
    body ends, and the span ended then."""
    release = hold_end(cap.span)

    def finish(chunks: list[bytes], exc: BaseException | None, body_open: bool) -> None:
        try:
            tree = _response_tree(response, chunks)
            if exc is not None:
                tree = _broken_tree(tree, error_tree(exc, _error_attrs(exc)))
            cap.ok(_open_tree(tree) if body_open else tree)
        finally:
            release()

    return _Tee(response.stream, finish)


def _triples(headers: httpx.Headers) -> Any:
    """The ``(name, lowercased name, value)`` bytes httpx keeps, read once (its public ``raw``
    builds a list of pairs on every access)."""
    triples = getattr(headers, "_list", None)
    if type(triples) is list:
        return triples
    return [(k, k.lower(), v) for k, v in headers.raw]


def _as_triples(triples: Sequence[Any]) -> Sequence[Any]:
    """Header triples as tuples (a deferred call's come back from msgpack as lists; ``map``
    converts them without a Python frame per header)."""
    if triples and type(triples[0]) is not tuple:
        return list(map(tuple, triples))
    return triples


def _call_of(method: str, url: str, triples: Sequence[Any], body: bytes) -> Call:
    r = STATE.redactor

    def headers() -> list[tuple[str, str]]:
        return r.header_rows(_as_triples(triples), _PROPAGATION_RAW)

    return http_call("httpx", method, r.url(url), headers, body)


def _call(request: httpx.Request) -> Call:
    return _call_of(request.method, str(request.url), _triples(request.headers), request.content)


def _response_tree_of(status: int, triples: Sequence[Any], chunks: list[bytes],
                      http_version: bytes, reason: bytes) -> Tree:
    return {
        "status": status,
        "headers": STATE.redactor.header_rows(_as_triples(triples)),
        "chunks": chunks,
        "http_version": http_version.decode("latin-1"),
        "reason": reason.decode("latin-1"),
    }


def _broken_tree(tree: Tree, body_error: Tree) -> Tree:
    """A response tree whose body broke off with ``body_error`` (after its chunks)."""
    tree["body_error"] = body_error
    return tree


def _response_tree(response: httpx.Response, chunks: list[bytes]) -> Tree:
    ext = response.extensions
    return _response_tree_of(response.status_code, _triples(response.headers), chunks,
                             ext.get("http_version", b"HTTP/1.1"), ext.get("reason_phrase", b""))


# --- deferred record (see base.defer) ----------------------------------------------------------


def _captured(request: httpx.Request, response: httpx.Response | None, chunks: list[bytes],
              error: Tree) -> tuple[Any, ...]:
    """The call as :func:`_payload_of` takes it. Header lists are copied (the app may still
    change its Headers); bodies and chunks are immutable bytes, referenced. With a response,
    ``error`` is its body's (see :func:`_broken_tree`).

    The app's redactor learns the secrets of the request here (headers, URL, configured body
    fields) and of the response headers, as a capture on the request path would, so the
    payloads other shims encode in the app are scrubbed of them too."""
    r = STATE.redactor
    url, content = str(request.url), request.content
    sent = list(_triples(request.headers))
    r.learn_headers(sent)
    r.url(url)  # memoised per URL
    if content:
        r.body(r.header_rows(sent, _PROPAGATION_RAW), content)
    if response is None:
        return (request.method, url, sent, content, None, None, None, None, None, error, False)
    received = list(_triples(response.headers))
    r.learn_headers(received)
    ext = response.extensions
    return (request.method, url, sent, content, response.status_code, received, chunks,
            ext.get("http_version", b"HTTP/1.1"), ext.get("reason_phrase", b""), error, False)


def _payload_of(args: Sequence[Any]) -> Payload:
    """A deferred call's Payload, whose encoding :class:`~.base.Capture` would have set:
    request built (and its secrets learned) first, then the response scrubbed and packed."""
    method, url, req_triples, body, status, resp_triples, chunks, http_version, reason, error, \
        body_open = args
    if error is not None and status is not None:  # the body broke off after the response started
        return built_payload(_call_of(method, url, req_triples, body), None, lambda: _broken_tree(
            _response_tree_of(status, resp_triples, chunks, http_version, reason), error))
    if body_open:
        return built_payload(_call_of(method, url, req_triples, body), None, lambda: _open_tree(
            _response_tree_of(status, resp_triples, chunks, http_version, reason)))
    return built_payload(_call_of(method, url, req_triples, body), error, lambda: _response_tree_of(
        status, resp_triples, chunks, http_version, reason))


BUILDERS["httpx"] = _payload_of


def _error_attrs(exc: BaseException) -> Tree:
    return None


def _build_exc(request: httpx.Request) -> Any:
    def build(cls: type[BaseException], tree: Tree) -> BaseException:
        if issubclass(cls, httpx.RequestError):
            return cls(tree["message"], request=request)
        return instantiate(cls, tree["message"])

    return build


def _replayed(match: Match, request: httpx.Request) -> httpx.Response:
    # The request's secret headers (its Authorization...) learned as a recording learns
    # them, though the replay never builds its stored headers: a later call that carries
    # such a secret (a SQL parameter, a Redis value) is then scrubbed and keyed as recorded.
    STATE.redactor.learn_headers(_triples(request.headers))
    span = match.span
    if span.error is not None:
        raise rebuild_error(span.error, _build_exc(request))
    r = span.response
    try:
        chunks = [c if type(c) is bytes else as_bytes(c) for c in r["chunks"]]
        body_error = r.get("body_error")  # absent from a whole body's response (older cassettes)
        stream: _Chunks
        if body_error is not None:
            stream = _BrokenChunks(chunks, lambda: rebuild_error(body_error, _build_exc(request)))
        elif r.get("body_open"):
            stream = _BrokenChunks(chunks, lambda: stopped_reading(span.label or span.name))
        else:
            stream = _Chunks(chunks)
        status = r["status"]
        if type(status) is not int:
            raise TypeError(f"its status is {status!r}")
        return httpx.Response(
            status_code=status,
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in r["headers"]],
            stream=stream,
            extensions={
                "http_version": r["http_version"].encode("latin-1"),
                "reason_phrase": r["reason"].encode("latin-1"),
            },
            request=request,
        )
    except (TypeError, KeyError, AttributeError, ValueError) as exc:  # (written by no shim)
        raise CassetteError(
            f"The recorded response of {span.label or span.name} in {match.source} is not one "
            f"this package writes ({type(exc).__name__}: {exc}); record it again.") from None


def _chunks(response: httpx.Response, chunks: list[bytes]) -> None:
    """The live body as the server sent it (chunk boundaries kept, still encoded), read into
    ``chunks``; when the read fails, ``chunks`` holds what arrived before (``list.extend``
    keeps the items an iterator gave before it raised, and costs less than a comprehension)."""
    stream = response.stream
    assert isinstance(stream, httpx.SyncByteStream)
    try:
        chunks.extend(map(bytes, stream))
    finally:
        stream.close()


async def _achunks(response: httpx.Response, chunks: list[bytes]) -> None:
    stream = response.stream
    assert isinstance(stream, httpx.AsyncByteStream)
    try:
        async for c in stream:  # as fast as a comprehension, and keeps what came before an error
            chunks.append(bytes(c))
    finally:
        await stream.aclose()


# Both handlers leave a call to the writer inline (span claimed, defer), not through a
# capture-like object: that object, its with-protocol and the dispatch cost 10,700
# instructions per recorded call on the request path (scenario 7's record mode).


def _sync_handler(original: Any) -> Any:
    def handle_request(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        if STATE.mode is Mode.OFF:
            return original(self, request)  # type: ignore[no-any-return]
        request.read()
        span = deferrable_span(SCOPE) if STATE.defer else None
        if span is not None:
            token = _TAKEN.set(span)  # claimed until the call ends, as a capture does
            try:
                try:
                    live: httpx.Response = original(self, request)
                except Exception as exc:
                    defer(span, "httpx", _captured(request, None, [], error_tree(exc, _error_attrs(exc))))
                    raise
                if _streamed(request, live):
                    live.stream = _left_stream(span, request, live)
                    return live
                chunks: list[bytes] = []
                try:
                    _chunks(live, chunks)
                except Exception as exc:  # the body broke off: its chunks, then the error
                    defer(span, "httpx", _captured(request, live, chunks, error_tree(exc, _error_attrs(exc))))
                    live.stream = _BrokenChunks(chunks, exc)
                    return live
                defer(span, "httpx", _captured(request, live, chunks, None))
            finally:
                _TAKEN.reset(token)
            live.stream = _Chunks(chunks)
            return live
        call = _call(request)
        action = decide(call)
        if isinstance(action, Match):
            return _replayed(action, request)
        if action is LIVE:
            return original(self, request)  # type: ignore[no-any-return]
        with capture(call, SCOPE) as cap:
            try:
                response: httpx.Response = original(self, request)
            except Exception as exc:
                cap.fail(exc, _error_attrs(exc))
                raise
            if _streamed(request, response):
                response.stream = _captured_stream(cap, response)
                return response
            chunks = []
            try:
                _chunks(response, chunks)
            except Exception as exc:  # the body broke off: its chunks, then the error
                cap.ok(_broken_tree(_response_tree(response, chunks), error_tree(exc, _error_attrs(exc))))
                response.stream = _BrokenChunks(chunks, exc)
                return response
            cap.ok(_response_tree(response, chunks))
        response.stream = _Chunks(chunks)
        return response

    return handle_request


def _async_handler(original: Any) -> Any:
    async def handle_async_request(
        self: httpx.AsyncHTTPTransport, request: httpx.Request
    ) -> httpx.Response:
        if STATE.mode is Mode.OFF:
            return await original(self, request)  # type: ignore[no-any-return]
        await request.aread()
        span = deferrable_span(SCOPE) if STATE.defer else None
        if span is not None:
            token = _TAKEN.set(span)  # claimed until the call ends, as a capture does
            try:
                try:
                    live: httpx.Response = await original(self, request)
                except Exception as exc:
                    defer(span, "httpx", _captured(request, None, [], error_tree(exc, _error_attrs(exc))))
                    raise
                if _streamed(request, live):
                    live.stream = _left_stream(span, request, live)
                    return live
                chunks: list[bytes] = []
                try:
                    await _achunks(live, chunks)
                except Exception as exc:  # the body broke off: its chunks, then the error
                    defer(span, "httpx", _captured(request, live, chunks, error_tree(exc, _error_attrs(exc))))
                    live.stream = _BrokenChunks(chunks, exc)
                    return live
                defer(span, "httpx", _captured(request, live, chunks, None))
            finally:
                _TAKEN.reset(token)
            live.stream = _Chunks(chunks)
            return live
        call = _call(request)
        action = decide(call)
        if isinstance(action, Match):
            return _replayed(action, request)
        if action is LIVE:
            return await original(self, request)  # type: ignore[no-any-return]
        with capture(call, SCOPE) as cap:
            try:
                response: httpx.Response = await original(self, request)
            except Exception as exc:
                cap.fail(exc, _error_attrs(exc))
                raise
            if _streamed(request, response):
                response.stream = _captured_stream(cap, response)
                return response
            chunks = []
            try:
                await _achunks(response, chunks)
            except Exception as exc:  # the body broke off: its chunks, then the error
                cap.ok(_broken_tree(_response_tree(response, chunks), error_tree(exc, _error_attrs(exc))))
                response.stream = _BrokenChunks(chunks, exc)
                return response
            cap.ok(_response_tree(response, chunks))
        response.stream = _Chunks(chunks)
        return response

    return handle_async_request


class HttpxShim(Shim):
    library = "httpx"
    requires = "httpx"
    scope = SCOPE
    instrumentor = "opentelemetry.instrumentation.httpx:HTTPXClientInstrumentor"

    def patch(self) -> None:
        self.wrap(httpx.HTTPTransport, "handle_request", _sync_handler)
        self.wrap(httpx.AsyncHTTPTransport, "handle_async_request", _async_handler)
