"""SQLAlchemy's sync ORM over psycopg 3 (``postgresql+psycopg://``): recorded against the real
PostgreSQL, replayed with the server unreachable, with no SQLAlchemy-specific code."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session, selectinload

import timetracer_otel
from tests.conftest import PG_HOST, PG_PORT, unreachable_port
from tests.replay_shims.orm_models import Author, Base, Book

KEY = uuid.UUID("12345678-1234-5678-1234-567812345678")


def orm_job(port: int, db: str) -> list[Any]:
    engine = create_engine(f"postgresql+psycopg://postgres@{PG_HOST}:{port}/{db}")
    out: list[Any] = []
    try:
        Base.metadata.create_all(engine)
        with Session(engine) as s:
            ada = Author(name="Ada", key=KEY, meta={"langs": ["en", "fr"], "n": 1.5})
            ada.books = [
                Book(title=f"Vol {i}", price=decimal.Decimal(f"{i}9.95"),
                     published=dt.datetime(2024, 1, i, 12, 30))
                for i in (1, 2, 3)
            ]
            s.add(ada)
            s.commit()
            out.append((ada.id, type(ada.id)))
        with Session(engine) as s:
            author = s.execute(
                select(Author).options(selectinload(Author.books)).where(Author.name == "Ada")
            ).scalar_one()
            out.append((author.name, author.key, type(author.key), author.meta))
            out.append([(b.title, b.price, type(b.price), b.published) for b in author.books])
            book = s.execute(select(Book).where(Book.title == "Vol 2")).scalar_one()
            book.price = decimal.Decimal("1.00")
            s.commit()
            out.append(s.scalar(select(func.sum(Book.price))))
            with s.begin_nested():  # a SAVEPOINT, rolled back
                s.add(Book(title="Draft", price=decimal.Decimal("0"), published=dt.datetime(2024, 2, 1),
                           author_id=author.id))
                s.flush()
                out.append(s.scalar(select(func.count()).select_from(Book)))
                s.rollback()
            out.append(s.scalar(select(func.count()).select_from(Book)))
        with engine.connect() as conn:
            streamed = conn.execution_options(stream_results=True, max_row_buffer=2).execute(
                select(Book.id, Book.title).order_by(Book.id)
            )
            out.append([tuple(r) for r in streamed])
    finally:
        engine.dispose()
    return out


def test_sqlalchemy_orm_over_psycopg_replays_offline(pg_database: str, tmp_path: Path) -> None:
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = orm_job(PG_PORT, pg_database)
    with timetracer_otel.replay(rec.paths) as rep:
        replayed = orm_job(unreachable_port(), pg_database)

    assert replayed == live
    assert [type(x) for x in replayed] == [type(x) for x in live]
    assert not rep.report.misses and not rep.report.shape_matches
    assert replayed[1] == ("Ada", KEY, uuid.UUID, {"langs": ["en", "fr"], "n": 1.5})
    assert replayed[2][0] == ("Vol 1", decimal.Decimal("19.95"), decimal.Decimal,
                              dt.datetime(2024, 1, 1, 12, 30))
    assert replayed[3] == decimal.Decimal("60.90")
    assert replayed[4:6] == [4, 3]
    assert replayed[6] == [(1, "Vol 1"), (2, "Vol 2"), (3, "Vol 3")]
