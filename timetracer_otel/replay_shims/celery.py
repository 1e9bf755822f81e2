"""Celery: the tasks an app sends and the results it reads back, and the runs of a worker.

Producer side. The OTel instrumentation's ``apply_async/<task>`` span is current while kombu
publishes the task message: record keeps the task's name, args and kwargs there (and the
publish's error, if the broker refused it; the span, which Celery sends no signal to end after
a failed publish, is ended then). A broker error raised before any publish (``rpc://``
declares its reply queue on the broker first) is kept on a span of its own. Replay answers
``Celery.send_task`` (which ``delay``/``apply_async`` call) without a broker: the app gets an
``AsyncResult`` of a fresh id, or the recorded error. Reading the result back
(``AsyncResult.get``, and the backend lookups behind ``state``/``ready()``/``result``) is
recorded as the value, the task's exception, or the meta the backend answered, keyed by the
task it belongs to (its name, args and kwargs when this process sent it, else its id); replay
gives the same back, and ``get()`` raises the task's exception with its own class, as live.
While recording, the broker's and the result backend's own traffic (kombu's Redis commands,
result polling; RabbitMQ's, through py-amqp, has no instrumentation) runs untraced: replay
never makes it.

Worker side. The instrumentation's ``run/<task>`` span, current while the task runs, gets the
task's name, args and kwargs and its return value (or exception): a worker's recording holds
one cassette per task run, with every dependency call the task made.
:func:`timetracer_otel.tasks.replay_task` (CLI: ``timetracer-otel replay CASSETTE --celery
MODULE:APP``) runs that task again in-process, every dependency answered from the cassette,
and compares its outcome with the recorded one.

Values are stored with the typed codec (what the task serializer carried: JSON or pickle).
Groups: their results are read one by one while recording and replaying (``join`` instead of
the backend's native join), each keyed by its task. Not covered: chords (their header results
are joined on the worker through the backend), ``GroupResult.save``/``restore``,
``AsyncResult.forget``/``revoke``.
"""

from __future__ import annotations

import contextlib
import inspect
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace
from opentelemetry.instrumentation.utils import suppress_instrumentation

from timetracer_otel.codec import Tree, from_tree, to_tree
from timetracer_otel.config import Mode
from timetracer_otel.index import Match
from timetracer_otel.keys import Call
from timetracer_otel.replay_shims.base import (
    RECORD,
    STATE,
    Shim,
    capture,
    decide,
    error_tree,
    instantiate,
    rebuild_error,
    unsupported,
)

LIBRARY = "celery"
SCOPE = "opentelemetry.instrumentation.celery"

# Set while a replay sends a task it had no answer for live (on_miss="record"): the publish
# beneath keeps it, as a recording's does.
_KEEP_SEND: ContextVar[bool] = ContextVar("timetracer_celery_keep_send", default=False)

# Set while a recording's send_task runs: the publish beneath marks it when it kept the send,
# so a broker error raised before any publish (rpc:// declaring its reply queue) is kept too.
_PUBLISHING: ContextVar[list[bool] | None] = ContextVar("timetracer_celery_publishing",
                                                        default=None)

# The task each id this process sent belongs to: a result read later is keyed by its task.
_SENT: OrderedDict[str, Tree] = OrderedDict()
_SENT_MAX = 10_000
# The groups this process saved (GroupResult.save), by id: their ``as_tuple()`` and their
# results' ids, which restoring one is keyed by.
_SAVED: OrderedDict[str, tuple[Any, list[str]]] = OrderedDict()


def _replaying() -> bool:
    return STATE.mode is Mode.REPLAY and not STATE.is_live(LIBRARY)


def _task(name: str, args: Sequence[Any] | None, kwargs: dict[str, Any] | None) -> Tree:
    r = STATE.redactor
    task = r.arguments(to_tree(
        {"task": name, "args": list(args or ()), "kwargs": dict(kwargs or {})}))
    if task["args"]:
        params = _parameters(name)
        if params:  # secrets given by position: by the name of their parameter
            task["args"] = r.positional(task["args"], params)
    return r.scrub(task)


