"""Replay a recorded inbound request into an ASGI app, and compare what it answers.

The recorded scope and ``http.request`` messages are sent into the app in-process, while
every dependency call is answered from the same cassette; the new response (status, headers,
body; JSON-aware) is compared with the recorded one::

    >>> result = replay_asgi("cassettes/2026-11-26/POST__orders_id__4bf92f35.msgpack", app)
    >>> result.ok, result.label
    (False, 'POST /orders/{id} [trace 4bf92f35]')
    >>> print("\\n".join(result.diff))
    body.total: recorded 30, now 31

``timetracer-otel replay PATH --asgi MODULE:APP`` and ``timetracer-otel diff A B`` are the
command-line faces of this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib
import os
import re
import sys
import threading
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec

from timetracer_otel.cassette import Cassette, SpanRecord, find_cassettes, load_cassette
from timetracer_otel.codec import Tree, as_bytes
from timetracer_otel.config import OnMiss
from timetracer_otel.errors import (
    CassetteError,
    ConfigError,
    ReplayMissError,
    ReplayUnsupportedError,
    TimetracerError,
)
from timetracer_otel.index import ReplayIndex, ReplayReport
from timetracer_otel.keys import field_diff
from timetracer_otel.replay_shims.asgi import PROBE, Exchange, message_tree
from timetracer_otel.replay_shims.base import is_startup_span, learn_statements, statements
from timetracer_otel.runtime import Replaying, replay

T = TypeVar("T")

# Response headers that change on every run; ``content-length`` only when streamed.
VOLATILE_HEADERS = frozenset({"date", "server", "traceresponse", "x-request-id", "x-process-time"})
_TOKEN = re.compile(r"redacted:[0-9a-f]+")
_DIFF_LIMIT = 20


@dataclass
class ReplayedRun:
    """The outcome of running a recorded inbound call again (a request, a task run): ``ok``
    when its outcome matches the recording and no dependency call missed."""

    ok: bool
    label: str
    diff: list[str]
    report: ReplayReport
    source: str = ""
    notes: list[str] = field(default_factory=list)

    def render(self) -> str:
        head = f"{'ok  ' if self.ok else 'DIFF'} {self.label}  ({self.report.summary()})"
        return "\n".join([head, *(f"    {d}" for d in self.diff), *(f"    note: {n}" for n in self.notes)])


@dataclass
class InboundResult(ReplayedRun):
    """The outcome of replaying one recorded request; ``status`` the response's now."""

    status: int | None = None


# --- loading ---------------------------------------------------------------------------------


def load_app(ref: str, flag: str = "--asgi") -> Any:
    """The app named ``"module:attr"`` (``attr`` may be dotted), imported from the current
    directory or ``sys.path``; errors name the option it came from (``flag``).

        >>> app = load_app("myservice.main:app")
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{flag} {ref!r} is not MODULE:APP; write it like myservice.main:app.")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(
            f"cannot import {module_name!r} ({type(exc).__name__}: {exc}); check the module name "
            "and that it is importable from the current directory or PYTHONPATH."
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"module {module_name!r} has no attribute {attr!r}; check {flag} MODULE:APP."
            ) from None
    if flag == "--asgi" and not callable(obj):
        raise ConfigError(f"{ref} is not an ASGI app (not callable); point --asgi at the app object.")
    return obj


def inbound_span(cassette: Cassette) -> SpanRecord | None:
    """The span that carries the recorded inbound request (the root, normally)."""
    root = cassette.root_span
    if root is not None and root.library == "asgi":
        return root
    for span in cassette.spans:
        if span.library == "asgi" and span.kind == "SERVER":
            return span
    return None


def _label(span: SpanRecord) -> str:
    return f"{span.label or span.name} [trace {span.trace_id[:8]}]"


# --- driving the app -------------------------------------------------------------------------


def _scope(req: Tree, state: dict[str, Any] | None = None) -> dict[str, Any]:
    raw_path = req.get("raw_path")
    client, server = req.get("client"), req.get("server")
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": req.get("http_version", "1.1"),
        "method": req["method"],
        "scheme": req.get("scheme", "http"),
        "path": req["path"],
        "raw_path": as_bytes(raw_path) if raw_path is not None else None,
        "query_string": as_bytes(req.get("query_string") or b""),
        "root_path": req.get("root_path", ""),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in req.get("headers", [])],
        "client": tuple(client) if client else None,
        "server": tuple(server) if server else None,
        # As a server gives it: a shallow copy of what the lifespan startup left there.
        "state": dict(state or {}),
        "extensions": {},
    }


def with_headers(req: Tree, headers: Iterable[tuple[str, str]]) -> Tree:
    """``req`` with ``headers`` in place of the recorded ones of the same names (any case),
    the rest added: the real values of headers the recording stored as redaction tokens (an
    ``Authorization``, a ``Cookie``), given at replay time and never written anywhere."""
    given = [(k.strip().lower(), v) for k, v in headers]  # (ASGI names are lowercase)
    if not given:
        return req
    names = {k for k, _ in given}
    kept = [h for h in req.get("headers", []) if str(h[0]).lower() not in names]
    return {**req, "headers": [*kept, *given]}


def _given_as_recorded(req: Tree, headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(value given, what the recording stored for it) of each header given at replay time in
    place of a recorded redaction token, the part after a shared prefix too (``Bearer ...``):
    an app that echoes the header sends back what the recording stored, not the secret."""
    recorded = {str(k).lower(): str(v) for k, v in req.get("headers", [])}
    pairs = []
    for name, value in headers:
        old = recorded.get(name.strip().lower())
        if not value or old is None or not _TOKEN.search(old):
            continue
        pairs.append((value, old))
        n = 0  # the scheme both share ("Bearer "): the part after it is the secret's own
        while n < min(len(value), len(old)) and value[n] == old[n]:
            n += 1
        cut = value.rfind(" ", 0, n) + 1
        if cut and value[cut:] and old[cut:]:
            pairs.append((value[cut:], old[cut:]))
    return pairs


