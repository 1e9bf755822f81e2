"""ASGI inbound: the request an app received and every response message it sent.

Patched: ``OpenTelemetryMiddleware.__call__`` (the ASGI instrumentation, which Starlette,
FastAPI and Litestar's OpenTelemetry plugin all use). On its first call it wraps the
middleware's inner app once with :class:`InboundApp`, which therefore runs *inside* the
server span. In record mode it passes every ``receive``/``send`` message through unchanged
(same objects, no buffering) and keeps references to them; just before the message that ends
the response (the span ends with it) it puts the request and the response onto the server
span as ``timetracer.*`` payload attributes. An exception from the app is stored with its
type, message and traceback. Secrets are redacted in the stored copy only.

Under a timetracer writer (``base.defer``) the request path only keeps shallow copies of
the messages and the scope's request fields, teaches the app's redactor the secrets in the
headers and the query, and leaves them with the server span; :func:`_payload_of` builds the
same payload in the writer (its own process, where it has one).

In replay mode the same seam reports what the app sent to :mod:`timetracer_otel.inbound`
(through :data:`PROBE`), so a replay compares the response at the level it was recorded.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import traceback
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from typing import Any
from urllib.parse import parse_qsl, urlencode

import msgspec
from opentelemetry import context, trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.trace import Span

from timetracer_otel.codec import Tree
from timetracer_otel.config import Mode
from timetracer_otel.keys import stable_hash
from timetracer_otel.replay_shims.base import (
    ATTR_LIFESPAN,
    ATTR_PAYLOAD,
    BUILDERS,
    STATE,
    Payload,
    Shim,
    _payload,
    defer,
    deferrable_span,
    error_tree,
)

_StarletteMatch: Any
_StarletteRoute: Any
try:  # route templates of plain Starlette apps (FastAPI and Litestar put them in the scope)
    from starlette.routing import Match as _StarletteMatch
    from starlette.routing import Route as _StarletteRoute
except ImportError:
    _StarletteMatch = _StarletteRoute = None

LIBRARY = "asgi"
SCOPE = "opentelemetry.instrumentation.asgi"

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]

_pack = msgspec.msgpack.Encoder().encode
_NIL = _pack(None)

# Set while one request is captured, so a second OTel middleware nested inside (a manual wrap
# plus the Starlette instrumentor) does not capture it again.
_capturing: ContextVar[bool] = ContextVar("timetracer_asgi_capturing", default=False)


def _room_left(room: int | None, message: Message) -> int | None:
    """``room`` less the bytes of ``message``'s body (a memoryview's ``len`` counts items);
    below zero it stays as it is: the limit was passed, nothing more is kept."""
    body = message.get("body")
    if room is None or room < 0 or not body:
        return room
    return room - (body.nbytes if type(body) is memoryview else len(body))


def _past(room: int | None) -> bool:
    return room is not None and room < 0


class Exchange:
    """One request/response as seen at the seam: messages in order, and the app's exception.

    ``deferred``: the messages are kept with their headers copied as sent (an app may reuse
    a message dict for its next chunk), made into trees by the writer (see
    :func:`_payload_of`); otherwise as trees, made as they pass.

    ``room``: body bytes each direction keeps while recording (the payload limit). Past it
    that direction's messages are no longer kept (an endless event stream the app serves
    holds no more memory as it goes) and its part is stored truncated (:attr:`cut`). None: no
    limit (a replay's, which compares what the app sent)."""

    __slots__ = ("claimed", "deferred", "error", "finished", "received", "received_room",
                 "sent", "sent_room", "span", "tb", "trailers")

    def __init__(self, span: Span | None = None, deferred: bool = False,
                 room: int | None = None) -> None:
        self.span = span
        self.deferred = deferred
        self.received: list[Tree] = []
        self.sent: list[Tree] = []
        self.received_room = self.sent_room = room
        self.error: BaseException | None = None
        self.tb: str | None = None
        self.trailers = False
        self.finished = False
        self.claimed = False

    @property
    def cut(self) -> tuple[bool, bool]:
        """Whether the request's, and the response's, messages passed the limit."""
        return _past(self.received_room), _past(self.sent_room)

    def on_receive(self, message: Message) -> None:
        self.received_room = room = _room_left(self.received_room, message)
        if room is None or room >= 0:
            self.received.append(message_tree(message, header_pairs if self.deferred else headers_tree))

    def on_send(self, message: Message) -> bool:
        """Keep ``message`` (within the limit); True when it completes the response."""
        self.sent_room = room = _room_left(self.sent_room, message)
        if room is None or room >= 0:
            self.sent.append(message_tree(message, header_pairs if self.deferred else headers_tree))
        kind = message.get("type")
        if kind == "http.response.start":
            self.trailers = bool(message.get("trailers", False))
            if message.get("status", 200) >= 500 and self.error is None:
                # An error page sent from an ``except`` block (Starlette's ServerErrorMiddleware
                # inside our seam): keep the exception it is answering; the span ends with it.
                handled = sys.exc_info()[1]
                if isinstance(handled, Exception):
                    self.on_error(handled)
            return False
        if kind == "http.response.body":
            return not self.trailers and not message.get("more_body", False)
        if kind == "http.response.trailers":
            return not message.get("more_trailers", False)
        return False

    def on_error(self, exc: BaseException) -> None:
        self.error = exc
        self.tb = "".join(traceback.format_exception(exc))

    @property
    def status(self) -> int | None:
        return _status(self.sent)


def _status(sent: list[Tree]) -> int | None:
    for m in sent:
        if m.get("type") == "http.response.start":
            return int(m["status"])
    return None


# --- message and scope trees -----------------------------------------------------------------


def _latin(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes | bytearray) else str(value)


def headers_tree(raw: Any) -> list[list[str]]:
    """ASGI ``(bytes, bytes)`` headers as redacted ``[name, value]`` text (latin-1: lossless)."""
    try:  # ASGI headers are bytes
        pairs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw or ()]
    except AttributeError:  # a server handing str or memoryview
        pairs = [(_latin(k), _latin(v)) for k, v in raw or ()]
    return [[k, v] for k, v in STATE.redactor.headers(pairs)]


