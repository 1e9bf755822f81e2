"""httpx and requests: a body the app reads as it comes reaches it as it comes while recording,
whatever its type. A Kubernetes-style watch (chunked ``application/json``) and a download
(``application/octet-stream`` of a stated length past ``base.READ_WHOLE_UP_TO``) each send
their first piece, then the rest only once the app has read it: a shim that read the body
whole first would wait for ever (here: until the read timeout, and the app gets an error it
never gets without timetracer). Replay, with the upstream stopped, gives the same bytes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import requests
from docker.types import CancellableStream
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from urllib3.exceptions import ProtocolError, ReadTimeoutError

import timetracer_otel
from tests.conftest import connects_refused
from tests.replay_shims.requests_helpers import close_listener, raw_server, three_ways
from tests.replay_shims.streaming_apps import DOWNLOAD, TIMEOUT, live_then_replayed, streaming_app
from timetracer_otel.cassette import load_cassette
from timetracer_otel.errors import ReplayUnsupportedError
from timetracer_otel.replay_shims import base
from timetracer_otel.replay_shims import httpx as httpx_shim
from timetracer_otel.replay_shims import requests as requests_shim

WATCH = b'{"type": "ADDED", "n": 0}\n{"type": "MODIFIED", "n": 1}\n{"type": "DELETED", "n": 2}\n'
PATHS = ("/watch", "/download")


def httpx_sync(url: str, gate: threading.Event) -> list[Any]:
    out: list[Any] = []
    with httpx.Client(timeout=TIMEOUT) as c:
        for path in PATHS:
            gate.clear()
            with c.stream("GET", url + path) as r:
                raw = r.iter_raw()
                first = next(raw)
                gate.set()  # the server sends the rest once the app has the first piece
                rest = list(raw)
                out.append((r.status_code, r.headers["content-type"],
                            {type(first), *map(type, rest)}, first + b"".join(rest)))
        r = c.get(url + "/watch")  # read whole by httpx (the gate is open): recorded the same
        out.append((r.status_code, r.headers["content-type"], {type(r.content)}, r.content))
    return out


async def _httpx_async(url: str, gate: threading.Event) -> list[Any]:
    out: list[Any] = []
    async with httpx.AsyncClient(timeout=TIMEOUT) as c:
        for path in PATHS:
            gate.clear()
            async with c.stream("GET", url + path) as r:
                raw = r.aiter_raw()
                first = await raw.__anext__()
                gate.set()
                rest = [chunk async for chunk in raw]
                out.append((r.status_code, r.headers["content-type"],
                            {type(first), *map(type, rest)}, first + b"".join(rest)))
        r = await c.get(url + "/watch")
        out.append((r.status_code, r.headers["content-type"], {type(r.content)}, r.content))
    return out


def httpx_async(url: str, gate: threading.Event) -> list[Any]:
    return asyncio.run(_httpx_async(url, gate))


def requests_stream(url: str, gate: threading.Event) -> list[Any]:
    out: list[Any] = []
    with requests.Session() as s:
        for path, size in zip(PATHS, (None, 64 * 1024), strict=True):
            gate.clear()
            with s.get(url + path, stream=True, timeout=TIMEOUT) as r:
                pieces = r.iter_content(size)
                first = next(pieces)
                gate.set()
                rest = list(pieces)
                out.append((r.status_code, r.headers["content-type"],
                            {type(first), *map(type, rest)}, first + b"".join(rest)))
        r = s.get(url + "/watch", timeout=TIMEOUT)  # not streamed: read whole by requests
        out.append((r.status_code, r.headers["content-type"], {type(r.content)}, r.content))
    return out


JOBS: dict[str, Callable[[str, threading.Event], list[Any]]] = {
    "httpx-sync": httpx_sync, "httpx-async": httpx_async, "requests": requests_stream}


def _shape(out: list[Any]) -> None:
    assert out == [(200, "application/json", {bytes}, WATCH),
                   (200, "application/octet-stream", {bytes}, DOWNLOAD),
                   (200, "application/json", {bytes}, WATCH)], [o[:3] for o in out]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(JOBS))
def test_a_watch_and_a_download_reach_the_app_as_they_come_and_replay_the_same(
    serve: Any, tmp_path: Path, kind: str
) -> None:
    assert len(DOWNLOAD) > base.READ_WHOLE_UP_TO  # (else /download proves nothing for httpx)
    live, replayed, cassette, report = live_then_replayed(serve, tmp_path, JOBS[kind], _shape)
    assert replayed == live
    assert len(cassette.interactions) == 3
    assert not any(s.truncated or (s.response or {}).get("body_open") for s in cassette.interactions)
    assert report.ok and report.exact == 3 and not report.unused


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", sorted(JOBS))
def test_a_download_past_the_payload_limit_reaches_the_app_whole_and_is_stored_truncated(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """Read whole first, the download would be held in memory in full (and in a replay
    refused as truncated anyway); as it comes, the app gets every byte and the recording
    keeps no more than the limit."""
    monkeypatch.setenv("TIMETRACER_MAX_PAYLOAD_BYTES", str(256 * 1024))
    kept: list[int] = []
    held: Any = httpx_shim._Tee if kind.startswith("httpx") else requests_shim._LiveBody
    end = held._end

    def spied(self: Any, exc: BaseException | None = None) -> None:
        kept.append(sum(map(len, self.chunks)) if isinstance(self, httpx_shim._Tee)
                    else len(self._kept))
        end(self, exc)

    monkeypatch.setattr(held, "_end", spied)
    gate = threading.Event()
    server = serve(streaming_app(gate))
    with timetracer_otel.record(dir=tmp_path) as rec:
        out = JOBS[kind](server.url, gate)
    _shape(out)
    [cassette] = [load_cassette(p) for p in rec.paths]
    download = next(s for s in cassette.interactions if s.request["url"].endswith("/download"))
    assert download.truncated and download.response is None
    # What was held of the download: the limit and at most one read past it.
    assert 256 * 1024 <= max(kept) <= 256 * 1024 + 64 * 1024, kept


def _bodiless_app() -> Starlette:
    async def big(request: Request) -> Response:  # a HEAD of a download states its length
        return Response(DOWNLOAD, media_type="application/octet-stream")

    async def empty(request: Request) -> Response:
        return Response(status_code=int(request.path_params["status"]))

    return Starlette(routes=[Route("/big", big, methods=["GET", "HEAD"]),
                             Route("/status/{status}", empty)])


@pytest.mark.timeout(120)
def test_responses_without_a_body_are_never_stored_as_read_part_way(
    serve: Any, tmp_path: Path
) -> None:
    """A HEAD (of a download past the length read whole, so its headers alone would stream
    it), a 204 and a 304 have no body: opened as streams and closed unread, they are stored
    ended, not ``body_open`` (which a replay refuses to read past)."""
    server = serve(_bodiless_app())
    calls = [("HEAD", "/big"), ("GET", "/status/204"), ("GET", "/status/304")]

    def job() -> list[Any]:
        out: list[Any] = []
        with httpx.Client(timeout=TIMEOUT) as c, requests.Session() as s:
            for method, path in calls:
                with c.stream(method, server.url + path) as r:
                    out.append((r.status_code, r.headers.get("content-length")))
                with s.request(method, server.url + path, stream=True, timeout=TIMEOUT) as rr:
                    out.append((rr.status_code, rr.headers.get("content-length")))
                r = c.request(method, server.url + path)
                out.append((r.status_code, type(r.content), r.content))
        return out

    plain = job()
    assert plain[0] == (200, str(len(DOWNLOAD))) and plain[2] == (200, bytes, b"")
    with timetracer_otel.record(dir=tmp_path) as rec:
        recorded = job()
    server.stop()
    spans = [s for p in rec.paths for s in load_cassette(p).interactions]
    assert len(spans) == 9 and {s.library for s in spans} == {"httpx", "requests"}
    assert not any(s.truncated or (s.response or {}).get("body_open") for s in spans)
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = job()
    assert attempts == [] and recorded == plain and replayed == plain


@pytest.mark.timeout(120)
def test_a_stream_still_open_when_its_run_ends_is_recorded_there_as_read_so_far(
    serve: Any, tmp_path: Path
) -> None:
    """The body is read on after the ``record()`` block: the call goes into that block's
    cassette with what was read inside it (read part way), the app still gets the rest; a
    response dropped unclosed in one block (httpx keeps a cycle, so no finaliser runs until a
    collection) goes into that block's cassette, not the next one's."""
    gate = threading.Event()
    gate.set()
    server = serve(streaming_app(gate))
    url = server.url + "/watch"
    with httpx.Client(timeout=TIMEOUT) as c, requests.Session() as s:
        with timetracer_otel.record(dir=tmp_path / "one") as one:
            a = c.send(c.build_request("GET", url), stream=True)
            b = s.get(url, stream=True, timeout=TIMEOUT)
            dropped = c.send(c.build_request("GET", url + "?dropped"), stream=True)
            assert (a.status_code, b.status_code, dropped.status_code) == (200, 200, 200)
            del dropped
        after = [a.read(), b.content]  # after the block: the whole body, as live
        a.close()
        with timetracer_otel.record(dir=tmp_path / "two") as two:
            c.get(url + "?two")
    assert after == [WATCH, WATCH]
    [first] = [load_cassette(p) for p in one.paths]
    assert sorted((s.library, s.request["url"].removeprefix(server.url)) for s in first.interactions) \
        == [("httpx", "/watch"), ("httpx", "/watch?dropped"), ("requests", "/watch")]
    assert all(s.response is not None and s.response["body_open"] for s in first.interactions)
    [second] = [load_cassette(p) for p in two.paths]
    assert [s.request["url"].removeprefix(server.url) for s in second.interactions] == ["/watch?two"]
    # Replayed, the call gives what was read inside the block (nothing), then says where the
    # recording stops instead of making up the rest.
    server.stop()
    with connects_refused() as attempts, timetracer_otel.replay(one.paths), \
            httpx.Client(timeout=TIMEOUT) as c:
        replayed = c.send(c.build_request("GET", url), stream=True)
        assert replayed.status_code == 200
        with pytest.raises(ReplayUnsupportedError, match="stopped reading"):
            replayed.read()
    assert attempts == []


def _framed_loop(url: str) -> list[Any]:
    """A client that frames a chunked body itself, as docker-py's event loop does: one byte,
    then the rest of its chunk from http.client's ``chunk_left``."""
    with requests.get(url, stream=True, timeout=TIMEOUT) as r:
        raw = r.raw
        out: list[Any] = [raw._fp.chunked]
        while not raw.closed and (data := raw.read(1)):
            left = raw._fp.chunk_left
            out.append((left, data + (raw.read(left) if left else b"")))
        return out


