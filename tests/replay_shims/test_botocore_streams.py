"""botocore's streamed answers against a raw HTTP server on 127.0.0.1 that moto cannot play: an
event stream whose later events the server holds back until the test lets them go (so a
recording that read the stream whole first could not hand the app its first event), and an
object whose connection breaks mid-body. Recorded, then replayed with every connect refused."""

from __future__ import annotations

import base64
import binascii
import json
import socket
import struct
import threading
import time
import uuid
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
from timetracer_otel.cassette import load_cassette
from timetracer_otel.errors import ReplayUnsupportedError
from timetracer_otel.replay_shims.base import STATE


def _header(name: str, value: str) -> bytes:
    n, v = name.encode(), value.encode()
    return bytes([len(n)]) + n + b"\x07" + struct.pack(">H", len(v)) + v


def _event(kind: str, payload: bytes = b"", ctype: str = "application/octet-stream") -> bytes:
    """One message of AWS's event-stream encoding (prelude, headers, payload, CRCs)."""
    headers = b"".join(_header(k, v) for k, v in {
        ":message-type": "event", ":event-type": kind, ":content-type": ctype}.items())
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


def _chunked(conn: socket.socket, messages: list[bytes], pause: float = 0.0) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.amazon.eventstream\r\n"
                 b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    try:
        for message in messages:
            time.sleep(pause)
            conn.sendall(b"%x\r\n" % len(message) + message + b"\r\n")
        conn.sendall(b"0\r\n\r\n")
    except OSError:  # the client left part way
        pass


def _chunk(doc: dict[str, Any]) -> bytes:
    return _event("chunk", json.dumps({"bytes": base64.b64encode(json.dumps(doc).encode())
                                       .decode()}).encode(), "application/json")


BEDROCK = [_chunk({"type": t}) for t in (
    "message_start", "content_block_start", "content_block_delta", "content_block_stop",
    "message_delta", "message_stop")]


def _tokens(url: str, count: int) -> tuple[Any, list[str]]:
    client = boto3.client("bedrock-runtime", endpoint_url=url,
                          config=Config(retries={"total_max_attempts": 1}))
    body = client.invoke_model_with_response_stream(
        modelId="anthropic.claude-3-haiku-20240307-v1:0", body=b'{"messages": []}')["body"]
    kinds = []
    for event in body:
        kinds.append(json.loads(event["chunk"]["bytes"])["type"])
        if len(kinds) == count:
            break
    return body, kinds


def test_a_bedrock_stream_the_app_leaves_part_way_is_recorded_when_the_run_ends(
    aws: None, tmp_path: Path
) -> None:
    """OTel's Bedrock extension ends its span only at the stream's end or close: an app that
    leaves the loop (and neither) still has its call recorded, as read so far."""
    server = RawServer(lambda conn: _chunked(conn, BEDROCK, 0.05))
    with timetracer_otel.record(dir=tmp_path) as rec:
        body, live = _tokens(server.url, 2)
    assert live == ["message_start", "content_block_start"]
    (path,) = rec.paths
    (call,) = load_cassette(path).interactions
    (send,) = call.response["sends"]
    assert send["body_open"] is True
    server.close()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed, kinds = _tokens(server.url, 2)
        assert kinds == live and type(replayed) is type(body)
        with pytest.raises(ReplayUnsupportedError, match="where the app stopped reading"):
            next(iter(replayed))
    assert attempts == []


def test_a_secret_in_an_event_stream_is_redacted_and_the_stream_still_reads(
    aws: None, tmp_path: Path
) -> None:
    """Each message's payload is scrubbed and the message framed again (lengths, CRCs):
    replayed, botocore reads the stream without a checksum error."""
    secret = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
    messages = [_event("Records", b'{"k":"%s"}\n' % secret.encode()), _event("End")]
    server = RawServer(lambda conn: _chunked(conn, messages))
    with timetracer_otel.record(dir=tmp_path) as rec:
        STATE.redactor.header("authorization", f"Bearer {secret}")  # a secret the run saw
        live = list(_select(server.url))
    assert live[0]["Records"]["Payload"] == b'{"k":"%s"}\n' % secret.encode()
    (path,) = rec.paths
    assert secret.encode() not in Path(path).read_bytes()
    server.close()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = list(_select(server.url))
    assert attempts == [] and [next(iter(e)) for e in replayed] == ["Records", "End"]
    assert replayed[0]["Records"]["Payload"].startswith(b'{"k":"redacted:')