def _swap(value: Any, pairs: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):
        for new, old in pairs:
            value = value.replace(new, old)
    elif isinstance(value, bytes | bytearray | memoryview):
        value = bytes(value)
        for new, old in pairs:
            value = value.replace(new.encode("latin-1"), old.encode("latin-1"))
    elif isinstance(value, list | tuple):
        value = [_swap(v, pairs) for v in value]
    elif isinstance(value, dict):
        value = {k: _swap(v, pairs) for k, v in value.items()}
    return value


def _redacted_names(req: Tree) -> list[str]:
    """The request headers the recording stored as redaction tokens."""
    return [str(k).lower() for k, v in req.get("headers", []) if _TOKEN.search(str(v))]


def _message(tree: Tree) -> dict[str, Any]:
    msg = dict(tree)
    if "body" in msg:
        msg["body"] = as_bytes(msg["body"])
    return msg


@dataclass
class _Run:
    seam: Exchange
    error: BaseException | None
    timed_out: bool = False
    unread: bool = False  # the app asked for request body that was never recorded
    raised: BaseException | None = None  # what came out of the outermost app call


async def _drive(app: Any, req: Tree, timeout: float, state: dict[str, Any] | None = None) -> _Run:
    messages = [_message(m) for m in req.get("messages", [])]
    complete = not messages or not messages[-1].get("more_body", False) or any(
        m.get("type") == "http.disconnect" for m in messages
    )
    outer, probe = Exchange(), Exchange()
    done = asyncio.Event()
    run = _Run(outer, None)
    pos = 0

    async def receive() -> dict[str, Any]:
        nonlocal pos
        if pos < len(messages):
            pos += 1
            return dict(messages[pos - 1])
        if not complete:
            run.unread = True
            return {"type": "http.disconnect"}
        await done.wait()  # like a server: the client goes away once the response is over
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if outer.on_send(message):
            done.set()

    token = PROBE.set(probe)
    try:
        await asyncio.wait_for(app(_scope(req, state), receive, send), timeout)
    except asyncio.TimeoutError:
        run.timed_out = True
    except Exception as exc:
        run.error = exc
    finally:
        PROBE.reset(token)
        done.set()
    if probe.claimed:  # the app's own OTel middleware saw it: compare at the recorded level
        run.seam = probe
        run.raised = run.error
        run.error = probe.error
    else:
        run.raised = run.error
        run.error = outer.error or run.error
    return run


# --- comparing -------------------------------------------------------------------------------


def _headers(messages: list[Tree], kind: str) -> list[list[str]]:
    for m in messages:
        if m.get("type") == kind:
            return list(m.get("headers") or [])
    return []


def _body(messages: list[Tree]) -> tuple[bytes, int]:
    chunks = [as_bytes(m.get("body") or b"") for m in messages if m.get("type") == "http.response.body"]
    return b"".join(chunks), len(chunks)


