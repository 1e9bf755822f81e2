"""Celery over the machine's RabbitMQ (127.0.0.1:5672), the most common production broker,
with results sent back over AMQP (``rpc://``, JSON messages) or stored in Redis (database 14,
pickle messages). A real ``celery worker`` process, itself under ``timetracer-otel record``,
runs the tasks while the producer records; then the worker is stopped, and the producer replays
with an app whose broker (and Redis backend) is a port nothing listens on, every socket connect
refused and kept: typed values, a task's exception, ``state``/``ready()`` come back as live. The
worker's task runs replay through ``timetracer-otel replay DIR --celery MODULE:APP``."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celery.exceptions
import kombu.exceptions
import pytest
from celery import Celery, group
from celery._state import get_current_app
from opentelemetry import trace

import timetracer_otel
from tests.conftest import (
    SHARED_SERVICES,
    connects_refused,
    plain_env,
    stop_process,
    timetracer_cli,
    typed,
    unreachable_port,
)
from tests.replay_shims.celery_app_amqp import (
    BROKER,
    PaymentDeclined,
    make_app,
    redis_app,
    rpc_app,
)
from timetracer_otel.cassette import find_cassettes, load_cassette
from timetracer_otel.tasks import task_run_span

pytestmark = SHARED_SERVICES  # (see tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests.replay_shims.celery_app_amqp"

# backend: (the live app, its attribute in MODULE, its result backend, its task serializer)
SETUPS: dict[str, tuple[Celery, str, str, str]] = {
    "rpc": (rpc_app, "rpc_app", "rpc://", "json"),
    "redis": (redis_app, "redis_app", "redis://127.0.0.1:{port}/14", "pickle"),
}


def start_worker(app: Celery, attr: str, record_dir: Path) -> subprocess.Popen[str]:
    """``timetracer-otel record --dir D -- celery -A MODULE:ATTR worker`` (solo pool; its
    broker heartbeat left on, which lets a warm shutdown end within seconds), ready once it
    has answered a task. The app's queue is emptied first."""
    try:
        app.control.purge()
    except Exception as exc:  # fail, naming the service: never skip silently
        pytest.fail(f"RabbitMQ is needed on 127.0.0.1:5672 (guest/guest) and is not usable: {exc}")
    command = [str(Path(sys.executable).parent / "timetracer-otel"), "record", "--dir",
               str(record_dir), "--", sys.executable, "-m", "celery", "-A", f"{MODULE}:{attr}",
               "worker", "--pool=solo", "--without-mingle", "--without-gossip",
               "--loglevel=WARNING"]
    # (C_FORCE_ROOT: a worker that accepts pickle refuses to run as root without it)
    proc = subprocess.Popen(command, cwd=ROOT, env=plain_env(C_FORCE_ROOT="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        app.tasks["tta.quote"].delay(0).get(timeout=60)  # ready: it answered
    except celery.exceptions.TimeoutError:
        proc.kill()
        pytest.fail(f"the celery worker did not start:\n{proc.communicate()[0]}")
    return proc


@pytest.fixture(autouse=True)
def current_app() -> Iterator[None]:
    """The tests make the app under test the current one (see below): set back after."""
    current = get_current_app()
    yield
    current.set_current()


@pytest.fixture
def workers() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        stop_process(proc)


def producer_job(app: Celery, polls: int) -> list[Any]:
    """What a web request does with Celery: send tasks, read their results and states."""
    tasks = app.tasks
    with trace.get_tracer("tests").start_as_current_span("job"):
        quote = tasks["tta.quote"].delay(3)
        out: list[Any] = [quote.get(timeout=30), quote.state, quote.ready(), quote.successful()]
        charge = tasks["tta.charge"].delay(7, "250.00")
        try:
            charge.get(timeout=30)
        except PaymentDeclined as exc:
            out.append(exc)
        out += [charge.state, charge.ready(), charge.failed(), charge.result,
                tasks["tta.charge"].delay(8, "12.50").get(timeout=30)]
        # A built-in exception, read without raising it.
        out.append(tasks["tta.lookup"].delay("zz").get(timeout=30, propagate=False))
        # Polling ready() while the task runs, then reading it: as many polls as live.
        slow = tasks["tta.slow"].delay(0.1)
        polled = [slow.ready()]
        while not polled[-1] and len(polled) < polls:
            time.sleep(0.05)
            polled.append(slow.ready())
        out += [polled, slow.get(timeout=30), slow.state, slow.ready()]
        # A group, its results read back together.
        out.append(group(tasks["tta.charge"].s(i, "1") for i in range(3)).apply_async()
                   .get(timeout=30))
        return out


@pytest.mark.parametrize("backend", ["rpc", "redis"])
def test_a_producer_and_a_worker_over_rabbitmq_replay_with_the_broker_gone(
    backend: str, workers: list[subprocess.Popen[str]], tmp_path: Path
) -> None:
    app, attr, backend_url, serializer = SETUPS[backend]
    # The OTel instrumentation finds a sent task in the current app's registry (a task of
    # another app gets a producer span it never ends): the app under test is the current one,
    # as a process's only app is.
    app.set_current()
    worker = start_worker(app, attr, tmp_path / "worker")
    workers.append(worker)
    polls = 4 if backend == "rpc" else 100  # (see below: rpc's ready() stays false until get())
    with timetracer_otel.record(dir=tmp_path / "producer") as rec:
        live = producer_job(app, polls)
    output = stop_process(worker)
    app.close()  # the broker connections the recording left open, too

    quote = live[0]
    if serializer == "pickle":  # every type as the task returned it
        assert type(quote) is tuple and typed(quote[4]) == typed(("sku", 3))
        assert repr(quote[2].tzinfo) == "zoneinfo.ZoneInfo(key='Europe/Berlin')"
    else:  # JSON: kombu's own types come back typed, tuples as lists, a zone as its offset
        assert type(quote) is list and quote[4] == ["sku", 3]
        assert quote[2].utcoffset().total_seconds() == 7200
    assert type(quote[0]).__name__ == "Decimal" and str(quote[0]) == "59.970"
    assert quote[1].utcoffset().total_seconds() == 5.5 * 3600 and quote[3] == b"\x00\xffraw"
    assert live[1:4] == ["SUCCESS", True, True]
    assert typed(live[4]) == typed(PaymentDeclined(7, "insufficient funds",
                                                   type(quote[0])("250.00")))
    assert live[5:8] == ["FAILURE", True, True] and typed(live[8]) == typed(live[4])
    assert live[9] == "charged 8" and typed(live[10]) == typed(KeyError("zz"))
    polled = live[11]
    if backend == "redis":
        assert polled[0] is False and polled[-1] is True, polled
    # (rpc: Celery's rpc backend answers PENDING to state/ready() until get() consumes the
    # result message: the polls run out. Whatever live said, the replay must say it too.)
    assert live[12:] == [type(quote[0])("0.1"), "SUCCESS", True,
                         ["charged 0", "charged 1", "charged 2"]]

    # The broker's traffic (AMQP, untraced by any instrumentation) and the Redis backend's
    # reads are not in the cassette: the tasks sent are, on the instrumentation's spans.
    spans = [s for p in rec.paths for s in load_cassette(p).spans]
    assert not [s.name for s in spans if s.library == "redis"]
    sends = [s.name for s in spans if s.library == "celery" and s.kind == "PRODUCER"]
    assert sends[:3] == ["apply_async/tta.quote", "apply_async/tta.charge",
                         "apply_async/tta.charge"]

    # Replay: the worker is gone and the app's broker (and Redis backend) is a dead port; an
    # app made afresh, as a new process would, no connection left from the recording.
    port = unreachable_port()
    offline = make_app(f"tt_amqp_{backend}", backend_url.format(port=port), serializer,
                       broker=f"amqp://guest:guest@127.0.0.1:{port}//")
    offline.set_current()
    with connects_refused() as attempts, \
            timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = producer_job(offline, polls)
        gc.collect()  # (a result let go unsubscribes from its backend: not from a replayed one)
    assert attempts == []
    assert typed(replayed) == typed(live)
    assert rep.report.misses == [] and rep.report.unused == [] and rep.report.unsupported == []

    # The worker's side: one cassette per task run (the readiness probe's too), no Redis in
    # them, each run again by the CLI with the broker and the backend unreachable.
    runs = []
    for path in find_cassettes(tmp_path / "worker"):
        cassette = load_cassette(path)
        span = task_run_span(cassette)
        assert span is not None, f"not a task run: {path.name}\n{output}"
        assert not [s.name for s in cassette.spans if s.library == "redis"], path.name
        runs.append((span.request["task"], span.request["args"]))
    assert sorted(runs, key=repr) == sorted(
        [("tta.quote", [0]), ("tta.quote", [3]), ("tta.charge", [7, "250.00"]),
         ("tta.charge", [8, "12.50"]), ("tta.lookup", ["zz"]), ("tta.slow", [0.1])]
        + [("tta.charge", [i, "1"]) for i in range(3)], key=repr), output
    env = plain_env(PYTHONPATH=str(ROOT), TT_AMQP_BROKER=f"amqp://guest:guest@127.0.0.1:{port}//",
                    TT_AMQP_REDIS_BACKEND=f"redis://127.0.0.1:{port}/14")
    cli = timetracer_cli("replay", str(tmp_path / "worker"), "--celery", f"{MODULE}:{attr}",
                         "--strict", env=env)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "9 matched, 0 differ" in cli.stdout, cli.stdout


def refused_job(app: Celery) -> list[Any]:
    """A request that sends a task while the broker is down, then goes on in its own span."""
    with trace.get_tracer("tests").start_as_current_span("job") as span:
        out: list[Any] = []
        try:
            app.tasks["tta.charge"].delay(1, "5")
        except Exception as exc:
            out.append(exc)
        out.append(trace.get_current_span() is span)  # (no publish span left current)
        return out


@pytest.mark.parametrize(("backend", "gone"), [("rpc", "broker"), ("redis", "broker"),
                                              ("redis", "backend")])
def test_a_send_refused_while_recording_replays_as_the_same_error(
    backend: str, gone: str, tmp_path: Path
) -> None:
    """RabbitMQ down while recording: ``delay()`` raises kombu's OperationalError. With
    ``rpc://`` it comes as the backend declares its reply queue, before any publish; with Redis
    results the publish raises it, and Celery sends no ``after_task_publish`` to end the
    instrumentation's span. The Redis result backend down (RabbitMQ up): Celery's RuntimeError
    after the backend's reconnects, before any publish, its reads as it reconnects no call of
    the app's. Each time the error is kept, and the replay raises it again."""
    _, _, backend_url, serializer = SETUPS[backend]
    port = unreachable_port()
    dead_broker = f"amqp://guest:guest@127.0.0.1:{port}//"
    down = make_app(f"tt_amqp_{backend}",
                    backend_url.format(port=port if gone == "backend" else 6379), serializer,
                    broker=dead_broker if gone == "broker" else BROKER)
    down.set_current()
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = refused_job(down)
    expected = kombu.exceptions.OperationalError if gone == "broker" else RuntimeError
    assert type(live[0]) is expected and live[1] is True, live
    spans = [s for p in rec.paths for s in load_cassette(p).spans]
    assert [(s.library, s.error["type"].rpartition(":")[2]) for s in spans
            if s.library is not None] == [("celery", expected.__name__)]

    offline = make_app(f"tt_amqp_{backend}", backend_url.format(port=port), serializer,
                       broker=dead_broker)
    offline.set_current()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = refused_job(offline)
    assert attempts == []
    assert typed(replayed) == typed(live)
    assert rep.report.misses == [] and rep.report.unused == []