def header_pairs(raw: Any) -> list[tuple[Any, Any]]:
    """ASGI headers copied as they were sent, unredacted (a deferred request's: OTel's
    response propagator appends to the app's list after our seam, and ASGI allows any
    iterable, which msgpack may not carry)."""
    return [tuple(pair) for pair in raw or ()]


def message_tree(message: Message, headers: Callable[[Any], Any] = headers_tree) -> Tree:
    """An ASGI message as a tree, its headers through ``headers``; bodies stay the very bytes
    objects the app saw (a bytearray or memoryview, which an app may reuse, as bytes), and a
    server extension's object (uvicorn's zero-copy ``file``) is left out.

    A deferred request keeps ``message_tree(message, header_pairs)`` of each message and
    the writer makes the tree of that (see :func:`_payload_of`)."""
    out: dict[str, Tree] = {}
    for key, value in message.items():
        if key == "headers":
            out[key] = headers(value)
        elif isinstance(value, bytes):
            out[key] = value
        elif isinstance(value, bytearray | memoryview):
            out[key] = bytes(value)
        elif value is None or isinstance(value, bool | int | float | str):
            out[key] = value
    return out


def _query(raw: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """The query string with secret parameters redacted (byte-exact otherwise), and its pairs."""
    if not raw:
        return raw, []
    pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
    names = STATE.redactor.param_names
    if not any(k in names for k, _ in pairs):
        return raw, pairs
    tok = STATE.redactor.token
    pairs = [(k, tok(v) if k in names else v) for k, v in pairs]
    return urlencode(pairs).encode("latin-1"), pairs


# Starlette's routes matched again, per app and request: a static route is matched on every
# request otherwise, and an app with many routes pays for each of them. Only apps whose routes
# are all plain ``Route``s are memoised: their match reads nothing but the scope's type, method,
# root_path and path (a Host or Mount route also reads headers or sub-routes). The memo holds
# the routes it was made for and starts again when the app's routes change.
class _RouteMemo:
    __slots__ = ("found", "plain", "routes")

    def __init__(self, routes: tuple[Any, ...]) -> None:
        self.routes = routes
        self.plain = _StarletteRoute is not None and all(type(r) is _StarletteRoute for r in routes)
        self.found: dict[tuple[str, str, str, str], str | None] = {}


_ROUTE_MEMO: weakref.WeakKeyDictionary[Any, _RouteMemo] = weakref.WeakKeyDictionary()
_ROUTE_MEMO_LIMIT = 4096


def route_of(scope: Message) -> str | None:
    """The route template the framework matched: FastAPI, Litestar, then Starlette's routes."""
    route = getattr(scope.get("route"), "path", None)
    if isinstance(route, str):
        return route
    template = scope.get("path_template")
    if isinstance(template, str) and template:
        return template
    app = scope.get("app")
    routes = getattr(app, "routes", None)
    if not routes:
        return None
    try:
        snapshot = tuple(routes)
        memo = _ROUTE_MEMO.get(app)
        if memo is None or memo.routes != snapshot:  # identity first: cheap when unchanged
            memo = _ROUTE_MEMO[app] = _RouteMemo(snapshot)
    except TypeError:  # routes that do not iterate, an app that takes no weak references
        return _match_route(routes, scope)
    if not memo.plain:
        return _match_route(snapshot, scope)
    where = (str(scope.get("type", "")), str(scope.get("method", "")),
             str(scope.get("root_path", "")), str(scope.get("path", "")))
    if where in memo.found:
        return memo.found[where]
    found = _match_route(snapshot, scope)
    if len(memo.found) < _ROUTE_MEMO_LIMIT:
        memo.found[where] = found
    return found


def _match_route(routes: Any, scope: Message) -> str | None:
    if _StarletteMatch is None:
        return None
    partial = None
    for r in routes:
        try:
            match, _ = r.matches(scope)
        except Exception:
            continue
        if match is _StarletteMatch.FULL:
            return getattr(r, "path", None)
        if match is _StarletteMatch.PARTIAL and partial is None:
            partial = getattr(r, "path", None)
    return partial


def request_tree(scope: Message, received: list[Tree],
                 route: str | None) -> tuple[Tree, list[tuple[str, str]]]:
    """The stored request (``received``: its messages as trees), and its (redacted) query
    pairs for the key."""
    client, server = scope.get("client"), scope.get("server")
    raw_path = scope.get("raw_path")
    query, pairs = _query(bytes(scope.get("query_string", b"")))
    return {
        "type": scope.get("type", "http"),
        "http_version": scope.get("http_version", "1.1"),
        "method": scope.get("method", "GET"),
        "scheme": scope.get("scheme", "http"),
        "path": scope.get("path", "/"),
        "raw_path": bytes(raw_path) if raw_path is not None else None,
        "query_string": query,
        "root_path": scope.get("root_path", ""),
        "headers": headers_tree(scope.get("headers")),
        "client": list(client) if client else None,
        "server": list(server) if server else None,
        "route": route,
        "messages": received,
    }, pairs


def identity(request: Tree, pairs: list[tuple[str, str]], body_hash: str) -> tuple[Tree, str, str]:
    """``(identity, shape key, label)`` of a recorded inbound request."""
    query = sorted(pairs)
    method, path = request["method"], request["path"]
    ident = {"method": method, "path": path, "query": [list(q) for q in query], "body": body_hash}
    where = request.get("route") or path
    return ident, _shape_key(method, where), f"{method} {where}"


@functools.lru_cache(maxsize=1024)
def _shape_key(method: str, route: str) -> str:
    # The same for every request of an endpoint (a route template, or a path when unrouted).
    return stable_hash(LIBRARY, {"method": method, "route": route})


# --- record: the payload onto the server span ------------------------------------------------


# What a deferred request keeps of its scope (the fields request_tree reads).
_SCOPE_FIELDS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string",
                 "root_path", "headers", "client", "server")


