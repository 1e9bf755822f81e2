"""pymongo against a real MongoDB-wire server (secantusdb) on 127.0.0.1: sync and asyncio
clients recorded, then replayed with every socket connect refused; documents compared with
the types of every value."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
from bson import Binary, Decimal128, Int64, ObjectId, Regex, Timestamp
from pymongo import AsyncMongoClient, MongoClient

import timetracer_otel
from tests.conftest import connects_refused, mongo_server, plain_env, timetracer_cli, unreachable_port
from timetracer_otel.cassette import load_cassette
from timetracer_otel.errors import ReplayMissError

OID = ObjectId("6b0b9be193e49aeabff70b3c")


def typed(value: Any) -> Any:
    """``value`` with the type of every part beside it (tzinfo's class included)."""
    if isinstance(value, list | tuple):
        return (type(value).__name__, [typed(v) for v in value])
    if isinstance(value, dict):
        return (type(value).__name__, [(k, typed(v)) for k, v in value.items()])
    if isinstance(value, dt.datetime):
        return ("datetime", repr(value), type(value.tzinfo).__name__)
    if isinstance(value, BaseException):
        return (type(value).__module__, type(value).__name__, str(value))
    return (type(value).__name__, repr(value))


@pytest.fixture
def db_name() -> str:
    return f"tt_{uuid.uuid4().hex[:10]}"


def client(port: int, **kwargs: Any) -> MongoClient[dict[str, Any]]:
    return MongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=5000,
                       uuidRepresentation="standard", **kwargs)


def job(port: int, name: str) -> list[Any]:
    c = client(port, tz_aware=True)
    items = c[name].items
    items.insert_many([
        {"_id": OID, "n": 1, "price": Decimal128("19.99"), "big": Int64(2**40),
         "at": dt.datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=dt.timezone.utc),
         "uid": uuid.UUID(int=7), "raw": b"\x00\xff", "bin": Binary(b"\x01", 128),
         "re": Regex("^a", "i"), "ts": Timestamp(1700000000, 3), "none": None,
         "nested": {"list": [1, 2.5, "x", True]}},
        {"_id": 2, "n": 2, "tags": ["a", "b"]},
    ])
    # The server's kind, as the client discovered it (the replay: from the recorded hello).
    out: list[Any] = [c.topology_description.topology_type_name]
    out.append(list(items.find({"n": {"$gte": 1}}).sort("n", 1)))
    out.append(items.find_one({"_id": OID}, {"price": 1, "at": 1}))
    try:
        items.insert_one({"_id": OID})
    except pymongo.errors.DuplicateKeyError as exc:
        out.append((type(exc).__name__, exc.code))
    out.append(items.update_one({"_id": 2}, {"$inc": {"n": 5}}).modified_count)
    out.append(items.count_documents({}))
    out.append(list(items.aggregate([{"$group": {"_id": None, "total": {"$sum": "$n"}}}])))
    out.append(items.delete_many({"n": {"$gt": 100}}).deleted_count)
    hello = c.admin.command("hello")  # the app's own: answered as the server answered it
    out.append((sorted(hello), hello.get("topologyVersion"), hello.get("setName")))
    c.close()
    return out


def test_documents_replay_with_their_types(mongo_port: int, db_name: str, tmp_path: Path) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job(mongo_port, db_name)
    assert live[0] == "ReplicaSetWithPrimary" and live[3] == ("DuplicateKeyError", 11000)
    assert type(live[1][0]["price"]) is Decimal128 and type(live[1][0]["uid"]) is uuid.UUID
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job(unreachable_port(), db_name)
    assert attempts == []
    assert typed(replayed) == typed(live)
    assert rep.report.misses == [] and rep.report.unused == [] and rep.report.shape_matches == []
    (path,) = rec.paths
    calls = load_cassette(path).interactions
    assert {c.library for c in calls} == {"pymongo"} and len(calls) == rep.report.exact
    # The calls sit on the instrumentation's own spans, named as it names them.
    insert = next(c for c in calls if c.label == f"{db_name}.insert items")
    assert insert.name == f"{db_name}.insert" and insert.attributes.get("db.system") == "mongodb"


