"""A small FastAPI + asyncpg service: users register with bcrypt-hashed passwords (a fresh
random salt every time), log in, and are listed. Its own suite is ``check_users.py``."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Annotated, Any

import asyncpg
import bcrypt
from fastapi import Depends, FastAPI, HTTPException
from pydantic import BaseModel

DSN_ENV = "USERS_APP_DSN"
SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id serial PRIMARY KEY,
    email text UNIQUE NOT NULL,
    password_hash bytea NOT NULL,
    created timestamptz NOT NULL DEFAULT now()
)
"""

app = FastAPI()


class Credentials(BaseModel):
    email: str
    password: str


async def get_conn() -> AsyncIterator[asyncpg.Connection]:
    """One connection per request; the test suite overrides this with its transaction."""
    conn = await asyncpg.connect(os.environ[DSN_ENV])
    try:
        yield conn
    finally:
        await conn.close()


Conn = Annotated[asyncpg.Connection, Depends(get_conn)]


@app.post("/users", status_code=201)
async def register(body: Credentials, conn: Conn) -> dict[str, Any]:
    hashed = bcrypt.hashpw(body.password.encode(), bcrypt.gensalt(rounds=4))
    try:
        async with conn.transaction():  # a savepoint when the caller already holds a transaction
            row = await conn.fetchrow(
                "INSERT INTO users (email, password_hash) VALUES ($1, $2) RETURNING id, created",
                body.email, hashed,
            )
    except asyncpg.UniqueViolationError as exc:
        raise HTTPException(409, f"{body.email} is taken ({exc.sqlstate})") from exc
    assert row is not None
    return {"id": row["id"], "email": body.email, "created": row["created"].isoformat()}


@app.post("/login")
async def login(body: Credentials, conn: Conn) -> dict[str, Any]:
    row = await conn.fetchrow("SELECT id, password_hash FROM users WHERE email = $1", body.email)
    if row is None or not bcrypt.checkpw(body.password.encode(), row["password_hash"]):
        raise HTTPException(401, "wrong email or password")
    return {"id": row["id"]}


@app.get("/users")
async def list_users(conn: Conn) -> list[dict[str, Any]]:
    rows = await conn.fetch("SELECT id, email FROM users ORDER BY id")
    return [dict(r) for r in rows]