def _header_map(pairs: list[list[str]], ignore: frozenset[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in pairs:
        name = k.lower()
        if name not in ignore:
            out.setdefault(name, []).append(_TOKEN.sub("redacted", v))
    return out


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _json(data: bytes) -> Any:
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return msgspec.UNSET


def body_diff(recorded: bytes, now: bytes, where: str = "body") -> list[str]:
    """Differences between two bodies: by JSON field when both are JSON, else the first
    differing byte."""
    if recorded == now:
        return []
    a, b = _json(recorded), _json(now)
    if a is not msgspec.UNSET and b is not msgspec.UNSET:
        return field_diff(a, b, where, limit=_DIFF_LIMIT)
    pairs = enumerate(zip(recorded, now, strict=False))
    at = next((i for i, (x, y) in pairs if x != y), min(len(recorded), len(now)))
    return [
        f"{where}: {len(recorded)} bytes recorded, {len(now)} now; first difference at byte {at}: "
        f"recorded {_short(recorded[at:at + 40])}, now {_short(now[at:at + 40])}"
    ]


def response_diff(
    recorded: list[Tree], now: list[Tree], ignore: Iterable[str] = ()
) -> list[str]:
    """Status, headers (volatile ones ignored), body and trailers of two message lists."""
    out: list[str] = []
    rs, ns = _status(recorded), _status(now)
    if rs != ns:
        out.append(f"status: recorded {rs}, now {ns}")
    rb, rn = _body(recorded)
    nb, nn = _body(now)
    skip = VOLATILE_HEADERS | {h.lower() for h in ignore}
    body = body_diff(rb, nb)
    if rn > 1 or nn > 1 or body:  # streamed, or a consequence of the body difference
        skip |= {"content-length", "transfer-encoding"}
    for kind, what in (("http.response.start", "header"), ("http.response.trailers", "trailer")):
        rh, nh = _header_map(_headers(recorded, kind), skip), _header_map(_headers(now, kind), skip)
        for name in dict.fromkeys([*rh, *nh]):
            a, b = rh.get(name), nh.get(name)
            if a != b:
                out.append(f"{what} {name}: recorded {_values(a)}, now {_values(b)}")
    out.extend(body)
    return out


def _values(v: list[str] | None) -> str:
    return "absent" if v is None else _short(v[0] if len(v) == 1 else v)


def _status(messages: list[Tree]) -> int | None:
    for m in messages:
        if m.get("type") == "http.response.start":
            return int(m["status"])
    return None


def _error_name(tree: Tree) -> str:
    return str(tree.get("type", "?")).replace(":", ".")


def _error_text(tree: Tree) -> str:
    return "none" if tree is None else f"{_error_name(tree)}: {tree.get('message')}"


def _miss_messages(exc: BaseException | None) -> list[str]:
    seen: set[int] = set()
    out = []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ReplayMissError):
            out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return out


def _compare(
    span: SpanRecord, run: _Run, report: ReplayReport, ignore: Iterable[str], *, misses_fail: bool = True
) -> list[str]:
    diff: list[str] = []
    misses = _miss_messages(run.error) or _miss_messages(run.raised)
    for text in misses:
        diff.extend(f"dependency {line}" if i == 0 else line for i, line in enumerate(text.splitlines()))
    if not misses and misses_fail:  # on_miss passthrough / record: a miss went live, as asked
        diff.extend(f"dependency miss: {label}" for label in report.misses)
    if run.timed_out:
        diff.append("the app did not finish within the replay timeout")
    if run.unread:
        diff.append("the app read more of the request body than the recording holds")
    recorded_messages: list[Tree] = (span.response or {}).get("messages") or []
    err = span.error
    if err is not None:
        now = run.error
        if now is None:
            diff.append(f"error: recorded {_error_name(err)}: {err.get('message')}, now no exception")
        else:
            name = f"{type(now).__module__}.{type(now).__qualname__}"
            if name != _error_name(err) or str(now) != err.get("message"):
                diff.append(f"error: recorded {_error_name(err)}: {err.get('message')}, "
                            f"now {name}: {_short(str(now), 200)}")
        if _status(recorded_messages) is None:
            return diff  # nothing was sent before it raised: the error is the whole outcome
    elif run.error is not None and not misses:
        diff.append(f"error: recorded none, now {type(run.error).__name__}: {_short(str(run.error), 200)}")
    diff.extend(response_diff(recorded_messages, run.seam.sent, ignore))
    return diff


# --- the app's lifespan ----------------------------------------------------------------------


def _last_line(message: Any) -> str:
    """The exception line of a lifespan ``failed`` message (Starlette sends the traceback)."""
    lines = [line for line in str(message or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def is_startup(cassette: Cassette) -> bool:
    """A cassette of an app's recorded lifespan startup (see ``replay_shims.asgi``)."""
    root = cassette.root_span
    return root is not None and is_startup_span(root)


def startup_cassette(cassettes: Iterable[tuple[str, Cassette]]) -> tuple[str, Cassette] | None:
    """The latest recorded lifespan startup among ``cassettes`` (path, cassette): the cassette
    whose root is the span ``replay_shims.asgi`` opens around an app's startup."""
    found = [(c.root_span.status != "ERROR", c.root_span.start_ns, path, c)
             for path, c in cassettes if c.root_span is not None and is_startup(c)]
    if not found:
        return None
    # A startup that failed (the database was down at one restart) only where no other is.
    _, _, path, cassette = max(found, key=lambda f: f[:2])
    return path, cassette


class Lifespan:
    """An app's lifespan, run the way a server runs it (ASGI lifespan 2.0): :meth:`startup`
    before the first replayed request, :meth:`shutdown` after the last, each inside a replay
    of the recorded startup (``startup``: its path and cassette, or None where none was
    recorded), so a pool or client the startup opens is answered as it was recorded. What the
    startup leaves in the lifespan state reaches every request's ``scope["state"]``.

    ``required``: an app that does not take part in the protocol (it raises before reading
    the startup message, or returns) is an error; otherwise it runs without a lifespan, as
    uvicorn's ``--lifespan auto`` does."""

    def __init__(self, app: Any, startup: tuple[str, Cassette] | None, *, required: bool = False,
                 on_miss: str = "error", live: Iterable[str] = (), timeout: float = 30.0,
                 strict: bool = False, lone: Iterable[tuple[str, Cassette]] = ()) -> None:
        self.app, self.required, self.on_miss, self.live = app, required, on_miss, list(live)
        self.timeout = timeout
        # ``lone``: the process cassettes of calls made outside any trace, which answer the
        # startup too: where a framework whose middleware never sees the lifespan (Litestar)
        # leaves all of its startup's calls, and where any startup leaves those it made in
        # another thread (run_in_executor carries no context).
        lone = list(lone)
        self.source = startup[0] if startup is not None else (
            ", ".join(path for path, _ in lone) or None)
        self.index = ReplayIndex([startup, *lone] if startup is not None else lone,
                                 strict=strict)
        self.state: dict[str, Any] = {}
        self.supported = True
        self._to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._from_app: asyncio.Queue[tuple[dict[str, Any], ReplayReport | None] | None] = \
            asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._rep: Replaying | None = None
        self._misses_at_answer = 0  # misses in the lifespan's replay when the app last answered
        self._read = False  # the app read the startup message

    async def _run(self) -> None:
        async def receive() -> dict[str, Any]:
            self._read = True
            return await self._to_app.get()

        async def send(message: Any) -> None:
            # With what the replay saw until the app answered: a task the startup left
            # running calls only once the answer is out, and is not the startup.
            rep = self._rep
            await self._from_app.put((dict(message), rep.report if rep is not None else None))

        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"},
                 "state": self.state}
        try:
            await self.app(scope, receive, send)
        finally:
            self._from_app.put_nowait(None)  # the app returned, or raised

    async def _answer(self, message: str) -> tuple[dict[str, Any] | None, str | None]:
        """Send ``message`` to the app; its answer (None if it returned without one) and what
        went wrong in the replay of the startup since the last message.

        That replay runs from the startup until the shutdown has answered (see
        :meth:`_end`): what the lifespan task, and the tasks the startup left running (a
        refresher), call meanwhile is answered from the startup's cassette, never from the
        cassette of the request running at the time."""
        if self._rep is None:
            self._rep = replay(self.index, on_miss=self.on_miss, live=self.live)
            self._rep.__enter__()
        before = self._rep.report
        seen = (len(before.misses), len(before.stranded), len(before.unsupported))
        if self._task is None:  # (its context holds the startup's replay)
            self._task = asyncio.get_running_loop().create_task(self._run())
            self._task.add_done_callback(_retrieved)
        await self._to_app.put({"type": message})
        try:
            got = await asyncio.wait_for(self._from_app.get(), self.timeout)
        except asyncio.TimeoutError:
            return None, f"the app did not answer {message} within {self.timeout:g} s"
        answer, at_answer = got if got is not None else (None, None)
        # (None: the app returned or raised; what the replay saw until now)
        report = at_answer if at_answer is not None else self._rep.report
        trouble: list[str] = []
        misses = report.misses[seen[0]:] if self._rep.on_miss is OnMiss.ERROR else []
        for what, calls in (("no recorded answer for", misses),
                            ("could not go live", report.stranded[seen[1]:]),
                            ("unsupported in replay", report.unsupported[seen[2]:])):
            if calls:
                more = f" and {len(calls) - 3} more" if len(calls) > 3 else ""
                trouble.append(f"{what} {', '.join(calls[:3])}{more}")
        self._misses_at_answer = len(report.misses)
        return answer, "; ".join(trouble) or None

    def _end(self) -> None:
        """The startup's replay ends (in the task that began it)."""
        rep, self._rep = self._rep, None
        if rep is not None:
            rep.__exit__(None, None, None)

    def _raised(self) -> BaseException | None:
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    async def startup(self) -> str | None:
        """Start the app; None once it started (or, not required, does not take part), the
        reason otherwise. Cancelled or interrupted, it ends the app's lifespan task and the
        startup's replay before it gives way."""
        try:
            return await self._startup()
        except BaseException:
            await self.close()
            raise

    async def _startup(self) -> str | None:
        answer, trouble = await self._answer("lifespan.startup")
        answer = answer or {}
        kind = answer.get("type")
        if kind == "lifespan.startup.complete" and trouble is None:
            return None
        if kind is None and trouble is None:
            await asyncio.sleep(0)  # (the task's end is set after its last put)
            raised = self._raised()
            if raised is None or not self._read:  # returned, or raised at the scope's type
                self.supported = False
                if not self.required:
                    return None
                return "the app does not take part in the ASGI lifespan protocol" + (
                    f" ({type(raised).__name__}: {raised})" if raised is not None else "")
            trouble = f"{type(raised).__name__}: {raised}"
        elif kind == "lifespan.startup.failed":  # (the misses say more than the app's message)
            trouble = trouble or _last_line(answer.get("message")) \
                or "the app answered lifespan.startup.failed"
        elif trouble is None:
            trouble = f"the app answered {kind!r}"
        where = (f"answered from {self.source}" if self.source is not None else
                 "no recorded startup in the cassettes")
        return f"the app's lifespan startup failed ({where}): {trouble}"

    async def begin(self, fallback: bool) -> str | None:
        """:meth:`startup`, and what its failure means: raises :class:`_NoLifespan` (an app
        outside the protocol where one is required) or :class:`_StartupFailed` (no request
        can run as recorded), unless ``fallback`` (``auto`` with no recorded startup: a
        recording from before, a framework whose middleware never sees the lifespan), where
        the requests run without a lifespan, as before, and the note saying so is returned."""
        failed = await self.startup()
        if failed is None:
            return None
        await self.close()
        if self.required and not self.supported:
            raise _NoLifespan(failed)
        if not fallback:
            raise _StartupFailed(failed)
        return f"{failed}; the requests ran without the lifespan"

    async def close(self) -> None:
        """End the app's lifespan task without a shutdown (after a failed startup)."""
        try:  # (the app's own clean-up on cancel still runs inside the startup's replay)
            if self._task is not None and not self._task.done():
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
        finally:
            self._end()

    async def shutdown(self) -> str | None:
        """Stop the app; None once it stopped, what went wrong otherwise. The shutdown is not
        recorded: what it calls is answered from the startup's cassette where it can be, and
        what went wrong is a note, not a difference (the requests' answers are compared)."""
        if self._task is None or self._task.done() or not self.supported:
            self._end()
            return None
        # (since the startup answered: the tasks it left running, while the requests ran)
        meanwhile = self._rep.report.misses[self._misses_at_answer:] if self._rep else []
        try:
            answer, trouble = await self._answer("lifespan.shutdown")
            answer = answer or {}
            kind = answer.get("type")
            if kind == "lifespan.shutdown.failed":
                trouble = trouble or _last_line(answer.get("message")) or "it answered failed"
            elif kind is None and trouble is None and (raised := self._raised()) is not None:
                trouble = f"{type(raised).__name__}: {raised}"
            notes = [f"{len(meanwhile)} call(s) made outside the requests while they ran (a "
                     f"task the startup left running) had no recorded answer: "
                     f"{', '.join(meanwhile[:3])}{' ...' if len(meanwhile) > 3 else ''}"
                     ] if meanwhile else []
            if trouble is not None:
                notes.append(f"the app's lifespan shutdown failed: {trouble}")
            return "; ".join(notes) or None
        finally:
            await self.close()


def _retrieved(task: asyncio.Task[None]) -> None:
    """The lifespan task's exception is read here (the failed startup reports it): asyncio
    would otherwise log it with a traceback when the task is collected."""
    if not task.cancelled():
        task.exception()


class _StartupFailed(Exception):
    pass


class _NoLifespan(Exception):
    pass


# --- the public entry points -----------------------------------------------------------------


def _load(cassette: Cassette | str | Path) -> tuple[Cassette, str]:
    if isinstance(cassette, Cassette):
        return cassette, cassette.name
    path = Path(cassette)
    if path.is_dir():
        raise CassetteError(f"{path} is a directory; pass one cassette file (the CLI takes directories).")
    return load_cassette(path), str(path)


async def replay_asgi_async(
    cassette: Cassette | str | Path,
    app: Any,
    *,
    on_miss: str = "error",
    strict: bool = False,
    ignore_headers: Iterable[str] = (),
    timeout: float = 30.0,
    live: Iterable[str] = (),
    headers: Iterable[tuple[str, str]] = (),
    lifespan: bool | Cassette | str | Path = False,
) -> InboundResult:
    """:func:`replay_asgi` inside a running event loop."""
    loaded, source, span = _recorded_request(cassette)
    if lifespan is False:
        return await _replay_request(loaded, source, span, app, on_miss=on_miss, strict=strict,
                                     ignore_headers=ignore_headers, timeout=timeout, live=live,
                                     headers=headers)
    startup = None
    if lifespan is not True:
        recorded, where = _load(lifespan)
        startup = (where, recorded)
    return await _replay_in_lifespan(loaded, source, span, app, startup, auto=False,
                                     on_miss=on_miss, strict=strict, ignore_headers=ignore_headers,
                                     timeout=timeout, live=live, headers=headers)


async def _replay_in_lifespan(
    loaded: Cassette, source: str, span: SpanRecord, app: Any,
    startup: tuple[str, Cassette] | None, *, auto: bool, on_miss: str, strict: bool,
    ignore_headers: Iterable[str] = (), timeout: float = 30.0, live: Iterable[str] = (),
    headers: Iterable[tuple[str, str]] = (), lone: Iterable[tuple[str, Cassette]] = (),
) -> InboundResult:
    """One recorded request inside the app's lifespan (see :class:`Lifespan`). ``auto``: an app
    outside the protocol, or whose startup fails where none was recorded, runs without it."""
    life: Lifespan | None = Lifespan(app, startup, required=not auto, on_miss=on_miss, live=live,
                                     timeout=timeout, strict=strict, lone=lone)
    assert life is not None
    try:
        note = await life.begin(fallback=auto and startup is None)
    except (_NoLifespan, _StartupFailed) as exc:
        return InboundResult(ok=False, label=_label(span), diff=[str(exc)],
                             report=ReplayReport(), source=source)
    notes = [] if note is None else [note]
    if note is not None:
        life = None
    try:
        result = await _replay_request(loaded, source, span, app, on_miss=on_miss, strict=strict,
                                       ignore_headers=ignore_headers, timeout=timeout, live=live,
                                       headers=headers, state=life.state if life else None)
    finally:
        stopped = await life.shutdown() if life is not None else None
    result.notes[:0] = notes
    if stopped is not None:
        result.notes.append(stopped)
    return result


def _recorded_request(cassette: Cassette | str | Path) -> tuple[Cassette, str, SpanRecord]:
    """The cassette, where it came from and its inbound span, checked for a replay."""
    loaded, source = _load(cassette)
    span = inbound_span(loaded)
    if span is None or span.request is None:
        raise CassetteError(
            f"{source} holds no recorded inbound request; record it through an ASGI app under "
            "OpenTelemetryMiddleware (e.g. opentelemetry-instrument uvicorn app:app)."
        )
    if span.truncated:
        raise ReplayUnsupportedError(
            f"{source}: the recorded request or response was over the payload limit and stored "
            "truncated; raise TIMETRACER_MAX_PAYLOAD_BYTES and record again."
        )
    return loaded, source, span


async def _replay_request(
    loaded: Cassette, source: str, span: SpanRecord, app: Any, *, on_miss: str, strict: bool,
    ignore_headers: Iterable[str], timeout: float, live: Iterable[str],
    headers: Iterable[tuple[str, str]], state: dict[str, Any] | None = None,
) -> InboundResult:
    # The inbound span is what is being replayed, never an answer to a dependency call.
    calls = msgspec.structs.replace(loaded, spans=[s for s in loaded.spans if s is not span])
    rep = replay(ReplayIndex([(source, calls)], strict=strict), on_miss=on_miss, live=live)
    headers = list(headers)
    request = with_headers(span.request, headers)
    with rep:
        run = await _drive(app, request, timeout, state)
    report = rep.report
    given = [(k, v) for k, v in headers]
    pairs = _given_as_recorded(span.request, given)
    if pairs:  # what the app sent back holds the recorded tokens, never a given secret
        run.seam.sent[:] = _swap(run.seam.sent, pairs)
    diff = _compare(span, run, report, ignore_headers, misses_fail=rep.on_miss is OnMiss.ERROR)
    for _, value in given:  # (and never in what is printed, whatever the app did with it)
        if value:
            diff = [line.replace(value, "<--header value>") for line in diff]
    notes = [f"recorded call not made: {label}" for label, _ in report.unused]
    tokens = _redacted_names(request)
    if diff and tokens:  # an app checking them answers otherwise (a 401): say why
        notes.append(f"sent as recorded, redaction tokens in place of the values: {', '.join(tokens)}"
                     " (give the real ones with --header 'NAME: value', or headers= in code)")
    if strict and notes:
        diff.extend(notes)
        notes = []
    return InboundResult(
        ok=not diff and not report.failed(rep.on_miss is OnMiss.ERROR),
        label=_label(span),
        diff=diff,
        report=report,
        status=run.seam.status,
        source=source,
        notes=notes,
    )


def _run_sync(coro: Coroutine[Any, Any, T]) -> T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        running = False
    else:
        running = True
    if not running:
        return asyncio.run(coro)
    box: list[Any] = []

    def target() -> None:  # a loop is running here (an async test): use a fresh one aside
        try:
            box.append((True, asyncio.run(coro)))
        except BaseException as exc:
            box.append((False, exc))

    t = threading.Thread(target=target, name="timetracer-replay-asgi")
    t.start()
    t.join()
    ok, value = box[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def replay_asgi(
    cassette: Cassette | str | Path,
    app: Any,
    *,
    on_miss: str = "error",
    strict: bool = False,
    ignore_headers: Iterable[str] = (),
    timeout: float = 30.0,
    live: Iterable[str] = (),
    headers: Iterable[tuple[str, str]] = (),
    lifespan: bool | Cassette | str | Path = False,
) -> InboundResult:
    """Send the recorded request into ``app`` with every dependency answered from the same
    cassette, and compare the new response with the recorded one.

        >>> result = replay_asgi("cassettes/x/GET__items__4bf92f35.msgpack", app)
        >>> assert result.ok, "\\n".join(result.diff)

    ``ignore_headers`` adds response headers to leave out of the comparison (``date``,
    ``server`` and ``content-length`` of streamed bodies are always left out). ``strict``
    turns off shape matching and counts recorded calls the app no longer makes as differences;
    ``live`` names libraries that stay live. ``headers`` (name, value) replace the recorded
    request headers of the same names, or are added: the real values of those the recording
    stored as redaction tokens (an ``Authorization`` the app checks). ``lifespan`` runs the
    app's lifespan startup before the request and its shutdown after it, answered from the
    recorded startup (its cassette, or True where none was recorded; see :class:`Lifespan`),
    so what the startup opens (a pool on ``app.state`` or in the lifespan state) is there.
    """
    return _run_sync(replay_asgi_async(
        cassette, app, on_miss=on_miss, strict=strict, ignore_headers=ignore_headers,
        timeout=timeout, live=live, headers=headers, lifespan=lifespan,
    ))


def instrument_app(app: Any) -> Any:
    """Give a bare Starlette/FastAPI app the OTel middleware (as ``opentelemetry-instrument``
    does), so the replay compares at the level the request was recorded."""
    try:
        from starlette.applications import Starlette
    except ImportError:
        return app
    if isinstance(app, Starlette) and not getattr(app, "_is_instrumented_by_opentelemetry", False) \
            and app.middleware_stack is None:
        # A FastAPI app as opentelemetry-instrument gives it one: its instrumentation puts the
        # middleware outside Starlette's ServerErrorMiddleware, so a 500 it sends for an
        # exception is seen (and was recorded); Starlette's puts it inside.
        if _as_fastapi(app):
            return app
        try:
            from opentelemetry.instrumentation.starlette import StarletteInstrumentor
        except ImportError:
            return app
        StarletteInstrumentor.instrument_app(app)
    return app


def _as_fastapi(app: Any) -> bool:
    """Instrument ``app`` as a FastAPI app, if it is one and that instrumentation is here."""
    try:
        from fastapi import FastAPI
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    except ImportError:
        return False
    if not isinstance(app, FastAPI):
        return False
    FastAPIInstrumentor.instrument_app(app)
    return True


def command_inputs(
    source: str, app: Callable[[], Any], keep: Callable[[Cassette], bool], missing: str
) -> tuple[Any, list[tuple[str, Cassette]], list[tuple[str, Cassette]]] | None:
    """What ``replay PATH --asgi/--celery MODULE:APP`` runs: the app (``app()``), the cassettes
    of ``source`` that ``keep`` holds to and the others (each with its path); None once the
    reason is said (``missing`` when none is kept): exit code 2."""
    try:
        cassettes = [(str(f), load_cassette(f)) for f in find_cassettes(source)]
        loaded = app()
    except TimetracerError as exc:
        click.echo(f"timetracer-otel: {exc}", err=True)
        return None
    kept = [(p, c) for p, c in cassettes if keep(c)]
    if not kept:
        click.echo(f"timetracer-otel: {source} holds no {missing}.", err=True)
        return None
    return loaded, kept, [(p, c) for p, c in cassettes if not keep(c)]


def replay_asgi_command(source: str, app_ref: str, *, on_miss: str, strict: bool,
                        live: Iterable[str] = (), headers: Iterable[tuple[str, str]] = (),
                        lifespan: str = "auto") -> int:
    """``timetracer-otel replay PATH --asgi MODULE:APP``: 0 all match, 1 differ, 2 bad input.

    ``lifespan``: ``auto`` runs the app's lifespan around the requests when the app takes
    part in it (answered from the latest recorded startup in PATH), ``on`` requires it,
    ``off`` never runs it."""
    inputs = command_inputs(source, lambda: instrument_app(load_app(app_ref)),
                            lambda c: inbound_span(c) is not None,
                            "recorded inbound request; record through an ASGI app first")
    if inputs is None:
        return 2
    app, inbound, others = inputs
    learned: dict[str, Any] = {}
    learn_statements((s for _, c in [*inbound, *others] for s in c.interactions), learned)
    # In the order they were recorded: the app's state (a pool's connections, a driver's
    # statement cache) then changes from request to request as it did.
    inbound.sort(key=lambda pc: inbound_span(pc[1]).start_ns)  # type: ignore[union-attr]
    startup = startup_cassette(others)
    skipped = sum(1 for _, c in others if not is_startup(c))
    given = list(headers)
    ignore = [h.strip() for h in os.environ.get("TIMETRACER_IGNORE_HEADERS", "").split(",") if h.strip()]

    notes: list[str] = []

    async def all_of_them() -> list[InboundResult | str]:
        out: list[InboundResult | str] = []
        life = None
        if lifespan != "off":
            life = Lifespan(app, startup, required=lifespan == "on", on_miss=on_miss, live=live,
                            strict=strict, lone=[(p, c) for p, c in others if c.root is None])
            note = await life.begin(fallback=lifespan == "auto" and startup is None)
            if note is not None:
                notes.append(note)
                life = None
        try:
            for path, cassette in inbound:
                try:
                    loaded, _, span = _recorded_request(cassette)
                    out.append(await _replay_request(
                        loaded, path, span, app, on_miss=on_miss, strict=strict,
                        ignore_headers=ignore, timeout=30.0, live=live, headers=given,
                        state=life.state if life is not None else None))
                except TimetracerError as exc:
                    out.append(f"FAIL {path}: {exc}")
        finally:
            stopped = await life.shutdown() if life is not None else None
        if stopped is not None:
            notes.append(stopped)
        return out

    try:
        with statements(learned):
            results = asyncio.run(all_of_them())
    except _NoLifespan as exc:
        click.echo(f"timetracer-otel: --lifespan on, but {exc} ({app_ref}); give --lifespan "
                   "auto or off.", err=True)
        return 2
    except _StartupFailed as exc:
        click.echo(f"FAIL {exc}")
        click.echo(f"timetracer-otel: no request replayed ({len(inbound)} recorded): the app did "
                   "not start")
        return 1
    failed = 0
    for r in results:
        if isinstance(r, str):
            failed += 1
            click.echo(r)
            continue
        failed += not r.ok
        if not r.ok or len(results) <= 50:
            click.echo(r.render())
    for note in notes:
        click.echo(f"note: {note}")
    tail = f", {skipped} without an inbound request skipped" if skipped else ""
    click.echo(f"timetracer-otel: {len(results) - failed} matched, {failed} differ{tail}")
    return 1 if failed else 0


# --- diff between two cassettes --------------------------------------------------------------


def _request_view(req: Tree | None) -> Tree:
    if not req:
        return None
    out = {k: v for k, v in req.items() if k not in ("messages", "client", "headers")}
    out["headers"] = {k.lower(): _TOKEN.sub("redacted", v) for k, v in req.get("headers", [])
                      if k.lower() not in ("traceparent", "tracestate", "baggage", "content-length")}
    return out


def _request_body(req: Tree | None) -> bytes:
    msgs = (req or {}).get("messages") or []
    return b"".join(as_bytes(m.get("body") or b"") for m in msgs if m.get("type") == "http.request")


def _plain(tree: Tree) -> Tree:
    """A dependency response as compared: volatile header values and times dropped, raw bytes (an
    HTTP body) in the form a JSON cassette stores them, so a cassette and its conversion to
    the other encoding compare equal."""
    if isinstance(tree, dict) and isinstance(tree.get("headers"), list):
        tree = dict(tree)
        tree["headers"] = [h for h in tree["headers"] if str(h[0]).lower() not in VOLATILE_HEADERS]
        tree.pop("elapsed_us", None)  # (a requests call's time: another every run)
    return _json_form(tree)


def _json_form(tree: Tree) -> Tree:
    """``tree`` with bytes as their base64 text (JSON's form of raw bytes; typed values keep
    their codec tags in both encodings)."""
    if isinstance(tree, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(tree)).decode("ascii")
    if isinstance(tree, dict):
        return {k: _json_form(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_json_form(v) for v in tree]
    return tree


def cassette_diff(a: Cassette, b: Cassette) -> list[str]:
    """Request, response and dependency calls of two cassettes; calls aligned by key, then
    by shape, never by position."""
    out: list[str] = []
    ia, ib = inbound_span(a), inbound_span(b)
    if ia is not None or ib is not None:
        ra, rb = (ia.request if ia else None), (ib.request if ib else None)
        out.extend(field_diff(_request_view(ra), _request_view(rb), "request", limit=_DIFF_LIMIT))
        out.extend(body_diff(_request_body(ra), _request_body(rb), "request.body"))
        ma = ((ia.response if ia else None) or {}).get("messages") or []
        mb = ((ib.response if ib else None) or {}).get("messages") or []
        out.extend(f"response {d}" for d in response_diff(ma, mb))
        ea, eb = _error_text(ia.error if ia else None), _error_text(ib.error if ib else None)
        if ea != eb:
            out.append(f"error: A {ea}, B {eb}")
    calls_a = [s for s in a.interactions if s is not ia]
    calls_b = [s for s in b.interactions if s is not ib]
    by_key: dict[str | None, list[SpanRecord]] = {}
    for s in calls_b:
        by_key.setdefault(s.key, []).append(s)
    left_a: list[SpanRecord] = []
    for s in calls_a:
        twins = by_key.get(s.key)
        if twins:
            other = twins.pop(0)
            d = field_diff(_plain(s.response), _plain(other.response), "response", limit=6)
            d += field_diff(_json_form(s.error), _json_form(other.error), "error", limit=4)
            if d:
                out.append(f"call {s.label}: same request, different outcome")
                out.extend(f"    {x}" for x in d)
        else:
            left_a.append(s)
    left_b = [s for twins in by_key.values() for s in twins]
    for s in left_a:
        near = next((o for o in left_b if o.shape == s.shape and o.library == s.library), None)
        if near is None:
            out.append(f"call only in A: {s.label}")
            continue
        left_b.remove(near)
        out.append(f"call changed: {s.label} -> {near.label}")
        out.extend(f"    {x}" for x in field_diff(_json_form(s.request), _json_form(near.request),
                                                  "request", limit=6))
    out.extend(f"call only in B: {s.label}" for s in sorted(left_b, key=lambda s: s.start_ns))
    return out


def diff_command(a: str, b: str) -> int:
    """``timetracer-otel diff A B``: 0 same, 1 different, 2 unreadable. What the cassettes
    hold is printed with its control characters escaped (shown, never obeyed)."""
    from timetracer_otel.text import printable

    try:
        ca, cb = load_cassette(a), load_cassette(b)
    except TimetracerError as exc:
        click.echo(f"timetracer-otel: {printable(str(exc))}", err=True)
        return 2
    lines = cassette_diff(ca, cb)
    la = _label(inbound_span(ca)) if inbound_span(ca) else ca.name  # type: ignore[arg-type]
    lb = _label(inbound_span(cb)) if inbound_span(cb) else cb.name  # type: ignore[arg-type]
    click.echo(f"A: {printable(a)}  {printable(la)}\nB: {printable(b)}  {printable(lb)}")
    if not lines:
        click.echo("no differences (request, response and dependency calls)")
        return 0
    for line in lines:
        click.echo(printable(line))
    click.echo(f"{len(lines)} difference(s)")
    return 1


__all__ = [
    "InboundResult",
    "body_diff",
    "cassette_diff",
    "diff_command",
    "inbound_span",
    "instrument_app",
    "is_startup",
    "load_app",
    "message_tree",
    "replay_asgi",
    "replay_asgi_async",
    "replay_asgi_command",
    "response_diff",
    "startup_cassette",
]