def test_async_client_cursor_batches_and_fresh_ids(
    mongo_port: int, db_name: str, tmp_path: Path
) -> None:
    async def ajob(port: int) -> list[Any]:
        c: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=5000)
        items = c[db_name].items
        await items.insert_many([{"_id": i, "v": "x" * i} for i in range(250)])
        new = await items.insert_one({"made": "here"})  # an id the client makes afresh
        out: list[Any] = [[d async for d in items.find({"v": {"$exists": True}}, batch_size=100)]]
        out.append(await items.find_one_and_update({"_id": 3}, {"$set": {"v": "y"}},
                                                   return_document=True))
        async with c.start_session() as session:
            out.append(await items.count_documents({}, session=session))
        try:
            await c[db_name].command("noSuchCommand")
        except pymongo.errors.OperationFailure as exc:
            out.append((type(exc).__name__, exc.code))
        out.append(type(new.inserted_id).__name__)
        await c.close()
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(ajob(mongo_port))
    assert len(live[0]) == 250 and live[2] == 251
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths) as rep:
        replayed = asyncio.run(ajob(unreachable_port()))
    assert attempts == [] and typed(replayed) == typed(live)
    # Two getMores answered in order; the insert with a fresh id matched by its shape, and the
    # report says so.
    assert [m.label for m in rep.report.shape_matches] == [f"{db_name}.insert items"]
    assert rep.report.misses == [] and rep.report.unused == []


@contextlib.contextmanager
def _proxy(port: int, pipe: Any) -> Iterator[int]:
    """A loopback TCP proxy to ``port``: each client connection is piped both ways by
    ``pipe(src, dst, upstream, state)`` threads sharing one ``state`` list per connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                down, _ = listener.accept()
                up = socket.create_connection(("127.0.0.1", port))
                state: list[Any] = []
                threading.Thread(target=pipe, args=(down, up, True, state), daemon=True).start()
                threading.Thread(target=pipe, args=(up, down, False, state), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


@contextlib.contextmanager
def cutting_proxy(port: int) -> Iterator[tuple[int, threading.Event]]:
    """A loopback TCP proxy to ``port``; once the event is set, the next ``find`` it sees
    closes that client's connection instead of reaching the server (a monitor's hello on its
    own connection goes on)."""
    cut = threading.Event()

    def pipe(src: socket.socket, dst: socket.socket, upstream: bool, _: list[Any]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if upstream and cut.is_set() and b"\x02find\x00" in data:
                    cut.clear()
                    break
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    with _proxy(port, pipe) as proxy_port:
        yield proxy_port, cut


def test_a_lost_connection_replays_as_the_same_error(
    mongo_port: int, db_name: str, tmp_path: Path
) -> None:
    def lose(port: int, cut: threading.Event | None) -> list[Any]:
        c = client(port, retryReads=False, directConnection=True)  # through the proxy
        items = c[db_name].items
        out: list[Any] = [items.insert_one({"_id": 1}).inserted_id]
        if cut is not None:
            cut.set()
        try:
            items.find_one({"_id": 1})
        except pymongo.errors.AutoReconnect as exc:
            out.append(exc)
        out.append(items.find_one({"_id": 1}))  # a new connection
        c.close()
        return out

    with cutting_proxy(mongo_port) as (port, cut), timetracer_otel.record(dir=tmp_path) as rec:
        live = lose(port, cut)
    assert type(live[1]) is pymongo.errors.AutoReconnect and live[2] == {"_id": 1}
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths):
        replayed = lose(unreachable_port(), None)
    assert attempts == [] and typed(replayed) == typed(live)


@pytest.fixture
def standalone_port() -> Iterator[int]:
    """A second MongoDB-wire server, a standalone one (no replica set)."""
    with mongo_server("--standalone") as port:
        yield port


def test_two_deployments_each_replay_as_they_were(
    mongo_port: int, standalone_port: int, db_name: str, tmp_path: Path
) -> None:
    """A service that talks to a replica set and to a standalone server: each client discovers
    in replay what it discovered live (the server facts are kept per server)."""
    def both(rs_port: int, single_port: int) -> list[Any]:
        rs, single = client(rs_port), client(single_port)
        rs[db_name].items.insert_one({"_id": "rs"})
        single[db_name].items.insert_one({"_id": "single"})
        out = [rs[db_name].items.find_one(), single[db_name].items.find_one(),
               rs.topology_description.topology_type_name,
               single.topology_description.topology_type_name]
        rs.close()
        single.close()
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = both(mongo_port, standalone_port)
    assert live[2:] == ["ReplicaSetWithPrimary", "Single"]
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = both(mongo_port, standalone_port)  # (nothing reached: connects refused)
    assert attempts == [] and typed(replayed) == typed(live)
    assert rep.report.misses == [] and rep.report.unused == []


def test_an_srv_name_replays_without_dns(
    mongo_port: int, db_name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Production connects through ``mongodb+srv://``: a replay resolves the name to the
    recorded replica set without asking DNS, and discovers it as the recording did."""
    with timetracer_otel.record(dir=tmp_path) as rec:
        c = client(mongo_port)
        c[db_name].items.insert_one({"_id": 1, "n": Decimal128("2.50")})
        live = c[db_name].items.find_one({"_id": 1})
        c.close()
    import dns.resolver

    asked: list[Any] = []

    def no_dns(*args: Any, **kwargs: Any) -> Any:
        asked.append(args)
        raise dns.resolver.NXDOMAIN()

    monkeypatch.setattr(dns.resolver, "resolve", no_dns)
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        c = MongoClient("mongodb+srv://cluster0.shop.example.com/?tls=false",
                        serverSelectionTimeoutMS=5000, uuidRepresentation="standard")
        c[db_name].items.insert_one({"_id": 1, "n": Decimal128("2.50")})
        replayed = c[db_name].items.find_one({"_id": 1})
        kind = c.topology_description.topology_type_name
        c.close()
    assert asked == [] and attempts == []
    assert typed(replayed) == typed(live) and kind == "ReplicaSetWithPrimary"
    assert rep.report.misses == [] and rep.report.unused == []


