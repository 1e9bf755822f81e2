"""A small sales report over asyncpg: the issue's example for PostgreSQL record/replay.

    export PG_REPORT_DSN=postgresql://postgres@127.0.0.1:5432/postgres
    timetracer-otel record --dir cassettes -- python examples/pg_report.py
    PG_REPORT_DSN=postgresql://postgres@127.0.0.1:1/postgres \\
        timetracer-otel replay --cassette cassettes -- python examples/pg_report.py  # same output

It works in a temporary table inside one transaction that it rolls back, so it leaves the
database as it found it.
"""

from __future__ import annotations

import asyncio
import os
from decimal import Decimal

import asyncpg

DSN = os.environ.get("PG_REPORT_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")

ORDERS = [
    ("ada", "keyboard", Decimal("49.90"), 2),
    ("ada", "monitor", Decimal("219.00"), 1),
    ("grace", "mouse", Decimal("19.99"), 3),
    ("linus", "monitor", Decimal("219.00"), 2),
]


async def main() -> None:
    pool = await asyncpg.create_pool(DSN, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            tr = conn.transaction()
            await tr.start()
            try:
                await conn.execute(
                    "CREATE TEMP TABLE orders (id serial PRIMARY KEY, customer text, item text,"
                    " price numeric(10,2), qty int, at timestamptz DEFAULT now())"
                )
                await conn.executemany(
                    "INSERT INTO orders (customer, item, price, qty) VALUES ($1, $2, $3, $4)", ORDERS
                )
                rows = await conn.fetch(
                    "SELECT customer, sum(price * qty) AS total, count(*) AS n FROM orders"
                    " GROUP BY customer ORDER BY total DESC"
                )
                top = await conn.fetchrow("SELECT item, sum(qty) AS qty FROM orders GROUP BY item"
                                          " ORDER BY 2 DESC, 1 LIMIT 1")
                grand = await conn.fetchval("SELECT sum(price * qty) FROM orders")
            finally:
                await tr.rollback()
    finally:
        await pool.close()
    for r in rows:
        print(f"{r['customer']:<8} {r['total']:>9} ({r['n']} orders) {type(r['total']).__name__}")
    assert top is not None
    print(f"best seller: {top['item']} x{top['qty']}")
    print(f"grand total: {grand}")


if __name__ == "__main__":
    asyncio.run(main())