# The positional parameter names of each task this process knows, by task name.
_PARAMETERS: dict[str, tuple[str, ...]] = {}


def _parameters(name: str) -> tuple[str, ...]:
    """The names of a task's positional parameters (its ``run``'s, ``self`` of a bound task
    left out), from the current app's registry; none for a task it does not know."""
    known = _PARAMETERS.get(name)
    if known is not None:
        return known
    try:
        from celery import current_app

        task = current_app.tasks.get(name)
        if task is None:  # (not known here yet: looked up again next time)
            return ()
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        names = tuple(p.name for p in inspect.signature(task.run).parameters.values()
                      if p.kind in positional)
    except Exception:  # (a run without a signature, an app that cannot load its tasks)
        names = ()
    if len(_PARAMETERS) < 10_000:
        _PARAMETERS[name] = names
    return names


def _label(kind: str, name: str) -> str:
    return f"{kind} {name}"


def task_call(kind: str, name: str, args: Sequence[Any] | None,
              kwargs: dict[str, Any] | None, stored: dict[str, Any] | None = None) -> Call:
    """The :class:`Call` of sending (``kind`` "send") or running ("run") a task; ``stored``
    adds fields to its stored request that are not part of its key."""
    task = _task(name, args, kwargs)
    identity = {"kind": kind, **task}
    request = {**identity, **stored} if stored else identity
    return Call(LIBRARY, request, identity, {"kind": kind, "task": name}, _label(kind, name))


def _sent(task_id: str, send: Call) -> None:
    """Remember the task of ``task_id`` (the key tree of its send) for its result's key."""
    _SENT[task_id] = send.identity
    while len(_SENT) > _SENT_MAX:
        _SENT.popitem(last=False)


def _result_call(result: Any, what: str) -> Call:
    task = _SENT.get(result.id)
    # (not result.name: a property that reads the backend, through _get_task_meta, patched)
    name = task["task"] if isinstance(task, dict) else "?"
    identity = {"kind": what, "of": task if task is not None else {"id": result.id}}
    return Call(LIBRARY, identity, identity, {"kind": what, "task": name},
                _label(what, str(name)))


def outcome_tree(value: Any) -> Tree:
    """A value a task returned, or the exception a result holds in its place (a value the
    codec cannot carry is kept as its repr, and replaying it is refused: recording never
    breaks the app's call)."""
    if isinstance(value, BaseException):
        return {"exception": error_tree(value)}
    try:
        return {"value": to_tree(value)}
    except Exception:
        return {"unsupported": f"{type(value).__qualname__}: {value!r:.200}"}


def _value(tree: Tree) -> Any:
    if tree.get("exception") is not None:
        return _exception(tree["exception"])
    if tree.get("unsupported") is not None:
        raise unsupported(
            f"a Celery result was recorded as a value the cassette cannot carry "
            f"({tree['unsupported']}); register its type with timetracer_otel.codec.register.",
            f"Celery result {tree['unsupported']:.80}")
    return from_tree(tree.get("value"))


def _exception(tree: Tree) -> BaseException:
    """A task's exception again: its own class, or where its module is not importable here,
    the stand-in class Celery makes for it (as the live result did)."""
    return rebuild_error(tree, fallback=_stand_in)


def _stand_in(tree: Tree) -> BaseException:
    from celery.utils.serialization import create_exception_cls

    module, _, name = tree["type"].partition(":")
    cls = create_exception_cls(name.rpartition(".")[2], module)
    args = from_tree(tree["args"]) if tree.get("args") is not None else (tree["message"],)
    return instantiate(cls, *args)


# Meta fields kept apart: the result (a value or an exception), and the children (results of
# the tasks this one started, which the cache holds as AsyncResult objects).
_META_APART = ("result", "children")


def _meta_tree(meta: dict[str, Any] | None) -> Tree:
    if not meta:
        return None
    out = {}
    for k, v in meta.items():
        if k not in _META_APART:
            try:
                out[k] = to_tree(v)
            except Exception:  # (a field the codec cannot carry is left out)
                continue
    out["result"] = outcome_tree(meta.get("result"))
    return out