def test_a_call_not_recorded_is_a_miss_naming_it(
    mongo_port: int, db_name: str, tmp_path: Path
) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        c = client(mongo_port)
        c[db_name].items.find_one({"sku": "A-1"})
        c.close()
    with connects_refused(), timetracer_otel.replay(rec.paths, strict=True):
        c = client(unreachable_port())
        with pytest.raises(ReplayMissError) as miss:
            c[db_name].items.find_one({"sku": "B-2"})
        c.close()
    text = str(miss.value)
    assert f"{db_name}.find items" in text and "'A-1'" in text and "'B-2'" in text


def test_passwords_never_reach_the_cassette(mongo_port: int, db_name: str, tmp_path: Path) -> None:
    admin = client(mongo_port)
    admin[db_name].command({"createUser": "app", "pwd": "app-Pa55-word", "roles": ["readWrite"]})
    admin.close()

    def with_secrets(port: int) -> list[Any]:
        c = MongoClient(f"mongodb://app:app-Pa55-word@127.0.0.1:{port}/{db_name}",
                        serverSelectionTimeoutMS=5000)
        db = c[db_name]
        out: list[Any] = [db.users.insert_one({"_id": 1, "password": "hunter2-Secret"}).acknowledged]
        out.append(db.command({"createUser": "other", "pwd": "0ther-Pa55", "roles": []})["ok"])
        out.append(db.users.find_one({"_id": 1}))
        c.close()
        return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = with_secrets(mongo_port)
    assert live[2] == {"_id": 1, "password": "hunter2-Secret"}
    raw = b"".join(Path(p).read_bytes() for p in rec.paths)
    for secret in (b"app-Pa55-word", b"hunter2-Secret", b"0ther-Pa55"):
        assert secret not in raw
    # Replay skips the authentication (a SCRAM exchange cannot be replayed) and answers the rest.
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths) as rep:
        replayed = with_secrets(unreachable_port())
    assert attempts == [] and rep.report.misses == []
    assert replayed[:2] == live[:2] and replayed[2]["password"].startswith("redacted:")


