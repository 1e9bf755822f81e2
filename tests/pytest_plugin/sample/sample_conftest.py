"""conftest.py of the sample project the plugin tests run with pytester."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import pytest

UPSTREAM = os.environ["SAMPLE_UPSTREAM"]
PG_DSN = os.environ["SAMPLE_PG_DSN"]


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    # Calls the upstream while the fixture is set up, before the test body runs.
    with httpx.Client(base_url=UPSTREAM) as c:
        assert c.get("/health").json() == {"path": "/health", "query": ""}
        yield c
        c.get("/cleanup")  # and once more at teardown


@pytest.fixture
async def db() -> AsyncIterator[asyncpg.Connection]:
    # Connects (and queries) before the test body: both belong to the test's cassette.
    conn = await asyncpg.connect(PG_DSN)
    assert await conn.fetchval("SELECT count(*) FROM items") == 3
    yield conn
    await conn.close()
