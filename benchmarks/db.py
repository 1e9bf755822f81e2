"""Scenario 4: a 10-row query through asyncpg and psycopg: live loopback PostgreSQL with OTel
only, the same under ``record()``, and replayed with the server unreachable.

Each driver runs in its own process. Every run records its own cassette and the replay of that
run answers from it (FIFO per key), connecting to a port where nothing listens.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import worker_main
from benchmarks.micro import _otel

PG = "127.0.0.1:5432"
# Untimed queries on each connection before its timed ones (see run).
LEAD = 100
SQL = "SELECT g AS id, md5(g::text) AS name, g * 1.5 AS price FROM generate_series(1, 10) g"


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fresh_database() -> str:
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"postgresql://postgres@{PG}/postgres", autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(f"postgresql://postgres@{PG}/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(args: dict[str, Any]) -> dict[str, Any]:
    import timetracer_otel
    from timetracer_otel import replay_shims

    driver: str = args["driver"]
    queries: int = args["queries"]
    _otel()
    replay_shims.instrument([driver])
    db = fresh_database()
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{driver}-"))
    res: dict[str, list[float]] = {"live_us": [], "record_us": [], "replay_us": []}
    rows_seen: dict[str, Any] = {}
    try:
        floor: Callable[[], float] | None = None
        if driver == "asyncpg":
            import asyncpg

            async def block(port: int, count: int) -> tuple[float, Any]:
                conn = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/{db}")
                for _ in range(LEAD):
                    rows = await conn.fetch(SQL)
                t0 = time.perf_counter()
                for _ in range(count):
                    rows = await conn.fetch(SQL)
                us = (time.perf_counter() - t0) * 1e6 / count
                await conn.close()
                return us, [tuple(r) for r in rows]

            def measure(port: int, count: int = queries) -> tuple[float, Any]:
                return asyncio.run(block(port, count))

            async def floor_block() -> float:
                # The cheapest possible answer at the call site: OTel's asyncpg span around a
                # fetch that returns rows built beforehand. No replay can cost less than this
                # while the instrumentation stays in the path; no timetracer code runs.
                conn = await asyncpg.connect(f"postgresql://postgres@{PG}/{db}")
                rows = await conn.fetch(SQL)
                wrapper = asyncpg.Connection.__dict__["fetch"]
                beneath = wrapper.__wrapped__  # OTel's wrapt wrapper sits on top

                async def prebuilt(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
                    return rows

                wrapper.__wrapped__ = prebuilt
                try:
                    t0 = time.perf_counter()
                    for _ in range(queries):
                        await conn.fetch(SQL)
                    return (time.perf_counter() - t0) * 1e6 / queries
                finally:
                    wrapper.__wrapped__ = beneath
                    await conn.close()

            def asyncpg_floor() -> float:
                return asyncio.run(floor_block())

            floor = asyncpg_floor
        else:
            import psycopg

            def measure(port: int, count: int = queries) -> tuple[float, Any]:
                with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/{db}") as conn:
                    for _ in range(LEAD):
                        rows = conn.execute(SQL).fetchall()
                    t0 = time.perf_counter()
                    for _ in range(count):
                        rows = conn.execute(SQL).fetchall()
                    us = (time.perf_counter() - t0) * 1e6 / count
                return us, rows

            def psycopg_floor() -> float:
                # As asyncpg's floor: OTel's traced cursor and span around an execute that
                # does nothing and a fetchall that returns rows built beforehand.
                with psycopg.connect(f"postgresql://postgres@{PG}/{db}") as conn:
                    rows = conn.execute(SQL).fetchall()
                    cls = psycopg.Cursor
                    saved = cls.__dict__["execute"], cls.__dict__["fetchall"]

                    def execute(self: Any, query: Any, params: Any = None, **kw: Any) -> Any:
                        return self

                    cls.execute, cls.fetchall = execute, lambda self: rows  # type: ignore[assignment,method-assign]
                    try:
                        t0 = time.perf_counter()
                        for _ in range(queries):
                            got = conn.execute(SQL).fetchall()
                        us = (time.perf_counter() - t0) * 1e6 / queries
                    finally:
                        cls.execute, cls.fetchall = saved  # type: ignore[method-assign]
                    assert got == rows
                    return us

            floor = psycopg_floor
        measure(5432)  # warm-up
        for r in range(args["runs"]):
            us, rows_seen["live"] = measure(5432)
            res["live_us"].append(us)
            with timetracer_otel.record(dir=tmp / f"r{r}", libraries=[driver]) as rec:
                # Steady state, as a server's first requests start its writer process: that
                # process boots (an interpreter and its imports, ~0.1-0.3 s of a core) before
                # the window, then enters it with the backlog of the lead queries.
                measure(5432, 1)
                rec.writer.flush(60)
                us, rows_seen["record"] = measure(5432)
            res["record_us"].append(us)
            with timetracer_otel.replay(rec.paths, libraries=[driver]) as rep:
                measure(dead_port(), 1)  # the same calls as recorded, in the same order
                us, rows_seen["replay"] = measure(dead_port())
            res["replay_us"].append(us)
            assert rep.report.ok, rep.report.render()
            if floor is not None:
                res.setdefault("floor_us", []).append(floor())
    finally:
        drop_database(db)
    same = rows_seen["replay"] == rows_seen["live"] and \
        [type(v) for v in rows_seen["replay"][0]] == [type(v) for v in rows_seen["live"][0]]
    return {**res, "replay_rows_equal": same, "rows": len(rows_seen["live"])}


if __name__ == "__main__":
    worker_main(run)
