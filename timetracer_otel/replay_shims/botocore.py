"""botocore (boto3): every API call, beneath the OTel botocore span.

The OTel instrumentation wraps ``BaseClient._make_api_call``; this shim sits beneath that
wrapper (the span is current), where the call is still its operation and parameters: that is
the key. Below it, ``Endpoint._send`` is where botocore hands a signed request to its HTTP
session: record keeps each raw HTTP response it returned (status, headers, body bytes; a
streamed body is read once and handed on from memory) or the error it raised, in order,
retries included; replay answers those sends from the recording, so botocore itself parses
them again: ``StreamingBody`` for S3 objects, datetimes, ``ClientError`` with the same code
and message, checksums validated, retries and waiters as they ran. Replay signs nothing, so
it needs no credentials, and opens no socket.

The key is the service, the operation and its parameters (bytes over 1 KiB by size and hash,
an upload stream as ``<stream>``, a boto3 condition by its expression); never the endpoint or
region. Secrets never reach the cassette: parameters the service model marks ``sensitive``
(and those named like secrets) become redaction tokens; the values of sensitive members of
the parsed response (STS and IAM keys, tokens, SecretString...) are learned and scrubbed from
the stored bodies, with the body's checksum headers dropped and its length fixed. Replay also
keeps botocore from asking the instance metadata service for credentials or a region.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import botocore.client
import botocore.endpoint
import botocore.exceptions
import botocore.signers
import botocore.utils
from botocore.awsrequest import AWSResponse
from opentelemetry import context as otel_context

from timetracer_otel.codec import Tree, as_bytes, to_tree
from timetracer_otel.config import Mode
from timetracer_otel.index import Match
from timetracer_otel.keys import Call
from timetracer_otel.replay_shims.base import (
    LIVE,
    STATE,
    Shim,
    _suppressed,
    capture,
    decide,
    error_tree,
    instantiate,
    rebuild_error,
)

LIBRARY = "botocore"
SCOPE = "opentelemetry.instrumentation.botocore"
_DIGEST_OVER = 1024


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
    tree = r.scrub(r.document(_param(params)))  # (scrub: secrets seen earlier, anywhere)
    request = {"service": service, "operation": operation, "params": tree}
    shape = {"service": service, "operation": operation, "params": sorted(tree)}
    named = [f"{k}={v}" for k, v in tree.items() if isinstance(v, str) and len(v) <= 60][:2]
    label = " ".join([f"{service}.{operation}", *named])
    return Call(LIBRARY, request, request, shape, label if len(label) <= 120 else label[:117] + "...")


# --- the HTTP exchanges of one call ------------------------------------------------------------


class _Body(io.BytesIO):
    """A response body botocore reads from memory as it would from urllib3."""

    def stream(self, amt: int = 64 * 1024, decode_content: bool | None = None) -> Iterator[bytes]:
        while chunk := self.read(amt):
            yield chunk


class _Exchange:
    """The sends of the API call running in this context: recorded as they happen, or the
    recorded ones answered in order."""

    __slots__ = ("next", "replay", "sends")

    def __init__(self, replay: list[Tree] | None = None) -> None:
        self.sends: list[Tree] = []
        self.replay = replay
        self.next = 0

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
        return AWSResponse(send.get("url") or url, send["status"],
                           [(k, v) for k, v in send["headers"]], _Body(as_bytes(send["body"])))


_EXCHANGE: ContextVar[_Exchange | None] = ContextVar("timetracer_botocore_exchange", default=None)
# Headers that vouch for a body's bytes: dropped when redaction changed the body.
_CHECKSUM_HEADERS = ("content-md5", "x-amz-checksum-", "x-amz-crc32")


def _kept(response: AWSResponse, body: bytes) -> Tree:
    """One live response as stored (its body redacted once the call is over: see _redacted)."""
    headers = STATE.redactor.headers([(str(k), str(v)) for k, v in response.headers.items()])
    return {"url": response.url, "status": response.status_code,
            "headers": [list(h) for h in headers], "body": body}


def _redacted(client: Any, operation: str, result: Any, sends: list[Tree]) -> list[Tree]:
    """The sends of a finished call as the cassette keeps them: the secret members of the
    parsed result learned (see :func:`_without_secrets`), then every response redacted as
    HTTP responses are (``Redactor.response``: secret JSON fields, anything learned, the
    length fixed); a body that changed loses the headers that vouch for its bytes."""
    try:
        shape = client.meta.service_model.operation_model(operation).output_shape
    except Exception:
        shape = None
    _without_secrets(shape, result)  # (only the tokens it makes, which teach the redactor)
    r = STATE.redactor
    out = []
    for send in sends:
        body = send.get("body")
        if isinstance(body, bytes):
            stored = r.response({"headers": send["headers"], "body": body})
            if stored["body"] != body:
                stored["headers"] = [h for h in stored["headers"]
                                     if not str(h[0]).lower().startswith(_CHECKSUM_HEADERS)]
            send = {**send, **stored}
        out.append(send)
    return out


def _error_of(exc: BaseException) -> Tree:
    """A send's error as recorded: botocore's errors with their keyword arguments (an
    exception among them as its text)."""
    kwargs = getattr(exc, "kwargs", None)
    if isinstance(exc, botocore.exceptions.BotoCoreError) and isinstance(kwargs, dict):
        plain = {str(k): v if isinstance(v, str | int | float | bool) or v is None else str(v)
                 for k, v in kwargs.items()}
        return error_tree(exc, {"kwargs": plain})
    return error_tree(exc)


def _build_error(cls: type[BaseException], tree: Tree) -> BaseException:
    kwargs = (tree.get("attrs") or {}).get("kwargs")
    if isinstance(kwargs, dict) and issubclass(cls, botocore.exceptions.BotoCoreError):
        try:
            return cls(**kwargs)
        except Exception:
            pass
    return instantiate(cls, tree["message"])


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
        body = response.content  # the whole body, once; a streamed one is then read from memory
        response.raw = _Body(body)
        exchange.sends.append(_kept(response, body))
        return response

    return _send


def _sign(original: Any) -> Any:
    def sign(self: Any, *args: Any, **kwargs: Any) -> Any:
        exchange = _EXCHANGE.get()
        if exchange is not None and exchange.replay is not None:
            return None  # nothing is sent: no credentials needed
        return original(self, *args, **kwargs)

    return sign


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
            token = _EXCHANGE.set(_Exchange(replay=list(span.response["sends"])))
            try:
                return original(self, operation_name, api_params)
            finally:
                _EXCHANGE.reset(token)
        if action is LIVE:
            return original(self, operation_name, api_params)
        exchange = _Exchange()
        with capture(call, SCOPE) as cap:
            token = _EXCHANGE.set(exchange)
            try:
                result = original(self, operation_name, api_params)
            except Exception as exc:
                # A ClientError or a connection error after its sends: replay sends the same
                # answers and botocore raises it again. Nothing sent: the error itself.
                if exchange.sends:
                    cap.ok({"sends": _redacted(self, operation_name, None, exchange.sends)})
                else:
                    cap.fail(exc, _error_of(exc).get("attrs"))
                raise
            finally:
                _EXCHANGE.reset(token)
            cap.ok({"sends": _redacted(self, operation_name, result, exchange.sends)})
        return result

    return _make_api_call


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
