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
an upload stream as ``<stream>``); never the endpoint or region. Parameters named like
secrets (``SecretString``, ``Password``...) become redaction tokens; a response body's secret
JSON fields are redacted as HTTP bodies are (its checksum headers are dropped then).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import botocore.client
import botocore.endpoint
import botocore.signers
from botocore.awsrequest import AWSResponse

from timetracer_otel.codec import Tree, as_bytes, to_tree
from timetracer_otel.config import Mode
from timetracer_otel.index import Match
from timetracer_otel.keys import Call
from timetracer_otel.replay_shims.base import (
    LIVE,
    STATE,
    Shim,
    capture,
    decide,
    error_tree,
    rebuild_error,
)

LIBRARY = "botocore"
SCOPE = "opentelemetry.instrumentation.botocore"
_DIGEST_OVER = 1024


# --- the request -----------------------------------------------------------------------------


def _param(value: Any) -> Any:
    """A parameter as the key and the stored request hold it."""
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
    return to_tree(value)


def _api_call(client: Any, operation: str, params: dict[str, Any]) -> Call:
    service = client.meta.service_model.service_name
    tree = STATE.redactor.document(_param(params))
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
            raise rebuild_error(send["error"])
        return AWSResponse(send.get("url") or url, send["status"],
                           [(k, v) for k, v in send["headers"]], _Body(as_bytes(send["body"])))


_EXCHANGE: ContextVar[_Exchange | None] = ContextVar("timetracer_botocore_exchange", default=None)
_CHECKSUM_HEADERS = ("content-md5", "x-amz-checksum-")


def _kept(response: AWSResponse, body: bytes) -> Tree:
    """One live response as stored: headers and body redacted as HTTP responses are."""
    r = STATE.redactor
    headers = [list(h) for h in r.headers([(str(k), str(v)) for k, v in response.headers.items()])]
    stored = r.response({"headers": headers, "body": body})
    if stored["body"] != body:  # redacted: the recorded checksums no longer hold
        stored["headers"] = [h for h in stored["headers"]
                             if not str(h[0]).lower().startswith(_CHECKSUM_HEADERS)]
    return {"url": response.url, "status": response.status_code, **stored}


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
            exchange.sends.append({"error": error_tree(exc)})
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


def _make_api_call(original: Any) -> Any:
    def _make_api_call(self: Any, operation_name: str, api_params: dict[str, Any]) -> Any:
        if STATE.mode is Mode.OFF:
            return original(self, operation_name, api_params)
        call = _api_call(self, operation_name, api_params)
        action = decide(call)
        if isinstance(action, Match):
            span = action.span
            if span.error is not None:  # it failed before anything was sent
                raise rebuild_error(span.error)
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
                    cap.ok({"sends": exchange.sends})
                else:
                    cap.fail(exc)
                raise
            finally:
                _EXCHANGE.reset(token)
            cap.ok({"sends": exchange.sends})
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
