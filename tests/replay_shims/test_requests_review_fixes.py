"""requests review fixes: each job runs plain (timetracer off), recorded and replayed with the
upstream stopped; the app must see the same values and the same exceptions all three ways.

- ``iter_content(chunk_size=None)`` ended nowhere (a busy loop) on the in-memory body;
- a body that broke while read (read timeout, connection closed early) raised urllib3's
  error from ``get()`` instead of the ``requests.exceptions`` class requests maps it to;
- ``r.raw.read()`` gave decoded bytes where requests gives the encoded ones.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

import timetracer_otel
from tests.conftest import connects_refused
from tests.deferral import recorded_both_ways
from tests.replay_shims.requests_helpers import chunks, raw_server
from tests.replay_shims.requests_helpers import three_ways as recorded_and_replayed
from timetracer_otel.replay_shims import requests as shim

pytestmark = pytest.mark.timeout(120)

GZIPPED = gzip.compress(b'{"hello": "%s"}' % (b"gzip " * 40), mtime=0)


async def _stream(request: Request) -> StreamingResponse:
    async def gen() -> Any:
        for i in range(5):
            yield f"line {i}\n".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(gen(), media_type="text/plain")


async def _gzip(request: Request) -> Response:
    return Response(GZIPPED, headers={"content-encoding": "gzip"}, media_type="application/json")


async def _slowbody(request: Request) -> StreamingResponse:
    async def gen() -> Any:
        yield b"first chunk\n"
        await asyncio.sleep(1.5)  # past the client's read timeout
        yield b"late chunk\n"

    # ?sized: a Content-Length body (no chunked framing) that stalls the same way.
    sized = {"content-length": "23"} if "sized" in request.query_params else None
    return StreamingResponse(gen(), media_type="text/plain", headers=sized)


APP = Starlette(routes=[Route("/stream", _stream), Route("/gzip", _gzip),
                        Route("/slowbody", _slowbody)])


@pytest.fixture
def broken() -> Iterator[str]:
    """A raw HTTP server that promises 100 bytes, sends 5 and closes; stopped at the end."""
    with raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n"
                    b"Content-Type: text/plain\r\n\r\nshort") as (url, _):
        yield url


def outcome(job: Callable[[], Any]) -> tuple[Any, ...]:
    """What the app saw: the value, or the exception's class and message."""
    try:
        return ("ok", job())
    except Exception as exc:
        return ("raised", type(exc), str(exc))


def bounded(iterable: Callable[[], Any], seconds: float = 10) -> list[Any]:
    """``list(iterable())`` in a thread: a loop that never ends fails the test, not hangs it."""
    out: list[Any] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            for item in iterable():
                out.append(item)
                if len(out) > 10_000:
                    raise AssertionError("endless iteration")
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still iterating after {seconds} s: {out[:5]!r}")
    if error:
        raise error[0]
    return out


def three_ways(job: Callable[[], Any], tmp_path: Path, stop: Callable[[], None]) -> list[Any]:
    """``job`` plain, recorded, then replayed with the upstream stopped (nothing connects,
    nothing missed)."""
    plain, recorded, replayed, rep = recorded_and_replayed(job, tmp_path, stop)
    assert not rep.report.misses
    return [plain, recorded, replayed]


def test_iter_content_without_a_chunk_size_ends(serve: Any, tmp_path: Path) -> None:
    server = serve(APP)

    def job() -> list[Any]:
        with requests.Session() as s:
            chunked = s.get(f"{server.url}/stream", stream=True)
            fixed = s.get(f"{server.url}/gzip", stream=True)
            sized = s.get(f"{server.url}/stream", stream=True)
            return [bounded(lambda: chunked.iter_content(chunk_size=None)),
                    bounded(lambda: fixed.iter_content(chunk_size=None)),
                    bounded(lambda: sized.iter_content(chunk_size=4)),
                    bounded(lambda: s.get(f"{server.url}/stream", stream=True).iter_lines())]

    plain, recorded, replayed = three_ways(job, tmp_path, server.stop)
    assert plain[0] == [f"line {i}\n".encode() for i in range(5)]  # each chunk as it came
    assert plain[1] == [gzip.decompress(GZIPPED)]
    assert recorded == plain and replayed == plain


def test_raw_read_gives_the_encoded_bytes(serve: Any, tmp_path: Path) -> None:
    server = serve(APP)

    def job() -> list[Any]:
        raw = requests.get(f"{server.url}/gzip", stream=True).raw.read()
        decoded = requests.get(f"{server.url}/gzip")
        return [raw, decoded.content, decoded.json()]

    plain, recorded, replayed = three_ways(job, tmp_path, server.stop)
    assert plain[0] == GZIPPED and plain[1] == gzip.decompress(GZIPPED)
    assert recorded == plain and replayed == plain


def _slow(base: str, stream: bool) -> Any:
    r = requests.get(f"{base}/slowbody", timeout=0.5, stream=stream)
    if not stream:
        return r.content
    return chunks(r, [r.status_code], None)


