"""Recording the same job with calls left to the writer and with payloads on the spans."""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

import timetracer_otel
from timetracer_otel.cassette import load_cassette
from timetracer_otel.codec import as_bytes
from timetracer_otel.keys import field_diff
from timetracer_otel.replay_shims.base import ATTR_PAYLOAD, Payload
from timetracer_otel.runtime import sdk_provider


class _AttributeTap(SpanProcessor):
    """A span processor beside the recorder's, standing for any other exporter of the app."""

    def __init__(self) -> None:
        self.attributes: list[dict[str, Any]] | None = None

    def on_end(self, span: ReadableSpan) -> None:
        if self.attributes is not None:
            self.attributes.append(dict(span.attributes or {}))


_TAP = _AttributeTap()


def _typed(x: Any) -> Any:
    """``x`` as a tree of ``(type name, value)``: equal only where every leaf has the same
    type too (1 and 1.0, True and 1, bytes and bytearray differ)."""
    if isinstance(x, dict):
        return ("dict", {k: _typed(v) for k, v in x.items()})
    if isinstance(x, list | tuple):
        return (type(x).__name__, [_typed(v) for v in x])
    return (type(x).__name__, x)


def _body(value: Any, fmt: str) -> bytes:
    """A stored body as bytes: a JSON cassette keeps it as base64 text, a msgpack one as bytes
    (anything else there is a defect, not a form to normalise)."""
    if fmt == "json":
        return as_bytes(value)
    assert type(value) is bytes, type(value)
    return value


def _timeless(response: Any, fmt: str) -> Any:
    """A recorded response without what the clock put in it: the Date header, gzip's mtime,
    the time a requests call took (an inbound response, the app's own ASGI messages, has
    none of them); and without the server
    process a database connection was given (the ``connect`` answers of asyncpg and psycopg),
    and a MongoDB server's cluster time."""
    if isinstance(response, dict) and ("pid" in response or "backend_pid" in response):
        return {k: None if k in ("pid", "backend_pid") else v for k, v in response.items()}
    if isinstance(response, dict) and "flags" in response and "reply" in response:
        return {**response, "reply": _untimed_reply(response["reply"])}
    if isinstance(response, dict) and isinstance(response.get("sends"), list):
        return {**response, "sends": [_untimed_send(x, fmt) for x in response["sends"]]}
    if response is None or "headers" not in response:
        return response
    headers = [h for h in response["headers"] if h[0].lower() != "date"]
    if "chunks" not in response:  # requests keeps the body whole, and the time it took
        body = _body(response["body"], fmt)
        if ["content-encoding", "gzip"] in headers or ["Content-Encoding", "gzip"] in headers:
            body = gzip.decompress(body)
        return {**{k: v for k, v in response.items() if k != "elapsed_us"},
                "headers": headers, "body": body}
    chunks = response["chunks"]
    if ["content-encoding", "gzip"] in headers:
        chunks = [gzip.decompress(b"".join(_body(c, fmt) for c in chunks))]
    return {**response, "headers": headers, "chunks": chunks}


# What AWS (and moto) put in an answer from the clock and the request: headers, and elements
# of XML bodies (a listing's LastModified, an error's RequestId).
_AWS_RUN_HEADERS = frozenset({"date", "last-modified", "x-amz-request-id", "x-amz-id-2",
                              "x-amzn-requestid"})
_AWS_RUN_XML = re.compile(rb"<(LastModified|RequestId|HostId)>[^<]*</\1>")


def _untimed_send(send: Any, fmt: str) -> Any:
    """One of a botocore call's sends without what the clock and the request put in it."""
    if not isinstance(send, dict) or "headers" not in send:
        return send
    headers = [h for h in send["headers"] if h[0].lower() not in _AWS_RUN_HEADERS]
    body = _AWS_RUN_XML.sub(rb"<\1/>", _body(send["body"], fmt))
    return {**send, "headers": headers, "body": body}


def _untimed_reply(reply: Any) -> Any:
    """A MongoDB reply (its codec tree: keys starting with "$" make it a ``$dict`` of pairs)
    without the server's clock: ``$clusterTime`` and ``operationTime``."""
    if isinstance(reply, dict) and isinstance(reply.get("$dict"), list):
        return {"$dict": [[k, None if k in ("$clusterTime", "operationTime") else v]
                          for k, v in reply["$dict"]]}
    return reply


def _portless(request: Any) -> Any:
    """A recorded request without its client's ephemeral port (an inbound request's)."""
    if isinstance(request, dict) and isinstance(request.get("client"), list):
        return {**request, "client": request["client"][:1]}
    return request


def _label(payload: Any) -> str:
    return msgspec.msgpack.decode(payload, type=Payload).label


