"""pymongo replays as it ran live where the recording alone does not show how: a client that
connected before the recording began (its server's facts come from what pymongo knows), and
a query that ran out of its client-side time budget (``timeoutMS``). Against a real
MongoDB-wire server (secantusdb) on 127.0.0.1, replayed with every socket connect refused."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pymongo
import pytest
from pymongo import AsyncMongoClient, MongoClient

import timetracer_otel
from tests.conftest import connects_refused, unreachable_port
from tests.replay_shims.test_pymongo import slow_proxy, typed
from timetracer_otel.cassette import load_cassette
from timetracer_otel.codec import from_tree


@pytest.fixture
def db_name() -> str:
    return f"tt_{uuid.uuid4().hex[:10]}"


def set_name(port: int) -> str:
    probe: MongoClient[dict[str, Any]] = MongoClient(f"mongodb://127.0.0.1:{port}",
                                                     directConnection=True)
    try:
        name = probe.admin.command("hello")["setName"]
    finally:
        probe.close()
    assert isinstance(name, str)
    return name


def recorded_servers(paths: list[str]) -> list[dict[str, Any]]:
    """The server facts each recorded pymongo call carries."""
    return [dict(from_tree(i.response.get("server")) or {}) for path in paths
            for i in load_cassette(path).interactions if i.library == "pymongo"]


# --- a client connected before the recording -------------------------------------------------


def test_a_client_connected_before_the_recording_replays_its_replica_set(
    mongo_port: int, db_name: str, tmp_path: Path
) -> None:
    """An app-wide client connected (its handshake done) before ``record()``: the cassette
    still carries its server's facts, so a replay whose URI names the replica set finds it
    (not 'No replica set members available'), and one that does not discovers it, as live."""
    rs = set_name(mongo_port)
    app: MongoClient[dict[str, Any]] = MongoClient(
        f"mongodb://127.0.0.1:{mongo_port}/?replicaSet={rs}", serverSelectionTimeoutMS=5000)
    items = app[db_name].items
    items.insert_one({"_id": 1, "v": "one"})  # connected and pooled before the recording
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = [items.find_one({"_id": 1}), app.topology_description.topology_type_name]
    app.close()
    assert live == [{"_id": 1, "v": "one"}, "ReplicaSetWithPrimary"]
    for query in (f"/?replicaSet={rs}", "/"):
        with connects_refused() as attempts, \
                timetracer_otel.replay(rec.paths, strict=True) as rep:
            c: MongoClient[dict[str, Any]] = MongoClient(
                f"mongodb://127.0.0.1:{unreachable_port()}{query}", serverSelectionTimeoutMS=2000)
            try:
                replayed = [c[db_name].items.find_one({"_id": 1}),
                            c.topology_description.topology_type_name]
            finally:
                c.close()
        assert attempts == [] and typed(replayed) == typed(live), query
        # (the client's endSessions at close: acknowledged, never recorded)
        assert rep.report.exact == 1 and rep.report.misses == ["admin.endSessions"], query
    # The cassette carries the server's facts, as pymongo knew them.
    (server,) = recorded_servers(rec.paths)
    member = f"127.0.0.1:{mongo_port}"
    assert server["setName"] == rs and server["hosts"] == [member]
    assert server["me"] == server["primary"] == server["address"] == member
    assert server["isWritablePrimary"] is True and type(server["maxWireVersion"]) is int


def test_an_async_client_connected_before_the_recording_replays_its_replica_set(
    mongo_port: int, db_name: str, tmp_path: Path
) -> None:
    rs = set_name(mongo_port)

    async def job(port: int, app: AsyncMongoClient[dict[str, Any]] | None) -> list[Any]:
        c = app or AsyncMongoClient(f"mongodb://127.0.0.1:{port}/?replicaSet={rs}",
                                    serverSelectionTimeoutMS=2000)
        out = [await c[db_name].items.find_one({"_id": 1}),
               c.topology_description.topology_type_name]
        if app is None:
            await c.close()
        return out

    async def live_run() -> tuple[list[Any], list[str]]:
        app: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            f"mongodb://127.0.0.1:{mongo_port}/?replicaSet={rs}", serverSelectionTimeoutMS=5000)
        await app[db_name].items.insert_one({"_id": 1, "at": dt.datetime(2024, 5, 6, 7, 8, 9)})
        with timetracer_otel.record(dir=tmp_path) as rec:
            out = await job(mongo_port, app)
        await app.close()
        return out, rec.paths

    live, paths = asyncio.run(live_run())
    assert live == [{"_id": 1, "at": dt.datetime(2024, 5, 6, 7, 8, 9)}, "ReplicaSetWithPrimary"]
    with connects_refused() as attempts, timetracer_otel.replay(paths, strict=True) as rep:
        replayed = asyncio.run(job(unreachable_port(), None))
    assert attempts == [] and typed(replayed) == typed(live)
    assert rep.report.exact == 1 and rep.report.misses == ["admin.endSessions"]
    (server,) = recorded_servers(paths)
    assert server["setName"] == rs and server["me"] == f"127.0.0.1:{mongo_port}"


# --- a query that ran out of its time budget -------------------------------------------------


class Opened(pymongo.monitoring.ConnectionPoolListener):
    """Counts the connections the app's pool opens (a timed-out one is closed, as live)."""

    def __init__(self) -> None:
        self.count = 0

    def connection_created(self, event: Any) -> None:
        self.count += 1

    def _ignored(self, event: Any) -> None:
        pass

    pool_created = pool_ready = pool_cleared = pool_closed = connection_ready = _ignored
    connection_closed = connection_check_out_started = connection_check_out_failed = _ignored
    connection_checked_out = connection_checked_in = _ignored


