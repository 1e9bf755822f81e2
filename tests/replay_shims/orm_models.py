"""The ORM models both SQLAlchemy tests use (async over asyncpg, sync over psycopg): types that
exercise the drivers' decoding through an ORM (UUID, JSONB, Numeric, timestamps, relations)."""

from __future__ import annotations

import datetime as dt
import decimal
import uuid
from typing import Any

from sqlalchemy import ForeignKey, Numeric, String
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Author(Base):
    __tablename__ = "authors"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50), unique=True)
    key: Mapped[uuid.UUID] = mapped_column(default=uuid.uuid4)  # fresh per run unless given
    meta: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    books: Mapped[list[Book]] = relationship(back_populates="author", order_by="Book.id")


class Book(Base):
    __tablename__ = "books"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(100))
    price: Mapped[decimal.Decimal] = mapped_column(Numeric(8, 2))
    published: Mapped[dt.datetime]
    author_id: Mapped[int] = mapped_column(ForeignKey("authors.id"))
    author: Mapped[Author] = relationship(back_populates="books")
