"""A secret inside a response body that came content-encoded (brotli, zstd, raw deflate) is
redacted before it reaches the cassette, as one in a gzip body always was: the body is
decoded, its secret fields replaced by tokens, and encoded again, so the app replaying it
decodes it as it decoded the live one. Against a real uvicorn upstream, through httpx and
requests; replayed with the upstream stopped."""

from __future__ import annotations

import gzip
import json
import logging
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import brotli
import httpx
import pytest
import requests
import zstandard
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import timetracer_otel
from tests.conftest import connects_refused, plain_env
from timetracer_otel import redaction
from timetracer_otel.cassette import load_cassette

ROOT = Path(__file__).resolve().parents[2]
SECRET = "at-5f0c2e9a7b41d8e3"
DOC = {"access_token": SECRET, "n": 1, "note": "plain"}


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def _raw_inflate(data: bytes) -> bytes:
    return zlib.decompress(data, -zlib.MAX_WBITS)


# encoding: (pack, unpack) with the libraries the clients decode with
CODECS: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]] = {
    "br": (brotli.compress, brotli.decompress),
    "zstd": (zstandard.ZstdCompressor().compress,
             lambda data: zstandard.ZstdDecompressor().decompressobj().decompress(data)),
    "deflate": (_raw_deflate, _raw_inflate),  # raw, without the zlib header, as some servers send it
    # two codings, in the order applied: gzip, then br
    "gzip, br": (lambda data: brotli.compress(gzip.compress(data, mtime=0)),
                 lambda data: gzip.decompress(brotli.decompress(data))),
}


async def token(request: Request) -> Response:
    encoding = request.query_params["enc"]
    return Response(CODECS[encoding][0](json.dumps(DOC).encode()), media_type="application/json",
                    headers={"content-encoding": encoding})


APP = Starlette(routes=[Route("/token", token)])


def call(client: str, url: str) -> tuple[type, dict[str, Any]]:
    if client == "httpx":
        r = httpx.get(url, headers={"accept-encoding": "br, zstd, deflate"})
        return type(r), r.json()
    response = requests.get(url, headers={"accept-encoding": "br, zstd, deflate"}, timeout=5)
    return type(response), response.json()


@pytest.mark.parametrize("client", ["httpx", "requests"])
@pytest.mark.parametrize("encoding", sorted(CODECS))
def test_a_secret_in_an_encoded_body_is_redacted_and_the_body_still_decodes(
    serve: Any, tmp_path: Path, encoding: str, client: str
) -> None:
    server = serve(APP)
    url = f"{server.url}/token?enc={encoding}"
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = call(client, url)
    server.stop()
    assert live[1] == DOC
    (path,) = rec.paths
    assert SECRET.encode() not in Path(path).read_bytes()
    (stored,) = [s.response for s in load_cassette(path).interactions if s.library == client]
    assert stored is not None
    body = stored["body"] if stored.get("body") is not None else b"".join(stored["chunks"])
    inside = json.loads(CODECS[encoding][1](body))  # still a body of its encoding
    assert SECRET not in json.dumps(inside) and inside["access_token"].startswith("redacted:")
    assert {k: v for k, v in inside.items() if k != "access_token"} == {"n": 1, "note": "plain"}

    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = call(client, url)
    assert attempts == [] and replayed[0] is live[0]
    assert replayed[1] == inside and type(replayed[1]["n"]) is int