BUDGET_MS = 400  # the client's timeoutMS; the slow find's reply comes 1.5 s late
SLOW_S = 1.5


def test_a_query_past_its_timeout_ms_replays_as_the_same_timeout(
    mongo_port: int, db_name: str, tmp_path: Path
) -> None:
    """A retryable read that ran out of ``timeoutMS`` live (NetworkTimeout, not retried: no
    time was left), then the same query again: the replayed timeout spends the budget as live
    before it is raised, so pymongo does not retry it either (a retry was never recorded: it
    took the second query's answer, and the second query missed)."""
    seed: MongoClient[dict[str, Any]] = MongoClient(f"mongodb://127.0.0.1:{mongo_port}")
    seed[db_name].items.insert_one({"_id": 1, "n": 7})
    seed.close()

    def job(port: int, slow: threading.Event | None) -> list[Any]:
        opened = Opened()
        c: MongoClient[dict[str, Any]] = MongoClient(
            f"mongodb://127.0.0.1:{port}", directConnection=True, timeoutMS=BUDGET_MS,
            event_listeners=[opened])
        items = c[db_name].items
        out: list[Any] = [items.find_one({"_id": 0})]  # connected, not slow
        if slow is not None:
            slow.set()
        started = time.monotonic()
        try:
            out.append(items.find_one({"_id": 1}))
        except pymongo.errors.NetworkTimeout as exc:
            out.append(exc)
        out.append(time.monotonic() - started)
        if slow is not None:
            slow.clear()
        out.append(items.find_one({"_id": 1}))
        c.close()
        return [*out, opened.count]

    with slow_proxy(mongo_port, SLOW_S) as (port, slow), \
            timetracer_otel.record(dir=tmp_path) as rec:
        live = job(port, slow)
    assert live[0] is None and type(live[1]) is pymongo.errors.NetworkTimeout
    assert "timeoutMS: 400.0ms" in str(live[1]) and live[3] == {"_id": 1, "n": 7} and live[4] == 2
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job(unreachable_port(), None)
    assert attempts == []
    assert typed(replayed[:2] + replayed[3:]) == typed(live[:2] + live[3:])
    # The budget was spent before the timeout was raised (not raised at once).
    assert replayed[2] >= BUDGET_MS / 1000 * 0.5
    assert rep.report.misses == [] and rep.report.shape_matches == [] and rep.report.unused == []


def test_an_async_query_past_its_timeout_ms_replays_as_the_same_timeout(
    mongo_port: int, db_name: str, tmp_path: Path
) -> None:
    seed: MongoClient[dict[str, Any]] = MongoClient(f"mongodb://127.0.0.1:{mongo_port}")
    seed[db_name].items.insert_one({"_id": 1, "n": 7})
    seed.close()

    async def job(port: int, slow: threading.Event | None) -> list[Any]:
        opened = Opened()
        c: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
            f"mongodb://127.0.0.1:{port}", directConnection=True, timeoutMS=BUDGET_MS,
            event_listeners=[opened])
        items = c[db_name].items
        out: list[Any] = [await items.find_one({"_id": 0})]
        if slow is not None:
            slow.set()
        started = time.monotonic()
        try:
            out.append(await items.find_one({"_id": 1}))
        except pymongo.errors.NetworkTimeout as exc:
            out.append(exc)
        out.append(time.monotonic() - started)
        if slow is not None:
            slow.clear()
        out.append(await items.find_one({"_id": 1}))
        await c.close()
        return [*out, opened.count]

    with slow_proxy(mongo_port, SLOW_S) as (port, slow), \
            timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(job(port, slow))
    assert live[0] is None and type(live[1]) is pymongo.errors.NetworkTimeout
    assert live[3] == {"_id": 1, "n": 7} and live[4] == 2
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = asyncio.run(job(unreachable_port(), None))
    assert attempts == []
    assert typed(replayed[:2] + replayed[3:]) == typed(live[:2] + live[3:])
    assert replayed[2] >= BUDGET_MS / 1000 * 0.5
    assert rep.report.misses == [] and rep.report.shape_matches == [] and rep.report.unused == []
