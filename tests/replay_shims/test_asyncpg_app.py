"""The flagship: a FastAPI + asyncpg service's own test suite (random bcrypt salts, a pool per
test, every test in a rolled-back transaction with savepoints) recorded once through
``timetracer-otel record`` and passing on ``timetracer-otel replay`` with the database
unreachable; the replay report lists the shape matches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import PG_HOST, PG_PORT, unreachable_port

APP_DIR = Path(__file__).resolve().parents[1] / "apps" / "fastapi_asyncpg"
ROOT = APP_DIR.parents[2]


def _cli(args: list[str], dsn: str) -> subprocess.CompletedProcess[str]:
    suite = [sys.executable, "-m", "pytest", "-q", "-c", str(APP_DIR / "pytest.ini"), str(APP_DIR)]
    env = {**os.environ, "USERS_APP_DSN": dsn}
    cli = [sys.executable, "-m", "timetracer_otel.cli"]
    return subprocess.run([*cli, *args, "--", *suite], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_app_suite_records_then_replays_with_the_database_unreachable(
    pg_database: str, tmp_path: Path
) -> None:
    cassettes = tmp_path / "cassettes"
    live = _cli(["record", "--dir", str(cassettes)],
                f"postgresql://postgres@{PG_HOST}:{PG_PORT}/{pg_database}")
    assert live.returncode == 0, live.stdout + live.stderr
    assert "4 passed" in live.stdout

    # Same database name, a port where nothing listens: only the cassette can answer.
    dead = f"postgresql://postgres@{PG_HOST}:{unreachable_port()}/{pg_database}"
    replayed = _cli(["replay", "--cassette", str(cassettes)], dead)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert "4 passed" in replayed.stdout
    report = replayed.stderr
    assert "0 missed" in report, report
    # Fresh salts and asyncpg's process-counter savepoint names are matched by shape, visibly.
    assert "shape match: fetchrow INSERT INTO users" in report
    assert "params.$tuple[1].$bytes: recorded b'$2b$04$" in report
    assert "shape match: execute SAVEPOINT __asyncpg_savepoint_" in report

    # Strict mode turns shape matching off: the salted insert is then a miss.
    strict = _cli(["replay", "--strict", "--cassette", str(cassettes)], dead)
    assert strict.returncode != 0
    assert "miss: fetchrow INSERT INTO users" in strict.stderr