def test_without_a_module_for_the_encoding_the_body_is_kept_and_the_user_told_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Where neither brotli nor brotlicffi is installed (then no HTTP client here decodes br
    either), a br body is stored as it came, and one warning says what to install."""
    monkeypatch.setattr(redaction, "_codec", lambda encoding: None)
    monkeypatch.setattr(redaction, "_warned", set())
    packed = brotli.compress(json.dumps(DOC).encode())
    r = redaction.Redactor(env={})
    headers = [("content-type", "application/json"), ("content-encoding", "br")]
    with caplog.at_level(logging.WARNING, logger="timetracer_otel"):
        assert r.body(headers, packed) == packed
        assert r.body(headers, packed) == packed
    warnings = [rec.getMessage() for rec in caplog.records]
    assert len(warnings) == 1 and "pip install 'brotli>=1.2'" in warnings[0]


def _gzip_members(data: bytes) -> bytes:
    return gzip.compress(data[:10], mtime=0) + gzip.compress(data[10:], mtime=0)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_a_body_that_inflates_past_the_limit_is_not_unpacked_past_it(encoding: str) -> None:
    """A small body that unpacks a thousandfold (a decompression bomb, or only a large
    answer) is not unpacked past the limit (TooLarge: the redactor scans it a piece at a time
    instead, see the tests below). Under the limit, the same body is redacted inside; a body
    cut short is kept as it came."""
    plain = json.dumps({"access_token": SECRET, "pad": "0" * (2 << 20)}).encode()
    pack = {"gzip": _gzip_members, "deflate": zlib.compress, "br": CODECS["br"][0],
            "zstd": CODECS["zstd"][0]}[encoding]
    packed = pack(plain)
    assert len(packed) < len(plain) // 100
    with pytest.raises(redaction.TooLarge):
        redaction.unpacked(encoding, packed, limit=1 << 20)
    found = redaction.unpacked(encoding, packed, limit=4 << 20)
    assert found is not None and found[0] == plain
    assert redaction.unpacked(encoding, packed[:-8], limit=4 << 20) is None  # cut short
    headers = [("content-type", "application/json"), ("content-encoding", encoding)]
    stored = redaction.Redactor(env={}).body(headers, packed)  # (the default limit, 64 MiB)
    inside = redaction.unpacked(encoding, stored, limit=4 << 20)
    assert inside is not None and json.loads(inside[0])["access_token"].startswith("redacted:")


def test_a_gzip_body_with_padding_or_a_tail_after_its_member_is_redacted() -> None:
    """As httpx and urllib3 read gzip: NUL padding after the member, or bytes that are no
    member, are not part of the body; what the member holds is redacted."""
    member = gzip.compress(json.dumps(DOC).encode(), mtime=0)
    headers = [("content-type", "application/json"), ("content-encoding", "gzip")]
    for tail in (b"\0", b"\0\0\0\0", b"not a member"):
        stored = redaction.Redactor(env={}).body(headers, member + tail)
        inside = json.loads(gzip.decompress(stored))
        assert inside["access_token"].startswith("redacted:") and inside["n"] == 1


def test_two_content_encoding_lines_are_one_list_of_codings() -> None:
    packed = CODECS["gzip, br"][0](json.dumps(DOC).encode())
    headers = [("content-type", "application/json"), ("Content-Encoding", "gzip"),
               ("Content-Encoding", "br")]
    inside = json.loads(CODECS["gzip, br"][1](redaction.Redactor(env={}).body(headers, packed)))
    assert inside["access_token"].startswith("redacted:") and inside["n"] == 1


SEND = """
import json, sys
import httpx
import timetracer_otel
from tests.security.test_compressed_bodies import CODECS, REQUEST_CODECS
mode, where, url = sys.argv[1:]
doc = json.dumps({"user": "u", "password": "pw-9b1e4c7d2a"}).encode()
def send():
    return [httpx.post(url, content=pack(doc), headers={"content-type": "application/json",
            "content-encoding": encoding}).json() for encoding, pack in REQUEST_CODECS.items()]
if mode == "record":
    with timetracer_otel.record(dir=where):
        print(json.dumps(send()))
else:
    from pathlib import Path
    with timetracer_otel.replay([str(p) for p in Path(where).rglob("*") if p.is_file()],
                                strict=True):
        print(json.dumps(send()))