def _meta(result: Any, tree: Tree) -> dict[str, Any] | None:
    if tree is None:
        return None
    meta = {k: from_tree(v) for k, v in tree.items() if k != "result"}
    meta.update(task_id=result.id, result=_value(tree["result"]), children=[])
    return meta


def _decided(call: Call) -> Match | Any:
    # Not on the app's current span (the request's): this call has no span of its own here.
    with trace.use_span(trace.INVALID_SPAN, end_on_exit=False):
        return decide(call)


def _answer(match: Match) -> Tree:
    span = match.span
    if span.error is not None:
        raise rebuild_error(span.error)
    tree: Tree = span.response
    return tree


# --- sending ---------------------------------------------------------------------------------


def _send_task(original: Any) -> Any:
    signature = inspect.signature(original)

    def send_task(self: Any, name: str, args: Any = None, kwargs: Any = None,
                  *more: Any, **options: Any) -> Any:
        if STATE.mode is Mode.RECORD:
            return _recorded_send(original, self, name, args, kwargs, *more, **options)
        if not _replaying():
            return original(self, name, args, kwargs, *more, **options)
        if more:  # options given by position (countdown, eta, task_id...): by name
            bound = signature.bind(self, name, args, kwargs, *more, **options).arguments
            options = {**{k: v for k, v in bound.items()
                          if k not in ("self", "name", "args", "kwargs", "options")},
                       **bound.get("options", {})}
        call = task_call("send", name, args, kwargs)
        action = _decided(call)
        if not isinstance(action, Match):  # passthrough, or on_miss="record" (kept by the
            # publish): sent live, the broker's and the backend's plumbing untraced, as it is
            # while recording (a replay of the other libraries must not answer or refuse it)
            token = _KEEP_SEND.set(action is RECORD)
            try:
                with suppress_instrumentation():
                    return original(self, name, args, kwargs, **options)
            finally:
                _KEEP_SEND.reset(token)
        sent = _answer(action)  # (the recorded publish error, raised)
        # The id the recording's task had, so what the app does with it (stores it, returns it)
        # is as recorded; a fresh one when the recording has none.
        task_id = options.get("task_id") or sent.get("id") or str(uuid.uuid4())
        _sent(task_id, call)
        _chained(options.get("chain"), options.get("link"), options.get("link_error"))
        result = (options.get("result_cls") or self.AsyncResult)(task_id)
        task_type = options.get("task_type") or self.tasks.get(name)
        ignore = options.get("ignore_result")
        result.ignored = bool(getattr(task_type, "ignore_result", False) if ignore is None
                              else ignore)
        return result

    return send_task


def _recorded_send(original: Any, app: Any, name: str, args: Any, kwargs: Any, *more: Any,
                   **options: Any) -> Any:
    """A recording's send: kept by the publish beneath; a broker error raised before any
    publish (the ``rpc://`` backend declares its reply queue on the broker first) is kept
    here, on a span of its own, so a replay raises it as live did."""
    published: list[bool] = []
    token = _PUBLISHING.set(published)
    try:
        return original(app, name, args, kwargs, *more, **options)
    except Exception as exc:
        if not published:
            with contextlib.suppress(Exception):  # (recording never changes what the app sees)
                call = task_call("send", name, args, kwargs)
                if decide(call) is RECORD:
                    with capture(call, SCOPE) as cap:
                        cap.fail(exc)
        raise
    finally:
        _PUBLISHING.reset(token)


def _end_publish_span(name: str, task_id: str) -> None:
    """The instrumentation's ``apply_async`` span of a publish that raised, ended (and its
    context detached) as ``after_task_publish`` ends it: Celery sends no such signal for a
    failed publish, and the span, the broker's error recorded on it, would stay current in this
    context and never reach a cassette."""
    try:
        from opentelemetry.instrumentation.celery import utils

        task = utils.retrieve_task_from_sender({"sender": name})
        ctx = utils.retrieve_context(task, task_id, is_publish=True)
        if ctx is None:
            return
        ctx[1].__exit__(None, None, None)
        utils.detach_context(task, task_id, is_publish=True)
    except Exception:  # (another release of the instrumentation: its span is left as it is)
        pass


