"""redis-py commands and pipelines left to the writer: the cassette holds what a capture on the
request path would have put on the span, in value and in type, and it replays offline."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio

from tests.conftest import REDIS_PORT, SHARED_SERVICES
from tests.deferral import interactions_of, left_to_writer, recorded_both_ways
from tests.upstream_app import app

pytestmark = SHARED_SERVICES  # (see tests/conftest.py)

# A secret the app's redactor learns from a header, then finds in a value it stores.
SECRET = "s3cr3t-0123456789abcdef"


def _job(port: int, prefix: str, secrets: bool = True) -> list[Any]:
    """Every reply shape through one client: bytes, a hash, an int, scores, a miss, a
    pipeline in a transaction, and an error the server sends (INCR of a text value)."""
    r = redis.Redis(port=port, db=11, socket_connect_timeout=2)
    note = f"token {SECRET}" if secrets else "plain"
    out: list[Any] = [r.set(prefix + "note", note), r.get(prefix + "note"),
                      r.hset(prefix + "h", mapping={"a": 1, "b": "zwei"}), r.hgetall(prefix + "h"),
                      r.zadd(prefix + "z", {"x": 1.5, "y": 2}),
                      r.zrange(prefix + "z", 0, -1, withscores=True), r.get(prefix + "absent")]
    with r.pipeline() as pipe:
        out.append(pipe.incr(prefix + "n").incrby(prefix + "n", 4).get(prefix + "n").execute())
    try:
        r.incr(prefix + "note")
    except redis.ResponseError as exc:
        out.append((type(exc).__name__, str(exc)))
    r.delete(prefix + "note", prefix + "h", prefix + "z", prefix + "n")  # for the next run
    r.close()
    return out


async def _async_job(port: int, prefix: str) -> list[Any]:
    r = redis.asyncio.Redis(port=port, db=11, socket_connect_timeout=2, decode_responses=True)
    out = [await r.set(prefix + "a", "eins"), await r.get(prefix + "a"),
           await r.delete(prefix + "a")]
    await r.aclose()
    return out


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_commands_left_to_the_writer_record_what_the_span_attribute_records(
    serve: Any, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    def job(base: str, down: str) -> None:
        httpx.get(f"{base}/blob", headers={"Authorization": f"Bearer {SECRET}"})
        _job(REDIS_PORT, prefix)
        asyncio.run(_async_job(REDIS_PORT, prefix))

    calls = interactions_of(job, serve(app).url, tmp_path)
    recorded = recorded_both_ways(job, serve(app).url, calls, tmp_path, monkeypatch, fmt)
    assert {r[0] for r in recorded} == {"httpx", "redis"}
    # The value stored lost the learned secret, both ways (in the SET command; the reply of
    # the GET, bytes, is base64 text in a JSON cassette: recorded_both_ways looked for it).
    assert any("token redacted:" in repr(r[4]) and r[0] == "redis" for r in recorded)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_commands_left_to_the_writer_replay_offline(
    prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    live, replayed = left_to_writer(monkeypatch, tmp_path, writer, "redis", "HGETALL",
                                    lambda port: _job(port, prefix, secrets=False), REDIS_PORT)
    assert live[-1][0] == "ResponseError" and live[1] == b"plain"
    assert [(type(x), x) for x in replayed] == [(type(x), x) for x in live]
