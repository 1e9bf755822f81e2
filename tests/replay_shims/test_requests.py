"""requests: record against a real upstream, replay identical responses and errors offline."""

from __future__ import annotations

import asyncio
import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.routing import Route

import timetracer_otel
from tests.conftest import connects_refused, unreachable_port
from tests.deferral import recorded_both_ways, secrets_learned_in_the_app
from tests.upstream_app import app
from timetracer_otel.cassette import load_cassette


def snapshot(r: requests.Response) -> dict[str, Any]:
    return {
        "type": type(r),
        "status": r.status_code,
        "reason": r.reason,
        "headers": {k: v for k, v in r.headers.items() if k.lower() != "set-cookie"},
        "content": r.content,
        "cookie_names": sorted(r.cookies.keys()),
        "url": r.url,
    }


def test_responses_replay_identically_with_the_server_stopped(serve: Any, tmp_path: Path) -> None:
    server = serve(app)

    def job() -> list[Any]:
        with requests.Session() as s:
            out = [snapshot(s.get(f"{server.url}/items", params={"page": p})) for p in (1, 2, 1)]
            out.append(snapshot(s.post(f"{server.url}/echo", data=b"\x00\x01payload")))
            out.append(snapshot(s.put(f"{server.url}/echo", data=io.BytesIO(b"from a file"))))
            out.append(snapshot(s.get(f"{server.url}/blob")))
            out.append(snapshot(s.get(f"{server.url}/multi")))
            out.append(s.get(f"{server.url}/gzip").json())
            streamed = s.get(f"{server.url}/stream", stream=True)
            out.append(b"".join(streamed.iter_content(chunk_size=3)))
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    server.stop()
    with timetracer_otel.replay(rec.paths) as rep:
        replayed = job()
    assert replayed == live
    assert live[0]["content"] != live[2]["content"]  # same request twice, answered in order
    assert live[3]["content"] == b"daolyap\x01\x00" and type(live[3]["content"]) is bytes
    assert live[6]["cookie_names"] == ["session"]
    assert rep.report.exact == 9


@pytest.mark.parametrize("kind", ["connect", "timeout"])
def test_recorded_exceptions_replay_with_their_class(serve: Any, tmp_path: Path, kind: str) -> None:
    server = serve(app)
    url = f"http://127.0.0.1:{unreachable_port()}/x" if kind == "connect" else f"{server.url}/slow"
    expected = requests.ConnectionError if kind == "connect" else requests.ReadTimeout

    def job() -> BaseException:
        with pytest.raises(requests.RequestException) as info:
            requests.get(url, timeout=0.3)
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
    assert replayed.request is not None and replayed.request.url == url


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_calls_left_to_the_writer_record_what_the_span_attribute_records(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    def job(base: str, down: str) -> None:
        with requests.Session() as s:
            s.headers["Authorization"] = "Bearer s3cr3t-0123456789abcdef"
            s.post(f"{base}/echo", json={"user": "ann", "password": "hunter2-hunter2"})
            s.get(f"{base}/blob")
            s.get(f"{base}/multi")  # Set-Cookie: a secret in the response headers
            s.get(f"{base}/gzip")
            s.put(f"{base}/echo", data=io.BytesIO(b"uploaded"))  # a file body, read once
        with pytest.raises(requests.ConnectionError):
            requests.get(down)

    recorded_both_ways(job, serve(app).url, 6, tmp_path, monkeypatch, fmt)


def test_secrets_of_a_call_left_to_the_writer_are_known_in_the_app(serve: Any, tmp_path: Path) -> None:
    secrets_learned_in_the_app(requests.get, requests.post, serve(app).url, tmp_path)


# --- response.elapsed -------------------------------------------------------------------------


async def _late(request: Request) -> PlainTextResponse:
    await asyncio.sleep(0.2)  # before the headers: requests' elapsed is at least this
    return PlainTextResponse("late")


async def _hop(request: Request) -> RedirectResponse:
    return RedirectResponse("/late", status_code=302)


TIMED = Starlette(routes=[Route("/late", _late), Route("/hop", _hop)])


def _timed_job(base: str, hooked: list[Any]) -> list[Any]:
    """The elapsed of a response, of both hops of a redirect, and what a response hook saw."""
    with requests.Session() as s:
        s.hooks["response"].append(lambda r, **kwargs: hooked.append(r.elapsed))
        direct = s.get(f"{base}/late")
        hopped = s.get(f"{base}/hop")
        assert [len(r.request.hooks["response"]) for r in (direct, hopped)] == [1, 1]
        return [direct.elapsed, hopped.history[0].elapsed, hopped.elapsed]


def test_elapsed_replays_as_recorded(serve: Any, tmp_path: Path) -> None:
    server = serve(TIMED)
    hooked: list[Any] = []
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = _timed_job(server.url, hooked)
    live_hooked, hooked[:] = hooked[:], []
    server.stop()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths) as rep:
        replayed = _timed_job(server.url, hooked)
    assert attempts == [] and rep.report.exact == 3 and not rep.report.misses
    assert [type(e) for e in live + replayed] == [timedelta] * 6
    assert live[0] >= timedelta(seconds=0.2) and live[2] >= timedelta(seconds=0.2)
    assert replayed == live
    # The response hooks run inside Session.send, before it sets the recorded value: they see
    # requests' own measure (of the live call and the body read recording added; of the
    # replay), and the app's hooks ran once per response either way.
    assert len(hooked) == len(live_hooked) == 3
    assert all(type(e) is timedelta for e in hooked + live_hooked)


def test_a_cassette_without_elapsed_replays_requests_own_measure(
    serve: Any, tmp_path: Path
) -> None:
    """Cassettes recorded before ``elapsed`` was kept replay requests' own measure of the
    replay (in memory: far under the live call's 0.2 s), as they did."""
    server = serve(TIMED)
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = requests.get(f"{server.url}/late").elapsed
    server.stop()
    [path] = rec.paths
    cassette = load_cassette(path)
    [call] = cassette.interactions
    assert call.response.pop("elapsed_us") == live // timedelta(microseconds=1)
    with connects_refused() as attempts, timetracer_otel.replay(cassette) as rep:
        elapsed = requests.get(f"{server.url}/late").elapsed
    assert attempts == [] and rep.report.exact == 1
    assert type(elapsed) is timedelta and elapsed < timedelta(seconds=0.1) < live


