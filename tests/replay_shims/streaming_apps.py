"""A real upstream whose responses are streams (server-sent events, NDJSON), for the HTTP shims'
streaming tests."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

import timetracer_otel
from tests.conftest import connects_refused
from timetracer_otel.cassette import Cassette, load_cassette
from timetracer_otel.index import ReplayReport

# Long enough that an app reading a body whole first would miss it by far; the read timeout
# makes such an app fail instead of hang.
PAUSE = 0.3
TIMEOUT = 5.0


# A download longer than base.READ_WHOLE_UP_TO, with a Content-Length; its first piece is sent
# alone (see /download).
FIRST_PIECE = 64 * 1024
DOWNLOAD = bytes(range(256)) * (6 * 1024)  # 1.5 MiB


def streaming_app(gate: threading.Event) -> Starlette:
    """``/events``: one event, then nothing until ``gate`` is set (by the client, once it has
    read that event), then two more; ``/forever``: an event every 2 ms until the client goes;
    ``/broken``: two NDJSON lines, then the server fails mid-body; ``/slow``: one event, a
    pause, then two more. Of types an app may or may not stream: ``/watch``, chunked
    ``application/json`` (a Kubernetes watch's shape), and ``/download``,
    ``application/octet-stream`` of a stated length: each sends its first piece, then the
    rest only once ``gate`` is set."""

    def gated(first: bytes, rest: list[bytes], media_type: str,
              headers: dict[str, str] | None = None) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield first
            while not gate.is_set():
                await asyncio.sleep(0.005)
            for piece in rest:
                yield piece

        return StreamingResponse(body(), media_type=media_type, headers=headers)

    async def events(request: Request) -> StreamingResponse:
        return gated(b"data: 0\n\n", [b"event: more\ndata: 1\n\n", b"data: 2\n\n"],
                     "text/event-stream")

    async def forever(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            i = 0
            while True:
                yield f"data: tick {i}\n\n".encode()
                i += 1
                await asyncio.sleep(0.002)

        return StreamingResponse(body(), media_type="text/event-stream; charset=utf-8")

    async def broken(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b'{"n": 1}\n'
            yield b'{"n": 2}\n'
            await asyncio.sleep(0.01)
            raise RuntimeError("the upstream failed mid-stream")

        return StreamingResponse(body(), media_type="application/x-ndjson")

    async def slow(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: 0\n\n"
            await asyncio.sleep(PAUSE)
            yield b"event: more\ndata: 1\n\n"
            yield b"data: 2\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    async def watch(request: Request) -> StreamingResponse:
        return gated(b'{"type": "ADDED", "n": 0}\n', [b'{"type": "MODIFIED", "n": 1}\n',
                                                      b'{"type": "DELETED", "n": 2}\n'],
                     "application/json")

    async def download(request: Request) -> StreamingResponse:
        return gated(DOWNLOAD[:FIRST_PIECE], [DOWNLOAD[FIRST_PIECE:]], "application/octet-stream",
                     {"content-length": str(len(DOWNLOAD))})

    return Starlette(routes=[Route("/events", events), Route("/forever", forever),
                             Route("/broken", broken), Route("/slow", slow),
                             Route("/watch", watch), Route("/download", download)])


def live_then_replayed(serve: Any, tmp_path: Path, job: Callable[[str, threading.Event], Any],
                       shape: Callable[[Any], None]) -> tuple[Any, Any, Cassette, ReplayReport]:
    """``job(url, gate)`` against :func:`streaming_app` without timetracer, under ``record``,
    and replayed (strict) with the upstream stopped and no connection attempted; each result
    checked with ``shape``. The recording's result, the replay's, the cassette and the
    replay's report."""
    gate = threading.Event()
    server = serve(streaming_app(gate))
    shape(job(server.url, gate))
    gate.clear()
    with timetracer_otel.record(dir=tmp_path) as rec:
        # Read whole before the app got it, the first event would never come: the server
        # sends the rest only once the app has read it (a read timeout, not this).
        live = job(server.url, gate)
    shape(live)
    server.stop()
    [cassette] = [load_cassette(p) for p in rec.paths]
    gate.clear()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job(server.url, gate)
    assert attempts == []
    shape(replayed)
    return live, replayed, cassette, rep.report
