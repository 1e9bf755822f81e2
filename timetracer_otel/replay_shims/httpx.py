"""httpx: ``HTTPTransport.handle_request`` and ``AsyncHTTPTransport.handle_async_request``.

The OTel instrumentation wraps the same two methods; this shim sits beneath its wrapper, so
its span is current. Record reads the raw response stream (chunk boundaries kept, content
still encoded) and hands the client an equivalent in-memory stream; replay returns an
``httpx.Response`` built from those bytes, or raises the recorded ``httpx`` exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx

from timetracer_otel.codec import Tree, as_bytes
from timetracer_otel.config import Mode
from timetracer_otel.index import Match
from timetracer_otel.keys import PROPAGATION_HEADERS, Call, http_call
from timetracer_otel.replay_shims.base import (
    LIVE,
    STATE,
    Shim,
    capture,
    decide,
    instantiate,
    rebuild_error,
)

SCOPE = "opentelemetry.instrumentation.httpx"
_PROPAGATION_RAW = frozenset(h.encode() for h in PROPAGATION_HEADERS)


class _Chunks(httpx.SyncByteStream, httpx.AsyncByteStream):
    """The recorded body, yielded in the chunks the live server sent."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    def __iter__(self) -> Iterator[bytes]:
        yield from self.chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


def _triples(headers: httpx.Headers) -> Any:
    """The ``(name, lowercased name, value)`` bytes httpx keeps, read once (its public ``raw``
    builds a list of pairs on every access)."""
    triples = getattr(headers, "_list", None)
    if type(triples) is list:
        return triples
    return [(k, k.lower(), v) for k, v in headers.raw]


def _call(request: httpx.Request) -> Call:
    r = STATE.redactor

    def headers() -> list[tuple[str, str]]:
        return r.header_rows(_triples(request.headers), _PROPAGATION_RAW)

    return http_call("httpx", request.method, r.url(str(request.url)), headers, request.content)


def _response_tree(response: httpx.Response, chunks: list[bytes]) -> Tree:
    ext = response.extensions
    return {
        "status": response.status_code,
        "headers": STATE.redactor.header_rows(_triples(response.headers)),
        "chunks": chunks,
        "http_version": ext.get("http_version", b"HTTP/1.1").decode("latin-1"),
        "reason": ext.get("reason_phrase", b"").decode("latin-1"),
    }


def _error_attrs(exc: BaseException) -> Tree:
    return None


def _build_exc(request: httpx.Request) -> Any:
    def build(cls: type[BaseException], tree: Tree) -> BaseException:
        if issubclass(cls, httpx.RequestError):
            return cls(tree["message"], request=request)
        return instantiate(cls, tree["message"])

    return build


def _replayed(match: Match, request: httpx.Request) -> httpx.Response:
    span = match.span
    if span.error is not None:
        raise rebuild_error(span.error, _build_exc(request))
    r = span.response
    return httpx.Response(
        status_code=r["status"],
        headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in r["headers"]],
        stream=_Chunks([c if type(c) is bytes else as_bytes(c) for c in r["chunks"]]),
        extensions={
            "http_version": r["http_version"].encode("latin-1"),
            "reason_phrase": r["reason"].encode("latin-1"),
        },
        request=request,
    )


def _sync_handler(original: Any) -> Any:
    def handle_request(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        if STATE.mode is Mode.OFF:
            return original(self, request)  # type: ignore[no-any-return]
        request.read()
        call = _call(request)
        action = decide(call)
        if isinstance(action, Match):
            return _replayed(action, request)
        if action is LIVE:
            return original(self, request)  # type: ignore[no-any-return]
        with capture(call, SCOPE) as cap:
            try:
                response: httpx.Response = original(self, request)
                stream = response.stream
                assert isinstance(stream, httpx.SyncByteStream)
                try:
                    chunks = [bytes(c) for c in stream]
                finally:
                    stream.close()
            except Exception as exc:
                cap.fail(exc, _error_attrs(exc))
                raise
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
        call = _call(request)
        action = decide(call)
        if isinstance(action, Match):
            return _replayed(action, request)
        if action is LIVE:
            return await original(self, request)  # type: ignore[no-any-return]
        with capture(call, SCOPE) as cap:
            try:
                response: httpx.Response = await original(self, request)
                astream = response.stream
                assert isinstance(astream, httpx.AsyncByteStream)
                try:
                    chunks = [bytes(c) async for c in astream]
                finally:
                    await astream.aclose()
            except Exception as exc:
                cap.fail(exc, _error_attrs(exc))
                raise
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