def recorded_both_ways(job: Callable[[str, str], None], base: str, calls: int, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch, fmt: str,
                       captured: tuple[str, ...] = ()) -> list[Any]:
    """Record ``job(base, down)`` (``down``: a URL where nothing listens) twice: with each call
    left to the writer, which builds its payload in the writer process (forced, whatever the
    CPUs), and with TIMETRACER_SPAN_PAYLOADS=1, where the shim builds it on the request path
    and puts it on the span. Assert both give the same ``calls`` interactions (keys, redacted
    headers and tokens, bodies, errors, and their types), and that no other processor sees a
    payload on the spans in the first way, except for calls whose label starts with one of
    ``captured`` (a shim's calls it still captures on the request path); return them."""
    from tests.conftest import unreachable_port

    down = f"http://127.0.0.1:{unreachable_port()}/down"
    monkeypatch.setenv("TIMETRACER_WRITER", "process")
    provider = sdk_provider()
    if not getattr(provider, "_test_attribute_tap", False):
        provider.add_span_processor(_TAP)
        provider._test_attribute_tap = True  # type: ignore[attr-defined]
    recorded = {}
    for deferred in (True, False):
        monkeypatch.setenv("TIMETRACER_SPAN_PAYLOADS", "" if deferred else "1")
        _TAP.attributes = []
        with timetracer_otel.record(dir=tmp_path / str(deferred), format=fmt) as rec:  # type: ignore[arg-type]
            assert rec.writer is not None and rec.writer.isolate
            job(base, down)
        seen, _TAP.attributes = _TAP.attributes, None
        on_spans = [_label(a[ATTR_PAYLOAD]) for a in seen if ATTR_PAYLOAD in a]
        if deferred:
            assert [x for x in on_spans if not (captured and x.startswith(captured))] == [], on_spans
            assert len(on_spans) < calls  # some calls were left to the writer
        else:
            assert len(on_spans) == calls
        interactions = [s for p in rec.paths for s in load_cassette(p).interactions]
        recorded[deferred] = sorted(
            ((s.library, s.key, s.shape, s.label, _portless(s.request), _timeless(s.response, fmt), s.error,
              s.truncated) for s in interactions), key=repr)
    assert len(recorded[True]) == calls
    for a, b in zip(recorded[True], recorded[False], strict=True):
        assert a == b, field_diff(list(b), list(a))  # recorded on the request path, deferred
    for a, b in zip(recorded[True], recorded[False], strict=True):
        assert _typed(a) == _typed(b), field_diff(list(b), list(a))  # every leaf's type too
    text = repr(recorded[True])
    assert "s3cr3t" not in text and "hunter2" not in text and "redacted:" in text
    return recorded[True]


def secrets_learned_in_the_app(get: Callable[..., Any], post: Callable[..., Any], base: str,
                               tmp_path: Path) -> None:
    """The writer process redacts calls left to it; the app's redactor must still learn the
    secrets in their headers, URL and body (and the response's Set-Cookie), so payloads other
    shims encode in the app are scrubbed of them. ``get``/``post`` are the client's own."""
    from timetracer_otel.replay_shims.base import STATE

    secret, qtoken, password = "s3cr3t-0123456789abcdef", "qt0ken-98765432", "hunter2-hunter2"
    with timetracer_otel.record(dir=tmp_path):
        assert STATE.defer
        get(f"{base}/multi", headers={"Authorization": f"Bearer {secret}"})
        post(f"{base}/echo?token={qtoken}", json={"password": password},
             headers={"Authorization": f"Bearer {secret}"})
        text = STATE.redactor.scrub(f"db said {secret} {qtoken} {password}; cookie s3cr3t-cookie")
    for value in (secret, qtoken, password, "s3cr3t-cookie"):
        assert value not in text
    assert text.count("redacted:") == 4


def built_here(monkeypatch: pytest.MonkeyPatch, library: str) -> list[str]:
    """The labels of the calls whose payloads ``library``'s builder makes in this process from
    now on (a writer thread's; a writer process imports its own builders)."""
    from timetracer_otel.replay_shims.base import BUILDERS

    build, built = BUILDERS[library], []

    def builder(args: Any) -> Any:
        payload = build(args)
        built.append(payload.label)
        return payload

    monkeypatch.setitem(BUILDERS, library, builder)
    return built


def interactions_of(job: Callable[[str, str], None], base: str, tmp_path: Path) -> int:
    """The interactions one recording of ``job(base, "")`` holds."""
    with timetracer_otel.record(dir=tmp_path / "count") as rec:
        job(base, "")
    return sum(len(load_cassette(p).interactions) for p in rec.paths)


def left_to_writer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, writer: str, library: str,
                   label: str, job: Callable[[int], Any], live_port: int) -> tuple[Any, Any]:
    """``job(port)`` recorded against ``live_port`` with the writer ``writer`` ("thread" or
    "process") and replayed strictly against a port where nothing listens; asserts the replay
    used every recorded call, and that ``library``'s calls (one labelled ``label...``) were
    built by the writer thread here, or not in this process by a writer process. Returns the
    live and the replayed results."""
    from tests.conftest import unreachable_port

    monkeypatch.setenv("TIMETRACER_WRITER", writer)
    built = built_here(monkeypatch, library)
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(live_port)
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job(unreachable_port())
    assert rep.report.ok
    if writer == "thread":  # the writer thread built the calls' payloads in this process
        assert any(x.startswith(label) for x in built)
    else:  # the writer's process did: this process's builder never ran
        assert built == [] and rec.writer is not None and rec.writer.isolate
    return live, replayed
