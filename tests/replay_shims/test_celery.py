"""Celery with a real worker (a ``celery worker`` process) over the machine's Redis on
127.0.0.1:6379 as broker and result backend: the producer side (sending tasks, reading their
results) recorded, then replayed with every socket connect refused; a worker recorded through
the CLI, then each task run replayed again with its dependency (a uvicorn upstream) stopped."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import celery.exceptions
import pytest
import redis
from celery import chain, chord, group
from celery.result import GroupResult
from opentelemetry import trace
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import timetracer_otel
from tests.conftest import (
    SHARED_SERVICES,
    ServerThread,
    connects_refused,
    plain_env,
    stop_process,
    timetracer_cli,
    typed,
)
from tests.replay_shims import celery_app_changed
from tests.replay_shims.celery_app import (
    add,
    app,
    audited,
    fail,
    flaky,
    nap,
    notify,
    on_error,
    profile,
    quota,
    spawn,
    total,
)
from timetracer_otel.cassette import find_cassettes, load_cassette
from timetracer_otel.tasks import replay_task, task_run_span

pytestmark = SHARED_SERVICES  # (see tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]
DB = 14


@pytest.fixture
def clean_broker() -> Iterator[None]:
    """Database 14 of the real Redis, empty before and after (queued messages, results)."""
    try:
        admin = redis.Redis(port=6379, db=DB)
        admin.flushdb()
    except redis.ConnectionError as exc:  # fail, naming the service: never skip silently
        pytest.fail(f"Redis is needed on 127.0.0.1:6379 and is not reachable: {exc}")
    yield
    admin.flushdb()
    admin.close()


@pytest.fixture
def worker(clean_broker: None) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start a ``celery worker`` process (solo pool, or Celery's default prefork pool of two
    children) for the tests' app, optionally under ``timetracer-otel record --dir D``; it is
    ready once it has answered a task."""
    started: list[subprocess.Popen[str]] = []

    def start(record_dir: Path | None = None, prefork: bool = False) -> subprocess.Popen[str]:
        # The prefork worker also says hello to other workers at start-up (mingle: a
        # broadcast of its own, outside every task run).
        pool = ["--concurrency=2"] if prefork else ["--pool=solo", "--without-mingle"]
        command = [sys.executable, "-m", "celery", "-A", "tests.replay_shims.celery_app",
                   "worker", *pool, "--without-heartbeat", "--without-gossip",
                   "--loglevel=WARNING"]
        if record_dir is not None:
            command = [str(Path(sys.executable).parent / "timetracer-otel"), "record", "--dir",
                       str(record_dir), "--", *command]
        proc = subprocess.Popen(command, cwd=ROOT, env=plain_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        started.append(proc)
        try:
            assert add.delay(0, 0).get(timeout=60) == 0  # ready: it answered
        except celery.exceptions.TimeoutError:
            proc.kill()
            pytest.fail(f"the celery worker did not start:\n{proc.communicate()[0]}")
        return proc

    yield start
    for proc in started:
        stop_process(proc)


def producer_job() -> list[Any]:
    """What a web request does with Celery: send tasks, read their results and states."""
    with trace.get_tracer("tests").start_as_current_span("job"):
        sum_ = add.delay(2, 3)
        out: list[Any] = [sum_.get(timeout=30), sum_.state, sum_.successful()]
        failing = fail.apply_async((7,))
        try:
            failing.get(timeout=30)
        except ValueError as exc:
            out.append(exc)
        out += [failing.state, failing.get(timeout=30, propagate=False)]
        # The id the task had, and the meta the backend gave (name and args, result_extended).
        out += [sum_.id, sum_.name, sum_.args]
        # A result this process did not send: it only knows the id a task returned.
        child = app.AsyncResult(spawn.delay(4).get(timeout=30))
        out += [child.get(timeout=30), child.state]
        # A group, read back together.
        out.append(group(add.s(i, i) for i in range(3)).apply_async().get(timeout=30))
        # An exception class this process never imported: Celery's stand-in for it (a class
        # it makes, in celery.exceptions), as live.
        try:
            quota.delay(7).get(timeout=30)
        except Exception as exc:
            out.append((type(exc).__module__, type(exc).__qualname__, exc.args))
        # A chord (its callback sent by the worker that ends its last part) and a chain (its
        # next step sent by the worker of the first): results of tasks this process never
        # sent, keyed by their tasks from the signatures. The chord's counter and a saved
        # group are the backend's bookkeeping, untraced and not replayed.
        out.append(chord([add.s(3, 4), add.s(5, 6)])(total.s()).get(timeout=30))
        steps = chain(add.s(1, 2), add.s(10))()
        out += [steps.get(timeout=30), steps.parent.get(timeout=30)]
        saved = group(add.s(5, 5), add.s(6, 6)).apply_async()
        out += [saved.save() is saved, saved.get(timeout=30)]
        # Composites of composites: a chord whose callback is a chain, a chain through a
        # group; and a callback linked to a task, its id frozen beforehand.
        out.append(chord([add.s(7, 8), add.s(9, 10)])(chain(total.s(), add.s(100))).get(timeout=30))
        out.append(chain(add.s(2, 2), group(add.s(1), add.s(2)), total.s())().get(timeout=30))
        linked = add.s(1000)
        linked.freeze()
        out += [add.apply_async((20, 30), link=linked).get(timeout=30),
                app.AsyncResult(linked.id).get(timeout=30)]
        return out


def test_sending_tasks_and_reading_results_replay_without_a_broker(
    worker: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    worker()
    with timetracer_otel.record(dir=tmp_path) as rec:
        live = producer_job()
    assert live[:3] == [5, "SUCCESS", True] and typed(live[3]) == typed(ValueError("bad input 7"))
    assert live[4] == "FAILURE" and type(live[5]) is ValueError
    assert live[7:] == ["tt.add", [2, 3], 8, "SUCCESS", [0, 2, 4],
                        ("celery.exceptions", "QuotaExceeded", ("user 7 is over quota", 7)),
                        18, 13, 3, True, [10, 12], 134, 11, 50, 1050]
    assert "tests.replay_shims.celery_errors" not in sys.modules  # (only the worker has it)
    # No broker, no result backend, no worker: every connect is refused.
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = producer_job()
    assert attempts == []
    assert typed(replayed) == typed(live)
    assert rep.report.misses == [] and rep.report.unused == []
    # The stand-in Celery makes for a class it cannot import is what live gave: nothing refused.
    assert rep.report.unsupported == [] and not rep.report.failed(misses_fail=True)
    # The sends sit on the instrumentation's producer spans; the broker's own Redis traffic
    # (kombu's LPUSH...) and the backend's result reads are not in the cassette.
    spans = [s for p in rec.paths for s in load_cassette(p).spans]
    sends = [s.name for s in spans if s.library == "celery" and s.kind == "PRODUCER"]
    assert sends[:3] == ["apply_async/tt.add", "apply_async/tt.fail", "apply_async/tt.spawn"]
    assert not [s for s in spans if s.library == "redis"]


def test_secrets_in_task_arguments_stay_out_of_the_cassette(
    worker: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    worker()

    def job() -> list[int]:
        # By keyword, and by position (redacted by the name of the task's parameter).
        return [notify.delay(7, token="tok-S3cret-123", api_key="key-S3cret-456").get(timeout=30),
                notify.delay(8, "tok-S3cret-789", "key-S3cret-012").get(timeout=30)]

    with timetracer_otel.record(dir=tmp_path) as rec:
        assert job() == [7, 8]
    raw = b"".join(Path(p).read_bytes() for p in rec.paths)
    for secret in (b"tok-S3cret-123", b"key-S3cret-456", b"tok-S3cret-789", b"key-S3cret-012"):
        assert secret not in raw
    sent = [s.request for p in rec.paths for s in load_cassette(p).spans
            if s.library == "celery" and s.kind == "PRODUCER"]
    assert [r["args"][0] for r in sent] == [7, 8]  # the user id is no secret: kept
    with connects_refused(), timetracer_otel.replay(rec.paths, strict=True) as rep:
        assert job() == [7, 8]
    assert rep.report.misses == [] and rep.report.unused == []


def test_on_miss_record_keeps_a_new_send_and_its_result(
    worker: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    proc = worker()
    with timetracer_otel.record(dir=tmp_path):
        assert add.delay(2, 3).get(timeout=30) == 5
    # A changed job sends one task more: on_miss="record" sends it live and keeps it.
    with timetracer_otel.replay(tmp_path, on_miss="record") as rep:
        assert [add.delay(2, 3).get(timeout=30), add.delay(5, 5).get(timeout=30)] == [5, 10]
    assert rep.report.misses == ["send tt.add", "result tt.add"]
    assert len(rep.written) == 1  # an appended-... cassette beside the first
    stop_process(proc)  # no worker, no broker: both calls now answer from the cassettes
    with connects_refused() as attempts, timetracer_otel.replay(tmp_path, strict=True) as again:
        assert [add.delay(2, 3).get(timeout=30), add.delay(5, 5).get(timeout=30)] == [5, 10]
    assert attempts == [] and again.report.misses == [] and again.report.unused == []


def test_send_task_with_options_by_position_replays_without_a_broker(
    worker: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    worker()

    def job() -> list[Any]:  # Celery.send_task(name, args, kwargs, countdown, eta, task_id)
        result = app.send_task("tt.add", (2, 3), None, 0, None, "fixed-id-1")
        return [result.id, result.get(timeout=30)]

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job()
    assert live == ["fixed-id-1", 5] and typed(replayed) == typed(live)
    assert attempts == [] and rep.report.misses == [] and rep.report.unused == []


def test_a_task_sent_differently_is_a_miss(
    worker: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    worker()
    with timetracer_otel.record(dir=tmp_path) as rec:
        assert add.delay(2, 3).get(timeout=30) == 5
    with connects_refused(), timetracer_otel.replay(rec.paths, strict=True), \
            pytest.raises(timetracer_otel.ReplayMissError) as miss:
        add.delay(2, 4)
    assert "send tt.add" in str(miss.value) and "[2, 3]" in str(miss.value).replace("'", "")


def test_worker_controls_replay_without_a_broker(
    worker: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    """revoke (of a task this run sent, by its fresh id), an inspect() query and a control
    that asks for replies go to the workers through the broker: recorded with the replies,
    answered from the cassette with the worker gone and every connect refused."""
    proc = worker()

    def job() -> list[Any]:
        with trace.get_tracer("tests").start_as_current_span("job"):
            sent = add.delay(4, 4)
            out: list[Any] = [sent.get(timeout=30), sent.revoke()]
            out.append(app.control.revoke([sent.id], terminate=False))
            out.append(app.control.inspect(timeout=5).ping())
            out.append(app.control.rate_limit("tt.add", "100/m", reply=True, timeout=5))
            return out

    with timetracer_otel.record(dir=tmp_path) as rec:
        live = job()
    assert live[:3] == [8, None, None]
    ((name, pong),) = live[3].items()  # one worker answered the ping
    assert name.startswith("celery@") and pong == {"ok": "pong"}
    assert live[4] == [{name: {"ok": "new rate limit set successfully"}}]
    stop_process(proc)
    app.close()  # the broker connections the recording left open, too
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job()
    assert attempts == []
    assert typed(replayed) == typed(live)
    assert rep.report.misses == [] and rep.report.unused == []


def test_cassettes_without_controls_let_a_broadcast_go_to_the_broker_as_before(
    worker: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    """Cassettes recorded before broadcasts were recorded hold none: a replay of them sends
    a revoke to the broker as it did then, instead of missing."""
    worker()
    with timetracer_otel.record(dir=tmp_path) as rec:
        assert add.delay(1, 1).get(timeout=30) == 2
    with timetracer_otel.replay(rec.paths, strict=True) as rep:
        sent = add.delay(1, 1)
        assert sent.get(timeout=30) == 2
        sent.revoke()  # (the broker is up: it goes there)
    assert rep.report.misses == [] and rep.report.unused == []


def test_a_restored_group_replays_without_a_broker(
    worker: Callable[..., subprocess.Popen[str]], tmp_path: Path
) -> None:
    """GroupResult.restore of a group this run saved (a fresh id each run), and of one an
    earlier run saved and the app kept the id of: answered from the cassette offline."""
    proc = worker()
    with timetracer_otel.record(dir=tmp_path / "earlier"):
        earlier = group(add.s(i, 1) for i in range(2)).apply_async()
        earlier.save()
        assert earlier.get(timeout=30) == [1, 2]

    def job(kept: str) -> list[Any]:
        with trace.get_tracer("tests").start_as_current_span("job"):
            saved = group(add.s(i, i) for i in range(3)).apply_async()
            saved.save()
            back = GroupResult.restore(saved.id, app=app)
            old = GroupResult.restore(kept, app=app)
            return [type(back).__name__, back.id == saved.id,
                    [r.id for r in back.results] == [r.id for r in saved.results],
                    back.get(timeout=30), type(old).__name__, old.id, old.get(timeout=30),
                    GroupResult.restore("never-saved", app=app)]

    with timetracer_otel.record(dir=tmp_path / "job") as rec:
        live = job(earlier.id)
    assert live == ["GroupResult", True, True, [0, 2, 4], "GroupResult", earlier.id, [1, 2], None]
    stop_process(proc)
    app.close()  # the broker connections the recording left open, too
    with connects_refused() as attempts, timetracer_otel.replay(rec.paths, strict=True) as rep:
        replayed = job(earlier.id)  # (the id as the app's own replayed read gives it back)
    assert attempts == []
    assert typed(replayed) == typed(live)
    assert rep.report.misses == [] and rep.report.unused == []


@pytest.fixture
def upstream() -> Iterator[ServerThread]:
    async def user(request: Request) -> JSONResponse:
        uid = int(request.path_params["uid"])
        return JSONResponse({"name": f"user {uid}", "score": 1.25 * uid, "tags": ["b", "a"]})

    server = ServerThread(Starlette(routes=[Route("/users/{uid}", user)])).start()
    yield server
    server.stop()


def test_a_recorded_worker_runs_its_tasks_again_offline(
    worker: Callable[..., subprocess.Popen[str]], upstream: ServerThread, tmp_path: Path
) -> None:
    cassettes = tmp_path / "worker"
    proc = worker(record_dir=cassettes)
    live = [profile.delay(4, upstream.url).get(timeout=30), add.delay(2, 3).get(timeout=30),
            flaky.delay(3).get(timeout=30)]
    with pytest.raises(ValueError, match="bad input 9"):
        fail.delay(9).get(timeout=30)
    output = stop_process(proc)
    upstream.stop()  # the task's dependency is gone for the replay
    assert live == [{"id": 4, "name": "User 4", "score": 10.0, "tags": ["a", "b"]}, 5, 30]
    runs: dict[str, Path] = {}
    for path in find_cassettes(cassettes):
        span = task_run_span(load_cassette(path))
        if span is not None and span.request["args"] != [0, 0]:  # (the readiness probe)
            runs[f"{span.request['task']}#{span.request['retries']}"] = path
    # flaky ran twice: its first attempt retried, its second returned.
    assert sorted(runs) == ["tt.add#0", "tt.fail#0", "tt.flaky#0", "tt.flaky#1",
                            "tt.profile#0"], output
    # Each run holds its own dependency calls: the profile run its HTTP call, no Redis.
    calls = load_cassette(runs["tt.profile#0"]).interactions
    assert [(c.library, c.kind) for c in calls] == [("celery", "CONSUMER"), ("httpx", "CLIENT")]
    with connects_refused() as attempts:
        results = {name: replay_task(path, app, strict=True) for name, path in runs.items()}
    assert attempts == []
    for name, result in results.items():
        assert result.ok, (name, result.render())
    assert results["tt.profile#0"].report.exact == 1
    # A task whose code changed gives another outcome: the replay says what differs.
    changed = replay_task(runs["tt.add#0"], celery_app_changed.app)
    assert not changed.ok and changed.diff == ["value: recorded 5, now 6"]
    # The CLI runs every task run of the directory: exit 0 when all match, 1 when one differs.
    cli = timetracer_cli("replay", str(cassettes), "--celery", "tests.replay_shims.celery_app:app",
                         env=plain_env(PYTHONPATH=str(ROOT)))
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "6 matched, 0 differ" in cli.stdout
    cli = timetracer_cli("replay", str(runs["tt.add#0"]), "--celery",
                         "tests.replay_shims.celery_app_changed:app", env=plain_env(PYTHONPATH=str(ROOT)))
    assert cli.returncode == 1 and "value: recorded 5, now 6" in cli.stdout
    cli = timetracer_cli("replay", str(cassettes), "--celery", "no_such_module:app",
                         env=plain_env(PYTHONPATH=str(ROOT)))
    assert cli.returncode == 2 and "cannot import 'no_such_module'" in cli.stderr


def test_a_replayed_run_reads_its_request_as_the_worker_set_it(
    worker: Callable[..., subprocess.Popen[str]], upstream: ServerThread, tmp_path: Path
) -> None:
    """A task that reads its request (custom header, root and parent ids, the worker's host
    name, the queue) and sends part of it to its dependency replays with the values the worker
    gave it, not those of an eager run here."""
    cassettes = tmp_path / "worker"
    proc = worker(record_dir=cassettes)
    alone = audited.apply_async((3, upstream.url), headers={"tenant": "acme"})
    first = add.si(1, 2)
    chained = chain(first, audited.si(4, upstream.url)).apply_async()
    live = {"alone": alone.get(timeout=30), "chained": chained.get(timeout=30)}
    stop_process(proc)
    upstream.stop()
    assert live["alone"]["tenant"] == "acme" and live["alone"]["headers"]["tenant"] == "acme"
    assert live["alone"]["root"] == alone.id and live["alone"]["host"].startswith("celery@")
    assert live["chained"]["parent"] == chained.parent.id and live["chained"]["queue"] == "celery"
    runs = {}
    for path in find_cassettes(cassettes):
        span = task_run_span(load_cassette(path))
        if span is not None and span.request["task"] == "tt.audited":
            runs[span.request["args"][0]] = path
    assert sorted(runs) == [3, 4]
    with connects_refused() as attempts:
        results = {n: replay_task(runs[n], app, strict=True) for n in (3, 4)}
    assert attempts == []
    for n, result in results.items():
        assert result.ok, (n, result.render())
        assert result.report.exact == 1


def test_a_prefork_worker_records_the_runs_of_its_children(
    worker: Callable[..., subprocess.Popen[str]], upstream: ServerThread, tmp_path: Path
) -> None:
    """Celery's default pool forks its children after OpenTelemetry is set up, and they end
    with os._exit: each child writes its own task runs, and the broker's traffic of the main
    process (polling, acks, restoring unacked messages, control messages) makes no cassette."""
    cassettes = tmp_path / "prefork"
    proc = worker(record_dir=cassettes, prefork=True)
    live = [profile.delay(i, upstream.url).get(timeout=30) for i in (1, 2, 3)]
    # A chord: the worker counts its parts in the result backend (its bookkeeping, untraced).
    assert chord([add.s(3, 4), add.s(5, 6)])(total.s()).get(timeout=30) == 18
    # A chain: the run of its first step sends the next, and so does its replay; a failed
    # run sends its link_error callback.
    assert chain(add.s(1, 2), add.s(10))().get(timeout=30) == 13
    errback = on_error.s()
    errback.freeze()
    failed = fail.apply_async((5,), link_error=errback)
    assert isinstance(failed.get(timeout=30, propagate=False), ValueError)
    assert app.AsyncResult(errback.id).get(timeout=30) == failed.id
    # Control messages the worker handles (its revoke reads the task's state from the
    # backend) are its plumbing too: no cassette.
    later = add.apply_async((7, 7), countdown=3)
    later.revoke()
    assert app.control.inspect(timeout=5).ping()
    assert later.get(timeout=30, propagate=False).__class__.__name__ == "TaskRevokedError"
    # A run ended under it (its child terminated) has no outcome to compare.
    napping = nap.delay(30)
    deadline = time.monotonic() + 20
    while not any(app.control.inspect(timeout=2).active().values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    napping.revoke(terminate=True)
    assert napping.get(timeout=30, propagate=False).__class__.__name__ == "TaskRevokedError"
    output = stop_process(proc)
    upstream.stop()
    runs: dict[int, Path] = {}
    others: list[Path] = []
    ended: list[Path] = []
    for path in find_cassettes(cassettes):
        cassette = load_cassette(path)
        span = task_run_span(cassette)
        assert span is not None, f"not a task run: {path.name}\n{output}"
        assert not [s.name for s in cassette.spans if s.library == "redis"], path.name
        if span.request["task"] == "tt.nap":
            ended.append(path)
            with pytest.raises(timetracer_otel.CassetteError, match="never finished"):
                replay_task(path, app)
            cli = timetracer_cli("replay", str(path), "--celery", "tests.replay_shims.celery_app:app",
                                 env=plain_env(PYTHONPATH=str(ROOT)))
            assert cli.returncode == 2 and "holds no recorded task run" in cli.stderr, cli.stderr
            continue
        if span.request["task"] == "tt.profile":
            runs[span.request["args"][0]] = path
        elif span.request["args"] != [0, 0]:  # (the readiness probe)
            others.append(path)
    assert sorted(runs) == [1, 2, 3], output
    assert len(ended) == 1, output  # (the terminated run's cassette, refused above)
    assert sorted(task_run_span(load_cassette(p)).request["task"] for p in others) == [  # type: ignore[union-attr]
        "tt.add", "tt.add", "tt.add", "tt.add", "tt.fail", "tt.on_error", "tt.total"]
    with connects_refused() as attempts:
        replayed = [replay_task(p, app, strict=True) for p in others]
    assert attempts == []
    for result in replayed:
        assert result.ok, result.render()
    with connects_refused() as attempts:
        results = [replay_task(runs[i], app, strict=True) for i in (1, 2, 3)]
    assert attempts == []
    for result in results:
        assert result.ok and result.report.exact == 1, result.render()
    assert [r["name"] for r in live] == ["User 1", "User 2", "User 3"]
