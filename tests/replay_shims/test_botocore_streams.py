"""botocore's streamed answers against a raw HTTP server on 127.0.0.1 that moto cannot play: an
event stream whose later events the server holds back until the test lets them go (so a
recording that read the stream whole first could not hand the app its first event), and an
object whose connection breaks mid-body. Recorded, then replayed with every connect refused."""

from __future__ import annotations

import binascii
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config
from botocore.eventstream import EventStream

import timetracer_otel
from tests.conftest import connects_refused


def _header(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return bytes([len(n)]) + n + b"\x07" + struct.pack(">H", len(v)) + v


def _event(kind: str, payload: bytes = b"") -> bytes:
    """One message of AWS's event-stream encoding (prelude, headers, payload, CRCs)."""
    headers = b"".join(_header(k, v) for k, v in {
        ":message-type": "event", ":event-type": kind,
        ":content-type": "application/octet-stream"}.items())
    prelude = struct.pack(">II", 12 + len(headers) + len(payload) + 4, len(headers))
    prelude += struct.pack(">I", binascii.crc32(prelude))
    message = prelude + headers + payload
    return message + struct.pack(">I", binascii.crc32(message))


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        part = conn.recv(65536)
        if not part:
            return
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        part = conn.recv(65536)
        if not part:
            return
        body += part


class RawServer:
    """One handler per connection, on a thread of its own."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.handle = handle
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            _read_request(conn)  # whole: a close with bytes unread would reset the connection
            self.handle(conn)


    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)


def _s3(url: str) -> Any:
    return boto3.client("s3", endpoint_url=url, config=Config(
        s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}))


EVENTS = [_event("Records", b'{"n":1}\n'), _event("Records", b'{"n":2}\n'), _event("End")]


@pytest.fixture
def gated() -> Iterator[tuple[RawServer, threading.Event, list[bool]]]:
    """An S3 Select answer sent chunk by chunk: the first event at once, the others once the
    gate opens (or after 5 s, noted in ``late``)."""
    gate = threading.Event()
    late: list[bool] = []

    def handle(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        for i, message in enumerate(EVENTS):
            if i == 1 and not gate.wait(5):
                late.append(True)
            conn.sendall(b"%x\r\n" % len(message) + message + b"\r\n")
        conn.sendall(b"0\r\n\r\n")

    server = RawServer(handle)
    yield server, gate, late
    server.close()


def _select(url: str) -> Any:
    return _s3(url).select_object_content(
        Bucket="b", Key="rows.csv", Expression="SELECT * FROM S3Object", ExpressionType="SQL",
        InputSerialization={"CSV": {}}, OutputSerialization={"JSON": {}})["Payload"]


def test_an_event_stream_reaches_the_app_event_by_event_while_recording(
    aws: None, gated: tuple[RawServer, threading.Event, list[bool]], tmp_path: Path
) -> None:
    server, gate, late = gated
    with timetracer_otel.record(dir=tmp_path) as rec:
        events = _select(server.url)
        stream = iter(events)
        first = next(stream)  # only the first event has been sent yet
        gate.set()
        rest = list(stream)
    assert late == []  # the app had its first event before the server sent the second
    live = [first, *rest]
    assert [next(iter(e)) for e in live] == ["Records", "Records", "End"]
    assert live[0]["Records"]["Payload"] == b'{"n":1}\n'
    server.close()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = _select(server.url)
        assert type(replayed) is EventStream
        assert list(replayed) == live
    assert attempts == [] and rep.report.exact == 1


N = 3 << 20


@pytest.fixture
def breaking() -> Iterator[RawServer]:
    """An object whose connection closes after a third of its stated length."""

    def handle(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % N)
        conn.sendall(b"a" * (N // 3))

    server = RawServer(handle)
    yield server
    server.close()


def _download(url: str) -> tuple[int, str, str]:
    body = _s3(url).get_object(Bucket="b", Key="k")["Body"]
    got = 0
    try:
        for chunk in body.iter_chunks(100_000):
            got += len(chunk)
    except botocore.exceptions.BotoCoreError as exc:
        return got, type(exc).__name__, str(exc)
    return got, "", ""


def test_a_body_that_breaks_replays_its_bytes_then_the_same_error(
    aws: None, breaking: RawServer, tmp_path: Path
) -> None:
    plain = _download(breaking.url)
    with timetracer_otel.record(dir=tmp_path) as rec:
        recorded = _download(breaking.url)
    assert plain[:2] == (N // 3, "ResponseStreamingError") and recorded == plain
    breaking.close()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = _download(breaking.url)
    assert attempts == [] and replayed == plain
