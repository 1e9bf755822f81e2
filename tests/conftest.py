"""Fixtures shared by every test: real servers on 127.0.0.1 and a clean timetracer state."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from timetracer_otel import replay_shims
from timetracer_otel.config import Mode
from timetracer_otel.replay_shims.base import STATE


class ServerThread:
    """A real uvicorn server in a thread, on 127.0.0.1 and a free port."""

    def __init__(self, app: Any, port: int | None = None, lifespan: str = "off") -> None:
        self.app, self.lifespan = app, lifespan
        self.port = port or free_port()
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan=self.lifespan)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self.server is not None and self.thread is not None:
            self.server.should_exit = True
            self.thread.join(10)
        # Nothing listens on the port any more: replay tests prove they do not need it.
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", self.port)) != 0, f"{self.url} still answers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def serve() -> Iterator[Callable[[Any], ServerThread]]:
    """``serve(app)`` starts a real uvicorn server; all are stopped at the end of the test."""
    servers: list[ServerThread] = []

    def start(app: Any, port: int | None = None, lifespan: str = "off") -> ServerThread:
        server = ServerThread(app, port, lifespan).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.thread is not None and server.thread.is_alive():
            server.stop()


# The mark of test files that use a fixed resource of the machine's services another file uses
# too: Redis databases 11, 13 and 14 by number (Celery's broker flushes 14), RabbitMQ's default
# vhost and its queues, Celery workers that answer every broadcast on their broker. Such a file
# says `pytestmark = SHARED_SERVICES`. Under xdist (`-n 2 --dist loadgroup`, pyproject's
# addopts) those files run in one group, one after another, on one worker; every other file is
# a group of its own (below: its module-scoped fixtures start once, its tests keep their order).
SHARED_SERVICES = pytest.mark.xdist_group("shared-services")
_TESTS = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        try:
            name = item.path.relative_to(_TESTS).as_posix()
        except ValueError:  # not one of the suite's files
            continue
        item.add_marker(pytest.mark.xdist_group(name))


@pytest.fixture(scope="session", autouse=True)
def _shimmed_libraries_imported() -> None:
    """What the first record() or replay() imports (each shimmed library, its shim and its
    OTel instrumentation), imported before the first test, patching nothing.

    pytester puts sys.modules back after each test, dropping the modules that test imported
    first: a test recording inside pytester would leave the next test a second copy of each
    library. asyncpg >= 0.31 segfaults at its first connect after such a re-import
    (MagicStack/asyncpg#1292), and the shims, installed on the first copy, would miss calls
    made through the second.
    """
    for name in replay_shims.available():
        try:
            shim = replay_shims.load(name)
        except Exception:  # as install() does: a broken optional library stops no other
            continue
        if shim.instrumentor is not None:
            with contextlib.suppress(ImportError):
                importlib.import_module(shim.instrumentor.partition(":")[0])


@pytest.fixture(autouse=True)
def _timetracer_off() -> Iterator[None]:
    """Every test starts and ends with the shims switched off."""
    STATE.mode = Mode.OFF
    STATE.index = None
    STATE.defer = False
    yield
    STATE.mode = Mode.OFF
    STATE.index = None
    STATE.defer = False


def run(coro: Any) -> Any:
    return asyncio.run(coro)


PG_HOST = "127.0.0.1"
PG_PORT = 5432


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database on the machine's real server; dropped afterwards.

    Yields its name; connect with ``postgresql://postgres@127.0.0.1:5432/<name>``.
    """
    import uuid

    import psycopg

    name = f"tt_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres", autocommit=True)
    except psycopg.OperationalError as exc:  # fail, naming the service: never skip silently
        pytest.fail(f"PostgreSQL is needed on {PG_HOST}:{PG_PORT} and is not reachable: {exc}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    yield name
    with psycopg.connect(f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres", autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_HELD: list[socket.socket] = []


def unreachable_port() -> int:
    """A loopback port where nothing listens: replay tests point their clients here. The
    port stays bound (not listening: a connect is refused) for the rest of the process, so a
    server of this or another xdist worker cannot be given it meanwhile."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    _HELD.append(held)
    return int(held.getsockname()[1])


@contextlib.contextmanager
def connects_refused() -> Iterator[list[Any]]:
    """Inside, every socket connect is refused (as nothing listening would) and its address
    kept: a replay that answers from its cassette leaves the list empty, one that went to the
    network does not, even where a live call would fail the same way."""
    attempts: list[Any] = []
    original = socket.socket.connect

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise ConnectionRefusedError(111, "Connection refused (by the test: replay must not connect)")

    socket.socket.connect = refuse  # type: ignore[method-assign]
    try:
        yield attempts
    finally:
        socket.socket.connect = original  # type: ignore[method-assign]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:  # a missing service fails, naming it
        pytest.fail("the moto S3 server is needed: pip install 'moto[server]'")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    aws = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": moto_endpoint,
           "AWS_EC2_METADATA_DISABLED": "true"}
    for k, v in aws.items():
        monkeypatch.setenv(k, v)
    import uuid

    import boto3

    name = f"tt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@contextlib.contextmanager
def mongo_server(*options: str) -> Iterator[int]:
    """A real MongoDB-wire server (secantusdb, in memory) on 127.0.0.1 with ``options``
    (``--standalone``: no replica set); its port, and it is stopped afterwards."""
    import importlib.util

    if importlib.util.find_spec("secantus") is None:  # a missing service fails, naming it
        pytest.fail("the MongoDB-wire server is needed: pip install secantusdb")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "secantus", "--host", "127.0.0.1", "--port", str(port),
         "--storage-path", ":memory:", *options],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"secantus {' '.join(options)} did not start on 127.0.0.1:{port}")
        time.sleep(0.1)
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


REDIS_PORT = 6379


@pytest.fixture
def prefix() -> Iterator[str]:
    """A fresh key prefix on the machine's Redis (127.0.0.1:6379); its keys are deleted
    afterwards."""
    import redis

    try:
        admin = redis.Redis(port=REDIS_PORT)
        admin.ping()
    except redis.ConnectionError as exc:  # fail, naming the service: never skip silently
        pytest.fail(f"Redis is needed on 127.0.0.1:{REDIS_PORT} and is not reachable: {exc}")
    name = f"tt:{uuid.uuid4().hex[:10]}:"
    yield name
    keys = admin.keys(name + "*")
    if keys:
        admin.delete(*keys)
    admin.close()


@pytest.fixture(scope="session")
def mongo_port() -> Iterator[int]:
    """The session's MongoDB-wire server (a one-member replica set, as secantusdb starts)."""
    with mongo_server() as port:
        yield port


def typed(value: Any) -> Any:
    """A value with the type of every part, down to a datetime's tzinfo."""
    if isinstance(value, list | tuple):
        return (type(value).__name__, [typed(v) for v in value])
    if isinstance(value, dict):
        return ("dict", [(typed(k), typed(v)) for k, v in value.items()])
    if isinstance(value, BaseException):
        return (type(value).__module__, type(value).__qualname__, typed(value.args))
    return (type(value).__name__, repr(value), repr(getattr(value, "tzinfo", None)))


def stop_process(proc: subprocess.Popen[str]) -> str:
    """A warm shutdown (SIGTERM, as a deploy sends it) of a worker process, its output
    returned."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


def plain_env(**extra: str) -> dict[str, str]:
    """This process's environment without OpenTelemetry or timetracer settings, plus ``extra``:
    for a command that must set them up itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TIMETRACER_"))}
    return {**env, **extra}


def timetracer_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``timetracer-otel ARGS`` (this interpreter's console script), its output captured."""
    command = [str(Path(sys.executable).parent / "timetracer-otel"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
