"""requests: ``HTTPAdapter.send``, beneath the instrumentation's ``Session.send`` patch.

Record reads the urllib3 response's raw bytes (still content-encoded) and swaps in an
equivalent in-memory urllib3 response, so requests decodes and extracts cookies as usual.
Replay builds the same urllib3 response from the cassette and lets ``build_response`` make the
``requests.Response``; recorded errors come back as their ``requests.exceptions`` class.

Under a timetracer writer the call is left on its span as captured and :func:`_payload_of`
makes its payload in the writer (see ``base.defer``), with the same functions the
request-path :class:`~.base.Capture` uses.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from http.client import HTTPMessage
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3 import HTTPResponse
from urllib3._collections import HTTPHeaderDict

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
    built_payload,
    capture,
    decide,
    defer,
    deferrable_span,
    error_tree,
    instantiate,
    rebuild_error,
)

SCOPE = "opentelemetry.instrumentation.requests"


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
                      headers: Iterable[Sequence[Any]], body: bytes) -> Tree:
    return {
        "status": status,
        "reason": reason,
        "version": version,
        "headers": [list(h) for h in STATE.redactor.headers(headers)],  # type: ignore[arg-type]
        "body": body,
    }


def _payload_of(args: Sequence[Any]) -> Payload:
    """A deferred call's Payload, whose encoding :class:`~.base.Capture` would have set:
    request built (and its secrets learned) first, then the response scrubbed and packed."""
    method, url, pairs, body, status, reason, version, headers, content, error = args
    return built_payload(_call_of(method, url, pairs, body), error, lambda: _response_tree_of(
        status, reason, version, headers, content))


BUILDERS["requests"] = _payload_of


def _raw(status: int, reason: str | None, version: int, headers: list[tuple[str, str]], body: bytes,
         request: requests.PreparedRequest) -> HTTPResponse:
    hd = HTTPHeaderDict()
    msg = HTTPMessage()
    for k, v in headers:
        hd.add(k, v)
        msg[k] = v
    raw = HTTPResponse(
        body=io.BytesIO(body),
        headers=hd,
        status=status,
        reason=reason,
        version=version,
        preload_content=False,
        decode_content=True,
        request_method=request.method,
        request_url=request.url,
    )
    # requests extracts cookies from the http.client message behind the urllib3 response.
    raw._original_response = _Original(msg)  # type: ignore[assignment]
    return raw


class _Original:
    def __init__(self, msg: HTTPMessage) -> None:
        self.msg = msg

    def isclosed(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _build_exc(request: requests.PreparedRequest) -> Any:
    def build(cls: type[BaseException], tree: Tree) -> BaseException:
        if issubclass(cls, requests.RequestException):
            return cls(tree["message"], request=request)
        return instantiate(cls, tree["message"])

    return build


def _handler(original: Any) -> Any:
    def send(
        self: HTTPAdapter, request: requests.PreparedRequest, *args: Any, **kwargs: Any
    ) -> requests.Response:
        if STATE.mode is Mode.OFF:
            return original(self, request, *args, **kwargs)  # type: ignore[no-any-return]
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
                    response: requests.Response = original(self, request, *args, **kwargs)
                    live, content = _read(response)
                except Exception as exc:
                    defer(dep, "requests", (*sent, None, None, None, None, None, error_tree(exc)))
                    raise
                headers = list(live.headers.items())
                STATE.redactor.learn_header_pairs(headers)  # as the request's, above
                defer(dep, "requests", (*sent, live.status, live.reason, live.version, headers,
                                        content, None))
            finally:
                _TAKEN.reset(token)
            return _swapped(request, response, headers, content)
        call = _call(request)
        action = decide(call)
        if isinstance(action, Match):
            # Its secret headers learned, as a recording learns them (see httpx's _replayed).
            STATE.redactor.learn_header_pairs(request.headers.items())
            span = action.span
            if span.error is not None:
                raise rebuild_error(span.error, _build_exc(request))
            r = span.response
            raw = _raw(r["status"], r["reason"], r["version"], [tuple(h) for h in r["headers"]],
                       as_bytes(r["body"]), request)
            return self.build_response(request, raw)
        if action is LIVE:
            return original(self, request, *args, **kwargs)  # type: ignore[no-any-return]
        with capture(call, SCOPE) as cap:
            try:
                response = original(self, request, *args, **kwargs)
                live, content = _read(response)
            except Exception as exc:
                cap.fail(exc)
                raise
            headers = list(live.headers.items())
            cap.ok(_response_tree_of(live.status, live.reason, live.version, headers, content))
        return _swapped(request, response, headers, content)

    return send


def _read(response: requests.Response) -> tuple[HTTPResponse, bytes]:
    """The urllib3 response and its raw bytes (still content-encoded); the connection goes
    back to the pool."""
    live = response.raw
    content = live.read(decode_content=False)
    live.release_conn()
    return live, content


def _swapped(request: requests.PreparedRequest, response: requests.Response,
             headers: list[tuple[str, str]], content: bytes) -> requests.Response:
    """``response`` reading the recorded bytes from memory (the live ones were read)."""
    live = response.raw
    replacement = _raw(live.status, live.reason, live.version, headers, content, request)
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