def _finish(ex: Exchange, scope: Message) -> None:
    """Put request, response and error on the server span (before it ends), or leave them
    with it for the writer; once."""
    if ex.finished:
        return
    ex.finished = True
    span = ex.span
    if span is None or not span.is_recording():
        return
    attrs = getattr(span, "attributes", None) or {}
    route = attrs.get("http.route")
    path, method = scope.get("path", "/"), scope.get("method", "")
    if not route or route in (path, f"{method} {path}"):
        # Missing, or the raw path (Litestar's plugin runs before routing): name the template.
        route = route_of(scope) or route
        if route:
            span.set_attribute("http.route", route)
    error = error_tree(ex.error, {"traceback": ex.tb}) if ex.error is not None else None
    if ex.deferred:
        # The app's redactor learns the request's and the response's secrets now, as the
        # trees would have taught it, so payloads other shims encode in the app lose them too.
        _learn_headers(scope.get("headers"))
        for m in ex.sent:
            if m.get("headers"):  # the response start's, and trailers'
                _learn_headers(m["headers"])
        _query(bytes(scope.get("query_string", b"")))
        fields = {k: scope[k] for k in _SCOPE_FIELDS if k in scope}
        if "headers" in fields:
            fields["headers"] = header_pairs(fields["headers"])
        # Copies of the lists: a receive() after the response (a disconnect listener) is not
        # part of this recording, whenever the writer reads them.
        defer(span, LIBRARY, (fields, route, list(ex.received), list(ex.sent), error, ex.cut))
        return
    span.set_attribute(ATTR_PAYLOAD, _pack(_built(scope, route, ex.received, ex.sent, error,
                                                  ex.cut)))


