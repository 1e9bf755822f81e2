"""redis-py against the machine's real Redis on 127.0.0.1:6379: commands and pipelines, sync
and asyncio, RESP2 and RESP3, bytes and decoded clients, recorded, then replayed with every
socket connect refused; values compared with their types."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

import timetracer_otel
from tests.conftest import (
    REDIS_PORT,
    SHARED_SERVICES,
    connects_refused,
    plain_env,
    timetracer_cli,
    unreachable_port,
)
from timetracer_otel.cassette import load_cassette

pytestmark = SHARED_SERVICES  # (see tests/conftest.py)


def typed(value: Any) -> Any:
    """``value`` with the type of every part beside it (set and dict members sorted)."""
    if isinstance(value, list | tuple):
        return (type(value).__name__, [typed(v) for v in value])
    if isinstance(value, dict):
        return ("dict", sorted((repr(typed(k)), typed(v)) for k, v in value.items()))
    if isinstance(value, set | frozenset):
        return (type(value).__name__, sorted(repr(typed(v)) for v in value))
    if isinstance(value, BaseException):
        return (type(value).__name__, str(value))
    return (type(value).__name__, repr(value))


def job(port: int, p: str, *, decode: bool = False, protocol: int = 2) -> list[Any]:
    r = redis.Redis(port=port, decode_responses=decode, protocol=protocol)
    out: list[Any] = [
        r.set(p + "k", "v1"), r.get(p + "k"), r.get(p + "k"), r.incr(p + "n"),
        r.set(p + "bin", b"\x00\xff\xfe"), r.get(p + "bin") if not decode else None,
        r.hset(p + "h", mapping={"a": 1, "b": "x"}), r.hgetall(p + "h"),
        r.zadd(p + "z", {"m1": 1.5, "m2": 2}), r.zrange(p + "z", 0, -1, withscores=True),
        r.sadd(p + "s", "a", "b"), r.smembers(p + "s"), r.get(p + "missing"),
        r.expire(p + "k", 100), r.ttl(p + "k") > 0,
    ]
    try:
        r.lpush(p + "k", "x")  # WRONGTYPE
    except redis.ResponseError as exc:
        out.append(exc)
    pipe = r.pipeline()  # MULTI/EXEC, one command failing inside it
    pipe.set(p + "t", 1).incr(p + "t").lpush(p + "k", 1).get(p + "t")
    out.append(pipe.execute(raise_on_error=False))
    pipe = r.pipeline()
    pipe.incr(p + "t").lpush(p + "k", 1)
    try:
        pipe.execute()
    except redis.ResponseError as exc:  # raise_on_error: the annotated first error
        out.append(exc)
    pipe = r.pipeline(transaction=False)
    pipe.get(p + "k").ttl(p + "k").hget(p + "h", "a")
    out.append(pipe.execute())
    r.close()
    return out


@pytest.mark.parametrize(("decode", "protocol"), [(False, 2), (True, 2), (False, 3)])
def test_commands_and_pipelines_replay_with_their_types(
    prefix: str, tmp_path: Path, decode: bool, protocol: int
) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(REDIS_PORT, prefix, decode=decode, protocol=protocol)
    assert live[3] == 1 and live[1] == ("v1" if decode else b"v1")
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job(unreachable_port(), prefix, decode=decode, protocol=protocol)
    assert attempts == []
    assert typed(replayed) == typed(live)
    assert rep.report.misses == [] and rep.report.unused == [] and rep.report.shape_matches == []
    (path,) = rec.paths
    calls = load_cassette(path).interactions
    assert {c.library for c in calls} == {"redis"} and len(calls) == rep.report.exact
    # The calls sit on the instrumentation's own spans, named as it names them.
    assert calls[0].name == "SET" and calls[0].attributes.get("db.system") == "redis"


def test_asyncio_commands_and_pipelines(prefix: str, tmp_path: Path) -> None:
    async def ajob(port: int) -> list[Any]:
        r = redis.asyncio.Redis(port=port)
        out = [await r.set(prefix + "a", b"\x00\xff"), await r.get(prefix + "a"),
               await r.hset(prefix + "h", "f", 2.5), await r.hgetall(prefix + "h")]
        try:
            await r.hincrby(prefix + "a", "f", 1)
        except redis.ResponseError as exc:
            out.append(exc)
        async with r.pipeline() as pipe:
            pipe.incr(prefix + "c").get(prefix + "a").lpush(prefix + "a", 1)
            out.append(await pipe.execute(raise_on_error=False))
        async with r.pipeline(transaction=False) as pipe:
            pipe.incr(prefix + "c").incr(prefix + "c")
            out.append(await pipe.execute())
        await r.aclose()
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(ajob(REDIS_PORT))
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = asyncio.run(ajob(unreachable_port()))
    assert attempts == [] and typed(replayed) == typed(live)
    assert live[1] == b"\x00\xff" and live[-1] == [2, 3]
    assert rep.report.misses == [] and rep.report.unused == []


def test_a_connection_error_replays_as_the_same_error(tmp_path: Path) -> None:
    port = unreachable_port()
    client = redis.Redis(port=port, retry=None)
    with timetracer_otel.record(dir=tmp_path) as rec, pytest.raises(redis.ConnectionError) as live:
        client.get("tt:k")
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths), \
            pytest.raises(redis.ConnectionError) as replayed:
        redis.Redis(port=port, retry=None).get("tt:k")
    assert attempts == []
    assert type(replayed.value) is type(live.value) and str(replayed.value) == str(live.value)


def test_a_miss_names_the_command_and_the_closest_recorded_one(prefix: str, tmp_path: Path) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        redis.Redis(port=REDIS_PORT).get(prefix + "a")
    with connects_refused(), timetracer_otel.replay(rec.paths, strict=True), \
            pytest.raises(timetracer_otel.ReplayMissError) as miss:
        redis.Redis(port=unreachable_port()).get(prefix + "b")
    text = str(miss.value)
    assert f"GET {prefix}b" in text and f"GET {prefix}a" in text


def test_passwords_in_commands_never_reach_the_cassette(prefix: str, tmp_path: Path) -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex
    r = redis.Redis(port=REDIS_PORT)

    def calls(client: redis.Redis) -> list[Any]:
        out: list[Any] = []
        for args in (("AUTH", secret), ("AUTH", "default", secret),
                     ("CONFIG", "SET", "masterauth", secret)):
            try:
                out.append(client.execute_command(*args))
            except redis.RedisError as exc:  # no password is set on this server
                out.append(exc)
        return out

    def api(client: redis.Redis, value: str) -> list[Any]:
        # redis-py's own methods send "CONFIG SET" as one first argument.
        return [client.config_set("masterauth", value), client.config_get("masterauth")]

    old = r.config_get("masterauth")["masterauth"]
    try:
        with timetracer_otel.record(dir=tmp_path / "raw") as raw:
            live = calls(r)
        with timetracer_otel.record(dir=tmp_path / "api") as rec_api:
            live_api = api(r, "other-" + secret)
    finally:
        r.config_set("masterauth", old)
        r.close()
    assert live_api[1] == {"masterauth": "other-" + secret}  # the server's own answer
    for rec, count in ((raw, 3), (rec_api, 2)):
        (path,) = rec.paths
        data = Path(path).read_bytes()
        assert secret.encode() not in data and len(load_cassette(path).interactions) == count
    with connects_refused(), timetracer_otel.replay(raw.paths, strict=True) as rep:
        replayed = calls(redis.Redis(port=unreachable_port()))
    assert typed(replayed) == typed(live) and rep.report.exact == 3
    with connects_refused(), timetracer_otel.replay(rec_api.paths, strict=True):
        replayed_api = api(redis.Redis(port=unreachable_port()), "other-" + secret)
    assert replayed_api[0] is True and replayed_api[1]["masterauth"].startswith("redacted:")


def test_recorded_and_replayed_through_the_cli(prefix: str, tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import os, redis\n"
        "r = redis.Redis(port=int(os.environ['REDIS_PORT']))\n"
        "p = os.environ['PREFIX']\n"
        "print(r.incr(p + 'n'), r.hgetall(p + 'h'), r.pipeline().incr(p + 'n').get(p + 'n').execute())\n")
    env = plain_env(REDIS_PORT=str(REDIS_PORT), PREFIX=prefix)
    redis.Redis(port=REDIS_PORT).hset(prefix + "h", "f", "v")
    run = [sys.executable, str(script)]
    rec = timetracer_cli("record", "--dir", str(tmp_path / "c"), "--", *run, env=env)
    assert rec.returncode == 0, rec.stderr
    assert rec.stdout == "1 {b'f': b'v'} [2, b'2']\n"
    env["REDIS_PORT"] = str(unreachable_port())
    rep = timetracer_cli("replay", "--cassette", str(tmp_path / "c"), "--", *run, env=env)
    assert rep.returncode == 0, rep.stderr
    assert rep.stdout == rec.stdout


def test_a_watched_transaction_is_refused_in_replay_with_a_clear_error(
    prefix: str, tmp_path: Path
) -> None:
    def transfer(client: redis.Redis) -> Any:
        with client.pipeline() as pipe:
            pipe.watch(prefix + "balance")
            pipe.multi()
            pipe.incr(prefix + "balance")
            return pipe.execute()

    with timetracer_otel.record(dir=tmp_path / "rec"):
        assert transfer(redis.Redis(port=REDIS_PORT)) == [1]  # live, not recorded
    cassette = tmp_path / "one.json"
    with timetracer_otel.record(dir=tmp_path / "one") as rec:
        redis.Redis(port=REDIS_PORT).get(prefix + "balance")
    Path(rec.paths[0]).rename(cassette)
    with connects_refused() as attempts, timetracer_otel.replay(cassette), \
            pytest.raises(timetracer_otel.ReplayUnsupportedError, match="WATCHes keys"):
        transfer(redis.Redis(port=unreachable_port()))
    assert attempts == []


def test_a_pipeline_retried_after_a_dropped_connection_replays_its_answer(
    prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.connection

    admin = redis.Redis(port=REDIS_PORT)
    admin.mset({prefix + "a": "A", prefix + "b": "B", prefix + "c": "C"})
    read = redis.connection.AbstractConnection.read_response
    count = [0]

    def dropped_once(self: Any, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] == 2:  # the second reply of the first attempt is lost with the connection
            self.disconnect()
            raise redis.ConnectionError("connection reset (by the test)")
        return read(self, *args, **kwargs)

    def job(client: redis.Redis) -> Any:
        return client.pipeline(transaction=False).get(prefix + "a").get(prefix + "b") \
            .get(prefix + "c").execute()

    client = redis.Redis(port=REDIS_PORT)
    client.ping()
    with timetracer_otel.record(dir=tmp_path) as rec:
        monkeypatch.setattr(redis.connection.AbstractConnection, "read_response", dropped_once)
        live = job(client)  # redis-py's default Retry sends it again
        monkeypatch.undo()
    assert live == [b"A", b"B", b"C"] and count[0] > 3
    with connects_refused(), timetracer_otel.replay(rec.paths, strict=True):
        assert job(redis.Redis(port=unreachable_port())) == live


def test_replay_refuses_what_it_cannot_answer_without_connecting(prefix: str, tmp_path: Path) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        redis.Redis(port=REDIS_PORT).get(prefix + "k")
    client = redis.Redis(port=unreachable_port())
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths):
        with pytest.raises(redis.DataError):  # an argument the encoder refuses, as live
            client.set(prefix + "k", None)  # type: ignore[arg-type]
        with pytest.raises(timetracer_otel.ReplayUnsupportedError, match="Pub/Sub"):
            client.pubsub().subscribe("channel")
        resp3 = redis.Redis(port=unreachable_port(), protocol=3)
        with pytest.raises(timetracer_otel.ReplayMissError, match="resp: recorded 2, now 3"):
            resp3.get(prefix + "k")  # recorded with RESP2: its replies have another form
    assert attempts == []


def test_a_recording_short_of_replies_is_a_miss_not_a_reply(prefix: str, tmp_path: Path) -> None:
    # A pipeline keeps a ResponseError among its results; a recording that lacks a reply must
    # not pass as one.
    from timetracer_otel.cassette import save_cassette

    def job(client: redis.Redis) -> Any:
        return client.pipeline(transaction=False).set(prefix + "a", 1).get(prefix + "a") \
            .execute(raise_on_error=False)

    with timetracer_otel.record(dir=tmp_path) as rec:
        assert job(redis.Redis(port=REDIS_PORT)) == [True, b"1"]
    (path,) = rec.paths
    cassette = load_cassette(path)
    (call,) = cassette.interactions
    call.response["reads"].pop()  # the GET's reply lost
    save_cassette(cassette, path)
    with connects_refused(), timetracer_otel.replay(rec.paths, strict=True), \
            pytest.raises(timetracer_otel.ReplayMissError, match="more replies"):
        job(redis.Redis(port=unreachable_port()))


def test_single_connection_clients_replay_without_connecting(prefix: str, tmp_path: Path) -> None:
    """A client that takes its one connection as it is made (``single_connection_client``,
    ``Redis.client()``, sync and asyncio) connects nowhere in a replay, and replays its
    commands with their types."""

    def job(port: int) -> list[Any]:
        r = redis.Redis(port=port, db=11, single_connection_client=True, socket_connect_timeout=2)
        out: list[Any] = [r.set(prefix + "one", "v"), r.get(prefix + "one")]
        r.close()
        with redis.Redis(port=port, db=11, socket_connect_timeout=2).client() as c:
            out += [c.incr(prefix + "n"), c.get(prefix + "n")]

        async def ajob() -> list[Any]:
            async with redis.asyncio.Redis(port=port, db=11, single_connection_client=True,
                                           socket_connect_timeout=2) as a:
                return [await a.delete(prefix + "one", prefix + "n"), await a.get(prefix + "one")]

        return out + asyncio.run(ajob())

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(REDIS_PORT)
    assert live == [True, b"v", 1, b"1", 2, None]
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job(unreachable_port())
    assert attempts == [] and rep.report.ok
    assert typed(replayed) == typed(live)


def test_a_call_the_app_cancelled_replays_as_never_answering(prefix: str, tmp_path: Path) -> None:
    """A worker polls a queue with ``asyncio.wait_for(blpop(...), t)``: the first poll times
    out (the app cancelled the call), a job is pushed, the second poll gets it. The cancelled
    call is kept, so the replay's first poll times out again and the second gets the job; a
    cancelled call nothing cancels in the replay is refused, saying so."""

    async def worker(port: int, limit: float) -> list[Any]:
        r = redis.asyncio.Redis(port=port, db=11, socket_connect_timeout=2)
        out: list[Any] = []
        for i in range(2):
            try:
                out.append(await asyncio.wait_for(r.blpop([prefix + "jobs"], timeout=0), limit))
            except TimeoutError as exc:
                out.append(type(exc))
            if i == 0:
                await r.rpush(prefix + "jobs", "job-1")
        await r.aclose()
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(worker(REDIS_PORT, 0.3))
    assert live == [TimeoutError, (prefix.encode() + b"jobs", b"job-1")]
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = asyncio.run(worker(unreachable_port(), 0.3))
    assert attempts == [] and replayed == live and rep.report.ok
    with timetracer_otel.replay(rec.paths, strict=True), \
            pytest.raises(timetracer_otel.ReplayUnsupportedError, match="cancelled by the app"):
        asyncio.run(worker(unreachable_port(), 60))


def test_a_pipeline_the_app_cancelled_replays_as_never_answering(prefix: str, tmp_path: Path) -> None:
    async def job(port: int) -> list[Any]:
        r = redis.asyncio.Redis(port=port, db=11, socket_connect_timeout=2)
        out: list[Any] = []
        pipe = r.pipeline(transaction=False)
        pipe.blpop([prefix + "pq"], timeout=0)
        try:
            out.append(await asyncio.wait_for(pipe.execute(), 0.3))
        except TimeoutError as exc:
            out.append(type(exc))
        out.append(await r.set(prefix + "after", "1"))
        await r.delete(prefix + "after")
        await r.aclose()
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(job(REDIS_PORT))
    assert live == [TimeoutError, True]
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        assert asyncio.run(job(unreachable_port())) == live
    assert attempts == [] and rep.report.ok