def test_a_read_timeout_mid_body_replays_as_the_same_error(aws: None, tmp_path: Path) -> None:
    def stall(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n" % N)
        conn.sendall(b"a" * 100_000)
        time.sleep(2)

    server = RawServer(stall)

    def job() -> tuple[int, str]:
        client = boto3.client("s3", endpoint_url=server.url, config=Config(
            s3={"addressing_style": "path"}, read_timeout=0.5, retries={"total_max_attempts": 1}))
        body = client.get_object(Bucket="b", Key="k")["Body"]
        got = 0
        with pytest.raises(botocore.exceptions.ReadTimeoutError) as raised:
            for chunk in body.iter_chunks(10_000):
                got += len(chunk)
        return got, type(raised.value).__name__

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    assert live == (100_000, "ReadTimeoutError")
    server.close()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        assert job() == live
    assert attempts == []


def test_a_secret_learned_after_an_event_stream_is_scrubbed_and_the_stream_still_reads(
    aws: None, tmp_path: Path
) -> None:
    """The writer scrubs a cassette again for secrets learned later in the run: the stream
    is kept unframed, so that scrub cannot break a message's checksums either."""
    secret = f"late{uuid.uuid4().hex}"  # (unknown to the redactor until the call is over)
    messages = [_event("Records", b'{"k":"%s"}\n' % secret.encode()), _event("End")]
    server = RawServer(lambda conn: _chunked(conn, messages))
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = list(_select(server.url))
        STATE.redactor.header("authorization", f"Bearer {secret}")  # learned only now
    (path,) = rec.paths
    assert secret.encode() not in Path(path).read_bytes()
    server.close()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = list(_select(server.url))
    assert attempts == [] and len(replayed) == len(live) == 2
    assert replayed[0]["Records"]["Payload"].startswith(b'{"k":"redacted:')


def test_a_secret_in_a_bedrock_chunk_is_redacted_inside_its_base64(
    aws: None, tmp_path: Path
) -> None:
    secret = f"bedrock{uuid.uuid4().hex}"
    said = {"type": "content_block_delta", "delta": {"text": f"your key is {secret}"}}
    server = RawServer(lambda conn: _chunked(conn, [BEDROCK[0], _chunk(said), BEDROCK[-1]]))

    def job() -> list[Any]:
        client = boto3.client("bedrock-runtime", endpoint_url=server.url,
                              config=Config(retries={"total_max_attempts": 1}))
        body = client.invoke_model_with_response_stream(
            modelId="anthropic.claude-3-haiku-20240307-v1:0", body=b"{}")["body"]
        return [json.loads(event["chunk"]["bytes"]) for event in body]

    with timetracer_otel.record(dir=tmp_path) as rec:
        STATE.redactor.header("authorization", f"Bearer {secret}")  # a secret the run saw
        live = job()
    assert live[1] == said
    (path,) = rec.paths
    (call,) = load_cassette(path).interactions
    (send,) = call.response["sends"]
    inside = [base64.b64decode(json.loads(payload)["bytes"]) for _, payload in send["messages"]]
    assert not any(secret.encode() in chunk for chunk in inside)
    server.close()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = job()
    assert attempts == [] and replayed[0] == live[0]
    assert replayed[1]["delta"]["text"].startswith("your key is redacted:")


def test_lines_reach_the_app_as_they_come_and_reads_after_them_count_as_live(
    aws: None, tmp_path: Path
) -> None:
    """``with body as f``: a line comes as soon as it has arrived (the server holds the rest
    back), and ``read(n)`` and ``tell()`` after a line give what they give live."""
    gate = threading.Event()
    late: list[bool] = []
    lines = [b"line %06d\n" % i for i in range(30_000)]

    def handle(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        for i, piece in enumerate((lines[0], b"".join(lines[1:]))):
            if i and not gate.wait(5):
                late.append(True)
            conn.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        conn.sendall(b"0\r\n\r\n")

    server = RawServer(handle)

    def job() -> tuple[bytes, int, int, int, bytes]:
        with _s3(server.url).get_object(Bucket="b", Key="k")["Body"] as f:
            first = f.readline()
            gate.set()
            at = f.tell()
            part = f.read(100_000)
            return first, at, len(part), f.tell(), part[:12] + f.read()[-12:]

    with timetracer_otel.record(dir=tmp_path) as rec:
        recorded = job()
    assert late == []  # the first line came before the server sent the rest
    assert recorded == (lines[0], 12, 100_000, 100_012, lines[1] + lines[-1])  # 12-byte lines
    server.close()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        assert job() == recorded
    assert attempts == []


def test_an_event_stream_is_redacted_by_field_name_and_a_broken_message_replays_broken(
    aws: None, tmp_path: Path
) -> None:
    """A record that names a secret field (``password``) is redacted as an S3 object's JSON
    is; a message whose checksum is wrong is kept as it came, so the replay fails on it as
    the live run did."""
    broken = bytearray(_event("Records", b'{"n":2}\n'))
    broken[-1] ^= 0xFF  # its message CRC
    messages = [_event("Records", b'{"user":"a","password":"hunter2-plain"}\n'), bytes(broken)]
    server = RawServer(lambda conn: _chunked(conn, messages))

    def job() -> list[Any]:
        out: list[Any] = []
        try:
            for event in _select(server.url):
                out.append(event)
        except Exception as exc:  # botocore's ChecksumMismatch
            out.append(type(exc).__name__)
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    assert live[1] == "ChecksumMismatch"
    assert live[0]["Records"]["Payload"] == b'{"user":"a","password":"hunter2-plain"}\n'
    (path,) = rec.paths
    assert b"hunter2-plain" not in Path(path).read_bytes()
    server.close()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = job()
    assert attempts == [] and replayed[1] == "ChecksumMismatch"
    doc = json.loads(replayed[0]["Records"]["Payload"])
    assert doc["user"] == "a" and doc["password"].startswith("redacted:")


def test_a_body_past_the_payload_limit_is_refused_past_what_was_kept(
    aws: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``TIMETRACER_MAX_PAYLOAD_BYTES`` the rest is not kept. Redaction can make what
    was kept fit the limit (tokens are shorter than the secrets here): a replay still
    refuses to go past it, instead of ending the body early."""
    monkeypatch.setenv("TIMETRACER_MAX_PAYLOAD_BYTES", "4096")
    secret = uuid.uuid4().hex * 6  # 192 characters
    lines = (secret + "\n").encode() * 40  # 7,720 bytes, chunked
    server = RawServer(lambda conn: _chunked(conn, [lines[:3000], lines[3000:]]))

    def job() -> tuple[int, str]:
        body = _s3(server.url).get_object(Bucket="b", Key="k")["Body"]
        first = body.readline()
        try:
            rest = body.read()
        except ReplayUnsupportedError as exc:
            return first.count(b"\n"), str(exc)
        return first.count(b"\n"), f"{len(first + rest)} bytes"

    with timetracer_otel.record(dir=tmp_path) as rec:
        STATE.redactor.header("authorization", f"Bearer {secret}")  # a secret the run saw
        assert job() == (1, f"{len(lines)} bytes")
    (path,) = rec.paths
    (call,) = load_cassette(path).interactions
    assert not call.truncated and call.response["sends"][0]["body_truncated"] is True
    server.close()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        lines_read, said = job()
    assert attempts == [] and lines_read == 1 and "longer than the payload limit" in said