"""
REQUEST_CODECS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": lambda data: gzip.compress(data, mtime=0), **{k: v[0] for k, v in CODECS.items()}}


async def login(request: Request) -> Response:
    return Response(json.dumps({"ok": len(await request.body())}), media_type="application/json")


def test_an_encoded_request_body_with_a_secret_replays_in_another_process(
    serve: Any, tmp_path: Path
) -> None:
    """A packed request body redacted inside holds tokens of its process's redaction key
    (random without TIMETRACER_REDACTION_KEY), so its packed bytes differ in the replaying
    process: its key is the digest of its unpacked bytes, tokens folded, so a strict replay
    in another process still finds it."""
    server = serve(Starlette(routes=[Route("/login", login, methods=["POST"])]))
    env = plain_env()
    recorded = subprocess.run([sys.executable, "-c", SEND, "record", str(tmp_path), server.url + "/login"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert recorded.returncode == 0, recorded.stderr[-2000:]
    server.stop()
    replayed = subprocess.run([sys.executable, "-c", SEND, "replay", str(tmp_path), server.url + "/login"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert replayed.returncode == 0, replayed.stderr[-2000:]
    assert json.loads(replayed.stdout) == json.loads(recorded.stdout)
    assert len(json.loads(recorded.stdout)) == len(REQUEST_CODECS)
    assert b"pw-9b1e4c7d2a" not in b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


TOKEN = "tok-9d1e5c7a3b2f4e6d8c0a"  # sent in the Authorization header, so a secret seen


async def feed(request: Request) -> Response:
    """NDJSON, gzip-encoded, streamed: the first line (which echoes the caller's token) at
    once, the rest only later; the app reads the first line and closes."""
    from starlette.responses import StreamingResponse

    async def body() -> Any:
        import asyncio

        packer = zlib.compressobj(wbits=31)
        yield packer.compress(b'{"seen": "%s", "n": 1}\n' % TOKEN.encode()) \
            + packer.flush(zlib.Z_SYNC_FLUSH)
        await asyncio.sleep(1.0)
        yield packer.compress(b'{"n": 2}\n') + packer.flush()

    return StreamingResponse(body(), media_type="application/x-ndjson",
                             headers={"content-encoding": "gzip"})


def first_line(client: str, url: str) -> str:
    headers = {"authorization": f"Bearer {TOKEN}", "accept-encoding": "gzip"}
    if client == "httpx":
        with httpx.stream("GET", url, headers=headers) as r:
            return next(r.iter_lines())
    with requests.get(url, headers=headers, stream=True, timeout=5) as response:
        return next(response.iter_lines()).decode()


@pytest.mark.parametrize("client", ["httpx", "requests"])
def test_a_secret_in_a_packed_stream_the_app_stopped_reading_is_redacted(
    serve: Any, tmp_path: Path, client: str
) -> None:
    """A gzip stream cut where the app closed it cannot be unpacked whole: what it holds is
    unpacked as far as it goes, redacted and packed again, so the secret is not stored."""
    server = serve(Starlette(routes=[Route("/feed", feed)]))
    url = f"{server.url}/feed"
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = first_line(client, url)
    server.stop()
    assert json.loads(live) == {"seen": TOKEN, "n": 1}
    (path,) = rec.paths
    (stored,) = [s.response for s in load_cassette(path).interactions if s.library == client]
    assert stored is not None and stored.get("body_open") is True
    packed = stored["body"] if stored.get("body") is not None else b"".join(stored["chunks"])
    inside = zlib.decompressobj(wbits=31).decompress(packed)
    assert TOKEN.encode() not in inside and b'"seen": "redacted:' in inside
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = first_line(client, url)
    assert attempts == [] and json.loads(replayed)["seen"].startswith("redacted:")


BIG = 65 << 20  # past redaction.UNPACK_LIMIT (64 MiB)


async def export(request: Request) -> Response:
    """A gzip JSON export that inflates past what is unpacked for redaction; with ``?secret``
    one of its fields is named like a secret."""
    name = "access_token" if "secret" in request.query_params else "label"
    doc = b'{"%s": "%s", "pad": "%s"}' % (name.encode(), SECRET.encode(), b"0" * BIG)
    return Response(gzip.compress(doc, compresslevel=1, mtime=0), media_type="application/json",
                    headers={"content-encoding": "gzip"})


@pytest.mark.parametrize("secret", [True, False])
def test_a_body_too_large_to_redact_is_stored_only_when_it_holds_nothing_to_redact(
    serve: Any, tmp_path: Path, secret: bool
) -> None:
    """Unpacked a piece at a time (memory bounded) and scanned: one that holds a field named
    like a secret is not stored (the call is, as truncated, and its replay refused saying
    why); one that holds nothing to redact is stored as it came and replays byte for byte."""
    server = serve(Starlette(routes=[Route("/export", export)]))
    url = f"{server.url}/export" + ("?secret=1" if secret else "")
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = httpx.get(url, timeout=30)
    server.stop()
    assert len(live.content) > BIG and live.json()["pad"] == "0" * BIG
    (path,) = rec.paths
    (call,) = [s for s in load_cassette(path).interactions if s.library == "httpx"]
    if secret:
        assert call.truncated and call.response is None
        with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True), \
                pytest.raises(timetracer_otel.ReplayUnsupportedError,
                              match=r"stored truncated: .* may have held a secret"):
            httpx.get(url, timeout=30)
        assert attempts == []
        return
    assert not call.truncated and call.response is not None
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True):
        replayed = httpx.get(url, timeout=30)
    assert attempts == [] and replayed.content == live.content


def test_the_scan_of_a_body_too_large_to_redact_finds_a_seen_secret_across_pieces() -> None:
    """A secret the redactor knows, straddling two of the pieces the scan unpacks at a time,
    is found; for brotli and zstd as for gzip."""
    r = redaction.Redactor(env={})
    r.header("authorization", f"Bearer {TOKEN}")  # seen: the token is a secret now
    at = redaction._SCAN_PIECE - len(TOKEN) // 2
    plain = b"x" * at + TOKEN.encode() + b"y" * 1000
    clean = b"x" * len(plain)
    for encoding, pack in (("gzip", lambda d: gzip.compress(d, mtime=0)),
                           ("br", CODECS["br"][0]), ("zstd", CODECS["zstd"][0])):
        assert r._may_hide(encoding, pack(plain)), encoding
        assert not r._may_hide(encoding, pack(clean)), encoding
    assert r._may_hide("gzip, br", CODECS["gzip, br"][0](clean))  # several codings: not scanned


def test_the_scan_reads_a_raw_deflate_body_to_its_last_byte_and_a_form_by_its_parameters() -> None:
    """Raw deflate has no trailer: zlib can hold its last bytes back once the input is used
    up; they are scanned too. A form body past the limit is scanned for its secret
    parameters' names."""
    r = redaction.Redactor(env={})
    r.header("authorization", f"Bearer {TOKEN}")
    plain = b"a" * ((1 << 20) + 7) + b'"t":"' + TOKEN.encode()
    assert r._may_hide("deflate", _raw_deflate(plain))
    assert r._may_hide("deflate", zlib.compress(plain))
    assert not r._may_hide("deflate", _raw_deflate(b"a" * len(plain)))
    form = b"a=" + b"1" * (1 << 20) + b"&token=abc"
    ctype = "application/x-www-form-urlencoded"
    assert r._may_hide("gzip", gzip.compress(form, mtime=0), ctype)
    assert not r._may_hide("gzip", gzip.compress(form, mtime=0), "text/plain")


@pytest.fixture
def broken_gzip() -> Any:
    """A raw server: a gzip NDJSON answer that echoes the caller's token, then the connection
    closes before the stated length."""
    from tests.replay_shims.requests_helpers import raw_server

    packer = zlib.compressobj(wbits=31)
    cut = packer.compress(b'{"seen": "%s", "n": 1}\n' % TOKEN.encode()) \
        + packer.flush(zlib.Z_SYNC_FLUSH)
    head = (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nContent-Encoding: gzip\r\n"
            b"Content-Type: application/x-ndjson\r\n\r\n" % (len(cut) + 500))
    with raw_server(head + cut) as (url, _):
        yield f"{url}/feed"


@pytest.mark.parametrize("client", ["httpx", "requests"])
def test_a_secret_in_a_packed_body_that_broke_off_is_redacted(
    broken_gzip: str, tmp_path: Path, client: str
) -> None:
    headers = {"authorization": f"Bearer {TOKEN}", "accept-encoding": "gzip"}
    with timetracer_otel.record(dir=tmp_path) as rec, pytest.raises(Exception) as live:
        if client == "httpx":
            httpx.get(broken_gzip, headers=headers)
        else:
            requests.get(broken_gzip, headers=headers, timeout=5)
    (path,) = rec.paths
    (stored,) = [s.response for s in load_cassette(path).interactions if s.library == client]
    assert stored is not None
    packed = stored["body"] if stored.get("body") is not None else b"".join(stored["chunks"])
    inside = zlib.decompressobj(wbits=31).decompress(packed)
    assert TOKEN.encode() not in inside and b'"seen": "redacted:' in inside
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True), \
            pytest.raises(type(live.value)):
        if client == "httpx":
            httpx.get(broken_gzip, headers=headers)
        else:
            requests.get(broken_gzip, headers=headers, timeout=5)
    assert attempts == []


