"""The users service's own suite: a pool per test, every test inside a transaction that is
rolled back at the end, every request a savepoint inside it. Run it with this directory's
``pytest.ini`` and ``USERS_APP_DSN`` set."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from users_app import DSN_ENV, SCHEMA, app, get_conn


@pytest.fixture
async def conn() -> AsyncIterator[asyncpg.Connection]:
    pool = await asyncpg.create_pool(os.environ[DSN_ENV], min_size=3, max_size=5)
    try:
        async with pool.acquire() as conn:
            tr = conn.transaction()
            await tr.start()
            await conn.execute(SCHEMA)
            try:
                yield conn
            finally:
                await tr.rollback()
    finally:
        await pool.close()


@pytest.fixture
async def client(conn: asyncpg.Connection) -> AsyncIterator[httpx.AsyncClient]:
    async def test_conn() -> AsyncIterator[asyncpg.Connection]:
        yield conn

    app.dependency_overrides[get_conn] = test_conn
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://users") as c:
        yield c
    app.dependency_overrides.clear()


def new_email() -> str:
    # Stable addresses (each test rolls back); what varies between runs is the bcrypt salt.
    global _seq
    _seq += 1
    return f"user{_seq}@example.com"


_seq = 0


async def test_register_then_login(client: httpx.AsyncClient, conn: asyncpg.Connection) -> None:
    email = new_email()
    r = await client.post("/users", json={"email": email, "password": "s3cret"})
    assert r.status_code == 201, r.text
    assert await conn.fetchval("SELECT count(*) FROM users") == 1
    r = await client.post("/login", json={"email": email, "password": "s3cret"})
    assert r.status_code == 200 and r.json()["id"] == (await conn.fetchval("SELECT min(id) FROM users"))
    r = await client.post("/login", json={"email": email, "password": "wrong"})
    assert r.status_code == 401


async def test_duplicate_email_is_a_conflict(client: httpx.AsyncClient) -> None:
    email = new_email()
    assert (await client.post("/users", json={"email": email, "password": "a"})).status_code == 201
    r = await client.post("/users", json={"email": email, "password": "b"})
    assert r.status_code == 409 and "23505" in r.json()["detail"]
    # The failed savepoint was rolled back; the outer transaction is still usable.
    assert len((await client.get("/users")).json()) == 1


async def test_list_users_in_order(client: httpx.AsyncClient, conn: asyncpg.Connection) -> None:
    emails = [new_email() for _ in range(3)]
    for e in emails:
        assert (await client.post("/users", json={"email": e, "password": "pw"})).status_code == 201
    listed = (await client.get("/users")).json()
    assert [u["email"] for u in listed] == emails
    assert [u["id"] for u in listed] == sorted(u["id"] for u in listed)


async def test_each_test_starts_empty(conn: asyncpg.Connection) -> None:
    assert await conn.fetchval("SELECT count(*) FROM users") == 0
    assert conn.is_in_transaction()