def _publish(original: Any) -> Any:
    def publish(self: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        headers = kwargs.get("headers") or {}
        name, task_id = headers.get("task"), headers.get("id")
        keep = _KEEP_SEND.get()
        if (STATE.mode is not Mode.RECORD and not keep) or name is None or task_id is None \
                or not isinstance(body, tuple) or len(body) < 2:
            return original(self, body, *args, **kwargs)
        call = task_call("send", name, body[0], body[1])
        if not keep and decide(call) is not RECORD:
            return original(self, body, *args, **kwargs)
        _sent(task_id, call)
        if len(body) > 2 and isinstance(body[2], dict):
            embed = body[2]
            _chained(embed.get("chain"), embed.get("callbacks"), embed.get("errbacks"))
        publishing = _PUBLISHING.get()
        if publishing is not None:
            publishing.append(True)
        with capture(call, SCOPE) as cap:
            try:
                with suppress_instrumentation():  # the broker's own traffic: replay never sends
                    out = original(self, body, *args, **kwargs)
            except Exception as exc:
                cap.fail(exc)
                if not cap.own:
                    _end_publish_span(name, task_id)
                raise
            cap.ok({"sent": True, "id": task_id})
            return out

    return publish


# --- results ---------------------------------------------------------------------------------


def _get(original: Any) -> Any:
    def get(self: Any, *args: Any, **kwargs: Any) -> Any:
        if STATE.mode is Mode.OFF or getattr(self, "ignored", False):
            return original(self, *args, **kwargs)
        call = _result_call(self, "result")
        action = _decided(call)
        if isinstance(action, Match):
            tree = _answer(action)
            meta = _meta(self, tree.get("meta"))
            if meta is not None:
                self._cache = meta
                if meta.get("status") in self.backend.READY_STATES:
                    self.on_ready(self)  # (what the backend's answer does live: then() callbacks)
            value = _value(tree["outcome"])
            if tree["outcome"].get("raised"):  # as the live get() did (the task's error, a timeout)
                raise value
            return value
        if action is not RECORD:  # (recording; or a replay's on_miss="record": kept too)
            return original(self, *args, **kwargs)
        with capture(call, SCOPE) as cap, suppress_instrumentation():
            try:
                value = original(self, *args, **kwargs)
            except Exception as exc:
                outcome = {**outcome_tree(exc), "raised": True}
                cap.ok({"outcome": outcome, "meta": _meta_tree(self._cache)})
                raise
            cap.ok({"outcome": outcome_tree(value), "meta": _meta_tree(self._cache)})
            return value

    return get


def _through_cassette(call: Call, live: Callable[[], Any], stored: Callable[[Any], Tree],
                      replayed: Callable[[Tree], Any]) -> Any:
    """A call no instrumentation makes a span for (a result read, a broadcast, a restore):
    ``replayed`` from its recorded answer, else ``live()``, recorded as ``stored`` makes it,
    Celery's own traffic beneath it untraced."""
    action = _decided(call)
    if isinstance(action, Match):
        return replayed(_answer(action))
    if action is not RECORD:
        return live()
    with capture(call, SCOPE) as cap, suppress_instrumentation():
        value = live()
        cap.ok(stored(value))
        return value


def _get_task_meta(original: Any) -> Any:
    def get_task_meta(self: Any) -> Any:
        # (inside a recorded get(), whose backend reads run untraced, decide() says LIVE)
        if STATE.mode is Mode.OFF or self._cache is not None:
            return original(self)

        def replayed(answer: Tree) -> Any:
            meta = _meta(self, answer["meta"])
            if meta is not None and meta["status"] in self.backend.READY_STATES:
                return self._set_cache(meta)
            return meta

        return _through_cassette(_result_call(self, "meta"), lambda: original(self),
                                 lambda meta: {"meta": _meta_tree(meta)}, replayed)

    return get_task_meta


def _worker_hello(original: Any) -> Any:
    """A worker's hello to the others as it starts (mingle): its own broadcast, outside every
    task run. Untraced, and live in a replay too (``decide`` leaves suppressed calls live)."""
    def send_hello(self: Any, *args: Any, **kwargs: Any) -> Any:
        if STATE.mode is Mode.OFF:
            return original(self, *args, **kwargs)
        with suppress_instrumentation():
            return original(self, *args, **kwargs)

    return send_hello


def _unrecorded(kind: str) -> bool:
    """A replay of cassettes that hold no call of this kind (``control``, ``restore``), as
    those recorded before session 25 do: the call runs as it did then (a broadcast goes to
    the broker, a restore reads the backend, whose read the cassette answers)."""
    if not _replaying() or STATE.index is None:
        return False
    return STATE.index.first(LIBRARY, lambda s: isinstance(s.request, dict)
                             and s.request.get("kind") == kind) is None


_BROADCAST_ARGS = ("arguments", "destination", "connection", "reply", "timeout", "limit",
                   "callback", "channel", "pattern", "matcher")


def _control_call(command: str, options: dict[str, Any]) -> Call:
    """A broadcast to the workers (``revoke``, ``rate_limit``, an ``inspect()`` query): its
    command, arguments and destination; a task id in the arguments (fresh in every run) is
    keyed by the task it was sent as, when this process sent it."""
    arguments = dict(options.get("arguments") or {})
    ids = arguments.get("task_id")
    if isinstance(ids, str):
        arguments["task_id"] = _SENT.get(ids, {"id": ids})
    elif isinstance(ids, list | tuple):
        arguments["task_id"] = [_SENT.get(i, {"id": i}) for i in ids]
    r = STATE.redactor
    identity = {"kind": "control", "command": command,
                "arguments": r.scrub(r.arguments(to_tree(arguments))),
                "destination": to_tree(options.get("destination")),
                "reply": bool(options.get("reply"))}
    return Call(LIBRARY, identity, identity, {"kind": "control", "task": command},
                _label("control", command))


def _broadcast(original: Any) -> Any:
    def broadcast(self: Any, command: str, *args: Any, **kwargs: Any) -> Any:
        """``Control.broadcast``, which ``revoke``, ``inspect()`` and the other worker
        controls send through: recorded with the workers' replies (none unless ``reply``),
        answered from the cassette in a replay, where it would reach for the broker."""
        if STATE.mode is Mode.OFF or _unrecorded("control"):
            return original(self, command, *args, **kwargs)
        options = dict(zip(_BROADCAST_ARGS, args, strict=False))
        options.update(kwargs)

        def replayed(answer: Tree) -> Any:
            replies = from_tree(answer["replies"])
            callback = options.get("callback")
            if callback is not None and replies:
                for one in replies:  # as the mailbox calls it, reply by reply
                    callback(one)
            return replies

        return _through_cassette(_control_call(command, options),
                                 lambda: original(self, command, *args, **kwargs),
                                 lambda replies: {"replies": to_tree(replies)}, replayed)

    return broadcast


_JOIN_NATIVE_ARGS = ("timeout", "propagate", "interval", "callback", "no_ack", "on_message",
                     "on_interval", "disable_sync_subtasks")


def _join_native(original: Any) -> Any:
    def join_native(self: Any, *args: Any, **kwargs: Any) -> Any:
        """A group's results read one by one (``join``, through each result's ``get()``)
        while recording or replaying, so each is kept by the task it belongs to; natively
        the backend reads them together under fresh ids (a Redis ``MGET``)."""
        kwargs.update(zip(_JOIN_NATIVE_ARGS, args, strict=False))
        if STATE.mode is Mode.OFF or (STATE.mode is Mode.REPLAY and not _replaying()) \
                or kwargs.get("on_message") is not None:
            return original(self, **kwargs)
        kwargs.pop("on_message", None)
        return self.join(**kwargs)

    return join_native


def _then(original: Any) -> Any:
    def then(self: Any, callback: Any, on_error: Any = None, weak: bool = False) -> Any:
        if not _replaying():
            return original(self, callback, on_error, weak)
        # (no backend to wait on: the callback runs when a replayed get() fills the result)
        return self.on_ready.then(callback, on_error)

    return then


# --- the worker ------------------------------------------------------------------------------


def _untraced(original: Any) -> Any:
    """Celery's plumbing, untraced while recording: the result backend storing a task's
    outcome (a replayed run stores nothing, so these calls are not the task's), or readying
    for the result of a task being sent (``on_task_call``: a Redis backend subscribes, and
    reads every pending result again as it reconnects to a server that went away; a replayed
    send makes no such call), a worker handling a control message (``revoke``, ``ping``; its
    revoke reads the task's state from the backend, outside every task run)."""
    def untraced(*args: Any, **kwargs: Any) -> Any:
        if STATE.mode is Mode.RECORD:
            with suppress_instrumentation():
                return original(*args, **kwargs)
        return original(*args, **kwargs)

    return untraced


# A result backend's own bookkeeping, which no replay needs (no worker counts a chord's parts
# or reads a saved group): untraced while recording (a worker's chord counting included),
# skipped in a replay; with the value a replay returns in its place.
_BOOKKEEPING = {"set_chord_size": None, "apply_chord": None, "on_chord_part_return": None,
                "add_to_chord": None, "forget": None, "save_group": "result",
                "delete_group": None}


def _backend_property(original: Any) -> Any:
    """``Celery.backend``: the app's result backend, its bookkeeping methods wrapped on the
    object the first time it is handed out (its class is imported from the backend URL,
    subclasses override the methods, and the app may have made it before the shim came)."""
    def backend(self: Any) -> Any:
        made = original.fget(self)
        try:
            if not vars(made).get("_timetracer_bookkeeping"):
                for name in _BOOKKEEPING:
                    method = getattr(made, name, None)
                    if method is not None:
                        setattr(made, name, _bookkeeping(made, name, method))
                restore = getattr(made, "restore_group", None)
                if restore is not None:
                    made.restore_group = _restore_group(made, restore)
                ready = getattr(made, "on_task_call", None)
                if ready is not None:
                    made.on_task_call = _untraced(ready)
                made._timetracer_bookkeeping = True
        except (TypeError, AttributeError):  # (an object without a __dict__: left as it is)
            pass
        return made

    return property(backend)


def _bookkeeping(backend: Any, name: str, method: Any) -> Any:
    from celery.backends.base import Backend

    native_chord = name == "apply_chord" and type(backend).apply_chord is not Backend.apply_chord

    def run(*args: Any, **kwargs: Any) -> Any:
        if name == "save_group" and len(args) > 1:
            # (its ids, not the result objects: those would live until the interpreter ends)
            group = args[1]
            _SAVED[str(args[0])] = (group.as_tuple(), [r.id for r in group.results])
            while len(_SAVED) > _SENT_MAX:
                _SAVED.popitem(last=False)
        if name == "apply_chord" and len(args) > 1:
            # A chord's callback is sent by the worker that ends its last part, never by
            # this process: its result is keyed by its task, from the signature.
            _later("chord", args[1])
        # (in a replay, a backend without native chords still sends its chord_unlock task:
        # a send, answered from the cassette like any other)
        if _replaying() and (name != "apply_chord" or native_chord):
            if _BOOKKEEPING[name] == "result":  # save_group(group_id, result) returns it
                return args[1] if len(args) > 1 else kwargs.get("result")
            return None
        if STATE.mode is Mode.RECORD:
            with suppress_instrumentation():
                return method(*args, **kwargs)
        return method(*args, **kwargs)

    return run


def _restore_group(backend: Any, method: Any) -> Any:
    """``GroupResult.restore``: the group a backend saved, read back. Keyed by the tasks of
    the group when this process saved it (its id is fresh in every run), else by its id (one
    the app kept, which its own replayed reads give back as recorded)."""
    from celery.result import result_from_tuple

    def restore_group(group_id: Any, *args: Any, **kwargs: Any) -> Any:
        if STATE.mode is Mode.OFF or _unrecorded("restore"):
            return method(group_id, *args, **kwargs)
        saved = _SAVED.get(str(group_id))
        of = ([_SENT.get(i, {"id": i}) for i in saved[1]] if saved is not None
              else {"id": str(group_id)})
        identity = {"kind": "restore", "of": of}
        call = Call(LIBRARY, identity, identity, {"kind": "restore", "task": "group"},
                    _label("restore", "group"))

        def replayed(answer: Tree) -> Any:
            tree = answer["group"]
            if tree is None:
                return None
            # The group as this run saved it (its ids), else as recorded.
            return result_from_tuple(saved[0] if saved is not None else from_tree(tree),
                                     backend.app)

        return _through_cassette(
            call, lambda: method(group_id, *args, **kwargs),
            lambda group: {"group": None if group is None else to_tree(group.as_tuple())},
            replayed)

    return restore_group


# Signatures made of others: their results are their parts' (a chain's last task's, a
# group's tasks'), each keyed by its own task; the composite's own id and options (fresh ids
# of its parts, reply queues) never enter a key.
_CANVAS = frozenset({"celery.chain", "celery.group", "celery.chord"})


def _later(kind: str, sig: Any) -> None:
    """Key the result of a task a worker will send (a chord's callback, a chain's next
    steps, a callback linked to a task) by its task, from its signature with the id frozen
    in it; a chain, group or chord by each of its parts."""
    if isinstance(sig, list | tuple):
        for one in sig:
            _later(kind, one)
        return
    if not isinstance(sig, dict):  # (a Signature is a dict)
        return
    task, options = sig.get("task"), sig.get("options") or {}
    if task in _CANVAS:
        parts = sig.get("kwargs") or {}
        _later(kind, parts.get("tasks"))  # a chain's steps, a group's tasks, a chord's header
        _later(kind, parts.get("body"))  # a chord's callback
        return
    task_id = options.get("task_id") if isinstance(options, dict) else None
    if isinstance(task, str) and isinstance(task_id, str):
        _sent(task_id, task_call(kind, task, sig.get("args"), sig.get("kwargs")))


def _chained(chain: Any, links: Any = None, errbacks: Any = None) -> None:
    """The steps of a chain after the task being sent, which the workers send in turn, and
    the callbacks linked to it (``link=``, ``link_error=``) whose ids are frozen."""
    _later("chain", chain)
    _later("link", links)
    _later("link", errbacks)


def _suppressed(fn: Any) -> Any:
    def untraced(*args: Any, **kwargs: Any) -> Any:
        with suppress_instrumentation():
            return fn(*args, **kwargs)

    return untraced


def _broker_client(original: Any) -> Any:
    """A Redis client kombu makes for the broker (a worker's consumer: polling, acks,
    restoring unacked messages, the pidbox): every command and pipeline it runs untraced, in
    every mode. It is Celery's plumbing, never a task's call; traced, it made cassettes of
    its own outside every task run. Set on the client, not its class, so the app's own Redis
    clients are traced as before."""
    def _create_client(self: Any, *args: Any, **kwargs: Any) -> Any:
        client = original(self, *args, **kwargs)
        client.execute_command = _suppressed(client.execute_command)
        pipeline = client.pipeline

        def untraced_pipeline(*a: Any, **k: Any) -> Any:
            pipe = pipeline(*a, **k)
            pipe.execute_command = _suppressed(pipe.execute_command)
            pipe.execute = _suppressed(pipe.execute)
            return pipe

        client.pipeline = untraced_pipeline
        return client

    return _create_client


def _on_postrun(sender: Any = None, task_id: Any = None, task: Any = None, args: Any = None,
                kwargs: Any = None, retval: Any = None, state: Any = None, **_: Any) -> None:
    """A task run ends: its request and outcome onto the instrumentation's ``run/`` span
    (this receiver is connected before the instrumentation's, so that span is still current)."""
    if STATE.mode is not Mode.RECORD or task is None:
        return
    try:
        # Which run of the task this was: replay_task runs it again as that one.
        request = getattr(task, "request", None)
        retries = getattr(request, "retries", 0) or 0
        stored: dict[str, Any] = {"id": task_id, "retries": retries}
        # What the worker sent after this run (a chain's next step, linked callbacks), so a
        # replay of the run sends it too (see tasks.replay_task).
        r = STATE.redactor
        for field, name in (("chain", "chain"), ("callbacks", "links"), ("errbacks", "errbacks")):
            sigs = getattr(request, field, None)
            if sigs:
                stored[name] = r.scrub(r.arguments(to_tree([dict(s) for s in sigs])))
        context = _context(request)
        if context:
            # (a value the codec cannot carry: the run is kept without its context)
            with contextlib.suppress(Exception):
                stored["context"] = r.scrub(r.arguments(to_tree(context)))
        call = task_call("run", task.name, args, kwargs, stored)
        if decide(call) is not RECORD:
            return
        with capture(call, SCOPE) as cap:
            cap.ok({"state": state, "outcome": outcome_tree(retval)})
    except Exception:  # recording never breaks the worker
        import logging

        logging.getLogger("timetracer_otel").warning(
            "timetracer-otel: could not record the run of %s", getattr(task, "name", task),
            exc_info=True)


# What a task may read of its request beyond its id and retries (kept above), as the worker
# set them: a replay runs it with the same (see tasks.replay_task), where ``Task.apply`` would
# give this machine's host name, no parent, its own root and no custom headers.
CONTEXT_FIELDS = ("hostname", "parent_id", "root_id", "group", "group_index", "correlation_id",
                  "reply_to", "delivery_info", "headers", "eta", "expires", "origin", "shadow",
                  "replaced_task_nesting")


def _context(request: Any) -> dict[str, Any]:
    """The run's request fields of :data:`CONTEXT_FIELDS` that are set; a custom header
    (``apply_async(headers=...)``) is also an attribute of the request, restored from
    ``headers``."""
    out = {}
    for name in CONTEXT_FIELDS:
        value = getattr(request, name, None)
        if value is not None:
            out[name] = dict(value) if name == "delivery_info" else value
    return out


def _on_child_shutdown(**_: Any) -> None:
    """A prefork pool's child is about to end with ``os._exit``, which skips ``atexit``:
    what it recorded is written now (see ``writer.finish_child``)."""
    from timetracer_otel.exporters.writer import finish_child

    finish_child()


class CeleryShim(Shim):
    library = LIBRARY
    requires = "celery"
    scope = SCOPE
    instrumentor = "opentelemetry.instrumentation.celery:CeleryInstrumentor"

    def patch(self) -> None:
        import celery.app.base
        import celery.app.control
        import celery.backends.base
        import celery.result
        import celery.worker.consumer.mingle
        import celery.worker.pidbox
        import kombu.messaging
        from celery import signals

        self.wrap(celery.app.base.Celery, "send_task", _send_task)
        self.wrap(kombu.messaging.Producer, "publish", _publish)
        self.wrap(celery.result.AsyncResult, "get", _get)
        self.wrap(celery.result.AsyncResult, "wait", _get)  # (an alias made with the class)
        self.wrap(celery.result.AsyncResult, "then", _then)
        self.wrap(celery.result.ResultSet, "join_native", _join_native)
        self.wrap(celery.result.AsyncResult, "_get_task_meta", _get_task_meta)
        self.wrap(celery.backends.base.Backend, "store_result", _untraced)
        self.wrap(celery.app.base.Celery, "backend", _backend_property)
        self.wrap(celery.app.control.Control, "broadcast", _broadcast)
        self.wrap(celery.worker.pidbox.Pidbox, "on_message", _untraced)
        self.wrap(celery.worker.consumer.mingle.Mingle, "send_hello", _worker_hello)
        try:
            import kombu.transport.redis
        except ImportError:  # (kombu's Redis transport needs redis-py)
            pass
        else:
            self.wrap(kombu.transport.redis.Channel, "_create_client", _broker_client)
        signals.task_postrun.connect(_on_postrun, weak=False)
        signals.worker_process_shutdown.connect(_on_child_shutdown, weak=False)

    def uninstall(self) -> None:
        from celery import signals

        signals.task_postrun.disconnect(_on_postrun)
        signals.worker_process_shutdown.disconnect(_on_child_shutdown)
        super().uninstall()