def test_the_cli_records_and_replays_a_script(mongo_port: int, db_name: str, tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(
        "import sys, pymongo\n"
        "c = pymongo.MongoClient(f'mongodb://127.0.0.1:{sys.argv[1]}', serverSelectionTimeoutMS=5000)\n"
        f"items = c['{db_name}'].items\n"
        "items.insert_one({'_id': 'k', 'n': 1.5})\n"
        "print(repr(items.find_one({'_id': 'k'})), type(items.find_one({'_id': 'k'})['n']).__name__)\n"
    )
    cassettes = tmp_path / "cassettes"
    recorded = timetracer_cli("record", "--dir", str(cassettes), "--", sys.executable, str(script),
                              str(mongo_port), env=plain_env())
    assert recorded.returncode == 0, recorded.stderr
    assert recorded.stdout == "{'_id': 'k', 'n': 1.5} float\n"
    replayed = timetracer_cli("replay", "--cassette", str(cassettes), "--", sys.executable,
                              str(script), str(unreachable_port()), env=plain_env())
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == recorded.stdout
    assert "3 exact" in replayed.stderr and "0 missed" in replayed.stderr


def test_a_client_used_in_a_replay_works_live_after_it(
    mongo_port: int, db_name: str, tmp_path: Path
) -> None:
    """An app-wide client that served a replay (its connections reach no server) is used live
    once the replay ends: its commands go to the server on new connections, never waiting on
    one made for the replay; a cursor opened in the replay fails at once (its connection is
    gone, or the server never had its cursor), not waiting for an answer that never comes."""
    import concurrent.futures

    with timetracer_otel.record(dir=tmp_path) as rec:
        seed = client(mongo_port)
        seed[db_name].items.insert_many([{"_id": i} for i in range(6)])
        list(seed[db_name].items.find({}, batch_size=2))
        seed.close()
    app_client = client(mongo_port, retryWrites=False)  # (a write nothing would retry)
    with timetracer_otel.replay(rec.paths):
        cursor = app_client[db_name].items.find({}, batch_size=2)
        assert [next(cursor)["_id"] for _ in range(2)] == [0, 1]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # (a hang: the suite's timeout)
        # A write first: not retried, so it must get a real connection at once.
        written = pool.submit(lambda: app_client[db_name].items.insert_one({"_id": 9})).result(20)
        after = pool.submit(lambda: app_client[db_name].items.find_one({"_id": 5})).result(20)
        with pytest.raises((pymongo.errors.AutoReconnect, pymongo.errors.CursorNotFound)):
            pool.submit(lambda: list(cursor)).result(20)
    assert after == {"_id": 5} and written.inserted_id == 9
    app_client.close()


@contextlib.contextmanager
def slow_proxy(port: int, delay: float = 1.0) -> Iterator[tuple[int, threading.Event]]:
    """A loopback TCP proxy to ``port``; the server's reply to a ``find`` sent while the event
    is set reaches the client ``delay`` seconds late (a slow query)."""
    slow = threading.Event()

    def pipe(src: socket.socket, dst: socket.socket, upstream: bool, finds: list[Any]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if upstream:
                    finds.append(b"\x02find\x00" in data and slow.is_set())
                elif finds and finds.pop(0):
                    time.sleep(delay)
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()

    with _proxy(port, pipe) as proxy_port:
        yield proxy_port, slow


def test_a_query_the_app_cancelled_replays_as_never_answering(
    mongo_port: int, db_name: str, tmp_path: Path
) -> None:
    """An async query the app gave up on (``asyncio.wait_for`` ran out), then the same query
    given time: the cancelled one is kept, so the replay's first one times out again and the
    second gets the document (not the first taking it, the second missing)."""
    client(mongo_port)[db_name].items.insert_one({"_id": 1, "n": 7})

    async def job(port: int, slow: threading.Event | None) -> list[Any]:
        c: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=5000, directConnection=True)
        items = c[db_name].items
        out: list[Any] = []
        for limit in (0.3, 10):
            if slow is not None and limit < 1:
                slow.set()
            try:
                out.append(await asyncio.wait_for(items.find_one({"_id": 1}), limit))
            except TimeoutError as exc:
                out.append(type(exc))
            if slow is not None:
                slow.clear()
        await c.close()
        return out

    with slow_proxy(mongo_port) as (port, slow), timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(job(port, slow))
    assert live == [TimeoutError, {"_id": 1, "n": 7}]
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = asyncio.run(job(unreachable_port(), None))
    assert attempts == [] and replayed == live and not rep.report.misses
