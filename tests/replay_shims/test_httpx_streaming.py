"""httpx: a streamed response (server-sent events, NDJSON) reaches the app as it comes while
recording, as it does without timetracer: each chunk as the server sends it, an endless stream
closed by the app when it has read enough, a stream that breaks off with its error. The call
is recorded as the app read it, its span ends with the body, and replay (upstream stopped)
gives the app the same chunks, of the same type, and the same error."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

import timetracer_otel
from tests.conftest import connects_refused
from tests.replay_shims.streaming_apps import PAUSE, TIMEOUT, live_then_replayed, streaming_app
from timetracer_otel.cassette import load_cassette
from timetracer_otel.errors import ReplayUnsupportedError
from timetracer_otel.replay_shims import base
from timetracer_otel.replay_shims import httpx as httpx_shim


def sync_job(base: str, gate: threading.Event, lines: int = 6) -> list[Any]:
    out: list[Any] = []
    with httpx.Client(timeout=TIMEOUT) as c:
        with c.stream("GET", f"{base}/events") as r:
            raw = r.iter_raw()
            out.append((r.status_code, r.headers["content-type"], next(raw)))
            time.sleep(PAUSE)
            gate.set()
            out.append(list(raw))
        with c.stream("GET", f"{base}/forever") as r:  # closed after a few events
            it = r.iter_lines()
            out.append([next(it) for _ in range(lines)])
        try:
            with c.stream("GET", f"{base}/broken") as r:
                for chunk in r.iter_raw():
                    out.append(chunk)
        except httpx.HTTPError as exc:
            out.append(type(exc))
    return out


async def async_job_(base: str, gate: threading.Event, lines: int = 6) -> list[Any]:
    out: list[Any] = []
    async with httpx.AsyncClient(timeout=TIMEOUT) as c:
        async with c.stream("GET", f"{base}/events") as r:
            raw = r.aiter_raw()
            out.append((r.status_code, r.headers["content-type"], await raw.__anext__()))
            await asyncio.sleep(PAUSE)
            gate.set()
            out.append([chunk async for chunk in raw])
        async with c.stream("GET", f"{base}/forever") as r:
            it = r.aiter_lines()
            out.append([await it.__anext__() for _ in range(lines)])
            await it.aclose()
        try:
            async with c.stream("GET", f"{base}/broken") as r:
                async for chunk in r.aiter_raw():
                    out.append(chunk)
        except httpx.HTTPError as exc:
            out.append(type(exc))
    return out


def async_job(base: str, gate: threading.Event, lines: int = 6) -> list[Any]:
    return asyncio.run(async_job_(base, gate, lines))


JOBS: dict[str, Callable[..., list[Any]]] = {"sync": sync_job, "async": async_job}


def _shape(out: list[Any]) -> None:
    """What any run of a job gives, live or replayed: typed and in order."""
    (status, ctype, first), rest, ticks, *broken = out
    assert (status, ctype, first) == (200, "text/event-stream; charset=utf-8", b"data: 0\n\n")
    assert type(first) is bytes and all(type(c) is bytes for c in rest)
    assert b"".join(rest) == b"event: more\ndata: 1\n\ndata: 2\n\n"
    assert ticks == ["data: tick 0", "", "data: tick 1", "", "data: tick 2", ""]
    assert broken == [b'{"n": 1}\n{"n": 2}\n', httpx.RemoteProtocolError] or broken == [
        b'{"n": 1}\n', b'{"n": 2}\n', httpx.RemoteProtocolError]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("span_payloads", ["", "1"])  # left to the writer / captured on the span
def test_a_streamed_body_reaches_the_app_as_it_comes_and_replays_as_read(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, span_payloads: str,
) -> None:
    monkeypatch.setenv("TIMETRACER_SPAN_PAYLOADS", span_payloads)
    live, replayed, cassette, report = live_then_replayed(serve, tmp_path, JOBS[kind], _shape)
    assert len(cassette.interactions) == 3, [s.name for s in cassette.interactions]
    events = next(s for s in cassette.interactions if s.request["url"].endswith("/events"))
    # The span ends with the body, which the app read after a pause: not with the headers.
    assert events.end_ns - events.start_ns >= PAUSE * 1e9
    broken = next(s for s in cassette.interactions if s.request["url"].endswith("/broken"))
    assert broken.response["body_error"]["type"] == "httpx:RemoteProtocolError"
    assert replayed == live  # the same chunks, as the app read them, and the same error
    assert report.ok and report.exact == 3 and not report.unused


@pytest.mark.timeout(120)
def test_an_endless_stream_past_the_payload_limit_is_stored_truncated(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The app reads far more than the limit: what is kept stops there (the memory of an
    # endless stream stays bounded), and the call says it was stored truncated.
    monkeypatch.setenv("TIMETRACER_MAX_PAYLOAD_BYTES", "2000")
    gate = threading.Event()
    server = serve(streaming_app(gate))
    kept: list[int] = []
    end = httpx_shim._Tee._end

    def spied(self: Any, exc: BaseException | None = None) -> None:
        kept.append(sum(map(len, self.chunks)))
        end(self, exc)

    monkeypatch.setattr(httpx_shim._Tee, "_end", spied)

    def job() -> list[str]:
        with httpx.Client(timeout=TIMEOUT) as c, c.stream("GET", f"{server.url}/forever") as r:
            it = r.iter_lines()
            return [next(it) for _ in range(600)]  # 300 events, over 4 KB

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    assert live[-2:] == ["data: tick 299", ""]
    assert kept and 2000 <= kept[0] <= 2000 + 64  # one event past the limit, no more
    server.stop()
    [span] = load_cassette(rec.paths[0]).interactions
    assert span.truncated and span.response is None
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths), \
            pytest.raises(ReplayUnsupportedError, match="stored truncated"):
        job()
    assert attempts == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("span_payloads", ["", "1"])
def test_a_stream_the_app_stopped_reading_replays_up_to_there_then_says_so(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, span_payloads: str,
) -> None:
    # Closed after three events while recording: replay gives those, and reading further
    # is refused with the reason (nothing after them was recorded), not a made-up end.
    monkeypatch.setenv("TIMETRACER_SPAN_PAYLOADS", span_payloads)
    server = serve(streaming_app(threading.Event()))

    def job(lines: int) -> list[str]:
        with httpx.Client(timeout=TIMEOUT) as c, c.stream("GET", f"{server.url}/forever") as r:
            it = r.iter_lines()
            return [next(it) for _ in range(lines)]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(6)
    server.stop()
    [span] = load_cassette(rec.paths[0]).interactions
    assert span.response["body_open"] is True
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        assert job(6) == live
    assert rep.report.ok
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths) as rep, \
            pytest.raises(ReplayUnsupportedError, match="where the app stopped reading"):
        job(600)
    assert attempts == [] and rep.report.failed(True)
    assert rep.report.unsupported == [f"GET {server.url}/forever (read past where the recording stopped)"]


@pytest.mark.timeout(120)
def test_a_response_dropped_unclosed_is_recorded_off_the_collecting_thread(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The finaliser of a response the app never closed hands the call to another thread
    # (it may run inside any lock: the redactor's), which records what was read.
    import gc

    server = serve(streaming_app(threading.Event()))
    finished_on: list[str] = []
    end = httpx_shim._Tee._end

    def spied(self: Any, exc: BaseException | None = None) -> None:
        finished_on.append(threading.current_thread().name)
        end(self, exc)

    monkeypatch.setattr(httpx_shim._Tee, "_end", spied)
    with timetracer_otel.record(dir=tmp_path) as rec:
        client = httpx.Client(timeout=TIMEOUT, headers={"Authorization": "Bearer s3cr3t-0123456789ab"})
        response = client.send(client.build_request("GET", f"{server.url}/forever"), stream=True)
        first = next(response.iter_lines())
        del response
        gc.collect()
        client.close()
    assert first == "data: tick 0"
    assert finished_on == ["timetracer-late-calls"]
    server.stop()
    [span] = load_cassette(rec.paths[0]).interactions
    assert span.response["body_open"] is True and span.response["chunks"]
    assert "s3cr3t-0123456789ab" not in str(span.request)
    assert base.drain_late()
