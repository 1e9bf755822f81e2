"""``record()`` and ``replay()``: the in-code way in, as context managers or decorators.

    >>> with timetracer_otel.record(dir="cassettes") as rec:
    ...     httpx.get("http://127.0.0.1:8000/items")
    >>> rec.paths
    ['cassettes/2026-11-26/script__3f9a....msgpack']
    >>> with timetracer_otel.replay(rec.paths[0]) as rep:
    ...     httpx.get("http://127.0.0.1:8000/items")      # answered from the cassette
    >>> rep.report.summary()
    'replay: 1 exact, 0 by shape, 0 missed, 0 recorded but unused'
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar, Token
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from timetracer_otel import replay_shims
from timetracer_otel.cassette import FORMATS, Cassette, Format, SpanRecord
from timetracer_otel.config import Mode, OnMiss, Settings, library_names
from timetracer_otel.errors import CassetteError, ConfigError, ReplayMissError
from timetracer_otel.exporters.storage import add_interactions, storage_for
from timetracer_otel.exporters.writer import CassetteWriter
from timetracer_otel.index import Answers, Match, ReplayIndex, ReplayReport
from timetracer_otel.keys import Call
from timetracer_otel.replay_shims import base as base_module
from timetracer_otel.replay_shims.base import STATE, Keeps

log = logging.getLogger("timetracer_otel")

F = TypeVar("F", bound=Callable[..., Any])
_A = TypeVar("_A", bound="_Activation")
_F = TypeVar("_F", bound="_Frame")


class _Guard:
    """The lock around every change of the runs and of :data:`STATE` they set.

    Re-entrant, so a signal handler that calls ``STATE.put`` (``provider.shutdown()`` on
    SIGTERM) on the thread that is switching cannot deadlock it: the handler's values wait in
    ``pending`` and are put when the switch it interrupted is complete."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.depth = 0  # how deep the thread holding the lock is in it
        self.pending: list[dict[str, Any]] = []

    def __enter__(self) -> int:
        self.lock.acquire()
        self.depth += 1
        return self.depth

    def __exit__(self, *exc: object) -> None:
        try:
            if self.depth == 1:
                while self.pending:
                    _put_now(self.pending.pop(0))
        finally:
            self.depth -= 1
            self.lock.release()


_lock = _Guard()


