"""httpx: record against a real uvicorn upstream, replay byte- and type-identical with it stopped."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests

import timetracer_otel
from tests.conftest import connects_refused, unreachable_port
from tests.deferral import recorded_both_ways, secrets_learned_in_the_app
from tests.upstream_app import app
from timetracer_otel.cassette import load_cassette, save_cassette
from timetracer_otel.errors import CassetteError, ReplayMissError


def snapshot(r: httpx.Response) -> dict[str, Any]:
    return {
        "type": type(r),
        "status": r.status_code,
        "reason": r.reason_phrase,
        "http_version": r.http_version,
        "headers": r.headers.multi_items(),
        "content": r.content,
        "content_type": type(r.content),
    }


def test_sync_calls_replay_identically_with_the_server_stopped(serve: Any, tmp_path: Path) -> None:
    server = serve(app)
    base = server.url

    def job() -> list[Any]:
        with httpx.Client(base_url=base) as c:
            out = [snapshot(c.get("/items", params={"page": p})) for p in (1, 2)]
            out.append(snapshot(c.get("/items", params={"page": 1})))  # repeated call: recorded order
            out.append(snapshot(c.post("/echo", content=b"\x00binary\xff")))
            out.append(snapshot(c.get("/blob")))
            out.append(snapshot(c.get("/multi")))
            out.append(snapshot(c.get("/gzip")))
            out.append(c.get("/gzip").json())
            with c.stream("GET", "/stream") as s:
                out.append([(type(chunk), chunk) for chunk in s.iter_raw()])
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    server.stop()
    assert len(rec.paths) == 1
    with timetracer_otel.replay(rec.paths) as rep:
        replayed = job()
    # set-cookie values are redacted in the stored copy; everything else is byte-identical.
    cookie_free = [_without_cookie(x) for x in live]
    assert [_without_cookie(x) for x in replayed] == cookie_free
    assert live[2]["content"] != live[0]["content"]  # the repeated call got its own (later) answer
    assert replayed[2]["content"] == live[2]["content"]
    assert rep.report.exact == 9 and not rep.report.shape_matches and not rep.report.unused


def _without_cookie(x: Any) -> Any:
    if isinstance(x, dict) and "headers" in x:
        return {**x, "headers": [(k, v) for k, v in x["headers"] if k != "set-cookie"]}
    return x


def test_async_calls_and_concurrent_gather(serve: Any, tmp_path: Path) -> None:
    server = serve(app)

    async def job() -> list[Any]:
        async with httpx.AsyncClient(base_url=server.url) as c:
            responses = await asyncio.gather(*(c.get("/items", params={"page": p}) for p in range(20)))
            async with c.stream("GET", "/stream") as s:
                chunks = [(type(chunk), chunk) async for chunk in s.aiter_raw()]
        return [(r.status_code, r.json()["page"]) for r in responses] + [chunks]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(job())
    server.stop()
    with timetracer_otel.replay(rec.paths):
        replayed = asyncio.run(job())
    assert replayed == live
    assert live[-1] == [(bytes, b"data: %d\n\n" % i) for i in range(4)]


@pytest.mark.parametrize("kind", ["connect", "timeout"])
def test_recorded_exceptions_replay_with_their_class(serve: Any, tmp_path: Path, kind: str) -> None:
    server = serve(app)

    url = f"http://127.0.0.1:{unreachable_port()}/x" if kind == "connect" else f"{server.url}/slow"
    expected = httpx.ConnectError if kind == "connect" else httpx.ReadTimeout

    def job() -> BaseException:
        with pytest.raises(httpx.HTTPError) as info:
            httpx.get(url, timeout=0.3)
        return info.value

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    server.stop()
    # A live call to the dead port would raise the same class and message: the proof that
    # the cassette answered is that nothing connected and the report counts the match.
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths) as rep:
        replayed = job()
    assert attempts == [] and rep.report.exact == 1 and not rep.report.misses
    assert type(live) is expected and type(replayed) is expected
    assert str(replayed) == str(live)
    assert isinstance(replayed, httpx.RequestError) and replayed.request.url == url


def test_unrecorded_call_raises_a_miss_naming_the_closest(serve: Any, tmp_path: Path) -> None:
    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        httpx.get(f"{server.url}/items", params={"page": 1})
    server.stop()
    with timetracer_otel.replay(rec.paths, strict=True), pytest.raises(ReplayMissError) as info:
        httpx.get(f"{server.url}/items", params={"page": 2})
    msg = str(info.value)
    assert f"GET {server.url}/items?page=2" in msg
    assert f"GET {server.url}/items?page=1 (unused)" in msg
    assert f"url: recorded '{server.url}/items?page=1', now '{server.url}/items?page=2'" in msg


def test_passthrough_goes_live_and_record_appends(serve: Any, tmp_path: Path) -> None:
    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        httpx.get(f"{server.url}/items", params={"page": 1})
    with timetracer_otel.replay(rec.paths, on_miss="passthrough", strict=True):
        live = httpx.get(f"{server.url}/items", params={"page": 9})
    assert live.json()["page"] == "9"
    with timetracer_otel.replay(rec.paths, on_miss="record", strict=True) as rep:
        httpx.get(f"{server.url}/items", params={"page": 10})
    assert [s.label for s in rep.appended] == [f"GET {server.url}/items?page=10"]
    assert rep.appended[0].response["status"] == 200


def test_live_libraries_stay_live_in_replay(serve: Any, tmp_path: Path) -> None:
    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        first = httpx.get(f"{server.url}/items").json()["n"]
        recorded = requests.get(f"{server.url}/items").json()["n"]
    with timetracer_otel.replay(rec.paths, live=["httpx"]) as rep:
        again = httpx.get(f"{server.url}/items").json()["n"]
        replayed = requests.get(f"{server.url}/items").json()["n"]
    assert again > recorded > first  # the real server answered httpx, its counter moved on
    assert replayed == recorded and rep.report.exact == 1  # while requests was replayed


def test_suppressed_instrumentation_stays_live_in_record_and_replay(serve: Any, tmp_path: Path) -> None:
    # An exporter's own HTTP (OTLP, S3) runs suppressed: never recorded, never answered.
    from opentelemetry.instrumentation.utils import suppress_instrumentation

    server = serve(app)
    with timetracer_otel.record(dir=tmp_path) as rec:
        recorded = httpx.get(f"{server.url}/items").json()["n"]
        with suppress_instrumentation():
            httpx.get(f"{server.url}/items", params={"exporter": 1})
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        with suppress_instrumentation():
            live = httpx.get(f"{server.url}/items").json()["n"]
        assert httpx.get(f"{server.url}/items").json()["n"] == recorded
    assert live > recorded  # the real server answered the suppressed call
    assert rep.report.ok and rep.report.exact == 1 and not rep.report.unused


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_calls_left_to_the_writer_record_what_the_span_attribute_records(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    def job(base: str, down: str) -> None:
        headers = {"Authorization": "Bearer s3cr3t-0123456789abcdef"}
        with httpx.Client(base_url=base, headers=headers) as c:
            c.post("/echo", json={"user": "ann", "password": "hunter2-hunter2"})
            c.get("/blob")
            c.get("/multi")  # Set-Cookie: a secret in the response headers
            c.get("/gzip")
            with c.stream("GET", "/stream") as s:
                s.read()
        with pytest.raises(httpx.ConnectError):
            httpx.get(down)

    recorded_both_ways(job, serve(app).url, 6, tmp_path, monkeypatch, fmt)


def test_secrets_of_a_call_left_to_the_writer_are_known_in_the_app(serve: Any, tmp_path: Path) -> None:
    secrets_learned_in_the_app(httpx.get, httpx.post, serve(app).url, tmp_path)


@pytest.mark.parametrize("broken", ["garbage", [1], {"status": "two hundred"}, {"headers": 5}])
def test_a_recorded_response_no_shim_writes_is_named_not_a_crash(
    serve: Any, tmp_path: Path, broken: Any
) -> None:
    """A cassette whose checksum holds but whose response has a shape no shim writes (from
    another sender through ``collect``, or edited by hand) raises a CassetteError naming the
    call and the cassette, not a TypeError from inside the shim or a wrong status."""
    server = serve(app)
    with timetracer_otel.record(dir=tmp_path / "rec") as rec:
        httpx.get(f"{server.url}/items")
    cassette = load_cassette(rec.paths[0])
    for span in cassette.spans:
        if span.library == "httpx":
            span.response = {**span.response, **broken} if isinstance(broken, dict) else broken
    path = tmp_path / "edited.msgpack"
    save_cassette(cassette, path)
    with timetracer_otel.replay([path]), \
            pytest.raises(CassetteError, match=r"The recorded response of GET .*/items in .*edited"):
        httpx.get(f"{server.url}/items")