def _short(base: str, chunk_size: int | None) -> Any:
    if chunk_size is None:
        return requests.get(f"{base}/x", timeout=2).content
    r = requests.get(f"{base}/x", timeout=2, stream=True)
    return chunks(r, [r.status_code], chunk_size)


def test_a_read_timeout_mid_body_is_the_requests_error(serve: Any, tmp_path: Path) -> None:
    server = serve(APP)

    def job() -> list[Any]:
        return [outcome(lambda: _slow(server.url, False)), outcome(lambda: _slow(server.url, True))]

    plain, recorded, replayed = three_ways(job, tmp_path, server.stop)
    not_streamed, streamed = plain
    assert not_streamed[:2] == ("raised", requests.exceptions.ConnectionError)
    assert "Read timed out" in not_streamed[2]
    # The response, its first chunk, then the error while iterating.
    assert streamed[0] == "ok" and streamed[1][:2] == [200, b"first chunk\n"]
    assert streamed[1][2][0] is requests.exceptions.ConnectionError
    assert recorded == plain and replayed == plain


def _stalled(base: str, chunk_size: int | None) -> Any:
    r = requests.get(f"{base}/slowbody?sized", timeout=0.5, stream=True)
    return chunks(r, [r.status_code, r.headers["content-length"], r.raw.chunked], chunk_size)


def test_a_read_timeout_mid_content_length_body_keeps_the_bytes_before_it(
    serve: Any, tmp_path: Path
) -> None:
    """The 12 bytes that came before the read timeout were lost in the recording (one whole
    read of the Content-Length body, which loses them with the error): replayed, the app got
    no chunk before the error."""
    server = serve(APP)

    def job() -> list[Any]:
        return [outcome(lambda: requests.get(f"{server.url}/slowbody?sized", timeout=0.5).content),
                *(outcome(lambda size=size: _stalled(server.url, size)) for size in (4, 5, 1, None))]

    plain, recorded, replayed = three_ways(job, tmp_path, server.stop)
    not_streamed, by_4, by_5, by_1, whole = plain
    assert not_streamed[:2] == ("raised", requests.exceptions.ConnectionError)
    assert "Read timed out" in not_streamed[2]
    timed_out = (requests.exceptions.ConnectionError, not_streamed[2])
    assert by_4 == ("ok", [200, "23", False, b"firs", b"t ch", b"unk\n", timed_out])
    # In the app's chunk size: a last piece shorter than it is lost with the error, as live.
    assert by_5 == ("ok", [200, "23", False, b"first", b" chun", timed_out])
    assert by_1 == ("ok", [200, "23", False, *(bytes([b]) for b in b"first chunk\n"), timed_out])
    assert whole == ("ok", [200, "23", False, timed_out])  # one read: all or nothing
    assert recorded == plain and replayed == plain


def test_a_body_cut_short_is_the_requests_error(broken: str, tmp_path: Path) -> None:
    def job() -> list[Any]:
        return [outcome(lambda size=size: _short(broken, size)) for size in (None, 2, 1024)]

    plain, recorded, replayed = three_ways(job, tmp_path, lambda: None)
    assert plain[0][:2] == ("raised", requests.exceptions.ChunkedEncodingError)
    assert "IncompleteRead(5 bytes read, 95 more expected)" in plain[0][2]
    # Streamed: the 5 bytes in the app's chunk size, then the error.
    assert plain[1][1][:3] == [200, b"sh", b"or"]  # urllib3 drops the odd byte, then raises
    assert plain[1][1][3][0] is requests.exceptions.ChunkedEncodingError
    assert plain[2][1][0] == 200 and plain[2][1][1][0] is requests.exceptions.ChunkedEncodingError
    assert recorded == plain and replayed == plain


def test_a_cassette_recorded_with_the_urllib3_error_replays_the_requests_error(
    broken: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cassettes written before the body's error was kept with its response hold the urllib3
    error as the call's: replayed, ``get()`` raises it mapped as requests maps it."""
    def job() -> tuple[Any, ...]:
        return outcome(lambda: _short(broken, None))

    plain = job()
    with monkeypatch.context() as m:
        m.setattr(shim, "_BODY_ERROR_TYPES", ())  # what an older version recorded
        with timetracer_otel.record(dir=tmp_path) as rec:
            old = job()
    assert old[1].__module__.startswith("urllib3")
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths) as rep:
        replayed = job()
    assert attempts == [] and rep.report.exact == 1
    assert replayed == plain


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_broken_bodies_left_to_the_writer_record_what_the_span_attribute_records(
    serve: Any, broken: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    def job(base: str, down: str) -> None:
        assert outcome(lambda: _short(broken, None))[1] is requests.exceptions.ChunkedEncodingError
        assert outcome(lambda: _slow(base, True))[1][-1][0] is requests.exceptions.ConnectionError
        secret = {"Authorization": "Bearer s3cr3t-0123456789abcdef"}  # redacted both ways
        assert bounded(lambda: requests.get(f"{base}/stream", stream=True, headers=secret)
                       .iter_content(None))

    recorded_both_ways(job, serve(APP).url, 3, tmp_path, monkeypatch, fmt)
