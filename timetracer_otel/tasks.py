"""Replaying a recorded task run (Celery) as a regression test.

A worker recording holds one cassette per task run: the instrumentation's ``run/<task>`` span
with the task's name, args, kwargs and outcome, and beneath it every dependency call the task
made. :func:`replay_task` runs the same task again in this process (``Task.apply``), with every
dependency answered from that cassette, and compares its outcome (state, return value with its
types, or exception class and message) with the recorded one::

    >>> result = replay_task("cassettes/2026-11-29/run_shop.tasks.charge__4bf9....msgpack", app)
    >>> assert result.ok, "\\n".join(result.diff)

``timetracer-otel replay CASSETTES --celery MODULE:APP`` does it for every task-run cassette
of a file or directory: exit 0 when all match, 1 when one differs, 2 on bad input.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import click
import msgspec

from timetracer_otel.cassette import Cassette, SpanRecord
from timetracer_otel.codec import Tree, from_tree
from timetracer_otel.config import OnMiss
from timetracer_otel.errors import CassetteError, ConfigError, ReplayMissError, TimetracerError
from timetracer_otel.inbound import ReplayedRun, _load, _miss_messages, command_inputs, load_app
from timetracer_otel.index import ReplayIndex, ReplayReport
from timetracer_otel.keys import field_diff
from timetracer_otel.replay_shims.celery import outcome_tree
from timetracer_otel.runtime import replay


class TaskResult(ReplayedRun):
    """The outcome of running one recorded task again: ``ok`` when its outcome matches the
    recording and no dependency call missed."""


def task_run_span(cassette: Cassette) -> SpanRecord | None:
    """The span that carries a recorded task run (the cassette's root, normally)."""
    for span in cassette.spans:
        if span.library == "celery" and span.kind == "CONSUMER" and span.request is not None:
            return span
    return None


def _error_text(tree: Tree) -> str:
    return "no exception" if tree is None else f"{tree['type']}: {tree['message']}"


def _compare(span: SpanRecord, state: str, value: Any, report: ReplayReport,
             misses_fail: bool) -> list[str]:
    diff: list[str] = []
    misses = _miss_messages(value) if isinstance(value, BaseException) else []
    for text in misses:
        diff.extend(f"dependency {line}" if i == 0 else line for i, line in enumerate(text.splitlines()))
    if misses:
        return diff
    if misses_fail:
        diff.extend(f"dependency miss: {label}" for label in report.misses)
    response = span.response or {}
    if response.get("state") != state:
        diff.append(f"state: recorded {response.get('state')}, now {state}")
    recorded = response.get("outcome") or {}
    now = outcome_tree(value)
    if "exception" in recorded or "exception" in now:
        old, new = recorded.get("exception"), now.get("exception")
        if old is None or new is None or old["type"] != new["type"] or old["message"] != new["message"]:
            diff.append(f"exception: recorded {_error_text(old)}, now {_error_text(new)}")
        return diff
    diff.extend(field_diff(recorded, now))  # ("value...", or a value kept as its repr)
    return diff


@contextlib.contextmanager
def _one_attempt(task: Any) -> Iterator[None]:
    """``task.retry()`` does what it does on a worker: it sends the next attempt (answered
    from the cassette, as every send is) and ends this run with ``Retry``, instead of running
    that attempt at once as an eager ``apply`` does: it is another recorded run."""
    from celery.exceptions import Retry

    original = task.retry

    def retry(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except Retry as exc:
            if exc.sig is not None:
                exc.sig.apply_async()
                exc.sig = None
            raise

    task.retry = retry
    try:
        yield
    finally:
        del task.retry


def _dispatch(app: Any, request: Any, value: Any) -> None:
    """What a worker sends after a run that succeeded, and an eager ``apply`` does not: the
    callbacks linked to it and the next step of its chain, with the value it returned (sends
    answered from the cassette, as every send is)."""
    from celery import signature

    parent = {"parent_id": request.get("id")}
    for link in from_tree(request.get("links")) or ():
        signature(link, app=app).apply_async((value,), **parent)
    chain = from_tree(request.get("chain"))
    if chain:
        signature(chain[-1], app=app).apply_async((value,), chain=chain[:-1], **parent)


def _dispatch_errbacks(app: Any, request: Any) -> None:
    """What a worker sends after a run that failed: the ``link_error`` callbacks that take
    the task id alone, as one group, as Celery's backend sends them (those that take the
    request, exception and traceback run inline there, and send nothing)."""
    from celery import group, signature
    from celery.utils.functional import arity_greater

    old = []
    for errback in from_tree(request.get("errbacks")) or ():
        sig = signature(errback, app=app)
        task = app.tasks.get(sig.task)
        header = getattr(task, "__header__", None)
        if header is None or not arity_greater(header, 1):
            old.append(sig)
    if old:
        task_id = request.get("id")
        group(old, app=app).apply_async((task_id,), parent_id=task_id)


@contextlib.contextmanager
def _as_recorded(task: Any, context: Any) -> Iterator[None]:
    """The run's request as the worker set it (host name, parent and root ids, group,
    delivery info, custom headers...; see ``celery.CONTEXT_FIELDS``), set when the task
    starts (``task_prerun``), where ``Task.apply`` has set this machine's. ``is_eager`` stays
    true: the run is in this process."""
    from celery.signals import task_prerun

    fields = from_tree(context) if context else None
    if not fields:
        yield
        return

    def restore(sender: Any = None, **_: Any) -> None:
        if sender is task:
            task.request.update(fields)
            task.request.update(fields.get("headers") or {})

    task_prerun.connect(restore, weak=False)
    try:
        yield
    finally:
        task_prerun.disconnect(restore)


def replay_task(cassette: Cassette | str | Path, app: Any, *, on_miss: str = "error",
                strict: bool = False, live: Iterable[str] = ()) -> TaskResult:
    """Run the recorded task of ``cassette`` again with ``app``'s task of that name, every
    dependency answered from the cassette (but those of the libraries ``live`` names), and
    compare the outcome with the recorded one."""
    loaded, source = _load(cassette)
    span = task_run_span(loaded)
    if span is None:
        raise CassetteError(
            f"{source} holds no recorded task run; record a worker (e.g. timetracer-otel record "
            "-- celery -A app worker --pool=solo)."
        )
    if not _has_outcome(span):
        raise CassetteError(
            f"{source} holds a task run that never finished (its worker process was ended "
            "under it: revoke(terminate=True), a time limit); there is no outcome to compare."
        )
    request = span.request
    name = request["task"]
    task = app.tasks.get(name)
    if task is None:
        raise ConfigError(f"the Celery app {getattr(app, 'main', app)!r} has no task {name!r}; "
                          "point --celery at the app that defines it.")
    args, kwargs = from_tree(request["args"]), from_tree(request["kwargs"])
    calls = msgspec.structs.replace(loaded, spans=[s for s in loaded.spans if s is not span])
    rep = replay(ReplayIndex([(source, calls)], strict=strict), on_miss=on_miss, live=live)
    # this run, as the worker ran it (its id, its retry count, its request's context)
    with rep, _one_attempt(task), _as_recorded(task, request.get("context")):
        eager = task.apply(args=args, kwargs=kwargs, task_id=request.get("id"),
                           retries=request.get("retries") or 0)
        if eager.state == "SUCCESS":
            _dispatch(app, request, eager.result)
        elif eager.state == "FAILURE":
            _dispatch_errbacks(app, request)
    state, value = eager.state, eager.result
    report = rep.report
    diff = _compare(span, state, value, report, misses_fail=rep.on_miss is OnMiss.ERROR)
    notes = [f"recorded call not made: {label}" for label, _ in report.unused]
    if strict and notes:
        diff.extend(notes)
        notes = []
    ok = not diff and not report.failed(rep.on_miss is OnMiss.ERROR)
    return TaskResult(ok=ok, label=f"{name} [trace {span.trace_id[:8]}]", diff=diff,
                      report=report, source=source, notes=notes)


def _has_outcome(span: SpanRecord) -> bool:
    """Whether a recorded task run ended with an outcome (not one whose worker process was
    ended under it)."""
    return (span.response or {}).get("state") is not None


def _finished_run(cassette: Cassette) -> bool:
    span = task_run_span(cassette)
    return span is not None and _has_outcome(span)


def replay_task_command(source: str, app_ref: str, *, on_miss: str, strict: bool,
                        live: Iterable[str] = ()) -> int:
    """``timetracer-otel replay PATH --celery MODULE:APP``: 0 all match, 1 differ, 2 bad input."""
    inputs = command_inputs(source, lambda: load_app(app_ref, "--celery"), _finished_run,
                            "recorded task run; record a worker first")
    if inputs is None:
        return 2
    app, runs, skipped = inputs
    failed = 0
    for path, cassette in runs:
        try:
            result = replay_task(cassette, app, on_miss=on_miss, strict=strict, live=live)
        except ReplayMissError as exc:  # raised outside the task (cannot normally happen)
            failed += 1
            click.echo(f"DIFF {path}: {exc}")
            continue
        except TimetracerError as exc:
            click.echo(f"timetracer-otel: {path}: {exc}", err=True)
            return 2
        result.source = path
        failed += not result.ok
        if not result.ok or len(runs) <= 50:
            click.echo(result.render())
    tail = f", {skipped} without a task run skipped" if skipped else ""
    click.echo(f"timetracer-otel: {len(runs) - failed} matched, {failed} differ{tail}")
    return 1 if failed else 0