@pytest.mark.timeout(120)
def test_a_client_framing_chunks_itself_sees_them_as_live(serve: Any, tmp_path: Path) -> None:
    gate = threading.Event()
    gate.set()
    server = serve(streaming_app(gate))
    plain = _framed_loop(server.url + "/watch")
    assert plain[0] is True and b"".join(d for _, d in plain[1:]) == WATCH
    with timetracer_otel.record(dir=tmp_path) as rec:
        recorded = _framed_loop(server.url + "/watch")
    server.stop()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = _framed_loop(server.url + "/watch")
    assert attempts == [] and recorded == plain and replayed == plain


SHORT_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5000\r\n\r\n"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("gap", [0.0, 1.0], ids=["cut-short", "read-timeout"])
def test_raw_reads_of_a_body_that_breaks_give_what_live_gives(tmp_path: Path, gap: float) -> None:
    """``raw.read(n)`` across the break, as http.client gives it: a body cut short of its
    length gives the bytes that came, then the error at the next read; a read timeout raises
    at once and the bytes before it are lost with it, live, recorded and replayed alike."""
    pieces = (SHORT_HEAD + b"x" * 100, b"never read") if gap else (SHORT_HEAD + b"x" * 100,)
    with raw_server(*pieces, gap=gap) as (url, sock):
        def job() -> list[Any]:
            out: list[Any] = []
            with requests.get(url, stream=True, timeout=0.3) as r:
                for n in (10, 1000, 1000):
                    try:
                        out.append(r.raw.read(n))
                    except Exception as exc:
                        out.append(type(exc))
                        break
            time.sleep(gap)  # (the server, one connection at a time, is done with this one)
            return out

        plain, recorded, replayed, _ = three_ways(job, tmp_path, lambda: close_listener(sock))
    expected = [b"x" * 10, b"x" * 90, ProtocolError] if not gap else [b"x" * 10, ReadTimeoutError]
    assert plain == expected and recorded == plain and replayed == plain, (plain, recorded, replayed)


