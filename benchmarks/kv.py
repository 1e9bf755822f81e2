"""Scenario 4b: Redis (the machine's server on 127.0.0.1:6379), MongoDB (a secantusdb server in
its own process), Celery (a worker process over that Redis) and AWS (a moto server in its own
process), all on 127.0.0.1, through redis-py, pymongo, Celery and boto3.

Per library, in one process: live calls with OTel only, the same under ``record()``, and
replayed with the server unreachable (AWS: with no credentials either), each mode timing its
calls after untimed ones; every replayed value is compared with the live one, type included.
For Redis and MongoDB, upstream timetracer 1.6.0 (``enable_redis()``/``enable_pymongo()``, its
own session API, no OTel) records and replays the same calls one cassette each, and the same
comparison counts which of them it gives back as they were.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import worker_main
from benchmarks.micro import _otel

LEAD = 50


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def typed(value: Any) -> Any:
    """``value`` with the type of every part beside it (sets and dicts sorted); botocore's
    response metadata (request ids, dates of the run) left out, a body read."""
    if isinstance(value, dict):
        return ("dict", sorted((repr(typed(k)), typed(v)) for k, v in value.items()
                               if k != "ResponseMetadata"))
    if isinstance(value, list | tuple):
        return (type(value).__name__, [typed(v) for v in value])
    if isinstance(value, set | frozenset):
        return (type(value).__name__, sorted(repr(typed(v)) for v in value))
    if hasattr(value, "read") and hasattr(value, "iter_chunks"):  # a botocore StreamingBody
        return (type(value).__name__, value.read())
    if isinstance(value, dt.datetime):
        return ("datetime", value.isoformat(), type(value.tzinfo).__name__)
    return (type(value).__name__, repr(value))


# --- Redis ---------------------------------------------------------------------------------------

PREFIX = f"bench:{uuid.uuid4().hex[:8]}:"
# One of each reply shape a service reads: bytes, a hash, an int, scores, a set, a miss.
COMMANDS: list[tuple[str, Callable[[Any], Any]]] = [
    ("GET", lambda r: r.get(PREFIX + "k")),
    ("HGETALL", lambda r: r.hgetall(PREFIX + "h")),
    ("INCR", lambda r: r.incr(PREFIX + "n")),
    ("ZRANGE WITHSCORES", lambda r: r.zrange(PREFIX + "z", 0, -1, withscores=True)),
    ("SMEMBERS", lambda r: r.smembers(PREFIX + "s")),
    ("GET (missing)", lambda r: r.get(PREFIX + "missing")),
]


def _redis_data() -> None:
    import redis

    r = redis.Redis(port=6379)
    r.set(PREFIX + "k", b"\x00\xffvalue")
    r.hset(PREFIX + "h", mapping={"a": 1, "b": "text"})
    r.zadd(PREFIX + "z", {"m1": 1.5, "m2": 2})
    r.sadd(PREFIX + "s", "x", "y")
    r.close()


def _redis_cleanup() -> None:
    import redis

    r = redis.Redis(port=6379)
    keys = r.keys(PREFIX + "*")
    if keys:
        r.delete(*keys)
    r.close()


def redis_ours(args: dict[str, Any]) -> dict[str, Any]:
    import redis

    import timetracer_otel
    from timetracer_otel import replay_shims

    _otel()
    replay_shims.instrument(["redis"])
    _redis_data()
    tmp = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    ops: int = args["ops"]
    res: dict[str, list[float]] = {"live_us": [], "record_us": [], "replay_us": []}
    seen: dict[str, Any] = {}

    def measure(port: int, count: int) -> tuple[float, list[Any]]:
        r = redis.Redis(port=port)
        out: list[Any] = []
        t0 = time.perf_counter()
        for _ in range(count):
            out = [fn(r) for _, fn in COMMANDS]
        us = (time.perf_counter() - t0) * 1e6 / (count * len(COMMANDS))
        r.close()
        return us, out

    try:
        measure(6379, LEAD)
        for n in range(args["runs"]):
            us, seen["live"] = measure(6379, ops)
            res["live_us"].append(us)
            with timetracer_otel.record(dir=tmp / f"r{n}", libraries=["redis"]) as rec:
                measure(6379, 1)  # the writer process boots before the window (see db.py)
                rec.writer.flush(60)
                measure(6379, LEAD)
                us, seen["record"] = measure(6379, ops)
            res["record_us"].append(us)
            port = dead_port()
            with timetracer_otel.replay(rec.paths, libraries=["redis"]) as rep:
                measure(port, 1 + LEAD)
                us, seen["replay"] = measure(port, ops)
            res["replay_us"].append(us)
            assert rep.report.ok, rep.report.render()
    finally:
        _redis_cleanup()
    # The INCR counter moves on between live and record; the replay answers what was recorded.
    equal = [typed(a) == typed(b) for a, b in zip(seen["record"], seen["replay"], strict=True)]
    return {**res, "commands": [name for name, _ in COMMANDS], "replay_equal": equal}


def upstream_fidelity(calls: list[tuple[str, Callable[[Any], Any]]], live: Any,
                      dead: Callable[[], Any], tmp: Path) -> dict[str, str]:
    """Upstream timetracer 1.6.0 (its plugins enabled, its session API, no OTel): each call
    recorded into a cassette of its own (one that cannot be written is one miss), then run under
    a replay session of it with a client of ``dead()`` (nothing listening); per call, "equal"
    when the replayed value has the live value and type, else what became of it."""
    from timetracer.cassette.io import read_cassette, write_cassette
    from timetracer.config import TraceConfig
    from timetracer.context import reset_session, set_session
    from timetracer.session import ReplaySession, TraceSession

    fidelity: dict[str, str] = {}
    for name, fn in calls:
        config = TraceConfig(mode="record", cassette_dir=str(tmp / name.split()[0]))
        session = TraceSession(config=config)
        token = set_session(session)
        try:
            value = fn(live)
        finally:
            reset_session(token)
        try:
            path = write_cassette(session, config)
        except Exception as exc:
            fidelity[name] = f"cassette not written: {type(exc).__name__}"
            continue
        token = set_session(ReplaySession(cassette=read_cassette(path), cassette_path=path))
        client = dead()
        try:
            got = fn(client)
        except Exception as exc:
            fidelity[name] = f"replay raised {type(exc).__name__}"
            continue
        finally:
            reset_session(token)
            client.close()
        fidelity[name] = "equal" if typed(got) == typed(value) else \
            f"{type(value).__name__} {value!r:.40} became {type(got).__name__} {got!r:.40}"
    return fidelity


def redis_upstream(args: dict[str, Any]) -> dict[str, Any]:
    import redis
    from timetracer.cassette.io import read_cassette, write_cassette
    from timetracer.config import TraceConfig
    from timetracer.context import reset_session, set_session
    from timetracer.plugins import enable_redis
    from timetracer.session import ReplaySession, TraceSession

    enable_redis()
    _redis_data()
    tmp = Path(tempfile.mkdtemp(prefix="bench-redis-upstream-"))
    ops: int = args["ops"]
    r = redis.Redis(port=6379)
    record_us: list[float] = []
    replay_us: list[float] = []
    try:
        fidelity = upstream_fidelity(COMMANDS, r, lambda: redis.Redis(port=dead_port()), tmp)
        # Speed, on the commands it records: GET and INCR, OTel-free, one session per block.
        timed = [fn for name, fn in COMMANDS if name in ("GET", "INCR")]
        for n in range(args["runs"]):
            config = TraceConfig(mode="record", cassette_dir=str(tmp / f"t{n}"))
            session = TraceSession(config=config)
            token = set_session(session)
            t0 = time.perf_counter()
            for _ in range(ops):
                for fn in timed:
                    fn(r)
            record_us.append((time.perf_counter() - t0) * 1e6 / (ops * len(timed)))
            reset_session(token)
            path = write_cassette(session, config)
            replay = ReplaySession(cassette=read_cassette(path), cassette_path=path)
            token = set_session(replay)
            dead = redis.Redis(port=dead_port())
            t0 = time.perf_counter()
            for _ in range(ops):
                for fn in timed:
                    fn(dead)
            replay_us.append((time.perf_counter() - t0) * 1e6 / (ops * len(timed)))
            reset_session(token)
    finally:
        r.close()
        _redis_cleanup()
    return {"fidelity": fidelity, "record_us": record_us, "replay_us": replay_us}


# --- MongoDB -------------------------------------------------------------------------------------

MONGO_DB = f"bench_{uuid.uuid4().hex[:8]}"
# What a service reads back: a typed document, a page of ten, a count, an aggregate, a miss.
OPERATIONS: list[tuple[str, Callable[[Any], Any]]] = [
    ("find_one", lambda c: c[MONGO_DB].items.find_one({"_id": 1})),
    ("find (10 documents)", lambda c: list(c[MONGO_DB].items.find({"n": {"$lt": 10}}).sort("n", 1))),
    ("count_documents", lambda c: c[MONGO_DB].items.count_documents({"n": {"$gte": 5}})),
    ("aggregate", lambda c: list(c[MONGO_DB].items.aggregate(
        [{"$group": {"_id": None, "total": {"$sum": "$price"}}}]))),
    ("find_one (missing)", lambda c: c[MONGO_DB].items.find_one({"_id": -1})),
]


def _mongo() -> tuple[subprocess.Popen[bytes], int]:
    port = dead_port()
    proc = subprocess.Popen([sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port",
                             str(port), "--storage-path", ":memory:"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the MongoDB-wire server (secantusdb) did not start")


def _mongo_client(port: int) -> Any:
    import pymongo

    return pymongo.MongoClient(f"mongodb://127.0.0.1:{port}", tz_aware=True,
                               uuidRepresentation="standard", serverSelectionTimeoutMS=500)


def _mongo_data(port: int) -> None:
    from bson import Decimal128, Int64

    c = _mongo_client(port)
    c[MONGO_DB].items.insert_many([
        {"_id": i, "n": i, "price": Decimal128(f"{i}.25"), "big": Int64(2**40 + i),
         "at": dt.datetime(2024, 1, 1, i, tzinfo=dt.timezone.utc), "uid": uuid.UUID(int=i),
         "raw": bytes([i, 255])} for i in range(20)])
    c.close()


def pymongo_ours(args: dict[str, Any]) -> dict[str, Any]:
    import timetracer_otel
    from timetracer_otel import replay_shims

    _otel()
    replay_shims.instrument(["pymongo"])
    proc, port = _mongo()
    ops: int = args["ops"]
    res: dict[str, list[float]] = {"live_us": [], "record_us": [], "replay_us": []}
    seen: dict[str, Any] = {}

    def measure(c: Any, count: int) -> tuple[float, list[Any]]:
        out: list[Any] = []
        t0 = time.perf_counter()
        for _ in range(count):
            out = [fn(c) for _, fn in OPERATIONS]
        return (time.perf_counter() - t0) * 1e6 / (count * len(OPERATIONS)), out

    try:
        _mongo_data(port)
        for n in range(args["runs"]):
            live = _mongo_client(port)
            measure(live, LEAD)
            us, seen["live"] = measure(live, ops)
            live.close()
            res["live_us"].append(us)
            with timetracer_otel.record(dir=Path(tempfile.mkdtemp()) / f"m{n}",
                                        libraries=["pymongo"]) as rec:
                c = _mongo_client(port)  # (the instrumentation traces clients made after it)
                measure(c, 1)
                rec.writer.flush(60)
                measure(c, LEAD)
                us, seen["record"] = measure(c, ops)
                c.close()
            res["record_us"].append(us)
            with timetracer_otel.replay(rec.paths, libraries=["pymongo"]) as rep:
                c = _mongo_client(dead_port())
                measure(c, 1 + LEAD)
                us, seen["replay"] = measure(c, ops)
                c.close()
            res["replay_us"].append(us)
            assert rep.report.ok, rep.report.render()
    finally:
        proc.terminate()
        proc.wait(10)
    equal = [typed(a) == typed(b) for a, b in zip(seen["live"], seen["replay"], strict=True)]
    return {**res, "commands": [name for name, _ in OPERATIONS], "replay_equal": equal}


def pymongo_upstream(args: dict[str, Any]) -> dict[str, Any]:
    """Upstream timetracer 1.6.0's pymongo plugin (``enable_pymongo()``, its own session API):
    each operation recorded into a cassette, then run under a replay session of it with the
    server unreachable."""
    from timetracer.plugins import enable_pymongo

    enable_pymongo()
    proc, port = _mongo()
    tmp = Path(tempfile.mkdtemp(prefix="bench-mongo-upstream-"))
    try:
        _mongo_data(port)
        c = _mongo_client(port)
        fidelity = upstream_fidelity(OPERATIONS, c, lambda: _mongo_client(dead_port()), tmp)
        c.close()
    finally:
        proc.terminate()
        proc.wait(10)
    return {"fidelity": fidelity}


# --- Celery --------------------------------------------------------------------------------------


def celery_ours(args: dict[str, Any]) -> dict[str, Any]:
    """``quote.delay(...).get()`` against a worker process over Redis (OTel only), recorded, and
    replayed with no broker, backend or worker (every connect would fail: a dead port)."""
    import redis

    import timetracer_otel
    from benchmarks.celery_tasks import quote
    from timetracer_otel import replay_shims

    _otel()
    replay_shims.instrument(["celery"])
    admin = redis.Redis(port=6379, db=12)
    admin.flushdb()
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "benchmarks.celery_tasks", "worker", "--pool=solo",
         "--without-heartbeat", "--without-gossip", "--without-mingle", "--loglevel=ERROR"],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    ops: int = args["ops"]
    res: dict[str, list[float]] = {"live_us": [], "record_us": [], "replay_us": []}
    seen: dict[str, Any] = {}

    def measure(count: int) -> tuple[float, list[Any]]:
        out: list[Any] = []
        t0 = time.perf_counter()
        for i in range(count):
            out.append(quote.delay(f"sku-{i % 7}", i % 5 + 1).get(timeout=30))
        return (time.perf_counter() - t0) * 1e6 / count, out[-7:]

    recordings = []
    try:
        quote.delay("warm", 1).get(timeout=60)  # the worker is up
        for n in range(args["runs"]):
            us, seen["live"] = measure(ops)
            res["live_us"].append(us)
            with timetracer_otel.record(dir=Path(tempfile.mkdtemp()) / f"c{n}",
                                        libraries=["celery"]) as rec:
                measure(1)
                rec.writer.flush(60)
                us, seen["record"] = measure(ops)
            res["record_us"].append(us)
            recordings.append(rec.paths)
    finally:
        worker.terminate()
        worker.wait(30)
        admin.flushdb()
    # Replayed with the worker gone: a get() that reached the backend would wait its 30 s out.
    for paths in recordings:
        with timetracer_otel.replay(paths, libraries=["celery"]) as rep:
            measure(1)
            us, seen["replay"] = measure(ops)
        res["replay_us"].append(us)
        assert rep.report.ok, rep.report.render()
    return {**res, "replay_equal": typed(seen["record"]) == typed(seen["replay"])}


# --- AWS -----------------------------------------------------------------------------------------


def _moto() -> tuple[subprocess.Popen[bytes], str]:
    port = dead_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the moto server did not start")


def botocore_ours(args: dict[str, Any]) -> dict[str, Any]:
    import boto3
    from botocore.config import Config

    import timetracer_otel
    from timetracer_otel import replay_shims

    _otel()
    replay_shims.instrument(["botocore"])
    proc, endpoint = _moto()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    ops: int = args["ops"]
    res: dict[str, list[float]] = {"live_us": [], "record_us": [], "replay_us": []}
    seen: dict[str, Any] = {}
    config = Config(retries={"total_max_attempts": 1})

    def measure(url: str, count: int) -> tuple[float, list[Any]]:
        s3 = boto3.client("s3", endpoint_url=url, config=config)
        out: list[Any] = []
        t0 = time.perf_counter()
        for _ in range(count):
            got = s3.get_object(Bucket=bucket, Key="obj")
            out = [got, got["Body"].read(), s3.head_object(Bucket=bucket, Key="obj")]
        us = (time.perf_counter() - t0) * 1e6 / (count * 2)
        out[0] = {k: v for k, v in out[0].items() if k != "Body"}
        return us, out

    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, config=config)
        s3.create_bucket(Bucket=bucket)
        s3.put_object(Bucket=bucket, Key="obj", Body=os.urandom(4096))
        measure(endpoint, 10)
        for n in range(args["runs"]):
            us, seen["live"] = measure(endpoint, ops)
            res["live_us"].append(us)
            with timetracer_otel.record(dir=Path(tempfile.mkdtemp()) / f"r{n}",
                                        libraries=["botocore"]) as rec:
                measure(endpoint, 1)
                rec.writer.flush(60)
                us, seen["record"] = measure(endpoint, ops)
            res["record_us"].append(us)
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                os.environ.pop(name)
            try:
                with timetracer_otel.replay(rec.paths, libraries=["botocore"]) as rep:
                    gone = f"http://127.0.0.1:{dead_port()}"
                    measure(gone, 1)
                    us, seen["replay"] = measure(gone, ops)
            finally:
                os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench")
            res["replay_us"].append(us)
            assert rep.report.ok, rep.report.render()
    finally:
        proc.terminate()
        proc.wait(10)
    equal = typed(seen["replay"]) == typed(seen["record"])
    return {**res, "replay_equal": equal}


def run(args: dict[str, Any]) -> dict[str, Any]:
    return {"redis": redis_ours, "redis_upstream": redis_upstream, "botocore": botocore_ours,
            "pymongo": pymongo_ours, "pymongo_upstream": pymongo_upstream,
            "celery": celery_ours}[args["lib"]](args)


if __name__ == "__main__":
    worker_main(run)
