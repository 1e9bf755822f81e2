"""requests: a streamed response (server-sent events, NDJSON, read with ``stream=True``)
reaches the app as it comes while recording, as without timetracer: each event as the server
sends it, an endless stream closed by the app when it has read enough, a stream that breaks
off with requests' error. The call is recorded as the app read it, its span ends with the
body, and replay (upstream stopped) gives the app the same bytes, lines and error."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

import timetracer_otel
from tests.conftest import connects_refused
from tests.replay_shims.streaming_apps import PAUSE, TIMEOUT, live_then_replayed, streaming_app
from timetracer_otel.cassette import load_cassette
from timetracer_otel.errors import ReplayUnsupportedError
from timetracer_otel.replay_shims import requests as requests_shim


def job(base: str, gate: threading.Event) -> list[Any]:
    out: list[Any] = []
    with requests.Session() as s:
        with s.get(f"{base}/events", stream=True, timeout=TIMEOUT) as r:
            events = r.iter_content(chunk_size=None)
            out.append((r.status_code, r.headers["content-type"], next(events)))
            time.sleep(PAUSE)
            gate.set()
            out.append(b"".join(events))
        with s.get(f"{base}/forever", stream=True, timeout=TIMEOUT) as r:  # closed early
            lines = r.iter_lines()
            out.append([next(lines) for _ in range(6)])
        try:
            with s.get(f"{base}/broken", stream=True, timeout=TIMEOUT) as r:
                out.extend(r.iter_content(chunk_size=None))
        except requests.RequestException as exc:
            out.append(type(exc))
        whole = s.get(f"{base}/events", timeout=TIMEOUT)  # not streamed: read inside get()
        out.append((whole.status_code, whole.content))
    return out


def _shape(out: list[Any]) -> None:
    (status, ctype, first), rest, ticks, *broken, whole = out
    assert (status, ctype, first) == (200, "text/event-stream; charset=utf-8", b"data: 0\n\n")
    assert type(first) is bytes and rest == b"event: more\ndata: 1\n\ndata: 2\n\n"
    assert ticks == [b"data: tick 0", b"", b"data: tick 1", b"", b"data: tick 2", b""]
    assert b"".join(broken[:-1]) == b'{"n": 1}\n{"n": 2}\n'
    assert broken[-1] is requests.exceptions.ChunkedEncodingError
    assert whole == (200, b"data: 0\n\nevent: more\ndata: 1\n\ndata: 2\n\n")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("span_payloads", ["", "1"])  # left to the writer / captured on the span
def test_a_streamed_body_reaches_the_app_as_it_comes_and_replays_as_read(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, span_payloads: str,
) -> None:
    monkeypatch.setenv("TIMETRACER_SPAN_PAYLOADS", span_payloads)
    live, replayed, cassette, report = live_then_replayed(serve, tmp_path, job, _shape)
    calls = cassette.interactions
    assert [c.request["url"].rsplit("/", 1)[1] for c in calls] == [
        "events", "forever", "broken", "events"]
    # The span ends with the body, which the app read after a pause: not with the headers.
    assert calls[0].end_ns - calls[0].start_ns >= PAUSE * 1e9
    assert calls[2].response["error"]["type"].endswith("ProtocolError")
    assert calls[0].response["chunk_sizes"] == [9, 21, 9]  # each event as the server sent it

    assert replayed == live
    assert report.ok and report.exact == 4 and not report.unused


@pytest.mark.timeout(120)
def test_an_endless_stream_past_the_payload_limit_is_stored_truncated(
    serve: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TIMETRACER_MAX_PAYLOAD_BYTES", "2000")
    server = serve(streaming_app(threading.Event()))
    kept: list[int] = []
    end = requests_shim._LiveBody._end

    def spied(self: Any, exc: BaseException | None = None) -> None:
        kept.append(len(self._kept))
        end(self, exc)

    monkeypatch.setattr(requests_shim._LiveBody, "_end", spied)

    def read_events() -> list[bytes]:
        with requests.get(f"{server.url}/forever", stream=True, timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            return [next(lines) for _ in range(600)]  # 300 events, over 4 KB

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = read_events()
    assert live[-2:] == [b"data: tick 299", b""]
    assert kept and 2000 <= kept[0] <= 2000 + 64  # one chunk past the limit, no more
    server.stop()
    [span] = load_cassette(rec.paths[0]).interactions
    assert span.truncated and span.response is None
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths), \
            pytest.raises(ReplayUnsupportedError, match="stored truncated"):
        read_events()
    assert attempts == []


@pytest.mark.timeout(120)
def test_raw_reads_of_n_bytes_wait_for_n_bytes_as_live(
    serve: Any, tmp_path: Path,
) -> None:
    # http.client's read(n) waits for n bytes unless the body ends: the first event comes
    # alone, the rest after a pause. Recording must not hand the app a shorter read (and
    # keep only that), and replay gives what live gave.
    server = serve(streaming_app(threading.Event()))

    def job() -> list[bytes]:
        with requests.get(f"{server.url}/slow", stream=True, timeout=TIMEOUT) as r:
            return [r.raw.read(20), r.raw.read(100), r.raw.read()]

    plain = job()
    assert plain == [b"data: 0\n\nevent: more", b"\ndata: 1\n\ndata: 2\n\n", b""]
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    server.stop()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job()
    assert live == plain and replayed == plain and attempts == []
    assert rep.report.ok and rep.report.exact == 1