DOCKER_EVENTS = [{"Type": "container", "Action": action, "id": f"c{n}"}
                 for n, action in enumerate(("create", "start", "die"))]


def docker_daemon() -> Starlette:
    """The Docker Engine API's ``GET /events``: chunked JSON, one event per chunk as things
    happen, and the connection held open after them (no more events come), as a daemon does."""

    async def events(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            for event in DOCKER_EVENTS:
                yield json.dumps(event).encode() + b"\n"
            while True:  # until the client goes
                await asyncio.sleep(0.05)

        return StreamingResponse(body(), media_type="application/json")

    async def stated(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield PART
            while True:  # the rest of the stated length never comes
                await asyncio.sleep(0.05)

        return StreamingResponse(body(), media_type="application/json",
                                 headers={"content-length": "100"})

    return Starlette(routes=[Route("/v1.45/events", events), Route("/stated", stated)])


PART = b'{"a": 1}\n'


def docker_watch(url: str) -> list[Any]:
    """docker-py's event stream: three events, then ``close()`` (which shuts the response's
    socket down) ends the iteration; then as its documentation shows it, closed from another
    thread while this one waits for the next event; then a body of a stated length, not
    chunked, cancelled after its first part."""
    client = docker.APIClient(base_url=url.replace("http://", "tcp://"), version="1.45")
    try:
        events = client.events(decode=True)
        seen = [next(events) for _ in DOCKER_EVENTS]
        events.close()
        out = [seen, list(events)]
        events = client.events(decode=True)
        timer = threading.Timer(0.3, events.close)
        timer.start()
        out.append(list(events))
        timer.join()
        # A body of a stated length (not chunked), cancelled the same way.
        with requests.get(url + "/stated", stream=True, timeout=TIMEOUT) as response:
            stream = CancellableStream(response.iter_content(1), response)
            first = b"".join(next(stream) for _ in PART)
            stream.close()
            out.append([first, list(stream)])
        return out
    finally:
        client.close()


@pytest.mark.timeout(120)
def test_docker_py_cancels_an_event_stream_recorded_and_replayed(serve: Any, tmp_path: Path) -> None:
    """docker-py's ``CancellableStream.close()`` reaches through the response to its socket
    (``raw._fp.fp.raw._sock``) to shut it down: the swapped-in response file gives it the
    live socket while recording, and one with nothing to shut in a replay, whose body ends
    where the live one was cut."""
    server = serve(docker_daemon())
    plain = docker_watch(server.url)
    assert plain == [DOCKER_EVENTS, [], DOCKER_EVENTS, [PART, []]]
    with timetracer_otel.record(dir=tmp_path) as rec:
        recorded = docker_watch(server.url)
    server.stop()
    assert recorded == plain
    calls = [s for p in rec.paths for s in load_cassette(p).interactions]
    assert [(s.library, s.request["url"].removeprefix(server.url)) for s in calls] \
        == [("requests", "/v1.45/events")] * 2 + [("requests", "/stated")]
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = docker_watch(server.url)
    assert attempts == [] and replayed == plain