def _learn_headers(raw: Any) -> None:
    """The secret values among ASGI headers, tokenized for the redactor to know them; a pass
    in C when no name can be secret (ASGI names are lowercase bytes)."""
    if not raw:
        return
    names = STATE.redactor.header_names
    try:
        lowered = [k.lower() for k, _ in raw]
        if not names.globs and all(type(k) is bytes for k in lowered) \
                and names.exact_bytes.isdisjoint(lowered):
            return
    except (AttributeError, TypeError, ValueError):  # odd names: the full pass
        pass
    headers_tree(raw)


def _built(scope: Message, route: str | None, received: list[Tree], sent: list[Tree],
           error: Tree, cut: tuple[bool, bool] = (False, False)) -> Payload:
    """The payload of one request: its trees (``received``/``sent``: messages as trees)
    packed, and its keys; a part whose messages were ``cut`` at the limit is left out."""
    request, pairs = request_tree(scope, received, route)
    bodies = [m["body"] for m in received if m.get("body")]
    body = hashlib.blake2b(b"".join(bodies), digest_size=16).hexdigest() if bodies else ""
    ident, shape_key, label = identity(request, pairs, body)
    parts = {
        "request": _pack(request),
        "response": _pack({"status": _status(sent), "messages": sent})
        if sent or error is None else None,
        "error": _pack(error) if error is not None else None,
    }
    # A part over the payload limit is left out and the interaction flagged truncated.
    over = {"request": cut[0], "response": cut[1]}
    kept = {k: p for k, p in parts.items()
            if p is not None and len(p) <= STATE.max_payload_bytes and not over.get(k)}
    return _payload(LIBRARY, stable_hash(LIBRARY, ident), shape_key, label,
                    kept.get("request", _NIL), kept.get("response"), kept.get("error"),
                    len(kept) < sum(p is not None for p in parts.values()))


def _payload_of(args: Any) -> Payload:
    """A deferred request's Payload (see :func:`_finish`), in the writer."""
    fields, route, received, sent, error, cut = args
    return _built(fields, route, [message_tree(m) for m in received],
                  [message_tree(m) for m in sent], error, tuple(cut))


BUILDERS[LIBRARY] = _payload_of


# Replay: inbound.py sets an Exchange here; the first seam that runs claims and fills it.
PROBE: ContextVar[Exchange | None] = ContextVar("timetracer_asgi_probe", default=None)