def test_the_unpack_limit_is_a_setting() -> None:
    """``TIMETRACER_MAX_UNPACKED_BYTES``: under it a packed body is redacted inside; past it,
    one that may hold a secret is withheld; a value that is no size is refused clearly."""
    plain = json.dumps({"access_token": SECRET, "pad": "0" * (2 << 20)}).encode()
    tree = {"status": 200, "headers": [["content-type", "application/json"],
                                       ["content-encoding", "gzip"]],
            "body": gzip.compress(plain, mtime=0)}
    stored = redaction.Redactor(env={}).response(tree)
    assert json.loads(gzip.decompress(stored["body"]))["access_token"].startswith("redacted:")
    small = redaction.Redactor(env={"TIMETRACER_MAX_UNPACKED_BYTES": str(1 << 20)})
    assert small.unpack_limit == 1 << 20
    with pytest.raises(redaction.Withheld):
        small.response(tree)
    from timetracer_otel.errors import ConfigError

    for value, says in (("lots", "is not a number"), ("nan", "is not a finite number"),
                        ("1e400", "is not a finite number"), ("0", "must be a positive")):
        with pytest.raises(ConfigError, match=f"TIMETRACER_MAX_UNPACKED_BYTES='{value}' {says}"):
            redaction.Redactor(env={"TIMETRACER_MAX_UNPACKED_BYTES": value})


