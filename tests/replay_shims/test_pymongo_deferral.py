"""pymongo commands left to the writer: the cassette holds what a capture on the request path
would have put on the span, in value and in type, and it replays offline."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest
from bson import Decimal128, Int64

from tests.deferral import interactions_of, left_to_writer, recorded_both_ways
from tests.upstream_app import app

# A secret the app's redactor learns from a header, then finds in a document it stores.
SECRET = "s3cr3t-0123456789abcdef"


def _job(port: int, db: str, secrets: bool = True, batches: int = 0) -> list[Any]:
    c = pymongo.MongoClient(f"mongodb://127.0.0.1:{port}", serverSelectionTimeoutMS=5000,
                            uuidRepresentation="standard", tz_aware=True)
    items = c[db].items
    items.insert_many([{"_id": i, "price": Decimal128(f"{i}.5"), "big": Int64(i)} for i in range(5)])
    items.insert_one({"_id": "u", "note": f"token {SECRET}" if secrets else "plain",
                      "password": "hunter2-hunter2" if secrets else None, "uid": uuid.UUID(int=3)})
    page = items.find({"big": {"$gte": 1}}).batch_size(batches)
    out: list[Any] = [items.find_one({"_id": "u"}), list(page)]
    try:
        items.insert_one({"_id": "u"})
    except pymongo.errors.DuplicateKeyError as exc:
        out.append(exc.code)
    items.delete_many({})  # as it was, so the next recording sees what this one did
    c.close()
    return out


@pytest.mark.parametrize("fmt", ["msgpack", "json"])
def test_commands_left_to_the_writer_record_what_the_span_attribute_records(
    serve: Any, mongo_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    db = f"tt_{uuid.uuid4().hex[:10]}"

    def job(base: str, down: str) -> None:
        httpx.get(f"{base}/blob", headers={"Authorization": f"Bearer {SECRET}"})
        _job(mongo_port, db)  # (one batch: another run's cursor ids would differ)

    calls = interactions_of(job, serve(app).url, tmp_path)
    recorded = recorded_both_ways(job, serve(app).url, calls, tmp_path, monkeypatch, fmt)
    assert {r[0] for r in recorded} == {"httpx", "pymongo"}
    # The stored document lost the learned secret and the password, both ways.
    assert any("redacted:" in repr(r[4]) and r[0] == "pymongo" for r in recorded)


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_commands_left_to_the_writer_replay_offline(
    mongo_port: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: str
) -> None:
    db = f"tt_{uuid.uuid4().hex[:10]}"
    live, replayed = left_to_writer(monkeypatch, tmp_path, writer, "pymongo", f"{db}.find",
                                    lambda port: _job(port, db, secrets=False, batches=2), mongo_port)
    assert repr(replayed) == repr(live) and live[-1] == 11000
