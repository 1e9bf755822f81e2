"""asyncpg under SQLAlchemy's async ORM and under a pool shared by concurrent tasks: recorded
against the real PostgreSQL, replayed with the server unreachable and no extra code."""

from __future__ import annotations

import asyncio
import datetime as dt
import decimal
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import selectinload

import timetracer_otel
from tests.conftest import PG_HOST, PG_PORT, unreachable_port
from tests.replay_shims.orm_models import Author, Base, Book


async def orm_job(port: int, db: str) -> list[Any]:
    engine = create_async_engine(f"postgresql+asyncpg://postgres@{PG_HOST}:{port}/{db}")
    out: list[Any] = []
    try:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        session_factory = async_sessionmaker(engine, expire_on_commit=False)
        async with session_factory() as s:
            ada = Author(name="Ada", meta={"langs": ["en", "fr"], "n": 1.5})
            ada.books = [
                Book(title=f"Vol {i}", price=decimal.Decimal(f"{i}9.95"),
                     published=dt.datetime(2024, 1, i, 12, 30))
                for i in (1, 2, 3)
            ]
            s.add(ada)
            await s.commit()
            out.append(type(ada.id))
        async with session_factory() as s:
            out.append(await _orm_reads(s))
            book = (await s.execute(select(Book).where(Book.title == "Vol 2"))).scalar_one()
            book.price = decimal.Decimal("1.00")
            await s.commit()
            out.append(await s.scalar(select(func.sum(Book.price))))
            # A server-side cursor: prepared statement + portal fetches, inside a transaction.
            result = await s.stream(select(Book.id, Book.title).order_by(Book.id))
            out.append([tuple(r) async for r in result])
    finally:
        await engine.dispose()
    return out


async def _orm_reads(s: AsyncSession) -> list[Any]:
    author = (
        await s.execute(select(Author).options(selectinload(Author.books)).where(Author.name == "Ada"))
    ).scalar_one()
    rows = (await s.execute(select(Book.title, Book.price, Book.published).order_by(Book.id))).all()
    return [
        (author.name, type(author.key), author.meta),
        [(b.title, b.price, type(b.price), b.published) for b in author.books],
        [tuple(r) for r in rows],
        await s.scalar(select(func.count()).select_from(Book)),
    ]


def test_sqlalchemy_async_orm_replays_without_the_server(pg_database: str, tmp_path: Path) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(orm_job(PG_PORT, pg_database))
    with timetracer_otel.replay(rec.paths) as rep:
        replayed = asyncio.run(orm_job(unreachable_port(), pg_database))
    assert replayed == live
    assert live[1][3] == 3 and live[2] == decimal.Decimal("60.90")
    assert [title for _, title in live[3]] == ["Vol 1", "Vol 2", "Vol 3"]
    assert rep.report.ok, rep.report.render()


async def pool_job(port: int, db: str) -> list[Any]:
    pool = await asyncpg.create_pool(f"postgresql://postgres@{PG_HOST}:{port}/{db}",
                                     min_size=2, max_size=4)
    try:
        await pool.execute("CREATE TABLE IF NOT EXISTS kv (k int PRIMARY KEY, v text)")

        async def task(i: int) -> Any:
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute("INSERT INTO kv VALUES ($1, $2)", i, f"v{i}")
                return await conn.fetchrow("SELECT k, v FROM kv WHERE k = $1", i)

        rows = await asyncio.gather(*(task(i) for i in range(12)))
        total = await pool.fetchval("SELECT count(*) FROM kv")
        return [tuple(r) for r in rows] + [total, type(rows[0])]
    finally:
        await pool.close()


def test_pool_shared_by_concurrent_tasks(pg_database: str, tmp_path: Path) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = asyncio.run(pool_job(PG_PORT, pg_database))
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = asyncio.run(pool_job(unreachable_port(), pg_database))
    assert replayed == live
    assert live[-2] == 12 and live[-1] is asyncpg.Record
    assert rep.report.ok and not rep.report.shape_matches