async def upload(request: Request) -> Response:
    body = await request.body()
    return Response(json.dumps({"got": len(body)}), media_type="application/json")


@pytest.mark.parametrize("client", ["httpx", "requests"])
@pytest.mark.parametrize("secret", [True, False])
def test_a_request_body_too_large_to_redact_is_stored_only_when_it_holds_nothing_to_redact(
    serve: Any, tmp_path: Path, client: str, secret: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packed upload that unpacks past the limit is scanned a piece at a time: one that
    holds a field named like a secret is stored without its bytes, and its replay matches it
    by method and URL; one that holds nothing to redact is stored as it came and matched by
    its bytes."""
    from timetracer_otel.replay_shims.base import STATE

    monkeypatch.setattr(redaction, "_warned", set())
    monkeypatch.setattr(STATE, "redactor",
                        redaction.Redactor(env={"TIMETRACER_MAX_UNPACKED_BYTES": str(1 << 20)}))
    server = serve(Starlette(routes=[Route("/upload", upload, methods=["POST"])]))
    url = f"{server.url}/upload"
    name = b"password" if secret else b"label"
    doc = b'{"%s": "%s", "pad": "%s"}' % (name, SECRET.encode(), b"0" * (2 << 20))
    packed = gzip.compress(doc, mtime=0)
    headers = {"content-type": "application/json", "content-encoding": "gzip"}

    def send(body: bytes) -> Any:
        if client == "httpx":
            return httpx.post(url, content=body, headers=headers).json()
        return requests.post(url, data=body, headers=headers, timeout=5).json()

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = send(packed)
    server.stop()
    assert live == {"got": len(packed)}
    (path,) = rec.paths
    (call,) = [s for s in load_cassette(path).interactions if s.library == client]
    assert call.request is not None
    stored = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    if secret:
        assert call.request["body"] == b"" and call.request["body_withheld"] is True
        assert packed not in stored
    else:
        assert call.request["body"] == packed and "body_withheld" not in call.request
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        assert send(packed) == live
    assert attempts == [] and rep.report.exact == 1
    if not secret:  # matched by its bytes: another body is a miss
        with timetracer_otel.replay(rec.paths, strict=True), \
                pytest.raises(timetracer_otel.ReplayMissError):
            send(gzip.compress(doc.replace(b"label", b"title"), mtime=0))
