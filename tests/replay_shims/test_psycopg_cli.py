"""Zero code: a plain psycopg script recorded with ``timetracer-otel record -- python script.py``
and replayed with ``timetracer-otel replay --cassette D -- python script.py`` while its DSN
points at a port where nothing listens; stdout is identical."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import PG_HOST, PG_PORT, unreachable_port

SCRIPT = textwrap.dedent(
    """
    import asyncio, datetime, os, sys
    import psycopg
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    dsn = os.environ["APP_DSN"]
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS orders (id serial PRIMARY KEY, total numeric,"
                     " at timestamptz DEFAULT '2024-05-01 10:00+00')")
        print("before", conn.execute("SELECT count(*) FROM orders").fetchone())
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO orders (total) VALUES (%s)", [(9.5,), (20,), (0.25,)])
            print("inserted", cur.rowcount, cur.statusmessage)
        print("after", conn.execute("SELECT count(*) FROM orders").fetchone())
        for row in conn.cursor(row_factory=dict_row).execute("SELECT * FROM orders ORDER BY id"):
            print({k: (v, type(v).__name__) for k, v in row.items()})
        try:
            with conn.transaction():
                conn.execute("INSERT INTO orders (id) VALUES (1)")
        except psycopg.errors.UniqueViolation as exc:
            print("error", type(exc).__name__, exc.sqlstate)

    async def report():
        async with AsyncConnectionPool(dsn, min_size=1, open=False) as pool:
            async with pool.connection() as conn:
                cur = await conn.execute("SELECT sum(total), max(at) FROM orders")
                print("report", await cur.fetchone())

    asyncio.run(report())
    """
)


def _run(args: list[str], dsn: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APP_DSN": dsn}
    cli = [sys.executable, "-m", "timetracer_otel.cli", *args]
    return subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120)


def test_record_and_replay_a_script_without_code_changes(pg_database: str, tmp_path: Path) -> None:
    script = tmp_path / "pg_report.py"
    script.write_text(SCRIPT)
    cassettes = tmp_path / "cassettes"

    live = _run(["record", "--dir", str(cassettes), "--", sys.executable, str(script)],
                f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{pg_database}")
    assert live.returncode == 0, live.stderr
    assert "before (0,)" in live.stdout and "after (3,)" in live.stdout
    assert "error UniqueViolation 23505" in live.stdout

    dead = f"postgresql://postgres@{PG_HOST}:{unreachable_port()}/{pg_database}"
    replayed = _run(["replay", "--cassette", str(cassettes), "--", sys.executable, str(script)], dead)
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout == live.stdout

    # The cassette really answered: without it the same script cannot connect.
    bare = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env={**os.environ, "APP_DSN": dead}, timeout=60)
    assert bare.returncode != 0 and "Connection refused" in bare.stderr


def test_a_swallowed_miss_that_could_not_go_live_fails_the_replay(
    pg_database: str, tmp_path: Path
) -> None:
    """--on-miss passthrough lets a miss go live; on a connection the replay opened from the
    cassette there is no server. The error says so (not "COPY... not supported"), and the
    replay fails even when the app swallows it."""
    script = tmp_path / "swallow.py"
    script.write_text(textwrap.dedent("""
        import os, sys, psycopg
        with psycopg.connect(os.environ["APP_DSN"]) as conn:
            print(conn.execute("SELECT 1").fetchone())
            if len(sys.argv) > 1:
                try:
                    conn.execute("SELECT 2")
                except Exception as exc:
                    print("swallowed", type(exc).__name__, exc)
    """))
    cassettes = tmp_path / "cassettes"
    live = _run(["record", "--dir", str(cassettes), "--", sys.executable, str(script)],
                f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{pg_database}")
    assert live.returncode == 0, live.stderr
    dead = f"postgresql://postgres@{PG_HOST}:{unreachable_port()}/{pg_database}"
    out = _run(["replay", "--cassette", str(cassettes), "--on-miss", "passthrough", "--",
                sys.executable, str(script), "more"], dead)
    assert "swallowed ReplayUnsupportedError execute SELECT 2 has no recording, and its connection was " \
           "opened from the cassette without a server" in out.stdout, out.stdout
    assert out.returncode == 1, out.stderr
    assert "1 could not go live" in out.stderr
