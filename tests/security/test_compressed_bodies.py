"""A secret inside a response body that came content-encoded (brotli, zstd, raw deflate) is
redacted before it reaches the cassette, as one in a gzip body always was: the body is
decoded, its secret fields replaced by tokens, and encoded again, so the app replaying it
decodes it as it decoded the live one. Against a real uvicorn upstream, through httpx and
requests; replayed with the upstream stopped."""

from __future__ import annotations

import gzip
import json
import logging
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
from tests.conftest import connects_refused
from timetracer_otel import redaction
from timetracer_otel.cassette import load_cassette

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
    assert len(warnings) == 1 and "pip install brotli" in warnings[0]


def _gzip_members(data: bytes) -> bytes:
    return gzip.compress(data[:10], mtime=0) + gzip.compress(data[10:], mtime=0)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd"])
def test_a_body_that_inflates_past_the_limit_is_kept_as_it_came(
    encoding: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small body that unpacks a thousandfold (a decompression bomb, or only a large
    answer) is not unpacked past the limit: stored as it came, one warning. Under the limit,
    the same body is redacted inside; a body cut short is kept as it came."""
    monkeypatch.setattr(redaction, "_warned", set())
    plain = json.dumps({"access_token": SECRET, "pad": "0" * (2 << 20)}).encode()
    pack = {"gzip": _gzip_members, "deflate": zlib.compress, "br": CODECS["br"][0],
            "zstd": CODECS["zstd"][0]}[encoding]
    packed = pack(plain)
    assert len(packed) < len(plain) // 100
    with caplog.at_level(logging.WARNING, logger="timetracer_otel"):
        assert redaction.unpacked(encoding, packed, limit=1 << 20) is None
        assert redaction.unpacked(encoding, packed, limit=1 << 20) is None
    assert [rec.getMessage() for rec in caplog.records] == [
        f"timetracer-otel: a {encoding}-encoded body unpacks to more than {1 << 20} bytes; "
        "it is stored as it came, not redacted inside."]
    found = redaction.unpacked(encoding, packed, limit=4 << 20)
    assert found is not None and found[0] == plain
    assert redaction.unpacked(encoding, packed[:-8], limit=4 << 20) is None  # cut short
    headers = [("content-type", "application/json"), ("content-encoding", encoding)]
    stored = redaction.Redactor(env={}).body(headers, packed)  # (the default limit, 64 MiB)
    inside = redaction.unpacked(encoding, stored, limit=4 << 20)
    assert inside is not None and json.loads(inside[0])["access_token"].startswith("redacted:")