class InboundApp:
    """The middleware's inner app, wrapped: captures one request/response per call."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        mode = STATE.mode
        if mode is Mode.OFF or scope.get("type") != "http" or _capturing.get():
            if mode is Mode.RECORD and scope.get("type") == "lifespan":
                return await _record_lifespan(self.app, scope, receive, send)
            return await self.app(scope, receive, send)
        ex: Exchange | None = None
        if mode is Mode.RECORD:
            # The middleware calls this app inside its server span, whose scope names the
            # instrumentation that made the middleware (asgi, starlette, fastapi...): any.
            deferrable = deferrable_span("") if STATE.defer else None
            if deferrable is not None:
                ex = Exchange(deferrable, deferred=True, room=STATE.max_payload_bytes)
            else:
                span = trace.get_current_span()
                # Not recording: the URL is excluded (OTEL_PYTHON_EXCLUDED_URLS) or not sampled.
                if span.is_recording():
                    ex = Exchange(span, room=STATE.max_payload_bytes)
        elif mode is Mode.REPLAY:
            ex = PROBE.get()
            if ex is not None and not ex.claimed:
                ex.claimed = True
            else:
                ex = None
        if ex is None:
            return await self.app(scope, receive, send)
        return await self._capture(ex, scope, receive, send)

    async def _capture(self, ex: Exchange, scope: Message, receive: Receive, send: Send) -> None:
        async def captured_receive() -> Message:
            message = await receive()
            ex.on_receive(message)
            return message

        async def captured_send(message: Message) -> None:
            if ex.on_send(message):
                _finish(ex, scope)  # the span ends inside this send
            await send(message)

        token = _capturing.set(True)
        try:
            await self.app(scope, captured_receive, captured_send)
        except Exception as exc:
            if not ex.finished:
                ex.on_error(exc)
            raise
        finally:
            _finish(ex, scope)
            _capturing.reset(token)


# The name of the span around an app's lifespan startup (marked with ATTR_LIFESPAN): the calls
# the startup makes (a pool's connections, a warm-up query) are its children, so they land in
# a cassette of their own, which `replay --asgi` answers the startup from (inbound.py).
LIFESPAN_SPAN = "lifespan startup"
_STARTUP_END = ("lifespan.startup.complete", "lifespan.startup.failed")


async def _record_lifespan(app: ASGIApp, scope: Message, receive: Receive, send: Send) -> None:
    """Run the app's lifespan with its startup inside a span of its own, from the moment the
    app reads ``lifespan.startup`` until it answers it (or raises); the app's own messages
    pass unchanged. The span is current in the app's lifespan task only between the two,
    so what the shutdown calls stays out of it."""
    opened: list[tuple[Span, Any]] = []

    def end(failure: str | None) -> None:
        if not opened:
            return
        span, token = opened.pop()
        if failure is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, failure))
        span.end()
        if trace.get_current_span() is span:  # (the same task that read the startup message)
            context.detach(token)

    async def lifespan_receive() -> Message:
        message = await receive()
        if message.get("type") == "lifespan.startup" and not opened and STATE.mode is Mode.RECORD:
            span = trace.get_tracer(SCOPE).start_span(
                LIFESPAN_SPAN, kind=trace.SpanKind.INTERNAL, attributes={ATTR_LIFESPAN: "startup"})
            opened.append((span, context.attach(trace.set_span_in_context(span))))
        return message

    async def lifespan_send(message: Message) -> None:
        kind = message.get("type")
        if kind in _STARTUP_END:
            end(None if kind == "lifespan.startup.complete" else str(message.get("message") or
                                                                   "lifespan startup failed"))
        await send(message)

    try:
        await app(scope, lifespan_receive, lifespan_send)
    except BaseException as exc:
        end(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        end(None)


def _middleware_call(original: Any) -> Any:
    async def __call__(self: OpenTelemetryMiddleware, scope: Any, receive: Any, send: Any) -> None:
        if type(self.app) is not InboundApp:  # once per middleware instance, before any await
            self.app = InboundApp(self.app)
        await original(self, scope, receive, send)

    return __call__


class AsgiShim(Shim):
    library = LIBRARY
    requires = "opentelemetry.instrumentation.asgi"
    scope = SCOPE

    def patch(self) -> None:
        self.wrap(OpenTelemetryMiddleware, "__call__", _middleware_call)
