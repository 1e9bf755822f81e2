"""httpx: a body that breaks off after the response started (the server stalls past the read
timeout, or closes before the declared Content-Length) reaches the app as plain httpx gives
it, under record and in replay: the status and the chunks that arrived, then the error, raised
where plain httpx raises it (while the body is read: in ``iter_bytes``, or in ``get()``)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import timetracer_otel
from tests.conftest import connects_refused
from tests.deferral import recorded_both_ways
from timetracer_otel.cassette import load_cassette

FIRST = b"first chunk\n"


class BrokenBodyServer:
    """A raw HTTP/1.1 server on 127.0.0.1: ``/stall`` sends its headers (chunked) and one
    chunk, then says nothing more until the client hangs up; ``/short`` declares a
    Content-Length of 100, sends 12 bytes and closes; ``/ok`` answers whole."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.closing = threading.Event()
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                part = conn.recv(4096)
                if not part:
                    return
                data += part
            path = data.split(b" ", 2)[1]
            if path == b"/stall":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                             b"transfer-encoding: chunked\r\n\r\n"
                             + f"{len(FIRST):x}\r\n".encode() + FIRST + b"\r\n")
                try:  # until the client gives up (its read timeout) and closes
                    while conn.recv(4096) and not self.closing.is_set():
                        pass
                except OSError:
                    pass
            elif path == b"/short":
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                             b"content-length: 100\r\n\r\n" + FIRST)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")

    def stop(self) -> None:
        self.closing.set()
        with contextlib.suppress(OSError):  # wakes the acceptor: close() alone does not on Linux
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.acceptor.join(5)
        for t in self.threads:
            t.join(5)


@pytest.fixture
def broken() -> Iterator[BrokenBodyServer]:
    server = BrokenBodyServer()
    try:
        yield server
    finally:
        server.stop()


TIMEOUT = httpx.Timeout(5, read=0.3)
ERRORS = (httpx.ReadTimeout, httpx.RemoteProtocolError)


def _streamed(c: httpx.Client, url: str) -> list[Any]:
    out: list[Any] = []
    try:
        with c.stream("GET", url) as r:
            out.append(("status", r.status_code, r.reason_phrase))
            for chunk in r.iter_raw():
                out.append(("chunk", chunk))
    except ERRORS as e:
        out.append((type(e), str(e), e.request.url == httpx.URL(url)))
    return out


def _got(c: httpx.Client, url: str) -> Any:
    try:
        return ("no error", c.get(url).content)
    except ERRORS as e:
        return (type(e), str(e))


def sync_job(base: str) -> list[Any]:
    with httpx.Client(timeout=TIMEOUT) as c:
        return [_streamed(c, f"{base}/stall"), _streamed(c, f"{base}/short"),
                _got(c, f"{base}/stall"), _got(c, f"{base}/short"), _got(c, f"{base}/ok")]


async def _astreamed(c: httpx.AsyncClient, url: str) -> list[Any]:
    out: list[Any] = []
    try:
        async with c.stream("GET", url) as r:
            out.append(("status", r.status_code, r.reason_phrase))
            async for chunk in r.aiter_raw():
                out.append(("chunk", chunk))
    except ERRORS as e:
        out.append((type(e), str(e), e.request.url == httpx.URL(url)))
    return out


async def _aget(c: httpx.AsyncClient, url: str) -> Any:
    try:
        return ("no error", (await c.get(url)).content)
    except ERRORS as e:
        return (type(e), str(e))


async def async_job(base: str) -> list[Any]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as c:
        return [await _astreamed(c, f"{base}/stall"), await _astreamed(c, f"{base}/short"),
                await _aget(c, f"{base}/stall"), await _aget(c, f"{base}/short"),
                await _aget(c, f"{base}/ok")]


def _expected_shape(out: list[Any]) -> None:
    """What plain httpx gives: status and the first chunk, then the error; ``get()`` raises."""
    stall, short, got_stall, got_short, ok = out
    # (the ReadTimeout's message is the socket's: "timed out" sync, "" from anyio)
    assert stall[:2] == short[:2] == [("status", 200, "OK"), ("chunk", FIRST)]
    assert len(stall) == len(short) == 3
    assert stall[2][0] is httpx.ReadTimeout and stall[2][2] is True
    assert short[2][0] is httpx.RemoteProtocolError and short[2][2] is True
    assert short[2][1].startswith("peer closed connection without sending complete message body")
    assert got_stall[0] is httpx.ReadTimeout
    assert got_short[0] is httpx.RemoteProtocolError
    assert ok == ("no error", b"ok")


JOBS: dict[str, Callable[[str], list[Any]]] = {
    "sync": sync_job,
    "async": lambda base: asyncio.run(async_job(base)),
}


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("span_payloads", ["", "1"])  # left to the writer / captured on the span
def test_a_body_broken_off_is_recorded_and_replayed_as_plain_httpx_sees_it(
    broken: BrokenBodyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str,
    span_payloads: str,
) -> None:
    monkeypatch.setenv("TIMETRACER_SPAN_PAYLOADS", span_payloads)
    job = JOBS[kind]
    plain = job(broken.url)
    _expected_shape(plain)
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(broken.url)
    assert live == plain  # recording changes nothing the app sees
    broken.stop()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job(broken.url)
    assert attempts == []
    assert replayed == plain
    assert rep.report.ok and rep.report.exact == 5 and not rep.report.unused


def test_the_recorded_body_error_is_the_same_both_ways(
    broken: BrokenBodyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def job(base: str, down: str) -> None:
        with httpx.Client(timeout=TIMEOUT, headers={"Authorization": "Bearer s3cr3t-0123456789abcdef"}) as c:
            _streamed(c, f"{base}/stall")
            _got(c, f"{base}/short")
            c.get(f"{base}/ok")

    recorded = recorded_both_ways(job, broken.url, 3, tmp_path, monkeypatch, "msgpack")
    # (library, key, shape, label, request, response, error, truncated)
    errors = sorted(((r[5] or {}).get("body_error") or {}).get("type", "") for r in recorded)
    assert errors == ["", "httpx:ReadTimeout", "httpx:RemoteProtocolError"]
    for r in recorded:
        assert r[5] is not None and r[6] is None  # a response (status, chunks), not an error
        if r[5].get("body_error"):
            assert r[5]["chunks"] == [FIRST] and r[5]["status"] == 200


def test_a_cassette_without_body_errors_replays_as_before(
    broken: BrokenBodyServer, tmp_path: Path
) -> None:
    # A whole body (every response of an older cassette) has no body_error: its stream ends
    # after its chunks.
    def job() -> list[Any]:
        with httpx.Client() as c, c.stream("GET", f"{broken.url}/ok") as s:
            return [c.get(f"{broken.url}/ok").content, s.status_code, list(s.iter_raw())]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    broken.stop()
    assert all("body_error" not in s.response for s in load_cassette(rec.paths[0]).interactions)
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job()
    assert attempts == [] and replayed == live == [b"ok", 200, [b"ok"]]
    assert rep.report.ok and rep.report.exact == 2