def _after_fork_in_child() -> None:
    # Held by another thread at the fork, the guard would stay held in the child for good.
    global _lock
    _lock = _Guard()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class _Dispatch(SpanProcessor):
    """One processor per provider (the SDK cannot remove processors); it forwards finished
    spans to the recording of the task or thread they end in, else to the latest one."""

    def __init__(self) -> None:
        self.writer: CassetteWriter | None = None

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        writer = self.writer
        if writer is None:
            return
        run = _here.get()  # a span ended in another recording's task goes to that recording
        if type(run) is _Recording and run.active and run.dispatch is self:
            writer = run.writer
        writer.submit(span)

    def shutdown(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.writer.flush(timeout_millis / 1000) if self.writer is not None else True


_dispatch: dict[int, _Dispatch] = {}


def sdk_provider(service_name: str | None = None) -> TracerProvider:
    """The application's SDK TracerProvider, or a new one set globally when only the API's
    default (proxy) provider exists."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        return provider
    attrs = {"service.name": service_name} if service_name else {}
    new = TracerProvider(resource=Resource.create(attrs))
    trace.set_tracer_provider(new)
    got = trace.get_tracer_provider()
    if not isinstance(got, TracerProvider):
        raise RuntimeError("a non-SDK TracerProvider is already set; timetracer needs the SDK one")
    return got


def _dispatch_for(provider: TracerProvider) -> _Dispatch:
    d = _dispatch.get(id(provider))
    if d is None:
        d = _dispatch[id(provider)] = _Dispatch()
        provider.add_span_processor(d)
    return d


@dataclass(slots=True)
class _Switch:
    """The part of :data:`STATE` that ``record()`` and ``replay()`` set, and the writer each
    provider's dispatch hands finished spans to. (A replay run's ``on_miss`` and ``live`` are
    not here: ``STATE.policy()`` asks the run of the call's own task, see :func:`_policy`.)"""

    mode: Mode
    defer: bool
    max_payload_bytes: int
    index: Answers | None
    appended: Keeps
    writers: dict[_Dispatch, CassetteWriter | None] = field(default_factory=dict)

    @classmethod
    def read(cls) -> _Switch:
        return cls(STATE.mode, STATE.defer, STATE.max_payload_bytes, STATE.index, STATE.appended)

    def copy(self) -> _Switch:
        return replace(self, writers=dict(self.writers))

    def write(self) -> None:
        # A shim on another thread reads the mode first: switching on, the mode goes last
        # (never replay without an index); switching off, first.
        if self.mode is Mode.OFF:
            STATE.mode = self.mode
        STATE.defer, STATE.max_payload_bytes = self.defer, self.max_payload_bytes
        STATE.index, STATE.appended = self.index, self.appended
        for dispatch, writer in self.writers.items():
            dispatch.writer = writer
        STATE.mode = self.mode


class _Frame:
    """One run of a ``record()`` or ``replay()`` (a ``with`` block, a decorated call): what it
    sets while it is active."""

    active = False
    token: Token[Any] | None = None

    def fold(self, switch: _Switch) -> None:
        raise NotImplementedError


# The runs active now, in the order they began. STATE is always the state from before the
# first of them with each one's settings laid over it in that order: the latest run sets the
# mode while it lasts, runs may end in any order (nested blocks, tasks, threads, a decorated
# function running twice at once) and leave the others in force, and the last to end restores
# what was there before. Cassette lookups and finished spans go to the run of the task or
# thread they happen in (a context variable), else to the latest run. Code outside the runs
# that sets these fields while runs are active goes through STATE.put (see _put).
_active: list[_Frame] = []
_base: _Switch | None = None
_here: ContextVar[_Frame | None] = base_module.RUN  # (shims read it: see base.stream_opened)


def _activate(frame: _Frame, dispatch: _Dispatch | None = None) -> None:
    global _base
    with _lock:
        if _base is None:
            _base = _Switch.read()
        if dispatch is not None and dispatch not in _base.writers:
            _base.writers[dispatch] = dispatch.writer
        _active.append(frame)
        frame.active = True
        try:
            _apply(_base)
            frame.token = _here.set(frame)
        except BaseException:  # interrupted (Ctrl-C) while switching: this run never began
            _active.remove(frame)
            frame.active = False
            _apply(_base)
            raise


def _deactivate(frame: _Frame) -> None:
    global _base
    try:
        if frame.token is not None:
            # Only if this run is still the context's: after runs ended out of order, resetting
            # would bring back a run begun before this one that may still be running.
            if _here.get() is frame:
                with contextlib.suppress(ValueError):  # ended in another context: inactive anyway
                    _here.reset(frame.token)
            frame.token = None
    finally:  # interrupted or not, the run ends
        with _lock:
            if frame.active and _base is not None:
                _active.remove(frame)
                frame.active = False
                try:
                    _apply(_base)
                except BaseException:  # interrupted (Ctrl-C) while switching back: finish it first
                    _apply(_base)
                    raise
                finally:
                    if not _active:
                        _base = None


def _put(values: dict[str, Any]) -> None:
    """``STATE.put``: outside values go into the base the runs are laid over; from a signal
    handler that interrupted a switch on this thread, once that switch is complete."""
    with _lock as depth:
        if depth > 1:
            _lock.pending.append(values)
        else:
            _put_now(values)


def _put_now(values: dict[str, Any]) -> None:
    if _base is None:
        for name, value in values.items():
            setattr(STATE, name, value)
        return
    for name, value in values.items():
        setattr(_base if name in _Switch.__slots__ else STATE, name, value)
    _apply(_base)


base_module._put_hook = _put


def _policy() -> tuple[OnMiss, frozenset[str]]:
    """``STATE.policy``: the replay run of this task or thread decides misses and live
    libraries, as it answers the calls."""
    run = _run_here(_Replaying)
    return (run.on_miss, run.live) if run is not None else (STATE.on_miss, STATE.live)


base_module._run_policy = _policy


def _apply(base: _Switch) -> None:
    switch = base.copy()
    for frame in _active:
        frame.fold(switch)
    switch.write()


def _latest(kind: type[_F]) -> _F | None:
    for frame in reversed(_active):
        if isinstance(frame, kind):
            return frame
    return None


def _run_here(kind: type[_F]) -> _F | None:
    """The active run of ``kind`` this task or thread is in, else the latest one."""
    frame = _here.get()
    if isinstance(frame, kind) and frame.active:
        return frame
    return _latest(kind)


class _Activation:
    """Context manager and decorator (sync or async functions) sharing enter/exit.

    Each entry (each ``with``, each call of a decorated function) is its own :class:`_Frame`,
    so a decorated function may run again, or twice at once, and re-entering ``with`` works.
    """

    def __init__(self) -> None:
        self._frames: list[_Frame] = []  # entered by ``with`` and not yet left

    def __enter__(self: _A) -> _A:
        self._frames.append(self._begin())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        # The frame this task or thread entered (``with`` blocks of one object may overlap in
        # separate tasks); else the latest.
        frame = _here.get()
        if frame is None or frame not in self._frames:
            if not self._frames:
                return
            if len(self._frames) > 1:
                log.warning("timetracer-otel: a %s block ended outside the task or thread that "
                            "began it, with other blocks of it running; ending the latest. Use "
                            "one object per task (or decorate the function).", type(self).__name__)
            frame = self._frames[-1]
        self._frames.remove(frame)
        self._end(frame, exc)

    def _begin(self) -> _Frame:
        raise NotImplementedError

    def _end(self, frame: _Frame, exc: BaseException | None) -> None:
        """End ``frame``; ``exc`` is the exception the block or function raised, if any."""
        raise NotImplementedError

    def __call__(self, fn: F) -> F:
        if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
            raise TypeError(
                f"{getattr(fn, '__qualname__', fn)!r} is a generator function, and a decorator "
                "cannot tell when it is finished; use a `with` block inside it instead."
            )
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                frame = self._begin()
                try:
                    result = await fn(*args, **kwargs)
                except BaseException as exc:
                    self._end(frame, exc)
                    raise
                self._end(frame, None)
                return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            frame = self._begin()
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:
                self._end(frame, exc)
                raise
            self._end(frame, None)
            return result

        return wrapper  # type: ignore[return-value]


@dataclass(slots=True, eq=False)
class _Recording(_Frame):
    writer: CassetteWriter
    dispatch: _Dispatch
    defer: bool
    max_payload_bytes: int

    def fold(self, switch: _Switch) -> None:
        switch.mode = Mode.RECORD
        switch.defer = self.defer  # shims may leave calls to this writer
        switch.max_payload_bytes = self.max_payload_bytes
        switch.writers[self.dispatch] = self.writer


class Recording(_Activation):
    """An active recording; ``paths`` lists the cassettes written once it has ended (for a
    decorator or a re-used block, those of every run so far)."""

    def __init__(
        self,
        dir: str | Path | None = None,
        *,
        format: Format | None = None,
        libraries: Iterable[str] | None = None,
        service_name: str | None = None,
    ) -> None:
        super().__init__()
        s = Settings.from_env()
        self.dir = str(dir) if dir is not None else s.dir
        if format is not None and format not in FORMATS:
            raise ConfigError(f"format={format!r} is not valid; use one of: {', '.join(FORMATS)}.")
        self.format: Format = format or s.format
        self.libraries = _libraries(libraries, "libraries")
        self.service_name = service_name
        self.settings = s
        self.paths: list[str] = []  # not the cassettes themselves: memory stays bounded
        self.writer: CassetteWriter | None = None  # the latest run's

    def _begin(self) -> _Frame:
        storage = storage_for(self.dir)
        storage.check()
        provider = sdk_provider(self.service_name)
        replay_shims.instrument(self.libraries)
        # (The limit reaches the writer's process through STATE, read when the first span
        # starts it: by then this run is active.)
        writer = CassetteWriter(
            storage,
            fmt=self.format,
            via="processor",
            sample_rate=self.settings.sample_rate,
            errors_only=self.settings.errors_only,
        )
        self.writer = writer
        frame = _Recording(writer, _dispatch_for(provider), not self.settings.span_payloads,
                           self.settings.max_payload_bytes)
        _activate(frame, frame.dispatch)
        return frame

    def _end(self, frame: _Frame, exc: BaseException | None) -> None:
        assert isinstance(frame, _Recording)
        provider = trace.get_tracer_provider()
        try:
            # Calls whose streamed response is still open (the app reads on, or dropped it and
            # no collection has run yet), then those dropped and being finished elsewhere.
            base_module.end_streams(frame)
            if isinstance(provider, TracerProvider):
                provider.force_flush()  # spans still queued in the app's own batch processors
        finally:  # whatever the flush raised (Ctrl-C, an app processor), this run is over
            _deactivate(frame)
            try:
                frame.writer.flush(process=True)
            finally:
                frame.writer.close()
                self.paths.extend(frame.writer.written)


@dataclass(slots=True, eq=False)
class _Replaying(_Frame):
    index: ReplayIndex
    on_miss: OnMiss
    live: frozenset[str]
    appended: list[SpanRecord]

    def fold(self, switch: _Switch) -> None:
        switch.mode = Mode.REPLAY
        switch.index = switch.appended = _ROUTED


class _Routed:
    """:data:`STATE`'s index and list of appended calls while ``replay()`` runs: each call is
    answered from (and recorded into) the run of its own task or thread, so two runs at once
    (a decorated coroutine gathered twice) each replay the whole cassette."""

    def _index(self) -> Answers:
        run = _run_here(_Replaying)
        if run is not None:
            return run.index
        base = _base  # a shim that read STATE.index just as the last run ended: what was before
        if base is not None and base.index is not None and base.index is not self:
            return base.index
        raise ReplayMissError("The replay() block has ended; no cassette is loaded.")

    def take(self, call: Call) -> Match | None:
        return self._index().take(call)

    def miss_message(self, call: Call, *, hint: str = "") -> str:
        return self._index().miss_message(call, hint=hint)

    def strand(self, call: Call) -> None:
        self._index().strand(call)

    def refuse(self, what: str) -> None:
        self._index().refuse(what)

    def first(self, library: str,
              where: Callable[[SpanRecord], bool] | None = None) -> SpanRecord | None:
        return self._index().first(library, where)

    def append(self, record: SpanRecord, /) -> None:
        run = _run_here(_Replaying)
        base = _base
        if run is not None:
            run.appended.append(record)
        elif base is not None and base.appended is not self:
            base.appended.append(record)


_ROUTED = _Routed()


class Replaying(_Activation):
    """An active replay; ``report`` tells what matched, by shape, missed and went unused, and
    ``appended`` holds the calls that went live and were recorded (``on_miss="record"``), both
    for the latest run. Every run (each ``with``, each call of a decorated function) replays
    the whole cassette afresh.

    Replaying from one file or directory (local or ``s3://``), the appended calls are kept
    there when the run ends (added to the file, or a new cassette in the directory; ``written``
    lists them), so the next replay answers them too. From several paths or a loaded Cassette
    they stay in ``appended`` only."""

    def __init__(
        self,
        cassette: str | Path | Sequence[str | Path] | Cassette | ReplayIndex,
        *,
        on_miss: str | OnMiss = OnMiss.ERROR,
        strict: bool = False,
        live: Iterable[str] = (),
        libraries: Iterable[str] | None = None,
    ) -> None:
        super().__init__()
        self._source: str | Path | None = None  # where on_miss="record" keeps what it records
        if isinstance(cassette, ReplayIndex):  # built by the caller (named sources); its strictness
            self.index = cassette
        elif isinstance(cassette, Cassette):
            self.index = ReplayIndex([("<cassette>", cassette)], strict=strict)
        else:
            paths = [cassette] if isinstance(cassette, str | Path) else list(cassette)
            self.index = ReplayIndex.from_paths(paths, strict=strict)
            if len(paths) == 1:
                self._source = paths[0]
        self.on_miss = on_miss if isinstance(on_miss, OnMiss) else OnMiss.parse(on_miss, "on_miss")
        self.live = frozenset(_libraries(live, "live") or ())  # a misspelt name is an error
        self.libraries = _libraries(libraries, "libraries")
        self.appended: list[SpanRecord] = []
        self.written: list[str] = []  # cassettes the appended calls were kept in
        self._fresh = True  # the index has not been replayed from yet

    @property
    def report(self) -> ReplayReport:
        return self.index.report()

    def _begin(self) -> _Frame:
        replay_shims.instrument(self.libraries)
        if self.written and self._source is not None:
            # A run kept new calls in the cassette: the next one replays them too.
            self.index = ReplayIndex.from_paths([self._source], strict=self.index.strict)
        elif not self._fresh:
            self.index = self.index.fresh()
        self._fresh = False
        self.appended = []
        frame = _Replaying(self.index, self.on_miss, self.live, self.appended)
        _activate(frame)
        return frame

    def _end(self, frame: _Frame, exc: BaseException | None) -> None:
        try:  # calls recorded on a miss whose streamed response is still open (see Recording)
            base_module.end_streams(frame)
        finally:
            _deactivate(frame)
        assert isinstance(frame, _Replaying)
        if not frame.appended or self._source is None:
            return
        # on_miss="record" from one path (local or s3://): kept where its next replay finds them.
        try:
            path = add_interactions(self._source, frame.appended, "processor",
                                    Settings.from_env().format,
                                    known=frame.index.key_counts())
            if path is not None:  # (None: another run of this replay kept them already)
                self.written.append(path)
        except CassetteError as error:
            if exc is None:
                raise
            # The block's own exception goes on; this one must not replace it.
            log.warning("timetracer-otel: %s", error)


@dataclass(slots=True, eq=False)
class _Moded(_Frame):
    mode: Mode

    def fold(self, switch: _Switch) -> None:
        switch.mode = self.mode


def hold_mode(mode: Mode) -> _Frame:
    """A run that only sets the mode, for a recorder that takes the spans itself (the pytest
    plugin): it nests and overlaps with ``record()``/``replay()`` runs like one of them.
    End it with :func:`release`."""
    frame = _Moded(mode)
    _activate(frame)
    return frame


def release(frame: _Frame) -> None:
    _deactivate(frame)


def _libraries(value: Iterable[str] | None, what: str) -> list[str] | None:
    """Library names given in code, checked as the environment's are: a misspelt one would
    leave that library recorded, replayed or live with no word said."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{what}={value!r} is not valid; give library names as strings.")
    library_names(",".join(names), what)
    return [n.strip().lower() for n in names if n.strip()]


def record(
    dir: str | Path | None = None,
    *,
    format: Format | None = None,
    libraries: Iterable[str] | None = None,
    service_name: str | None = None,
) -> Recording:
    """Record every dependency call made inside the block (or decorated function).

    Reuses the application's SDK TracerProvider, or installs one; installs the shims, then
    the OTel instrumentors of the importable libraries.
    """
    return Recording(dir, format=format, libraries=libraries, service_name=service_name)


def replay(
    cassette: str | Path | Sequence[str | Path] | Cassette | ReplayIndex,
    *,
    on_miss: str | OnMiss = OnMiss.ERROR,
    strict: bool = False,
    live: Iterable[str] = (),
    libraries: Iterable[str] | None = None,
) -> Replaying:
    """Answer every dependency call inside the block from ``cassette`` (a file, a directory,
    several of them, a loaded :class:`Cassette`, or a :class:`ReplayIndex` of them, whose
    own ``strict`` then applies).

    ``on_miss``: ``"error"`` raises ReplayMissError, ``"passthrough"`` calls the real
    dependency, ``"record"`` calls it and keeps the interaction in ``appended`` and, replaying
    from one file or directory (local or ``s3://``), in that cassette (see :class:`Replaying`).
    ``strict`` turns off shape matching; ``live`` names libraries that stay live.
    """
    return Replaying(cassette, on_miss=on_miss, strict=strict, live=live, libraries=libraries)
